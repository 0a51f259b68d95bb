//! The replicated cluster version, which gates new kinds of raft entry.
//!
//! A member running an older binary cannot apply an entry kind that was
//! added after it was built: protobuf decodes the unknown `oneof` arm as no
//! request at all. Skipping it would let that replica diverge, so apply stops
//! the member instead (see `apply`). To keep a healthy mixed-version cluster
//! from ever reaching that point, as etcd does with its cluster version:
//!
//! 1. every member publishes the newest entry version its binary applies
//!    ([`APPLY_VERSION`]) in its `MemberAttributes`, through raft;
//! 2. the cluster version is the lowest version any member published
//!    (version 1 until every member has published one), so it is the same on
//!    every replica at the same log index;
//! 3. a request is proposed only when the cluster version is at least the
//!    version that introduced its kind ([`required`]); otherwise it is
//!    refused with [`Error::ClusterVersion`] before it reaches the log.
//!
//! A kind added later gets `required == APPLY_VERSION + 1` together with the
//! bump of [`APPLY_VERSION`] in the same change.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use meridian_proto::meridian::v1::internal_request::Request;

use super::cluster::Members;
use crate::error::{Error, Result};

/// The newest entry version this binary applies.
pub const APPLY_VERSION: u32 = 4;

/// The version of the cluster whose members are `members`: the lowest one
/// any member published, and the base version while any has published none.
pub fn cluster_version(members: &Members) -> u32 {
    // A member added by MemberAdd that has not started yet (no name) has
    // no binary to speak of; it counts once it publishes its attributes.
    let started = members.0.iter().filter(|m| !m.name.is_empty() || m.apply_version > 0);
    started.map(|m| m.apply_version.max(1)).min().unwrap_or(1)
}

/// The cluster version as of the last applied entry, shared by apply (which
/// sets it) and the proposers (which check against it) without decoding the
/// member list on every proposal.
#[derive(Clone, Debug)]
pub struct VersionCell(Arc<AtomicU32>);

impl VersionCell {
    pub fn new(members: &Members) -> Self {
        Self(Arc::new(AtomicU32::new(cluster_version(members))))
    }

    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// Recomputes the version after the member list changed.
    pub fn update(&self, members: &Members) {
        self.0.store(cluster_version(members), Ordering::Relaxed);
    }
}

/// The entry version that introduced this kind of request. Listed kind by
/// kind, so a new kind must name its version here.
pub fn required(request: &Request) -> u32 {
    match request {
        Request::Put(_)
        | Request::DeleteRange(_)
        | Request::Txn(_)
        | Request::Compaction(_)
        | Request::Alarm(_)
        | Request::MemberAttributes(_)
        | Request::LeaseGrant(_)
        | Request::LeaseRevoke(_)
        | Request::LeaseCheckpoint(_)
        | Request::MirrorApply(_)
        | Request::AutoCompaction(_) => 1,
        Request::RegionChange(_) => 2,
        Request::MemberChange(_) => 3,
        Request::AuthChange(_) => 4,
    }
}

/// Refuses a request the cluster cannot apply on every member yet.
///
/// # Errors
///
/// [`Error::ClusterVersion`] when some member's binary predates the kind.
pub fn check(request: &Request, cluster: u32) -> Result<()> {
    let needed = required(request);
    if needed > cluster {
        return Err(Error::ClusterVersion { cluster, needed });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use meridian_proto::etcdserverpb::PutRequest;

    use super::*;
    use crate::server::cluster::MemberInfo;

    fn member(id: u64, apply_version: u32) -> MemberInfo {
        MemberInfo {
            id,
            name: format!("m{id}"),
            peer_urls: vec![],
            client_urls: vec![],
            apply_version,
            is_learner: false,
        }
    }

    #[test]
    fn cluster_version_is_the_lowest_published() {
        let table = [
            (vec![], 1),
            (vec![member(1, 0), member(2, 0)], 1),
            (vec![member(1, 3), member(2, 2), member(3, 5)], 2),
            (vec![member(1, 4), member(2, 0)], 1),
            (vec![member(1, 4), member(2, 4)], 4),
        ];
        for (members, want) in table {
            assert_eq!(cluster_version(&Members(members.clone())), want, "{members:?}");
        }
    }

    #[test]
    fn a_kind_newer_than_the_cluster_is_refused() {
        let put = Request::Put(PutRequest::default());
        assert!(check(&put, 1).is_ok());
        // Every kind this binary knows is within its own version.
        assert!(required(&put) <= APPLY_VERSION);
        let err = check(&put, 0).unwrap_err();
        assert!(matches!(err, Error::ClusterVersion { cluster: 0, needed: 1 }), "{err}");
    }
}
