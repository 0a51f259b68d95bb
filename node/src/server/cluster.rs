//! Cluster membership and alarms: replicated metadata kept in the MVCC
//! store's `app/` metadata. The Cluster service is in `membership`.

use meridian_proto::etcdserverpb::{AlarmMember, AlarmType};
use meridian_proto::meridian::v1::MemberAttributes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::mvcc::Mvcc;
use meridian_proto::meridian::v1::member_change::Kind;
use meridian_proto::meridian::v1::MemberChange;

/// One cluster member as the cluster knows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    /// The newest raft entry version its binary applies; 0 until published.
    #[serde(default)]
    pub apply_version: u32,
    /// A learner: receives the log, does not vote.
    #[serde(default)]
    pub is_learner: bool,
}

/// Learners a cluster may have at once (etcd 3.4's `--experimental-max-learners`).
pub const MAX_LEARNERS: usize = 1;

/// The member list, replicated through raft.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Members(pub Vec<MemberInfo>);

impl Members {
    pub const META_KEY: &'static str = "members";
    pub const REMOVED_KEY: &'static str = "members_removed";

    pub fn load(mvcc: &Mvcc) -> Self {
        mvcc.meta(Self::META_KEY).and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    pub fn store(&self, mvcc: &Mvcc) {
        mvcc.set_meta(Self::META_KEY, serde_json::to_vec(self).expect("members encode"));
    }

    /// The ids of the members removed from the cluster (etcd's `members_removed`).
    pub fn load_removed(mvcc: &Mvcc) -> std::collections::HashSet<u64> {
        mvcc.meta(Self::REMOVED_KEY).and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    pub fn store_removed(mvcc: &Mvcc, removed: &std::collections::HashSet<u64>) {
        let mut ids: Vec<u64> = removed.iter().copied().collect();
        ids.sort_unstable();
        mvcc.set_meta(Self::REMOVED_KEY, serde_json::to_vec(&ids).expect("ids encode"));
    }

    /// Records a member's name and client URLs, published by the member itself.
    pub fn set_attributes(&mut self, a: &MemberAttributes) {
        if let Some(m) = self.0.iter_mut().find(|m| m.id == a.id) {
            m.name = a.name.clone();
            m.client_urls = a.client_urls.clone();
            m.apply_version = a.apply_version;
        }
    }

    pub fn get(&self, id: u64) -> Option<&MemberInfo> {
        self.0.iter().find(|m| m.id == id)
    }

    /// Applies a membership change, or refuses it with etcd's error and
    /// leaves the list as it was. Deterministic: every replica decides the
    /// same from the same list.
    ///
    /// # Errors
    ///
    /// [`Error::MemberExists`], [`Error::PeerUrlExists`],
    /// [`Error::TooManyLearners`], [`Error::MemberNotFound`],
    /// [`Error::MemberNotLearner`].
    pub fn apply(&mut self, c: &MemberChange) -> Result<()> {
        let id = c.member_id;
        let url_taken = |members: &Members| {
            members.0.iter().any(|m| m.id != id && m.peer_urls.iter().any(|u| c.peer_urls.contains(u)))
        };
        match Kind::try_from(c.kind).map_err(|_| Error::Internal(format!("unknown member change {}", c.kind)))? {
            Kind::Add => {
                if url_taken(self) {
                    return Err(Error::PeerUrlExists);
                }
                if self.get(id).is_some() {
                    return Err(Error::MemberExists);
                }
                if c.is_learner && self.0.iter().filter(|m| m.is_learner).count() >= MAX_LEARNERS {
                    return Err(Error::TooManyLearners);
                }
                self.0.push(MemberInfo {
                    id,
                    name: String::new(),
                    peer_urls: c.peer_urls.clone(),
                    client_urls: Vec::new(),
                    apply_version: 0,
                    is_learner: c.is_learner,
                });
            }
            Kind::Remove => {
                let m = self.get(id).ok_or(Error::MemberNotFound)?;
                // Raft cannot remove its last voter.
                if !m.is_learner && self.0.iter().filter(|v| !v.is_learner).count() == 1 {
                    return Err(Error::NotEnoughStartedMembers);
                }
                self.0.retain(|m| m.id != id);
            }
            Kind::Update => {
                self.get(id).ok_or(Error::MemberNotFound)?;
                if url_taken(self) {
                    return Err(Error::PeerUrlExists);
                }
                let m = self.0.iter_mut().find(|m| m.id == id).ok_or(Error::MemberNotFound)?;
                m.peer_urls = c.peer_urls.clone();
            }
            Kind::Promote => {
                let m = self.0.iter_mut().find(|m| m.id == id).ok_or(Error::MemberNotFound)?;
                if !m.is_learner {
                    return Err(Error::MemberNotLearner);
                }
                m.is_learner = false;
            }
        }
        Ok(())
    }

    /// The peers raft talks to: every member, at its first peer URL.
    pub fn peers(&self) -> std::collections::HashMap<u64, String> {
        self.0.iter().filter_map(|m| m.peer_urls.first().map(|u| (m.id, u.clone()))).collect()
    }

    /// Whether, after `change`, the voters that have started (published
    /// their name) still make a quorum of all voters: etcd's strict
    /// reconfiguration check, which keeps a change from costing the cluster
    /// its quorum.
    pub fn keeps_quorum(&self, change: &MemberChange) -> bool {
        // etcd checks adding, removing and promoting voters only.
        let kind = Kind::try_from(change.kind);
        let voter = self.get(change.member_id).is_some_and(|m| !m.is_learner);
        let checked = match kind {
            Ok(Kind::Add) => !change.is_learner,
            Ok(Kind::Remove) => voter,
            Ok(Kind::Promote) => true,
            _ => false,
        };
        let mut after = self.clone();
        if !checked || after.apply(change).is_err() {
            return true; // not checked, or apply refuses it with the reason
        }
        let voters: Vec<&MemberInfo> = after.0.iter().filter(|m| !m.is_learner).collect();
        // A learner being promoted counts as started: it has been replicating.
        let started = voters
            .iter()
            .filter(|m| !m.name.is_empty() || (kind == Ok(Kind::Promote) && m.id == change.member_id))
            .count();
        // etcd lets a one-member cluster add its second voter (how a
        // restored member grows back into a cluster).
        let growing_one = change.kind == Kind::Add as i32 && voters.len() == 2 && started == 1;
        growing_one || (!voters.is_empty() && started > voters.len() / 2)
    }
}

/// Active alarms, replicated through raft.
#[derive(Clone, Debug, Default)]
pub struct Alarms(pub Vec<AlarmMember>);

impl Alarms {
    pub const META_KEY: &'static str = "alarms";

    pub fn decode(b: &[u8]) -> Self {
        let pairs: Vec<(u64, i32)> = serde_json::from_slice(b).unwrap_or_default();
        Self(pairs.into_iter().map(|(member_id, alarm)| AlarmMember { member_id, alarm }).collect())
    }

    pub fn load(mvcc: &Mvcc) -> Self {
        mvcc.meta(Self::META_KEY).map(|b| Self::decode(&b)).unwrap_or_default()
    }

    pub fn store(&self, mvcc: &Mvcc) {
        let pairs: Vec<(u64, i32)> = self.0.iter().map(|a| (a.member_id, a.alarm)).collect();
        mvcc.set_meta(Self::META_KEY, serde_json::to_vec(&pairs).expect("alarms encode"));
    }

    pub fn has(&self, t: AlarmType) -> bool {
        self.0.iter().any(|a| a.alarm == t as i32)
    }

    /// Adds an alarm; false if it was already active.
    pub fn activate(&mut self, a: AlarmMember) -> bool {
        if self.0.contains(&a) {
            return false;
        }
        self.0.push(a);
        true
    }

    /// Removes matching alarms (member 0 or alarm NONE match any) and returns them.
    pub fn deactivate(&mut self, a: &AlarmMember) -> Vec<AlarmMember> {
        let matches = |x: &AlarmMember| {
            (a.member_id == 0 || x.member_id == a.member_id)
                && (a.alarm == AlarmType::None as i32 || x.alarm == a.alarm)
        };
        let (gone, kept) = std::mem::take(&mut self.0).into_iter().partition(matches);
        self.0 = kept;
        gone
    }
}
