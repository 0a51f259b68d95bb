//! Leases: time-to-live handles that keys attach to, as etcd's.
//!
//! What is replicated (through raft, applied on every member): grants,
//! revokes (which delete the attached keys in one revision), and
//! checkpoints of remaining TTLs. Each lease is kept in the MVCC store's
//! metadata as `lease/<id>` → (granted TTL, checkpointed remaining TTL); which
//! keys are attached follows from the keys' own `lease` field, so it is
//! rebuilt from the key index at startup and kept current from the writes'
//! [`LeaseMove`]s.
//!
//! What is not replicated: expiry. Only the leader (the *primary* lessor)
//! keeps deadlines. Keep-alives renew them on the leader (followers forward,
//! see `service`), and when a deadline passes the leader proposes a revoke,
//! so every member deletes the same keys at the same revision. A new leader
//! starts each lease's clock from its last checkpoint (or its full TTL), plus
//! one election timeout, as etcd does; checkpoints every
//! `--experimental-lease-checkpoint-interval` bound how much a leader change
//! can extend a lease, and carry remaining TTLs across a full restart.

pub mod service;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use meridian_proto::etcdserverpb::LeaseCheckpoint;
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::mvcc::{LeaseMove, Mvcc};

/// etcd's largest TTL, in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// Metadata names of leases start with this.
pub const LEASE_META_PREFIX: &str = "lease/";
/// How long a proposed revoke is given before the leader proposes it again.
const REVOKE_RETRY: Duration = Duration::from_secs(3);

#[derive(Default, Debug)]
struct Lease {
    /// Granted TTL in seconds.
    ttl: i64,
    /// Remaining TTL at the last checkpoint (0: none since the last renewal).
    remaining: i64,
    keys: BTreeSet<Vec<u8>>,
    /// Deadline, on the leader only.
    expiry: Option<Instant>,
    /// When its grant applied on this member (`None` if loaded from the store).
    granted_at: Option<Instant>,
}

#[derive(Default)]
struct State {
    leases: HashMap<i64, Lease>,
    primary: bool,
}

/// Every lease of the member.
pub struct Lessor {
    state: Mutex<State>,
    /// Shorter TTLs are raised to this (etcd: 1.5 election timeouts, in whole seconds).
    min_ttl: i64,
    /// Grace a new leader adds to every lease.
    promote_extension: Duration,
}

/// A lease's stored metadata: its TTL and its checkpointed remaining TTL.
pub fn encode_lease_meta(ttl: i64, remaining: i64) -> Vec<u8> {
    let mut b = ttl.to_be_bytes().to_vec();
    b.extend_from_slice(&remaining.to_be_bytes());
    b
}

/// The (TTL, remaining TTL) of [`encode_lease_meta`]; `None` if malformed.
pub fn decode_lease_meta(v: &[u8]) -> Option<(i64, i64)> {
    let ttl = i64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let remaining = i64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    (v.len() == 16).then_some((ttl, remaining))
}

impl Lessor {
    /// A lessor for a member with this election timeout.
    pub fn new(election_timeout: Duration) -> Self {
        let min = (election_timeout.as_secs_f64() * 1.5).ceil() as i64;
        Self { state: Mutex::default(), min_ttl: min.max(1), promote_extension: election_timeout }
    }

    /// Reloads every lease and its keys from the store (startup, snapshot).
    pub fn rebuild(&self, mvcc: &Mvcc) {
        let (stored, leased) = (mvcc.meta_with_prefix(LEASE_META_PREFIX), mvcc.leased_keys());
        let mut st = self.state.lock();
        st.leases.clear();
        for (name, v) in stored {
            let Ok(id) = name[LEASE_META_PREFIX.len()..].parse::<i64>() else { continue };
            let Some((ttl, remaining)) = decode_lease_meta(&v) else { continue };
            st.leases.insert(id, Lease { ttl, remaining, ..Default::default() });
        }
        for (key, id) in leased {
            if let Some(l) = st.leases.get_mut(&id) {
                l.keys.insert(key);
            }
        }
        if st.primary {
            self.start_clocks(&mut st, None);
        }
    }

