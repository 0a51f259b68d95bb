//! etcd 3.4's auth store as data: users, roles, their key permissions, the
//! enabled flag and the auth revision, with etcd's rules for every change
//! and its permission check. It holds no state of its own and does no I/O:
//! it is meant to live in the replicated metadata and change only in apply,
//! so every member decides the same.
//!
//! Not served yet (issue 12 item 2): the Auth RPCs answer `UNIMPLEMENTED`
//! and no request is checked. What remains is to carry each change through
//! raft (hashing passwords with bcrypt before proposing, so apply stays
//! deterministic), tokens (simple and JWT), and the checks on every call.
//!
//! # Rules (etcd 3.4's)
//!
//! - `root` is an ordinary user and role until auth is enabled; enabling
//!   needs the user `root` with the role `root`. While enabled, the user
//!   `root` cannot be deleted nor lose the role `root`, and the role cannot
//!   be deleted (`etcdserver: invalid auth management`).
//! - A user's roles are kept sorted; granting a role twice is no error.
//! - A role's permissions are kept sorted by key; granting the same key and
//!   range again replaces its type.
//! - Every change that succeeds moves the auth revision on, but enabling
//!   auth and granting a role already held. A new store is at revision 1.
//! - A user added with no password cannot authenticate with one (only by
//!   a client certificate).
//!
//! # Permission check
//!
//! A permission covers `[key, range_end)`: an empty `range_end` is the key
//! alone, `"\0"` every key from `key` on. A request's range is permitted when
//! one interval of the union of the user's permissions of that type (READ
//! or WRITE; READWRITE counts as both) covers it whole. The role `root`
//! may do everything.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The user and role that may do everything once auth is on.
pub const ROOT: &str = "root";

/// What a permission allows (authpb.Permission.Type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PermKind {
    Read,
    Write,
    ReadWrite,
}

impl PermKind {
    fn allows(self, wanted: PermKind) -> bool {
        self == PermKind::ReadWrite || self == wanted
    }
}

/// One key permission of a role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Perm {
    pub kind: PermKind,
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The bcrypt hash of the password; `None` for a user added with
    /// `--no-password` (it can only be used through a client certificate).
    pub password: Option<String>,
    /// Sorted.
    pub roles: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// Sorted by key, then range end.
    pub perms: Vec<Perm>,
}

/// The whole auth store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthState {
    pub enabled: bool,
    /// etcd's auth revision: moves on with every change that succeeds.
    pub revision: u64,
    pub users: BTreeMap<String, User>,
    pub roles: BTreeMap<String, Role>,
}

/// An interval of keys: `[start, end)`, `None` for no end.
type Interval = (Vec<u8>, Option<Vec<u8>>);

impl Default for AuthState {
    fn default() -> Self {
        Self { enabled: false, revision: 1, users: BTreeMap::new(), roles: BTreeMap::new() }
    }
}

/// The keys `[key, range_end)` names, etcd's way.
fn interval(key: &[u8], range_end: &[u8]) -> Interval {
    match range_end {
        [] => {
            let mut end = key.to_vec();
            end.push(0);
            (key.to_vec(), Some(end))
        }
        [0] => (key.to_vec(), None),
        end => (key.to_vec(), Some(end.to_vec())),
    }
}

impl AuthState {
    fn changed(&mut self) -> Result<()> {
        self.revision += 1;
        Ok(())
    }

    fn user_mut(&mut self, name: &str) -> Result<&mut User> {
        self.users.get_mut(name).ok_or(Error::UserNotFound)
    }

    /// AuthEnable: needs the user `root` holding the role `root`; enabling
    /// twice is no error.
    pub fn enable(&mut self) -> Result<()> {
        if self.enabled {
            return Ok(());
        }
        let root = self.users.get(ROOT).ok_or(Error::RootUserNotExist)?;
        if !root.roles.iter().any(|r| r == ROOT) {
            return Err(Error::RootRoleNotExist);
        }
        // As etcd: enabling does not move the revision on (disabling does).
        self.enabled = true;
        Ok(())
    }

