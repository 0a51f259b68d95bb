//! The auth store as a member holds it: the applied [`AuthState`] (kept in
//! the replicated metadata under [`META_KEY`], so raft snapshots carry it),
//! the simple tokens handed out, and who a request's token names.
//!
//! Simple tokens (`--auth-token simple`, etcd's default) are random strings
//! made by the member that checked the password and proposed through raft,
//! so every member knows them. They live in memory only, as etcd's do: a
//! member that restarts forgets them and answers `etcdserver: invalid auth
//! token`, and etcd's clients authenticate again. A token lasts
//! `--auth-token-ttl` past its last use. Disabling auth forgets every token;
//! deleting a user or changing their password forgets theirs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_proto::etcdserverpb::{AuthRoleGrantPermissionRequest, AuthUserAddRequest};
use meridian_proto::meridian::v1::auth_change::Change;
use meridian_proto::meridian::v1::RequestAuth;
use parking_lot::{Mutex, RwLock};
use rand::Rng;
use tonic::metadata::MetadataMap;

use super::{AuthState, Perm, PermKind};
use crate::error::{Error, Result};
use crate::mvcc::Mvcc;

/// The metadata entry holding the auth store (JSON).
pub const META_KEY: &str = "auth";
/// The gRPC metadata keys a token comes in: etcd's clients send `token`;
/// its JSON gateway passes the `Authorization` header on.
const TOKEN_KEYS: [&str; 2] = ["token", "authorization"];
/// The metadata key a client certificate's CN travels in, set by the
/// client listener (never taken from a client).
pub const CLIENT_CN: &str = "x-meridian-client-cn";
/// Tokens held at most; past it the one nearest to expiry goes first.
const MAX_TOKENS: usize = 100_000;
const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// The raft index a simple token was handed out at (after its last `.`).
pub fn token_index(token: &str) -> Option<u64> {
    token.rsplit_once('.')?.1.parse().ok()
}

/// The token `metadata` carries: `token`, else `authorization`.
pub fn token_of(metadata: &MetadataMap) -> Option<&str> {
    TOKEN_KEYS.iter().find_map(|k| metadata.get(*k)).and_then(|v| v.to_str().ok())
}

/// etcd's `--bcrypt-cost` default (Go's bcrypt.DefaultCost; the bcrypt
/// crate's own default is 12).
pub const DEFAULT_BCRYPT_COST: u32 = 10;

/// `--auth-token`, `--auth-token-ttl` and `--bcrypt-cost`.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub token_ttl: Duration,
    pub bcrypt_cost: u32,
    /// `--auth-token jwt,...`: JWTs in place of simple tokens.
    pub jwt: Option<Arc<super::jwt::Jwt>>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { token_ttl: Duration::from_secs(300), bcrypt_cost: DEFAULT_BCRYPT_COST, jwt: None }
    }
}

/// Who made a request, as its token says, and the auth revision checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthInfo {
    /// Empty: no token (refused once auth is on, with `user name is empty`).
    pub user: String,
    pub revision: u64,
}

impl AuthInfo {
    /// What the proposal carries.
    pub fn header(&self) -> RequestAuth {
        RequestAuth { user: self.user.clone(), revision: self.revision }
    }
}

struct Token {
    user: String,
    expires: Instant,
}

pub struct AuthStore {
    state: RwLock<Arc<AuthState>>,
    tokens: Mutex<HashMap<String, Token>>,
    pub config: AuthConfig,
}

impl AuthStore {
    /// The store as `mvcc` holds it.
    pub fn load(mvcc: &Mvcc, config: AuthConfig) -> Self {
        let store = Self { state: RwLock::new(Arc::default()), tokens: Mutex::new(HashMap::new()), config };
        store.reload(mvcc);
        store
    }

    /// Reads the store again after a snapshot replaced the metadata.
    pub fn reload(&self, mvcc: &Mvcc) {
        let state = mvcc
            .meta(META_KEY)
            .map(|b| {
                serde_json::from_slice::<AuthState>(&b)
                    .unwrap_or_else(|e| panic!("the auth store does not decode: {e}"))
            })
            .unwrap_or_default();
        if !state.enabled {
            self.tokens.lock().clear();
        }
        *self.state.write() = Arc::new(state);
    }

