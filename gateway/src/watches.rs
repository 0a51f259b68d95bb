//! Watches that survive a region. Each client Watch stream is one session
//! with one upstream stream in the nearest healthy region. The session keeps,
//! for every watcher, its create request and the first revision not yet
//! delivered; when the upstream fails it opens a stream in the next nearest
//! region and re-creates every watcher from that revision with the same
//! watch id, hiding the second `created`. The client sees every event once,
//! in order, with no error; a watcher whose revision was compacted in the
//! new region gets etcd's compaction cancel, as from any member.
//!
//! The gateway chooses auto watch ids itself (0, 1, 2, ... skipping ids in
//! use, as etcd does) and sends them explicitly, so ids stay the same in
//! every region.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_proto::etcdserverpb::watch_client::WatchClient;
use meridian_proto::etcdserverpb::watch_request::RequestUnion;
use meridian_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Status, Streaming};

use crate::proxy::{forward, Gateway};
use crate::regions::Pick;

/// Responses queued for a client stream, and requests for an upstream one.
const BUFFER: usize = 256;
/// How long a session looks for another region before it gives up.
const FAILOVER_FOR: Duration = Duration::from_secs(10);

struct Watcher {
    create: WatchCreateRequest,
    /// First revision not yet delivered (0 until the watcher is created).
    next_rev: i64,
    created: bool,
    /// Re-created after a failover: its `created` answer is not the client's.
    recreating: bool,
}

pub struct Upstream {
    region: String,
    requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
}

/// Opens an upstream Watch stream in `pick`'s region.
pub async fn open(pick: &Pick, meta: &MetadataMap) -> Result<Upstream, Status> {
    let (requests, rx) = mpsc::channel(BUFFER);
    let resp = WatchClient::new(pick.region.channel().0).watch(forward(meta, ReceiverStream::new(rx))).await?;
    Ok(Upstream { region: pick.region.name.clone(), requests, responses: resp.into_inner() })
}

pub struct Session {
    pub gw: Arc<Gateway>,
    pub meta: MetadataMap,
    pub out: mpsc::Sender<Result<WatchResponse, Status>>,
    watchers: BTreeMap<i64, Watcher>,
}

impl Session {
    pub fn new(gw: Arc<Gateway>, meta: MetadataMap, out: mpsc::Sender<Result<WatchResponse, Status>>) -> Self {
        Self { gw, meta, out, watchers: BTreeMap::new() }
    }

    /// Relays until the client leaves, moving regions when one fails.
    pub async fn run(mut self, mut inbound: Streaming<WatchRequest>, mut up: Upstream) {
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => {
                        if let Some(req) = self.on_client_request(req) {
                            // A failed send means the upstream is gone; its
                            // response stream ends next, and the failover
                            // re-sends what this watcher needs.
                            let _ = up.requests.send(req).await;
                        }
                    }
                    _ => return,
                },
                resp = up.responses.message() => match resp {
                    Ok(Some(r)) => {
                        if !self.on_upstream_response(r).await {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => match self.failover(&up.region).await {
                        Some(next) => up = next,
                        None => return,
                    },
                },
            }
        }
    }

    /// Records a client request and gives what to send upstream.
    fn on_client_request(&mut self, req: WatchRequest) -> Option<WatchRequest> {
        match req.request_union {
            Some(RequestUnion::CreateRequest(mut c)) => {
                if c.watch_id == 0 {
                    c.watch_id = (0..).find(|id| !self.watchers.contains_key(id)).expect("a free id");
                }
                let next_rev = c.start_revision.max(0);
                self.watchers.entry(c.watch_id).or_insert_with(|| Watcher {
                    create: c.clone(),
                    next_rev,
                    created: false,
                    recreating: false,
                });
                Some(WatchRequest { request_union: Some(RequestUnion::CreateRequest(c)) })
            }
            other => Some(WatchRequest { request_union: other }),
        }
    }

    /// Tracks what a response delivers and passes it on (hiding the
    /// `created` of a re-created watcher); false once the client is gone.
    async fn on_upstream_response(&mut self, r: WatchResponse) -> bool {
        let header_rev = r.header.as_ref().map_or(0, |h| h.revision);
        if r.watch_id == -1 && !r.created {
            // A progress notification for the whole stream.
            for w in self.watchers.values_mut().filter(|w| w.created) {
                w.next_rev = w.next_rev.max(header_rev + 1);
            }
        } else if let Some(w) = self.watchers.get_mut(&r.watch_id) {
            if r.created && !r.canceled {
                w.created = true;
                if w.next_rev == 0 {
                    w.next_rev = header_rev + 1;
                }
                if std::mem::take(&mut w.recreating) {
                    return true; // the client has its `created` already
                }
            }
            if let Some(last) = r.events.last().and_then(|e| e.kv.as_ref()) {
                w.next_rev = w.next_rev.max(last.mod_revision + 1);
            } else if !r.created && !r.canceled && !r.fragment {
                w.next_rev = w.next_rev.max(header_rev + 1);
            }
            if r.canceled {
                self.watchers.remove(&r.watch_id);
            }
        }
        self.out.send(Ok(r)).await.is_ok()
    }

    /// Opens a stream in the nearest other healthy region and re-creates
    /// every watcher from its next revision. `None` when no region answers
    /// within [`FAILOVER_FOR`] (the client gets `Unavailable`) or the client
    /// is gone.
    async fn failover(&mut self, failed: &str) -> Option<Upstream> {
        let deadline = Instant::now() + FAILOVER_FOR;
        let mut avoid = Some(failed.to_string());
        loop {
            let pick = self.gw.regions.nearest_named(|name, _| avoid.as_deref() != Some(name));
            if let Some(pick) = pick {
                if let Ok(up) = open(&pick, &self.meta).await {
                    tracing::info!(from = failed, to = %up.region, watchers = self.watchers.len(), "moved a watch stream");
                    self.gw.metrics.watch_failovers.inc();
                    if self.recreate(&up).await {
                        return Some(up);
                    }
                }
            }
            if self.out.is_closed() {
                return None;
            }
            if Instant::now() > deadline {
                let _ = self.out.send(Err(Status::unavailable("meridian: no region can serve this watch"))).await;
                return None;
            }
            // The failed region may be the only one left: try it again too.
            avoid = None;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn recreate(&mut self, up: &Upstream) -> bool {
        for w in self.watchers.values_mut() {
            let mut create = w.create.clone();
            if w.created {
                create.start_revision = w.next_rev;
                w.recreating = true;
            }
            let req = WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) };
            if up.requests.send(req).await.is_err() {
                return false;
            }
        }
        true
    }
}
