//! What each etcd request needs of its user, etcd 3.4's way: a range read
//! needs READ over the range; a put or a delete WRITE over its keys, and
//! READ too when it asks for the previous values; a txn each of its compares
//! READ and every request of both branches what it needs alone; attaching
//! a key to a lease, or revoking one, WRITE over every key the lease holds
//! (a user who could not revoke a lease must not extend it, nor keep it
//! alive); granting one or listing them, a user; a lease's TTL with its
//! keys, READ over them. Membership and auth changes, compaction, alarms
//! raised or cleared, and the maintenance calls that read or move the whole
//! store need the role `root`. (etcd 3.4.23 leaves compaction, leases,
//! alarms, nested txns and a txn put's previous value unchecked; later 3.4
//! releases check them as here.)
//!
//! The same checks run when the member takes the call and again in apply,
//! against the auth store as of that entry (see [`AuthState::permits`]).

use meridian_proto::etcdserverpb::request_op::Request as Op;
use meridian_proto::etcdserverpb::{DeleteRangeRequest, PutRequest, TxnRequest};
use meridian_proto::meridian::v1::auth_change::Change;
use meridian_proto::meridian::v1::internal_request::Request;
use meridian_proto::meridian::v1::RequestAuth;

use super::store::AuthInfo;
use super::{AuthState, PermKind};
use crate::error::{Error, Result};

/// The keys a lease holds, by lease id.
pub type LeaseKeys<'a> = &'a dyn Fn(i64) -> Vec<Vec<u8>>;

impl AuthState {
    /// Whether `user` holds the role `root`; always while auth is off.
    ///
    /// # Errors
    ///
    /// [`Error::UserEmpty`], [`Error::UserNotFound`] or
    /// [`Error::PermissionDenied`].
    pub fn check_admin(&self, user: &str) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() {
            return Err(Error::UserEmpty);
        }
        if !self.users.contains_key(user) {
            return Err(Error::UserNotFound);
        }
        if self.is_admin(user) {
            Ok(())
        } else {
            Err(Error::PermissionDenied)
        }
    }

    /// etcd's first checks of a KV call, in its order: a user, then an auth
    /// store that has not moved on since their token was made (a JWT
    /// carries the revision it was signed at; a simple token is always
    /// current).
    ///
    /// # Errors
    ///
    /// [`Error::UserEmpty`], [`Error::AuthOldRevision`].
    pub fn check_fresh(&self, who: &AuthInfo) -> Result<()> {
        self.fresh(&who.user, who.revision)
    }

    fn fresh(&self, user: &str, revision: u64) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() {
            return Err(Error::UserEmpty);
        }
        if revision < self.revision {
            return Err(Error::AuthOldRevision);
        }
        Ok(())
    }

    /// A read of `[key, range_end)`.
    ///
    /// # Errors
    ///
    /// As [`AuthState::check`].
    pub fn check_range(&self, user: &str, key: &[u8], range_end: &[u8]) -> Result<()> {
        self.check(user, PermKind::Read, key, range_end)
    }

    /// # Errors
    ///
    /// As [`AuthState::check`].
    pub fn check_put(&self, user: &str, p: &PutRequest, lease_keys: LeaseKeys<'_>) -> Result<()> {
        self.check(user, PermKind::Write, &p.key, &[])?;
        if p.prev_kv {
            self.check(user, PermKind::Read, &p.key, &[])?;
        }
        if p.lease != 0 {
            self.check_lease(user, p.lease, lease_keys)?;
        }
        Ok(())
    }

    /// # Errors
    ///
    /// As [`AuthState::check`].
    pub fn check_delete(&self, user: &str, d: &DeleteRangeRequest) -> Result<()> {
        self.check(user, PermKind::Write, &d.key, &d.range_end)?;
        if d.prev_kv {
            self.check(user, PermKind::Read, &d.key, &d.range_end)?;
        }
        Ok(())
    }

    /// Every compare and both branches, whichever would run.
    ///
    /// # Errors
    ///
    /// As [`AuthState::check`].
    pub fn check_txn(&self, user: &str, t: &TxnRequest, lease_keys: LeaseKeys<'_>) -> Result<()> {
        for c in &t.compare {
            self.check(user, PermKind::Read, &c.key, &c.range_end)?;
        }
        for op in t.success.iter().chain(&t.failure) {
            match &op.request {
                Some(Op::RequestRange(r)) => self.check_range(user, &r.key, &r.range_end)?,
                Some(Op::RequestPut(p)) => self.check_put(user, p, lease_keys)?,
                Some(Op::RequestDeleteRange(d)) => self.check_delete(user, d)?,
                Some(Op::RequestTxn(t)) => self.check_txn(user, t, lease_keys)?,
                None => {}
            }
        }
        Ok(())
    }

    /// WRITE over every key lease `id` holds.
    ///
    /// # Errors
    ///
    /// As [`AuthState::check`].
    pub fn check_lease(&self, user: &str, id: i64, lease_keys: LeaseKeys<'_>) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        lease_keys(id).iter().try_for_each(|k| self.check(user, PermKind::Write, k, &[]))
    }

    /// Whether the request that `auth` made may apply now: the user's
    /// permissions as of this entry, and an auth store that has not moved on
    /// since the member that took the call checked it (etcd's
    /// `ErrAuthOldRevision`; the client authenticates again and retries).
    /// Requests the server makes itself carry no `auth` and are not checked.
    ///
    /// # Errors
    ///
    /// [`Error::UserEmpty`], [`Error::AuthOldRevision`],
    /// [`Error::PermissionDenied`].
    pub fn permits(&self, auth: &RequestAuth, request: &Request, lease_keys: LeaseKeys<'_>) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        // A token needs no user: its user's password was checked.
        if let Request::AuthChange(c) = request {
            if matches!(c.change, Some(Change::SimpleToken(_))) {
                return Ok(());
            }
        }
        let user = auth.user.as_str();
        // Admin calls do not look at the revision, as in etcd.
        if let Request::AuthChange(_) | Request::MemberChange(_) | Request::Compaction(_) = request {
            return self.check_admin(user);
        }
        self.fresh(user, auth.revision)?;
        match request {
            Request::Put(p) => self.check_put(user, p, lease_keys),
            Request::DeleteRange(d) => self.check_delete(user, d),
            Request::Txn(t) => self.check_txn(user, t, lease_keys),
            Request::LeaseRevoke(r) => self.check_lease(user, r.id, lease_keys),
            _ => Ok(()),
        }
    }
}