    pub fn disable(&mut self) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        self.enabled = false;
        self.changed()
    }

    /// UserAdd, with the password already hashed (`None`: no password).
    pub fn user_add(&mut self, name: &str, password: Option<String>) -> Result<()> {
        if name.is_empty() {
            return Err(Error::UserEmpty);
        }
        if self.users.contains_key(name) {
            return Err(Error::UserExists);
        }
        self.users.insert(name.to_string(), User { password, roles: Vec::new() });
        self.changed()
    }

    pub fn user_delete(&mut self, name: &str) -> Result<()> {
        if self.enabled && name == ROOT {
            return Err(Error::InvalidAuthMgmt);
        }
        self.users.remove(name).ok_or(Error::UserNotFound)?;
        self.changed()
    }

    pub fn user_change_password(&mut self, name: &str, password: Option<String>) -> Result<()> {
        self.user_mut(name)?.password = password;
        self.changed()
    }

    pub fn user_grant_role(&mut self, name: &str, role: &str) -> Result<()> {
        if !self.users.contains_key(name) {
            return Err(Error::UserNotFound);
        }
        if role != ROOT && !self.roles.contains_key(role) {
            return Err(Error::RoleNotFound);
        }
        let user = self.user_mut(name)?;
        match user.roles.binary_search_by(|r| r.as_str().cmp(role)) {
            Ok(_) => Ok(()),
            Err(at) => {
                user.roles.insert(at, role.to_string());
                self.changed()
            }
        }
    }

    pub fn user_revoke_role(&mut self, name: &str, role: &str) -> Result<()> {
        if self.enabled && name == ROOT && role == ROOT {
            return Err(Error::InvalidAuthMgmt);
        }
        let user = self.user_mut(name)?;
        let at = user.roles.binary_search_by(|r| r.as_str().cmp(role)).map_err(|_| Error::RoleNotGranted)?;
        user.roles.remove(at);
        self.changed()
    }

    pub fn role_add(&mut self, name: &str) -> Result<()> {
        if name.is_empty() {
            return Err(Error::RoleEmpty);
        }
        if self.roles.contains_key(name) {
            return Err(Error::RoleExists);
        }
        self.roles.insert(name.to_string(), Role::default());
        self.changed()
    }

    /// RoleDelete: also taken from every user that held it.
    pub fn role_delete(&mut self, name: &str) -> Result<()> {
        if self.enabled && name == ROOT {
            return Err(Error::InvalidAuthMgmt);
        }
        self.roles.remove(name).ok_or(Error::RoleNotFound)?;
        for user in self.users.values_mut() {
            user.roles.retain(|r| r != name);
        }
        self.changed()
    }

    pub fn role_grant_permission(&mut self, name: &str, perm: Perm) -> Result<()> {
        let role = self.roles.get_mut(name).ok_or(Error::RoleNotFound)?;
        let place = role.perms.binary_search_by(|p| (&p.key, &p.range_end).cmp(&(&perm.key, &perm.range_end)));
        match place {
            Ok(at) => role.perms[at].kind = perm.kind,
            Err(at) => role.perms.insert(at, perm),
        }
        self.changed()
    }

    pub fn role_revoke_permission(&mut self, name: &str, key: &[u8], range_end: &[u8]) -> Result<()> {
        let role = self.roles.get_mut(name).ok_or(Error::RoleNotFound)?;
        let before = role.perms.len();
        role.perms.retain(|p| !(p.key == key && p.range_end == range_end));
        if role.perms.len() == before {
            return Err(Error::PermissionNotGranted);
        }
        self.changed()
    }

    /// Whether `user` holds the role `root`.
    pub fn is_admin(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.roles.iter().any(|r| r == ROOT))
    }

    /// Whether `user` may `wanted` the keys `[key, range_end)`; always
    /// while auth is off.
    ///
    /// # Errors
    ///
    /// [`Error::UserEmpty`] for no user, [`Error::PermissionDenied`] when no
    /// permission covers the range (or the user is gone).
    pub fn check(&self, user: &str, wanted: PermKind, key: &[u8], range_end: &[u8]) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() {
            return Err(Error::UserEmpty);
        }
        let Some(u) = self.users.get(user) else { return Err(Error::PermissionDenied) };
        if u.roles.iter().any(|r| r == ROOT) {
            return Ok(());
        }
        let mut granted: Vec<Interval> = u
            .roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .flat_map(|r| r.perms.iter())
            .filter(|p| p.kind.allows(wanted))
            .map(|p| interval(&p.key, &p.range_end))
            .collect();
        granted.sort();
        let (want_start, want_end) = interval(key, range_end);
        let mut merged: Option<Interval> = None;
        let covers = |(start, end): &Interval| {
            *start <= want_start
                && match (end, &want_end) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(e), Some(w)) => w <= e,
                }
        };
        for (start, end) in granted {
            merged = match merged {
                // Overlapping or adjacent: one interval.
                Some((s, Some(e))) if start <= e => {
                    let end = match end {
                        None => None,
                        Some(x) => Some(x.max(e)),
                    };
                    Some((s, end))
                }
                Some((s, None)) => Some((s, None)),
                Some(done) => {
                    if covers(&done) {
                        return Ok(());
                    }
                    Some((start, end))
                }
                None => Some((start, end)),
            };
        }
        match merged {
            Some(m) if covers(&m) => Ok(()),
            _ => Err(Error::PermissionDenied),
        }
    }
}

pub mod check;
pub mod jwt;
pub mod service;
pub mod store;

#[cfg(test)]
mod tests;
