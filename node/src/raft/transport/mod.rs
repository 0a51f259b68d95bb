//! The peer transport: raft messages over gRPC (`meridian.v1.RaftTransport`).
//!
//! Each peer has one task and one long-lived stream (`Stream`), with at
//! most [`WINDOW`] batches unacknowledged on it. Messages produced while the
//! window is full queue up and leave together in the next batch, so the
//! batch size grows with load and the per-message cost falls; a batch stays
//! under the peer's message limit. Each batch costs one HTTP/2 DATA frame
//! each way, not a call. A failed send (or an ack that does not come within
//! [`ACK_TIMEOUT`]) drops what was out and queued (raft retransmits), ends
//! the stream and tells raft the peer is unreachable. A peer without
//! `Stream` (an older member) is sent one unary `Send` at a time.
//!
//! A snapshot leaves on a stream of its own (`InstallSnapshot`), beside the
//! batches: the MsgSnapshot first, then the state machine's body in chunks
//! read from the leader's [`SnapshotImage`] on a blocking thread, at most a
//! few chunks ahead of the network. The follower stores the body as it
//! arrives ([`SnapshotSource::receive`]) and steps the message into raft
//! only when the body is complete, so no snapshot is ever one message, and
//! neither raft thread reads or writes the body.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use meridian_proto::meridian::v1::raft_transport_client::RaftTransportClient;
use meridian_proto::meridian::v1::{RaftAck, RaftBatch, SnapshotChunk};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status, Streaming};

use super::driver::{is_snapshot, try_input, Input, SnapshotReports, Transport};
use super::storage::SnapshotImages;
use crate::metrics::Metrics;

mod receive;
#[cfg(test)]
mod tests;

pub use receive::{decode_messages, decode_snapshot_message, PeerService};

/// Most messages in one batch.
const MAX_BATCH: usize = 4096;
/// Messages queued for one peer, at most. raft-rs itself keeps at most
/// `max_inflight_msgs` appends in flight to a replicating peer; past this
/// bound (a peer that does not keep up) messages are dropped, which raft
/// recovers from by resending, and the peer is reported unreachable.
const PEER_QUEUE: usize = 2 * MAX_BATCH;
/// Default for `--max-peer-message-bytes`: the largest message a member
/// sends to or accepts from a peer. Snapshots are chunked below it.
pub const DEFAULT_MAX_PEER_MESSAGE: usize = 64 << 20;
/// Room a batch leaves under the limit for its own framing, and what each
/// message adds to it (a field tag and a length).
const BATCH_SLACK: usize = 4096;
const PER_MESSAGE_FRAMING: usize = 6;
/// Batches on a peer's stream not yet acknowledged, at most.
const WINDOW: usize = 4;
/// A batch not acknowledged within this counts as a failed send.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Snapshot body chunks already read and not yet on the wire, per stream.
const CHUNKS_AHEAD: usize = 4;
/// A snapshot stream that sends nothing for this long is given up.
const SNAPSHOT_IDLE: Duration = Duration::from_secs(60);

/// The size of a snapshot body chunk for a peer message limit.
pub fn snapshot_chunk_bytes(max_message: usize) -> usize {
    (max_message / 2).clamp(1, 1 << 20)
}

/// What every peer link of a member shares.
pub struct PeerContext {
    pub cluster_id: u64,
    pub self_id: u64,
    pub raft_tx: Sender<Input>,
    /// The leader's snapshot images, which the links stream to followers.
    pub images: Arc<SnapshotImages>,
    /// The largest message sent to a peer (`--max-peer-message-bytes`).
    pub max_message: usize,
    /// Where snapshot outcomes go; the raft thread reads them every cycle.
    pub reports: Arc<SnapshotReports>,
    pub metrics: Arc<Metrics>,
    /// What this member trusts and presents on `https://` peer URLs.
    pub tls: meridian_wire::tls::ClientTls,
    /// Since when each peer has answered without a failure.
    pub active: ActivePeers,
    /// This member's raft status (marked removed when a peer says so).
    pub status: Arc<super::RaftStatus>,
    /// This member's own peer URL, sent with every batch.
    pub self_url: String,
}

/// Peer id -> since when its link has delivered without a failure (etcd's
/// `ActiveSince`), for the checks that keep a membership change from
/// breaking the active quorum.
#[derive(Clone, Default)]
pub struct ActivePeers(Arc<parking_lot::Mutex<HashMap<u64, Instant>>>);

