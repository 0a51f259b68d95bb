//! The member's place in a multi-region deployment: the region it belongs
//! to, whether its cluster is the primary or a read-only secondary, and, for
//! a secondary, which source it mirrors (cluster id, region) and at which
//! epoch. This is replicated state (the MVCC store's `role` metadata),
//! cached here for the request path.

use std::sync::Arc;

use meridian_proto::meridian::v1::LineageEntry;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::mvcc::Mvcc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

/// The replicated role record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleState {
    pub role: Role,
    /// This cluster's region.
    pub region: String,
    /// For a secondary: the region it mirrors (named in refusals).
    pub primary_region: String,
    /// For a secondary: the cluster id of its source, 0 until the first mirror write.
    pub source_cluster_id: u64,
    /// Fencing epoch: mirror writes with a lower epoch are refused.
    pub epoch: u64,
    /// The revision at which this cluster last changed role (0: never).
    #[serde(default)]
    pub fence_revision: i64,
    /// Who wrote which revisions, oldest epoch first. A primary appends to
    /// it when promoted; a secondary keeps its source's.
    #[serde(default)]
    pub lineage: Vec<Lineage>,
}

/// One epoch of the history: from `first_revision` on, written by the
/// primary cluster `primary_cluster_id` of `region`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    pub epoch: u64,
    pub first_revision: i64,
    pub primary_cluster_id: u64,
    pub region: String,
}

impl From<&Lineage> for LineageEntry {
    fn from(l: &Lineage) -> Self {
        Self {
            epoch: l.epoch,
            first_revision: l.first_revision,
            primary_cluster_id: l.primary_cluster_id,
            region: l.region.clone(),
        }
    }
}

impl From<&LineageEntry> for Lineage {
    fn from(l: &LineageEntry) -> Self {
        Self {
            epoch: l.epoch,
            first_revision: l.first_revision,
            primary_cluster_id: l.primary_cluster_id,
            region: l.region.clone(),
        }
    }
}

impl RoleState {
    pub const META_KEY: &'static str = "role";

    pub fn load(mvcc: &Mvcc) -> Option<Self> {
        mvcc.meta(Self::META_KEY).and_then(|b| serde_json::from_slice(&b).ok())
    }

    pub fn store(&self, mvcc: &Mvcc) {
        mvcc.set_meta(Self::META_KEY, serde_json::to_vec(self).expect("role encodes"));
    }

    /// The lineage as the wire carries it. A cluster bootstrapped before
    /// lineages were kept has none stored: a primary's is then its own
    /// history from revision 1 at its epoch.
    pub fn lineage_for(&self, own_cluster_id: u64) -> Vec<LineageEntry> {
        if self.lineage.is_empty() && self.role == Role::Primary {
            return vec![LineageEntry {
                epoch: self.epoch,
                first_revision: 1,
                primary_cluster_id: own_cluster_id,
                region: self.region.clone(),
            }];
        }
        self.lineage.iter().map(LineageEntry::from).collect()
    }

    pub fn role_name(&self) -> &'static str {
        match self.role {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }

    /// The error a client write gets on a secondary.
    pub fn read_only_error(&self) -> Error {
        Error::ReadOnly(self.primary_region.clone())
    }
}

/// The role as the request path reads it; apply keeps it current.
#[derive(Clone)]
pub struct RoleCell(Arc<RwLock<RoleState>>);

impl RoleCell {
    pub fn new(state: RoleState) -> Self {
        Self(Arc::new(RwLock::new(state)))
    }

    pub fn get(&self) -> RoleState {
        self.0.read().clone()
    }

    pub fn set(&self, state: RoleState) {
        *self.0.write() = state;
    }

    pub fn is_secondary(&self) -> bool {
        self.0.read().role == Role::Secondary
    }

    /// Refuses a client write on a secondary.
    ///
    /// # Errors
    ///
    /// [`Error::ReadOnly`] naming the primary's region.
    pub fn check_writable(&self) -> Result<(), Error> {
        let st = self.0.read();
        match st.role {
            Role::Primary => Ok(()),
            Role::Secondary => Err(st.read_only_error()),
        }
    }
}
