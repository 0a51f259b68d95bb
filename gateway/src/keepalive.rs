//! A client's lease keep-alive stream through the gateway. Its upstream is a
//! keep-alive stream on the primary region's leader; when that ends or is
//! refused (the region was fenced, or failed), the session opens one on the
//! region that is the primary now and sends again the keep-alives not yet
//! answered. The client's stream goes on, with no error: after a failover
//! its leases are renewed on the new primary, which kept their ids.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_proto::etcdserverpb::lease_client::LeaseClient;
use meridian_proto::etcdserverpb::{LeaseKeepAliveRequest, LeaseKeepAliveResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Status, Streaming};

use crate::proxy::{forward, Gateway};
use crate::regions::Pick;

/// How long a session looks for a primary before it gives the client
/// `Unavailable`.
const FAILOVER_FOR: Duration = Duration::from_secs(15);
/// Keep-alives in flight to one upstream, at most (the client's own are
/// answered in order, so this bounds what is re-sent).
const IN_FLIGHT: usize = 64;
/// What the session sends its client.
pub type Outbox = mpsc::Sender<Result<LeaseKeepAliveResponse, Status>>;

pub struct Upstream {
    region: String,
    requests: mpsc::Sender<LeaseKeepAliveRequest>,
    responses: Streaming<LeaseKeepAliveResponse>,
}

/// Opens a keep-alive stream on `pick`'s region.
///
/// # Errors
///
/// The region's answer to the stream.
pub async fn open(pick: &Pick, meta: &MetadataMap) -> Result<Upstream, Status> {
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    let mut client = LeaseClient::new(pick.region.channel().0);
    let responses = client.lease_keep_alive(forward(meta, ReceiverStream::new(rx))).await?.into_inner();
    Ok(Upstream { region: pick.region.name.clone(), requests: tx, responses })
}

pub struct Session {
    gw: Arc<Gateway>,
    meta: MetadataMap,
    out: Outbox,
    /// Lease ids sent upstream and not answered yet, oldest first.
    pending: VecDeque<i64>,
}

impl Session {
    pub fn new(gw: Arc<Gateway>, meta: MetadataMap, out: Outbox) -> Self {
        Self { gw, meta, out, pending: VecDeque::new() }
    }

    /// Runs until the client's stream ends, the client is gone, or no
    /// primary is found within [`FAILOVER_FOR`].
    pub async fn run(mut self, mut inbound: Streaming<LeaseKeepAliveRequest>, first: Upstream) {
        let mut up = first;
        loop {
            tokio::select! {
                req = inbound.message() => {
                    let Ok(Some(req)) = req else { return };
                    if self.pending.len() >= IN_FLIGHT {
                        // The client sends faster than the primary answers:
                        // an older keep-alive of the same lease covers it.
                        if self.pending.contains(&req.id) {
                            continue;
                        }
                    }
                    self.pending.push_back(req.id);
                    if up.requests.send(req).await.is_err() {
                        match self.reconnect(&up.region).await {
                            Some(next) => up = next,
                            None => return,
                        }
                    }
                }
                resp = up.responses.message() => match resp {
                    Ok(Some(resp)) => {
                        if let Some(at) = self.pending.iter().position(|id| *id == resp.id) {
                            self.pending.remove(at);
                        }
                        if self.out.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                    // Ended, refused (a fenced primary is a secondary now) or failed.
                    Ok(None) | Err(_) => match self.reconnect(&up.region).await {
                        Some(next) => up = next,
                        None => return,
                    },
                },
                _ = self.out.closed() => return,
            }
        }
    }

    /// A stream on the region that is the primary now, with every pending
    /// keep-alive sent again; `None` (the client told why) when none opens
    /// within [`FAILOVER_FOR`], or the client is gone.
    async fn reconnect(&mut self, failed: &str) -> Option<Upstream> {
        tracing::info!(region = failed, "lease keep-alive stream ended; moving to the primary");
        let deadline = Instant::now() + FAILOVER_FOR;
        loop {
            if let Some(pick) = self.gw.regions.primary() {
                if let Ok(up) = open(&pick, &self.meta).await {
                    let mut sent = true;
                    for id in &self.pending {
                        sent &= up.requests.send(LeaseKeepAliveRequest { id: *id }).await.is_ok();
                    }
                    if sent {
                        self.gw.metrics.keepalive_failovers.inc();
                        return Some(up);
                    }
                }
            }
            if Instant::now() >= deadline || self.out.is_closed() {
                let _ = self
                    .out
                    .send(Err(Status::unavailable(format!(
                        "meridian: no primary region took the lease keep-alives within {FAILOVER_FOR:?}"
                    ))))
                    .await;
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