impl ActivePeers {
    fn up(&self, id: u64) {
        self.0.lock().entry(id).or_insert_with(Instant::now);
    }
    fn down(&self, id: u64) {
        self.0.lock().remove(&id);
    }
    /// Whether `id` has been reachable for at least `for_at_least`.
    pub fn active_for(&self, id: u64, for_at_least: Duration) -> bool {
        self.0.lock().get(&id).is_some_and(|since| since.elapsed() >= for_at_least)
    }
    /// Whether `id` is reachable now (its last send did not fail).
    pub fn is_active(&self, id: u64) -> bool {
        self.0.lock().contains_key(&id)
    }
}

impl PeerContext {
    fn report_snapshot(&self, to: u64, ok: bool) {
        self.reports.push(to, ok);
    }
}

/// The members a member takes peer messages from (every one in its member
/// list) and those removed from the cluster (told so), kept current by
/// [`GrpcTransport::set_peers`].
#[derive(Debug, Default)]
pub struct Peers {
    pub members: HashSet<u64>,
    pub removed: HashSet<u64>,
    /// Senders not in the member list yet, at the peer URL they gave: a
    /// member that missed an addition still answers the new member (which
    /// may be the leader whose log would tell it of the addition).
    pub learned: HashMap<u64, String>,
}

pub type PeerSet = Arc<parking_lot::RwLock<Peers>>;

/// What a member tells a peer it removed (etcd's words); the peer stops.
pub const REMOVED: &str = "the member has been permanently removed from the cluster";

/// Sends to peers over gRPC.
pub struct GrpcTransport {
    /// Peer id -> its URL and the queue of its link task.
    links: parking_lot::Mutex<HashMap<u64, (String, mpsc::Sender<Message>)>>,
    ctx: Arc<PeerContext>,
    members: PeerSet,
    /// Links start from the raft thread, which is not in the runtime.
    runtime: tokio::runtime::Handle,
}

impl GrpcTransport {
    /// Starts one sender task per peer (`id -> peer URL`). Must be called
    /// inside a tokio runtime.
    pub fn start(ctx: Arc<PeerContext>, peers: HashMap<u64, String>, removed: HashSet<u64>, members: PeerSet) -> Self {
        let t = Self { links: Default::default(), ctx, members, runtime: tokio::runtime::Handle::current() };
        t.set_peers(peers, removed);
        t
    }
}

impl GrpcTransport {
    /// Starts the link task to peer `id` at `url`.
    fn link(&self, links: &mut HashMap<u64, (String, mpsc::Sender<Message>)>, id: u64, url: String) {
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        links.insert(id, (url.clone(), tx));
        let link = PeerLink { ctx: self.ctx.clone(), to: id, snapshot_in_flight: Arc::new(AtomicBool::new(false)) };
        self.runtime.spawn(link.run(url, rx));
    }
}

impl Transport for GrpcTransport {
    /// Links to new peers start, links to removed ones stop (their queue
    /// closes), and a peer whose URL changed is dialed at the new one.
    fn set_peers(&self, peers: HashMap<u64, String>, removed: HashSet<u64>) {
        let mut links = self.links.lock();
        links.retain(|id, (url, _)| peers.get(id) == Some(url));
        for (id, url) in &peers {
            if *id != self.ctx.self_id && !links.contains_key(id) {
                self.link(&mut links, *id, url.clone());
            }
        }
        *self.members.write() = Peers { members: peers.keys().copied().collect(), removed, learned: HashMap::new() };
    }

    fn send(&self, msgs: Vec<Message>) {
        let mut full = Vec::new();
        let mut links = self.links.lock();
        for m in msgs {
            if !links.contains_key(&m.to) {
                let Some(url) = self.members.read().learned.get(&m.to).cloned() else { continue };
                tracing::info!(peer = format!("{:x}", m.to), %url, "answering a member not in the member list yet");
                self.link(&mut links, m.to, url);
            }
            let Some((_, tx)) = links.get(&m.to) else { continue };
            if let Err(mpsc::error::TrySendError::Full(m)) = tx.try_send(m) {
                if is_snapshot(&m) {
                    self.ctx.report_snapshot(m.to, false);
                }
                if !full.contains(&m.to) {
                    full.push(m.to);
                }
            }
        }
        for to in full {
            tracing::debug!(peer = format!("{to:x}"), "peer queue full; dropped messages");
            let _ = try_input(&self.ctx.raft_tx, Input::Unreachable(to));
        }
    }
}