    /// Starts every lease's clock from its checkpointed remaining TTL (its
    /// full TTL if none), plus the grace a new leader gives, since a former
    /// leader may have renewed it unseen. A lease granted while this member
    /// already led (`leader_since`) has had no other leader: its clock runs
    /// from its grant, so a 3 s lease granted right after startup is gone 3 s
    /// later, not 3 s plus an election timeout.
    fn start_clocks(&self, st: &mut State, leader_since: Option<Instant>) {
        let now = Instant::now();
        for l in st.leases.values_mut() {
            l.expiry = Some(match (l.granted_at, leader_since) {
                (Some(granted), Some(since)) if granted >= since => granted + secs(l.ttl),
                _ => now + self.promote_extension + secs(if l.remaining > 0 { l.remaining } else { l.ttl }),
            });
        }
    }

    fn store(mvcc: &Mvcc, id: i64, l: &Lease) {
        mvcc.set_meta(&format!("{LEASE_META_PREFIX}{id}"), encode_lease_meta(l.ttl, l.remaining));
    }

    // ---- Apply side: deterministic, called by the state machine. ----

    /// Grants lease `id`; returns the TTL actually granted.
    ///
    /// # Errors
    ///
    /// etcd's lease errors: id 0 or already in use, TTL too large.
    pub fn grant(&self, mvcc: &Mvcc, id: i64, ttl: i64) -> Result<i64> {
        if id == 0 {
            return Err(Error::LeaseNotFound);
        }
        if ttl > MAX_LEASE_TTL {
            return Err(Error::LeaseTtlTooLarge);
        }
        let mut st = self.state.lock();
        if st.leases.contains_key(&id) {
            return Err(Error::LeaseExists);
        }
        let ttl = ttl.max(self.min_ttl);
        let now = Instant::now();
        let expiry = st.primary.then(|| now + secs(ttl));
        let lease = Lease { ttl, expiry, granted_at: Some(now), ..Default::default() };
        Self::store(mvcc, id, &lease);
        st.leases.insert(id, lease);
        Ok(ttl)
    }

    /// Creates a mirrored lease with its source's id, granted TTL and the
    /// remaining TTL the source reported (0: unknown), unless it exists. A
    /// secondary never expires it; its revoke arrives by mirror.
    pub fn adopt(&self, mvcc: &Mvcc, id: i64, ttl: i64, remaining: i64) {
        let mut st = self.state.lock();
        if id == 0 || st.leases.contains_key(&id) {
            return;
        }
        let lease = Lease { ttl, remaining: remaining.clamp(0, ttl), ..Default::default() };
        Self::store(mvcc, id, &lease);
        st.leases.insert(id, lease);
    }

    /// The keys attached to `id`, in key order, for its revoke.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseNotFound`].
    pub fn keys(&self, id: i64) -> Result<Vec<Vec<u8>>> {
        let st = self.state.lock();
        st.leases.get(&id).map(|l| l.keys.iter().cloned().collect()).ok_or(Error::LeaseNotFound)
    }

    /// Forgets a revoked lease.
    pub fn remove(&self, mvcc: &Mvcc, id: i64) {
        if self.state.lock().leases.remove(&id).is_some() {
            mvcc.remove_meta(&format!("{LEASE_META_PREFIX}{id}"));
        }
    }

    /// Records a lease's remaining TTL as the leader measured it.
    pub fn checkpoint(&self, mvcc: &Mvcc, id: i64, remaining: i64) {
        let mut st = self.state.lock();
        if let Some(l) = st.leases.get_mut(&id) {
            l.remaining = remaining;
            Self::store(mvcc, id, l);
        }
    }

    /// A promotion: every lease gets its full TTL again (its remaining TTL
    /// is forgotten), as etcd does on a leader change, since clients kept it
    /// alive on the old primary unseen.
    pub fn rearm_full(&self, mvcc: &Mvcc) {
        let mut st = self.state.lock();
        for (id, l) in st.leases.iter_mut() {
            if l.remaining != 0 {
                l.remaining = 0;
                Self::store(mvcc, *id, l);
            }
        }
    }

    pub fn exists(&self, id: i64) -> bool {
        self.state.lock().leases.contains_key(&id)
    }

