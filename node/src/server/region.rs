//! The member's place in a multi-region deployment: the region it belongs
//! to, whether its cluster is the primary or a read-only secondary, and, for
//! a secondary, which source it mirrors (cluster id, region) and at which
//! epoch. This is replicated state (the MVCC store's `role` metadata),
//! cached here for the request path.

use std::sync::Arc;

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
}

impl RoleState {
    pub const META_KEY: &'static str = "role";

    pub fn load(mvcc: &Mvcc) -> Option<Self> {
        mvcc.meta(Self::META_KEY).and_then(|b| serde_json::from_slice(&b).ok())
    }

    pub fn store(&self, mvcc: &Mvcc) {
        mvcc.set_meta(Self::META_KEY, serde_json::to_vec(self).expect("role encodes"));
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