    /// The auth store as of the last applied entry.
    pub fn state(&self) -> Arc<AuthState> {
        self.state.read().clone()
    }

    pub fn enabled(&self) -> bool {
        self.state.read().enabled
    }

    /// Who `metadata`'s token names. With auth off, nobody (and no check
    /// follows). A request without a token is its client certificate's CN
    /// (see [`CLIENT_CN`]), or nobody: the check refuses it with `user name
    /// is empty`. A token wins over a certificate, even a bad token.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAuthToken`] for a token this member does not know or
    /// that has expired.
    pub fn info(&self, metadata: &MetadataMap) -> Result<AuthInfo> {
        let state = self.state();
        if !state.enabled {
            return Ok(AuthInfo { user: String::new(), revision: state.revision });
        }
        let Some(token) = token_of(metadata) else {
            // No token: the client certificate's CN, if it showed one.
            let cn = metadata.get(CLIENT_CN).and_then(|v| v.to_str().ok()).unwrap_or_default();
            return Ok(AuthInfo { user: cn.to_string(), revision: state.revision });
        };
        if let Some(jwt) = &self.config.jwt {
            let (user, revision) = jwt.check(token).ok_or(Error::InvalidAuthToken)?;
            return Ok(AuthInfo { user, revision });
        }
        let now = Instant::now();
        let mut tokens = self.tokens.lock();
        match tokens.get_mut(token) {
            Some(t) if t.expires > now => {
                t.expires = now + self.config.token_ttl;
                Ok(AuthInfo { user: t.user.clone(), revision: state.revision })
            }
            Some(_) => {
                tokens.remove(token);
                Err(Error::InvalidAuthToken)
            }
            None => Err(Error::InvalidAuthToken),
        }
    }

