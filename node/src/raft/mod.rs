//! Consensus: a replicated log of opaque commands, on raft-rs.
//!
//! This module knows nothing about etcd. It moves byte strings from
//! [`RaftHandle`] proposals, through raft-rs and the durable [`storage::LogStore`],
//! into a [`StateMachine`], and answers linearizable read barriers.
//!
//! ```text
//!   gRPC tasks ──Input──▶ driver (raft thread) ──▶ RaftNode::handle_ready
//!                            ▲                      1. send leader appends (before its fsync)
//!   peers ──PeerService──────┘                      2. restore snapshot, apply committed
//!                                                   3. append log + HardState (same batch)
//!                                                   4. one commit, one fsync
//!                                                   5. publish, send persisted messages
//!                                                   6. advance; apply newly committed
//! ```
//!
//! Invariants:
//! - An entry is applied only after raft reports it committed, which needs a
//!   quorum of members to have fsynced it (step 4 on each).
//! - The state machine's writes and its applied index are in the same fjall
//!   batch as the log append, so a restart resumes exactly after the last
//!   applied entry.
//! - Log compaction keeps `catchup_entries` behind the applied index; a
//!   follower further behind gets a snapshot: an image of the state machine
//!   taken on demand ([`storage::SnapshotSource`]), whose body streams in
//!   chunks off the raft thread ([`transport`]) and is stored by the
//!   follower before raft sees the message.
//! - Pre-vote and check-quorum are on; the peer service refuses other
//!   clusters and removed members.

pub mod driver;
pub mod logger;
pub mod node;
pub mod storage;
pub mod transport;

pub use driver::{Input, RaftHandle, SnapshotReports, Transport};
pub use node::{Committed, Progress, RaftConfig, RaftNode, RaftStatus, StateMachine};

#[cfg(test)]
mod tests;
