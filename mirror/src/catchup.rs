//! Fetching a long stretch of an etcd source's history quickly, through the
//! public Watch API only.
//!
//! etcd serves a watcher that starts in the past from a sync pass that runs
//! every 100 ms and hands each watcher at most 1,000 revisions, so a single
//! watch replays history at about 10,000 revisions a second. One pass serves
//! every lagging watcher, though, each from its own start revision. So the
//! session splits the revisions it lacks into [`SEGMENT_REVS`]-revision
//! segments, watches each from its first revision on a stream of its own,
//! and applies the segments in order as they complete.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use anyhow::bail;
use meridian_proto::etcdserverpb::watch_client::WatchClient;
use meridian_proto::etcdserverpb::watch_request::RequestUnion;
use meridian_proto::etcdserverpb::{WatchCreateRequest, WatchRequest};
use meridian_proto::mvccpb::Event;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinHandle};
use tokio_stream::wrappers::ReceiverStream;

/// Revisions per segment: what etcd gives one watcher in one sync pass.
pub const SEGMENT_REVS: i64 = 1000;
/// Behind by fewer revisions than this, one watch is as quick.
pub const MIN_BEHIND: i64 = 4 * SEGMENT_REVS;
/// Segments fetched at once before their size is known.
pub const FIRST_PARALLEL: usize = 16;
/// Most segments fetched at once.
pub const MAX_PARALLEL: usize = 64;
/// Bytes of events held by segments in flight, at most (roughly).
pub const BUFFER_BYTES: usize = 64 * 1024 * 1024;

/// What watching one segment produced.
pub enum Segment {
    /// Every event with a revision in the segment, in order.
    Events(Vec<Event>),
    /// The source has compacted past the segment's start, to this revision.
    Compacted(i64),
}

/// A spawned segment fetch that stops when dropped (a session that ends
/// early leaves no watches behind).
pub struct Fetch(JoinHandle<anyhow::Result<Segment>>);

impl Future for Fetch {
    type Output = Result<anyhow::Result<Segment>, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl Drop for Fetch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts fetching the events of revisions `from..to` whose keys `keep` accepts.
pub fn spawn(
    src: crate::session::Upstream,
    keep: impl Fn(&[u8]) -> bool + Send + 'static,
    from: i64,
    to: i64,
) -> Fetch {
    Fetch(tokio::spawn(fetch(src, keep, from, to)))
}

/// Watches the whole keyspace, not just the mirrored range: every revision
/// has at least one event there, so the arrival of the segment's last
/// revision proves the segment complete. (A progress request cannot: etcd
/// 3.4 answers one with its current revision even while the watcher is
/// still replaying.)
async fn fetch(
    src: crate::session::Upstream,
    keep: impl Fn(&[u8]) -> bool,
    from: i64,
    to: i64,
) -> anyhow::Result<Segment> {
    let (tx, rx) = mpsc::channel(1);
    let create = WatchCreateRequest { key: vec![0], range_end: vec![0], start_revision: from, ..Default::default() };
    tx.send(WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) }).await?;
    let mut stream =
        WatchClient::new(src).max_decoding_message_size(usize::MAX).watch(ReceiverStream::new(rx)).await?.into_inner();
    let mut events = Vec::new();
    loop {
        let Some(resp) = stream.message().await? else { bail!("the source closed a catch-up watch") };
        if resp.canceled {
            if resp.compact_revision > 0 {
                return Ok(Segment::Compacted(resp.compact_revision));
            }
            bail!("the source canceled a catch-up watch: {}", resp.cancel_reason);
        }
        let mut last = 0;
        for ev in resp.events {
            let Some(kv) = &ev.kv else { continue };
            last = kv.mod_revision;
            if last >= to {
                return Ok(Segment::Events(events));
            }
            if keep(&kv.key) {
                events.push(ev);
            }
        }
        // etcd never splits a revision across responses: once the last
        // revision of the segment has arrived, all of it has.
        if last == to - 1 {
            return Ok(Segment::Events(events));
        }
    }
}