    /// A fresh simple token's prefix, to be proposed: 16 random letters.
    pub fn new_token_prefix() -> String {
        let mut rng = rand::rng();
        (0..16).map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char).collect()
    }

    /// Checks `password` against `user`'s hash (bcrypt: on a blocking thread).
    ///
    /// # Errors
    ///
    /// [`Error::AuthNotEnabled`], or [`Error::AuthFailed`] for an unknown
    /// user, a user without a password, or a wrong password.
    pub async fn check_password(&self, user: &str, password: &str) -> Result<()> {
        let state = self.state();
        if !state.enabled {
            return Err(Error::AuthNotEnabled);
        }
        let hash = state.users.get(user).ok_or(Error::AuthFailed)?.password.clone().ok_or(Error::NoPasswordUser)?;
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        if ok {
            Ok(())
        } else {
            Err(Error::AuthFailed)
        }
    }

    /// `password`'s bcrypt hash at `--bcrypt-cost` (on a blocking thread).
    ///
    /// # Errors
    ///
    /// [`Error::Internal`] if bcrypt refuses (a cost out of its range).
    pub async fn hash(&self, password: String) -> Result<String> {
        let cost = self.config.bcrypt_cost;
        tokio::task::spawn_blocking(move || bcrypt::hash(password, cost))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(|e| Error::Internal(format!("bcrypt: {e}")))
    }

    /// Applies a committed change, the entry at raft `index`: the new state
    /// goes to `mvcc`'s metadata, in the batch being applied, and is what
    /// later requests see. A simple token is its prefix, `.`, and `index`
    /// (as etcd makes it): a member that has not applied `index` yet knows
    /// to wait for it ([`token_index`]). Returns the token handed out.
    ///
    /// # Errors
    ///
    /// etcd's refusal of the change; nothing changes then.
    pub fn apply(&self, change: &Change, index: u64, mvcc: &Mvcc) -> Result<Option<String>> {
        if let Change::SimpleToken(t) = change {
            let state = self.state();
            if !state.enabled {
                return Err(Error::AuthNotEnabled);
            }
            if !state.users.get(&t.user).is_some_and(|u| u.password.is_some()) {
                return Err(Error::AuthFailed);
            }
            let token = format!("{}.{index}", t.token);
            self.keep_token(&token, &t.user);
            return Ok(Some(token));
        }
        let mut next = (*self.state()).clone();
        apply_change(&mut next, change)?;
        match change {
            Change::Disable(_) => self.tokens.lock().clear(),
            Change::UserDelete(r) => self.forget_user(&r.name),
            Change::UserChangePassword(r) => self.forget_user(&r.name),
            _ => {}
        }
        mvcc.set_meta(META_KEY, serde_json::to_vec(&next).expect("auth store encodes"));
        *self.state.write() = Arc::new(next);
        Ok(None)
    }

    /// Replaces the whole store with a primary's (`store` as
    /// `Mirror.AuthStore` gives it), on a secondary, in apply.
    ///
    /// # Errors
    ///
    /// [`Error::Fenced`] for a store that does not decode; nothing changes.
    pub fn replace(&self, store: &[u8], mvcc: &Mvcc) -> Result<()> {
        let next: AuthState = serde_json::from_slice(store)
            .map_err(|e| Error::Fenced(format!("the source's auth store does not decode: {e}")))?;
        // Tokens go with their user, as a deletion or a new password here would take them.
        let old = self.state();
        let kept = |user: &str| old.users.get(user).map(|u| &u.password) == next.users.get(user).map(|u| &u.password);
        let mut tokens = self.tokens.lock();
        tokens.retain(|_, t| next.enabled && next.users.contains_key(&t.user) && kept(&t.user));
        drop(tokens);
        mvcc.set_meta(META_KEY, store.to_vec());
        *self.state.write() = Arc::new(next);
        Ok(())
    }

    fn keep_token(&self, token: &str, user: &str) {
        let now = Instant::now();
        let mut tokens = self.tokens.lock();
        if tokens.len() >= MAX_TOKENS {
            tokens.retain(|_, t| t.expires > now);
            if tokens.len() >= MAX_TOKENS {
                if let Some(first) = tokens.iter().min_by_key(|(_, t)| t.expires).map(|(k, _)| k.clone()) {
                    tokens.remove(&first);
                }
            }
        }
        tokens.insert(token.to_string(), Token { user: user.to_string(), expires: now + self.config.token_ttl });
    }

    fn forget_user(&self, user: &str) {
        self.tokens.lock().retain(|_, t| t.user != user);
    }
}

/// One auth change on `state`, etcd's rules (see [`AuthState`]).
fn apply_change(state: &mut AuthState, change: &Change) -> Result<()> {
    match change {
        Change::Enable(_) => state.enable(),
        Change::Disable(_) => state.disable(),
        Change::UserAdd(AuthUserAddRequest { name, password, options }) => {
            let no_password = options.as_ref().is_some_and(|o| o.no_password);
            state.user_add(name, (!no_password).then(|| password.clone()))
        }
        Change::UserDelete(r) => state.user_delete(&r.name),
        // A user added with no password stays one (etcd keeps its flag).
        Change::UserChangePassword(r) => {
            let had = state.users.get(&r.name).map(|u| u.password.is_some());
            state.user_change_password(&r.name, had.unwrap_or(true).then(|| r.password.clone()))
        }
        Change::UserGrantRole(r) => state.user_grant_role(&r.user, &r.role),
        Change::UserRevokeRole(r) => state.user_revoke_role(&r.name, &r.role),
        Change::RoleAdd(r) => state.role_add(&r.name),
        Change::RoleDelete(r) => state.role_delete(&r.role),
        Change::RoleGrantPermission(AuthRoleGrantPermissionRequest { name, perm }) => {
            let perm = perm.as_ref().ok_or(Error::PermissionNotGiven)?;
            let kind = match perm.perm_type {
                0 => PermKind::Read,
                1 => PermKind::Write,
                2 => PermKind::ReadWrite,
                _ => return Err(Error::InvalidAuthMgmt),
            };
            state.role_grant_permission(name, Perm { kind, key: perm.key.clone(), range_end: perm.range_end.clone() })
        }
        Change::RoleRevokePermission(r) => state.role_revoke_permission(&r.role, &r.key, &r.range_end),
        Change::SimpleToken(_) => Ok(()),
    }
}
