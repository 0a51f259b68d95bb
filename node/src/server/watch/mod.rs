//! Watch: a change feed per key range, with history replay and etcd 3.4's
//! stream protocol.
//!
//! ```text
//!   apply (raft thread) ── Feed::Records ──▶ hub task ──try_send──▶ stream channel ─▶ gRPC stream
//!                                             ▲   │                      ▲
//!   service::stream task ── Create/Cancel ────┘   └─ sync tick: history  │ Created/Canceled/progress
//!                                                    from the store ─────┘ (sent by the stream task)
//! ```
//!
//! Every watcher is in one of three states inside [`hub`]:
//! - *pending*: registered, its Created response not yet queued; gets nothing;
//! - *synced*: caught up; the hub hands it each new revision as it is
//!   published, with a non-blocking send;
//! - *unsynced*: behind (new with an old start revision, or its stream was
//!   full, or the member restored a snapshot); a periodic sync reads its
//!   missing revisions from the store, and it rejoins the synced set once
//!   caught up.
//!
//! So a slow or stalled client never blocks apply or another watcher: when
//! its stream channel is full it drops to *unsynced* and is caught up from
//! the store later (etcd calls these victims). Nothing is lost and nothing
//! is sent twice: a watcher's `next_rev` is the first revision it has not
//! been sent, and only the hub task moves it.
//!
//! Invariants: the events of one revision travel in one response unless the
//! watcher asked for fragments; responses of one watcher are in revision
//! order; a start revision below the compact revision gets etcd's cancel
//! with `compact_revision` set.

pub mod hub;
pub mod service;

pub use hub::{Feed, WatchHub};
pub use service::WatchService;
