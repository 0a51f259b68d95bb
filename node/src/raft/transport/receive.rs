//! The receiving side of the peer transport: each batch's sender checked
//! before anything is decoded, its messages stepped into raft; snapshot
//! bodies stored as they stream in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use meridian_proto::meridian::v1::raft_transport_server::RaftTransport;
use meridian_proto::meridian::v1::{RaftAck, RaftBatch, SnapshotChunk};
use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::{PeerSet, CHUNKS_AHEAD, REMOVED, SNAPSHOT_IDLE};
use crate::metrics::Metrics;
use crate::raft::driver::{is_snapshot, try_input, Input};
use crate::raft::storage::{ReceivedSnapshot, SnapshotSource};

/// The receiving side: checks the sender is a configured member of this
/// cluster before decoding anything, then feeds the raft thread.
pub struct PeerService {
    pub cluster_id: u64,
    pub members: PeerSet,
    pub raft_tx: Sender<Input>,
    /// Where incoming snapshot bodies are stored.
    pub source: Arc<dyn SnapshotSource>,
    pub metrics: Arc<Metrics>,
    /// Held while a snapshot is being received: one at a time.
    pub receiving: tokio::sync::Mutex<()>,
}

impl PeerService {
    fn inbox(&self) -> Inbox {
        Inbox {
            cluster_id: self.cluster_id,
            members: self.members.clone(),
            raft_tx: self.raft_tx.clone(),
            metrics: self.metrics.clone(),
        }
    }

    fn check_sender(&self, cluster_id: u64, from: u64, from_url: &str) -> Result<(), Status> {
        self.inbox().check_sender(cluster_id, from, from_url)
    }
}

/// What delivering a batch needs, owned (a stream of batches holds it).
struct Inbox {
    cluster_id: u64,
    members: PeerSet,
    raft_tx: Sender<Input>,
    metrics: Arc<Metrics>,
}

impl Inbox {
    /// Checks the sender, then steps each message into raft.
    fn deliver(&self, batch: RaftBatch) -> Result<(), Status> {
        self.check_sender(batch.cluster_id, batch.from, &batch.from_url)?;
        let from_label = format!("{:x}", batch.from);
        let bytes = batch.messages.iter().map(|m| m.len() as u64).sum::<u64>();
        for msg in decode_messages(&batch).map_err(Status::invalid_argument)? {
            if is_snapshot(&msg) {
                // Its body would be missing: snapshots come by InstallSnapshot.
                return Err(Status::invalid_argument("a snapshot must come by InstallSnapshot"));
            }
            // A full raft channel refuses the rest of the batch; the sender
            // counts it as failed and raft resends.
            try_input(&self.raft_tx, Input::Step(msg)).map_err(|e| Status::unavailable(e.to_string()))?;
        }
        self.metrics.peer_received_bytes.with_label_values(&[&from_label]).inc_by(bytes);
        Ok(())
    }

    /// A sender must be of this cluster and not removed from it. One not in
    /// this member's list yet is taken (this member may have missed its
    /// addition), and answered at `from_url`.
    fn check_sender(&self, cluster_id: u64, from: u64, from_url: &str) -> Result<(), Status> {
        if cluster_id != self.cluster_id {
            return Err(Status::failed_precondition(format!(
                "cluster ID mismatch: local {:x}, remote {cluster_id:x}",
                self.cluster_id
            )));
        }
        let peers = self.members.read();
        if peers.removed.contains(&from) {
            return Err(Status::permission_denied(REMOVED));
        }
        if !peers.members.contains(&from) && !peers.learned.contains_key(&from) {
            if from_url.is_empty() {
                return Err(Status::permission_denied(format!("{from:x} is not a member of this cluster")));
            }
            drop(peers);
            tracing::info!(peer = format!("{from:x}"), url = from_url, "a member not in the member list yet");
            self.members.write().learned.insert(from, from_url.to_string());
        }
        Ok(())
    }
}

impl PeerService {
    /// Stores the body that follows a snapshot's first chunk, on a blocking
    /// thread, a few chunks at a time.
    async fn receive_body(
        &self,
        index: u64,
        header: Vec<u8>,
        stream: &mut Streaming<SnapshotChunk>,
    ) -> Result<Box<dyn ReceivedSnapshot>, Status> {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(CHUNKS_AHEAD);
        let source = self.source.clone();
        let store = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let stored = source.receive(index, &header, &mut std::iter::from_fn(|| rx.blocking_recv()));
            (stored, started.elapsed())
        });
        let (mut done, mut failed) = (false, None);
        while !done {
            match tokio::time::timeout(SNAPSHOT_IDLE, stream.message()).await {
                Err(_) => failed = Some(Status::deadline_exceeded("snapshot stream idle")),
                Ok(Err(status)) => failed = Some(status),
                Ok(Ok(None)) => failed = Some(Status::invalid_argument("snapshot stream ended before its last chunk")),
                Ok(Ok(Some(chunk))) => {
                    // A send fails only once storing gave up; its error is below.
                    if !chunk.data.is_empty() && tx.send(chunk.data).await.is_err() {
                        break;
                    }
                    done = chunk.done;
                }
            }
            if failed.is_some() {
                break;
            }
        }
        drop(tx);
        let (stored, took) = store.await.map_err(|e| Status::internal(format!("snapshot store task: {e}")))?;
        if let Some(status) = failed {
            return Err(status); // the partial body is dropped, and discarded with it
        }
        let stored = stored.map_err(|e| Status::invalid_argument(format!("storing snapshot: {e}")))?;
        if !done {
            return Err(Status::invalid_argument("snapshot stream ended before its last chunk"));
        }
        self.metrics.snap_db_save.observe(took.as_secs_f64());
        Ok(stored)
    }
}