    /// Keeps the key sets current after a write.
    pub fn apply_moves(&self, moves: Vec<LeaseMove>) {
        if moves.is_empty() {
            return;
        }
        let mut st = self.state.lock();
        for m in moves {
            if let Some(l) = st.leases.get_mut(&m.from) {
                l.keys.remove(&m.key);
            }
            if let Some(l) = st.leases.get_mut(&m.to) {
                l.keys.insert(m.key);
            }
        }
    }

    // ---- Leader side. ----

    /// Becomes the primary: starts every lease's clock (see `start_clocks`;
    /// `leader_since` is when this member became leader). Returns true if it
    /// was not primary before.
    pub fn promote(&self, leader_since: Option<Instant>) -> bool {
        let mut st = self.state.lock();
        if st.primary {
            return false;
        }
        st.primary = true;
        self.start_clocks(&mut st, leader_since);
        true
    }

    /// Stops keeping deadlines (no longer leader).
    pub fn demote(&self) {
        let mut st = self.state.lock();
        if st.primary {
            st.primary = false;
            for l in st.leases.values_mut() {
                l.expiry = None;
            }
        }
    }

    /// Renews a lease on the leader: its clock restarts at the full TTL.
    /// Returns the TTL, 0 if the lease does not exist, and whether a
    /// checkpointed remaining TTL must be cleared (through raft).
    ///
    /// # Errors
    ///
    /// [`Error::NotLeader`] on a member that is not the primary.
    pub fn renew(&self, id: i64) -> Result<(i64, bool)> {
        let mut st = self.state.lock();
        if !st.primary {
            return Err(Error::NotLeader);
        }
        let Some(l) = st.leases.get_mut(&id) else { return Ok((0, false)) };
        l.expiry = Some(Instant::now() + secs(l.ttl));
        Ok((l.ttl, l.remaining != 0))
    }

    /// Remaining TTL (seconds, -1 if unknown), granted TTL and, if asked, the
    /// attached keys — measured on the leader.
    ///
    /// # Errors
    ///
    /// [`Error::NotLeader`] on a member that is not the primary.
    pub fn time_to_live(&self, id: i64, with_keys: bool) -> Result<(i64, i64, Vec<Vec<u8>>)> {
        let st = self.state.lock();
        if !st.primary {
            return Err(Error::NotLeader);
        }
        let Some(l) = st.leases.get(&id) else { return Ok((-1, 0, Vec::new())) };
        let remaining = l.expiry.map_or(l.ttl, |e| e.saturating_duration_since(Instant::now()).as_secs() as i64);
        let keys = if with_keys { l.keys.iter().cloned().collect() } else { Vec::new() };
        Ok((remaining, l.ttl, keys))
    }

    /// What a secondary knows of a mirrored lease: its remaining TTL as of
    /// the last figure its source sent (the granted TTL if none), its
    /// granted TTL and, if asked, its keys. -1 for an unknown lease, as etcd.
    /// A secondary keeps no clocks: the source decides expiry.
    pub fn mirrored_time_to_live(&self, id: i64, with_keys: bool) -> (i64, i64, Vec<Vec<u8>>) {
        let st = self.state.lock();
        let Some(l) = st.leases.get(&id) else { return (-1, 0, Vec::new()) };
        let remaining = if l.remaining > 0 { l.remaining } else { l.ttl };
        let keys = if with_keys { l.keys.iter().cloned().collect() } else { Vec::new() };
        (remaining, l.ttl, keys)
    }

    /// Leases past their deadline, at most `limit`; each is given a retry
    /// delay so one expiry is proposed once per [`REVOKE_RETRY`].
    pub fn expired(&self, limit: usize) -> Vec<i64> {
        let mut st = self.state.lock();
        if !st.primary {
            return Vec::new();
        }
        let now = Instant::now();
        let mut out = Vec::new();
        for (id, l) in st.leases.iter_mut() {
            if out.len() == limit {
                break;
            }
            if l.expiry.is_some_and(|e| e <= now) {
                l.expiry = Some(now + REVOKE_RETRY);
                out.push(*id);
            }
        }
        out
    }