struct PeerLink {
    ctx: Arc<PeerContext>,
    to: u64,
    /// raft-rs sends a peer one snapshot at a time; a second one while the
    /// first streams is refused (reported failed, and raft asks again).
    snapshot_in_flight: Arc<AtomicBool>,
}

impl PeerLink {
    async fn run(self, url: String, mut rx: mpsc::Receiver<Message>) {
        let endpoint = match Endpoint::from_shared(url.clone()) {
            // Pings find a peer that went away mid-snapshot, whose stream would
            // otherwise wait on TCP for minutes.
            Ok(e) => e
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true),
            Err(e) => {
                tracing::error!(peer = format!("{:x}", self.to), %url, error = %e, "bad peer URL");
                return;
            }
        };
        let client = RaftTransportClient::new(self.ctx.tls.channel(&endpoint))
            .max_encoding_message_size(self.ctx.max_message)
            .max_decoding_message_size(self.ctx.max_message);
        let to_label = format!("{:x}", self.to);
        // At zero from the start, so `rate()` over it (etcd's members-down
        // alert) has a series before the first failure.
        self.ctx.metrics.peer_sent_failures.with_label_values(&[&to_label]).inc_by(0);
        let budget = self.ctx.max_message.saturating_sub(BATCH_SLACK).max(1);
        let mut failing = false;
        // An encoded message that did not fit the last batch: it opens the next.
        let mut carry: Option<Vec<u8>> = None;
        // The stream to the peer, once open; `None` in `unary` mode too.
        let mut open: Option<Open> = None;
        let mut unary = false;
        loop {
            // Wait for what comes first: an ack (or the stream's end, or the
            // oldest batch's deadline) while batches are out, or a message
            // to send while the window has room.
            let mut batch = Batch { budget, ..Batch::default() };
            if let Some(raw) = carry.take() {
                batch.push(raw);
            } else {
                let event = match open.as_mut().filter(|o| !o.unacked.is_empty()) {
                    Some(o) => {
                        let deadline = o.unacked.front().map(|(at, _)| *at + ACK_TIMEOUT).expect("batches are out");
                        let room = o.unacked.len() < WINDOW;
                        tokio::select! {
                            biased;
                            ack = o.acks.message() => {
                                Event::Ack(ack.and_then(|a| a.ok_or_else(|| Status::unavailable("the peer ended the stream"))))
                            }
                            _ = tokio::time::sleep_until(deadline.into()) => {
                                Event::Ack(Err(Status::deadline_exceeded("the peer did not acknowledge a batch")))
                            }
                            m = rx.recv(), if room => Event::Message(m),
                        }
                    }
                    None => Event::Message(rx.recv().await),
                };
                match event {
                    Event::Message(None) => break,
                    Event::Message(Some(m)) => self.take(m, &mut batch, &mut carry, &client),
                    Event::Ack(Ok(_)) => {
                        let o = open.as_mut().expect("an ack comes on an open stream");
                        let (_, bytes) = o.unacked.pop_front().expect("an ack is for a batch that is out");
                        self.delivered(bytes, &mut failing, &to_label);
                        continue;
                    }
                    Event::Ack(Err(status)) => {
                        open = None;
                        self.failed(status, &mut failing, &mut rx, &mut carry).await;
                        continue;
                    }
                }
            }
            while batch.messages.len() < MAX_BATCH && carry.is_none() {
                match rx.try_recv() {
                    Ok(m) => self.take(m, &mut batch, &mut carry, &client),
                    Err(_) => break,
                }
            }
            let batch = batch.messages;
            if batch.is_empty() {
                continue; // only snapshots, which stream on their own
            }
            let (cluster_id, from, from_url) = (self.ctx.cluster_id, self.ctx.self_id, self.ctx.self_url.clone());
            let batch = RaftBatch { cluster_id, from, to: self.to, messages: batch, from_url };
            let bytes = batch.encoded_len() as u64;
            if open.is_none() && !unary {
                match Open::start(&client).await {
                    Ok(o) => open = Some(o),
                    Err(status) if status.code() == tonic::Code::Unimplemented => {
                        tracing::info!(peer = %to_label, "the peer has no raft stream; sending it one batch at a time");
                        unary = true;
                    }
                    Err(status) => {
                        self.failed(status, &mut failing, &mut rx, &mut carry).await;
                        continue;
                    }
                }
            }
            if let Some(o) = open.as_mut() {
                // The window bounds what is out, and the channel holds as much.
                if o.batches.send(batch).await.is_ok() {
                    o.unacked.push_back((Instant::now(), bytes));
                } else {
                    open = None;
                    self.failed(Status::unavailable("the raft stream closed"), &mut failing, &mut rx, &mut carry).await;
                }
                continue;
            }
            let mut req = Request::new(batch);
            req.set_timeout(ACK_TIMEOUT);
            match client.clone().send(req).await {
                Ok(_) => self.delivered(bytes, &mut failing, &to_label),
                Err(status) => self.failed(status, &mut failing, &mut rx, &mut carry).await,
            }
        }
    }

    /// A batch reached the peer.
    fn delivered(&self, bytes: u64, failing: &mut bool, to_label: &str) {
        self.ctx.active.up(self.to);
        if *failing {
            tracing::info!(peer = %to_label, "peer reachable again");
            *failing = false;
        }
        self.ctx.metrics.peer_sent_bytes.with_label_values(&[to_label]).inc_by(bytes);
    }

    /// A send failed: raft hears the peer is unreachable, and the messages
    /// queued meanwhile (and `carry`), stale now, are dropped (raft resends
    /// what matters; a dropped snapshot is reported so raft offers it again).
    async fn failed(
        &self,
        status: Status,
        failing: &mut bool,
        rx: &mut mpsc::Receiver<Message>,
        carry: &mut Option<Vec<u8>>,
    ) {
        *carry = None;
        let to_label = format!("{:x}", self.to);
        self.ctx.active.down(self.to);
        if status.code() == tonic::Code::PermissionDenied && status.message() == REMOVED {
            tracing::warn!(peer = %to_label, "a peer says this member was removed from the cluster");
            self.ctx.status.mark_removed();
        }
        if !*failing {
            tracing::warn!(peer = %to_label, error = %status.message(), "cannot reach peer");
            *failing = true;
        }
        self.ctx.metrics.peer_sent_failures.with_label_values(&[&to_label]).inc();
        let _ = try_input(&self.ctx.raft_tx, Input::Unreachable(self.to));
        while let Ok(m) = rx.try_recv() {
            if is_snapshot(&m) {
                self.ctx.report_snapshot(self.to, false);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Adds `m` to the batch, or to `carry` when the batch is full; a
    /// snapshot starts its own stream instead.
    fn take(&self, m: Message, batch: &mut Batch, carry: &mut Option<Vec<u8>>, client: &RaftTransportClient<Channel>) {
        if is_snapshot(&m) {
            if self.snapshot_in_flight.swap(true, Ordering::AcqRel) {
                self.ctx.report_snapshot(self.to, false);
                return;
            }
            let (ctx, to, client, flag) = (self.ctx.clone(), self.to, client.clone(), self.snapshot_in_flight.clone());
            tokio::spawn(async move {
                let ok = send_snapshot(&ctx, to, client, m).await;
                flag.store(false, Ordering::Release);
                ctx.report_snapshot(to, ok);
            });
            return;
        }
        let raw = m.write_to_bytes().expect("encode raft message");
        if !batch.messages.is_empty() && batch.bytes + raw.len() + PER_MESSAGE_FRAMING > batch.budget {
            *carry = Some(raw);
        } else {
            batch.push(raw);
        }
    }
}

/// What the link waits on.
enum Event {
    Ack(Result<RaftAck, Status>),
    Message(Option<Message>),
}

/// An open raft stream to a peer.
struct Open {
    batches: mpsc::Sender<RaftBatch>,
    acks: Streaming<RaftAck>,
    /// When each batch out was sent, and its size, oldest first.
    unacked: std::collections::VecDeque<(Instant, u64)>,
}

impl Open {
    async fn start(client: &RaftTransportClient<Channel>) -> Result<Self, Status> {
        let (batches, rx) = mpsc::channel(WINDOW);
        let acks = tokio::time::timeout(ACK_TIMEOUT, client.clone().stream(ReceiverStream::new(rx)))
            .await
            .map_err(|_| Status::deadline_exceeded("the peer did not open the raft stream"))??
            .into_inner();
        Ok(Self { batches, acks, unacked: Default::default() })
    }
}

/// Encoded messages bound for one peer, and their size as sent.
#[derive(Default)]
struct Batch {
    messages: Vec<Vec<u8>>,
    bytes: usize,
    budget: usize,
}

impl Batch {
    fn push(&mut self, raw: Vec<u8>) {
        self.bytes += raw.len() + PER_MESSAGE_FRAMING;
        self.messages.push(raw);
    }
}

/// Streams one snapshot to `to`: the message, then the image's body.
/// True when the follower confirmed it stored the body and took the message.
async fn send_snapshot(ctx: &PeerContext, to: u64, mut client: RaftTransportClient<Channel>, msg: Message) -> bool {
    let to_label = format!("{to:x}");
    let index = msg.get_snapshot().get_metadata().index;
    let Some(image) = ctx.images.get(index) else {
        tracing::debug!(peer = %to_label, index, "snapshot image gone before it was sent");
        return false;
    };
    let chunk_bytes = snapshot_chunk_bytes(ctx.max_message);
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(CHUNKS_AHEAD);
    let first = SnapshotChunk {
        cluster_id: ctx.cluster_id,
        from: ctx.self_id,
        to,
        message: msg.write_to_bytes().expect("encode raft message"),
        ..Default::default()
    };
    if tx.send(first).await.is_err() {
        return false;
    }
    let started = Instant::now();
    tracing::info!(peer = %to_label, index, "sending snapshot");
    ctx.metrics.snapshot_send_inflights.with_label_values(&[&to_label]).inc();
    let delay = slow_snapshot_failpoint();
    let runtime = tokio::runtime::Handle::current();
    let mut body = tokio::task::spawn_blocking(move || {
        // A follower that stops reading is given up after SNAPSHOT_IDLE.
        let send = |chunk: SnapshotChunk| {
            runtime.block_on(async { matches!(tokio::time::timeout(SNAPSHOT_IDLE, tx.send(chunk)).await, Ok(Ok(()))) })
        };
        let mut sent = 0u64;
        let mut open = true;
        image.write_body(chunk_bytes, &mut |data| {
            if let Some(delay) = delay {
                std::thread::sleep(delay);
            }
            sent += data.len() as u64;
            open = send(SnapshotChunk { data, ..Default::default() });
            open
        })?;
        // Only a body read to its end is marked done; the receiver discards any other.
        if open {
            send(SnapshotChunk { done: true, ..Default::default() });
        }
        Ok::<u64, crate::error::Error>(sent)
    });
    let rpc = client.install_snapshot(ReceiverStream::new(rx));
    tokio::pin!(rpc);
    let (answer, body) = tokio::select! {
        answer = &mut rpc => (answer, body.await),
        body = &mut body => {
            // The body is out (or given up): the follower has SNAPSHOT_IDLE to answer.
            let answer = tokio::time::timeout(SNAPSHOT_IDLE, rpc)
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("the follower did not answer the snapshot")));
            (answer, body)
        }
    };
    ctx.metrics.snapshot_send_inflights.with_label_values(&[&to_label]).dec();
    let outcome = match (answer, body) {
        (Ok(_), Ok(Ok(bytes))) => Ok(bytes),
        (Err(status), _) => Err(status.message().to_string()),
        (_, Ok(Err(e))) => Err(format!("reading the snapshot image: {e}")),
        (_, Err(e)) => Err(format!("snapshot reader task: {e}")),
    };
    match outcome {
        Ok(bytes) => {
            let took = started.elapsed();
            ctx.metrics.snapshot_send_success.with_label_values(&[&to_label]).inc();
            ctx.metrics.snapshot_send_duration.with_label_values(&[&to_label]).observe(took.as_secs_f64());
            ctx.metrics.peer_sent_bytes.with_label_values(&[&to_label]).inc_by(bytes);
            tracing::info!(peer = %to_label, index, bytes, ms = took.as_millis() as u64, "snapshot sent");
            true
        }
        Err(e) => {
            ctx.metrics.snapshot_send_failures.with_label_values(&[&to_label]).inc();
            tracing::warn!(peer = %to_label, index, error = %e, "sending snapshot failed");
            false
        }
    }
}

/// Fault injection for the tests: `MERIDIAN_FAILPOINT=slow-snapshot@MS`
/// holds each snapshot chunk back MS milliseconds before it is sent, as a
/// slow link between regions would. Read once; off unless set.
fn slow_snapshot_failpoint() -> Option<Duration> {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        let v = std::env::var("MERIDIAN_FAILPOINT").ok()?;
        let ms = v.strip_prefix("slow-snapshot@")?.parse().ok()?;
        tracing::warn!(ms, "failpoint armed: every snapshot chunk is sent this much later");
        Some(Duration::from_millis(ms))
    })
}