#[tonic::async_trait]
impl RaftTransport for PeerService {
    async fn send(&self, req: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        self.inbox().deliver(req.into_inner())?;
        Ok(Response::new(RaftAck {}))
    }

    type StreamStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftAck, Status>> + Send>>;

    /// An ack per batch delivered, in order; a refused batch ends the
    /// stream with its error.
    async fn stream(&self, req: Request<Streaming<RaftBatch>>) -> Result<Response<Self::StreamStream>, Status> {
        let acks = futures::stream::unfold(Some((req.into_inner(), self.inbox())), |state| async move {
            let (mut batches, inbox) = state?;
            let answer = match batches.message().await {
                Ok(None) => return None,
                Ok(Some(batch)) => inbox.deliver(batch),
                Err(status) => Err(status),
            };
            match answer {
                Ok(()) => Some((Ok(RaftAck {}), Some((batches, inbox)))),
                Err(status) => Some((Err(status), None)),
            }
        });
        Ok(Response::new(Box::pin(acks)))
    }

    async fn install_snapshot(&self, req: Request<Streaming<SnapshotChunk>>) -> Result<Response<RaftAck>, Status> {
        let mut stream = req.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        self.check_sender(first.cluster_id, first.from, "")?;
        let msg = decode_snapshot_message(&first).map_err(Status::invalid_argument)?;
        let Ok(_one_at_a_time) = self.receiving.try_lock() else {
            return Err(Status::unavailable("already receiving a snapshot"));
        };
        let index = msg.get_snapshot().get_metadata().index;
        let from_label = format!("{:x}", first.from);
        tracing::info!(from = %from_label, index, "receiving snapshot");
        self.metrics.snapshot_receive_inflights.with_label_values(&[&from_label]).inc();
        let started = Instant::now();
        let header = msg.get_snapshot().get_data().to_vec();
        let result = self.receive_body(index, header, &mut stream).await;
        self.metrics.snapshot_receive_inflights.with_label_values(&[&from_label]).dec();
        let stored = match result {
            Ok(stored) => stored,
            Err(status) => {
                self.metrics.snapshot_receive_failures.with_label_values(&[&from_label]).inc();
                tracing::warn!(from = %from_label, index, error = %status.message(), "receiving snapshot failed");
                return Err(status);
            }
        };
        // The body is durable; raft may now take the snapshot and restore it.
        // A full raft channel is waited out (for a while): the body is here.
        stored.keep();
        let mut msg = Some(msg);
        for _ in 0..100 {
            match self.raft_tx.try_send(Input::Step(msg.take().expect("not sent yet"))) {
                Ok(()) => break,
                Err(crossbeam_channel::TrySendError::Full(Input::Step(m))) => {
                    msg = Some(m);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(_) => return Err(Status::unavailable("the member is stopping")),
            }
        }
        if msg.is_some() {
            return Err(Status::unavailable("etcdserver: too many requests"));
        }
        let took = started.elapsed();
        self.metrics.snapshot_receive_success.with_label_values(&[&from_label]).inc();
        self.metrics.snapshot_receive_duration.with_label_values(&[&from_label]).observe(took.as_secs_f64());
        tracing::info!(from = %from_label, index, ms = took.as_millis() as u64, "snapshot received");
        Ok(Response::new(RaftAck {}))
    }
}

/// The MsgSnapshot in a snapshot stream's first chunk, checked to come
/// from the chunk's sender.
///
/// # Errors
///
/// A message that does not decode, is not a snapshot, or names another sender.
pub fn decode_snapshot_message(first: &SnapshotChunk) -> Result<Message, String> {
    let msg = Message::parse_from_bytes(&first.message).map_err(|e| format!("bad raft message: {e}"))?;
    if !is_snapshot(&msg) {
        return Err("the first chunk of a snapshot stream must carry a snapshot message".to_string());
    }
    if msg.from != first.from {
        return Err("raft message sender differs from the stream's sender".to_string());
    }
    Ok(msg)
}

/// The raft messages of a peer's batch, each checked to come from the
/// batch's sender. Bytes from the network: any input gets an answer, never a
/// panic (fuzzed by `fuzz/fuzz_targets/peer_batch.rs`).
///
/// # Errors
///
/// A message that does not decode, or that names another sender.
pub fn decode_messages(batch: &RaftBatch) -> Result<Vec<Message>, String> {
    batch
        .messages
        .iter()
        .map(|raw| {
            let msg = Message::parse_from_bytes(raw).map_err(|e| format!("bad raft message: {e}"))?;
            if msg.from != batch.from {
                return Err("raft message sender differs from the batch sender".to_string());
            }
            Ok(msg)
        })
        .collect()
}