    /// The remaining TTL of every lease whose remaining time differs from
    /// its checkpoint, for the leader's periodic checkpoint.
    pub fn checkpoints(&self) -> Vec<LeaseCheckpoint> {
        let st = self.state.lock();
        if !st.primary {
            return Vec::new();
        }
        let now = Instant::now();
        let mut out: Vec<LeaseCheckpoint> = st
            .leases
            .iter()
            .filter_map(|(id, l)| {
                let remaining = l.expiry?.saturating_duration_since(now).as_secs() as i64;
                (remaining != l.remaining && remaining < l.ttl)
                    .then_some(LeaseCheckpoint { id: *id, remaining_ttl: remaining.max(1) })
            })
            .collect();
        out.sort_by_key(|c| c.id);
        out
    }

    /// Every lease id, ascending.
    pub fn leases(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.state.lock().leases.keys().copied().collect();
        ids.sort_unstable();
        ids
    }
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(u64::try_from(s).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Mvcc) {
        let dir = tempfile::tempdir().unwrap();
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        (dir, Mvcc::open(db, None).unwrap())
    }

    #[test]
    fn grant_rules_match_etcd() {
        let (_d, m) = store();
        let l = Lessor::new(Duration::from_millis(1000));
        assert_eq!(l.grant(&m, 5, 1).unwrap(), 2, "a TTL below 1.5 election timeouts is raised");
        assert!(matches!(l.grant(&m, 5, 10), Err(Error::LeaseExists)));
        assert!(matches!(l.grant(&m, 6, MAX_LEASE_TTL + 1), Err(Error::LeaseTtlTooLarge)));
        assert_eq!(l.grant(&m, 7, 60).unwrap(), 60);
        assert_eq!(l.leases(), [5, 7]);
    }

    /// A new leader gives the leases a former leader may have renewed an
    /// election timeout of grace, but not those granted while it already led.
    #[test]
    fn a_lease_granted_under_this_leader_runs_from_its_grant() {
        let (_d, m) = store();
        let l = Lessor::new(Duration::from_secs(5));
        l.grant(&m, 1, 30).unwrap();
        let since = Instant::now();
        l.grant(&m, 2, 30).unwrap();
        assert!(l.promote(Some(since)));
        let (older, _, _) = l.time_to_live(1, false).unwrap();
        let (newer, _, _) = l.time_to_live(2, false).unwrap();
        assert!((34..=35).contains(&older), "granted before this leader: 30 s plus 5 s of grace, got {older}");
        assert!((29..=30).contains(&newer), "granted under this leader: its own 30 s, got {newer}");
    }

    #[test]
    fn only_the_primary_keeps_time_and_checkpoints_survive_rebuild() {
        let (_d, m) = store();
        let l = Lessor::new(Duration::from_millis(100));
        l.grant(&m, 1, 100).unwrap();
        assert!(matches!(l.renew(1), Err(Error::NotLeader)));
        assert!(l.expired(10).is_empty());
        assert!(l.promote(None));
        assert_eq!(l.renew(1).unwrap(), (100, false));
        assert_eq!(l.renew(2).unwrap(), (0, false), "an unknown lease renews to TTL 0");
        let (remaining, granted, _) = l.time_to_live(1, false).unwrap();
        assert_eq!(granted, 100);
        assert!((98..=100).contains(&remaining));
        assert_eq!(l.time_to_live(9, false).unwrap().0, -1);
        l.checkpoint(&m, 1, 40);
        assert_eq!(l.renew(1).unwrap(), (100, true), "a renewal must clear the checkpoint");

        // A new primary starts from the checkpoint, not the full TTL.
        let fresh = Lessor::new(Duration::from_millis(100));
        fresh.rebuild(&m);
        fresh.promote(None);
        let (remaining, _, _) = fresh.time_to_live(1, false).unwrap();
        assert!((39..=40).contains(&remaining), "{remaining}");
    }

    #[test]
    fn keys_follow_lease_moves() {
        let (_d, m) = store();
        let l = Lessor::new(Duration::from_millis(100));
        l.grant(&m, 1, 10).unwrap();
        l.grant(&m, 2, 10).unwrap();
        let mv = |k: &str, from, to| LeaseMove { key: k.into(), from, to };
        l.apply_moves(vec![mv("a", 0, 1), mv("b", 0, 1), mv("a", 1, 2), mv("c", 0, 3)]);
        assert_eq!(l.keys(1).unwrap(), [b"b".to_vec()]);
        assert_eq!(l.keys(2).unwrap(), [b"a".to_vec()]);
        assert!(matches!(l.keys(3), Err(Error::LeaseNotFound)));
    }
}
