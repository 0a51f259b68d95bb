//! Multi-version concurrency control: the key-value history of one member.
//!
//! # The revision model
//!
//! The store has one global counter, the *main revision*. It starts at 1 on
//! an empty store, and every write transaction that changes something moves
//! it on by exactly one. The changes inside one transaction share that main
//! revision and are numbered by a *sub revision* from 0:
//!
//! ```text
//!   rev 2      put a=1                  -> (2,0) a
//!   rev 3      txn { put b=1, del a }   -> (3,0) b   (3,1) a†
//!   rev 4      put a=2                  -> (4,0) a
//!   (a read, a delete of nothing, or a failed compare writes no revision)
//! ```
//!
//! Per key, etcd's fields follow from that history: `mod_revision` is the
//! main revision of the key's last change, `create_revision` the main
//! revision of the put that created the current *generation* (the puts since
//! the last delete), and `version` counts puts within the generation. A
//! delete writes a tombstone (†) and ends the generation. A read at revision
//! R sees, for each key, its newest change at or below R, unless that is a
//! tombstone.
//!
//! # Layout on fjall
//!
//! ```text
//!   keyspace "kv":    main:u64be ‖ sub:u64be  ->  KvRecord { key, value, create_revision,
//!                                                           version, lease, tombstone }
//!   keyspace "meta":  mvcc/current_revision, mvcc/compact_revision,
//!                     mvcc/applied_index      ->  u64be
//!                     app/<name>              ->  metadata of the layer above (members, alarms)
//! ```
//!
//! Records are keyed by revision, so the `kv` keyspace *is* the change log:
//! a scan from revision R yields every change after R in order (what watch
//! history and the mirror read). Lookup by user key goes through
//! [`index::KeyIndex`], an in-memory map `key -> [versions]` rebuilt from
//! `kv` at startup, as etcd does with its B-tree index.
//!
//! # Apply, stage, publish
//!
//! Only the apply thread writes. It applies a batch of committed raft
//! entries through [`WriteTxn`]s, whose records wait in memory; [`Mvcc::stage`]
//! then puts them, the new marks and the applied raft index into the same
//! fjall batch as the raft log append, so data and applied index commit
//! atomically. After that batch commits, [`Mvcc::publish`] makes the new
//! revision visible to readers. Readers never see an uncommitted revision.
//!
//! # Compaction
//!
//! Compacting at C drops every version that no read at or after C can see:
//! per key, all versions below its newest one at or below C, and that one too
//! if it is a tombstone. The compact revision is persisted with the apply
//! batch; the dropped records are removed by explicit deletes right after
//! publish, and again at startup if a crash came between the two. (Explicit
//! deletes, not a compaction filter: in fjall 3.1 rows dropped by a filter
//! can reappear after journal replay.)

pub mod index;
mod revision;
mod store;

pub use index::KeyRange;
pub use revision::Revision;
pub use store::{LeaseMove, Marks, Mvcc, RangeOpts, RangeResult, ReadTxn, Received, StoreImage, WriteTxn};

#[cfg(test)]
mod tests;
