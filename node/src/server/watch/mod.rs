//! Watch: a change feed per key range, with history replay and etcd 3.4's
//! stream protocol.
//!
//! ```text
//!   apply (raft thread) ── WatchHub::publish ──try_send──▶ stream channel ─▶ gRPC stream
//!                              │ (hub under a mutex)           ▲
//!   service::stream task ── create/cancel                      │ Created/Canceled/progress
//!                              │                               │ (sent by the stream task)
//!   hub task: sync tick ── plan ─ history read (unlocked) ─ finish ─┘
//! ```
//!
//! Every watcher is in one of three states inside [`hub`]:
//! - *pending*: registered, its Created response not yet queued; gets nothing;
//! - *synced*: caught up; apply hands it each new revision as it is
//!   published, with a non-blocking send, before the write's own response
//!   goes out (so a writer watching its own keys sees the event first, as
//!   with etcd);
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

pub use hub::WatchHub;
pub use service::WatchService;
