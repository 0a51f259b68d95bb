//! The peer transport: raft messages over gRPC (`meridian.v1.RaftTransport`).
//!
//! Each peer has one task and one in-flight RPC. Messages produced while an
//! RPC is on the wire queue up and leave together in the next batch, so the
//! batch size grows with load and the per-message cost falls. A failed send
//! drops its batch (raft retransmits) and tells raft the peer is unreachable.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use meridian_proto::meridian::v1::raft_transport_client::RaftTransportClient;
use meridian_proto::meridian::v1::raft_transport_server::RaftTransport;
use meridian_proto::meridian::v1::{RaftAck, RaftBatch};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

use super::driver::{is_snapshot, try_input, Input, Transport};
use crate::metrics::Metrics;

/// Most messages in one batch.
const MAX_BATCH: usize = 4096;
/// Messages queued for one peer, at most. raft-rs itself keeps at most
/// `max_inflight_msgs` appends in flight to a replicating peer; past this
/// bound (a peer that does not keep up) messages are dropped, which raft
/// recovers from by resending, and the peer is reported unreachable.
const PEER_QUEUE: usize = 2 * MAX_BATCH;
/// Largest message a peer accepts: room for a whole-store snapshot.
pub const MAX_PEER_MESSAGE: usize = 1 << 30;

/// Sends to peers over gRPC.
pub struct GrpcTransport {
    peers: HashMap<u64, mpsc::Sender<Message>>,
    raft_tx: Sender<Input>,
}

impl GrpcTransport {
    /// Starts one sender task per peer (`id -> peer URL`). Must be called
    /// inside a tokio runtime.
    pub fn start(
        cluster_id: u64,
        self_id: u64,
        peers: HashMap<u64, String>,
        raft_tx: Sender<Input>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut senders = HashMap::new();
        for (id, url) in peers {
            if id == self_id {
                continue;
            }
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            senders.insert(id, tx);
            let link =
                PeerLink { cluster_id, from: self_id, to: id, raft_tx: raft_tx.clone(), metrics: metrics.clone() };
            tokio::spawn(link.run(url, rx));
        }
        Self { peers: senders, raft_tx }
    }
}

impl Transport for GrpcTransport {
    fn send(&self, msgs: Vec<Message>) {
        let mut full = Vec::new();
        for m in msgs {
            let Some(tx) = self.peers.get(&m.to) else { continue };
            if let Err(mpsc::error::TrySendError::Full(m)) = tx.try_send(m) {
                if is_snapshot(&m) {
                    let _ = try_input(&self.raft_tx, Input::SnapshotDelivered { to: m.to, ok: false });
                }
                if !full.contains(&m.to) {
                    full.push(m.to);
                }
            }
        }
        for to in full {
            tracing::debug!(peer = format!("{to:x}"), "peer queue full; dropped messages");
            let _ = try_input(&self.raft_tx, Input::Unreachable(to));
        }
    }
}

struct PeerLink {
    cluster_id: u64,
    from: u64,
    to: u64,
    raft_tx: Sender<Input>,
    metrics: Arc<Metrics>,
}

impl PeerLink {
    async fn run(self, url: String, mut rx: mpsc::Receiver<Message>) {
        let endpoint = match Endpoint::from_shared(url.clone()) {
            Ok(e) => e.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true),
            Err(e) => {
                tracing::error!(peer = format!("{:x}", self.to), %url, error = %e, "bad peer URL");
                return;
            }
        };
        let mut client = RaftTransportClient::new(endpoint.connect_lazy())
            .max_encoding_message_size(MAX_PEER_MESSAGE)
            .max_decoding_message_size(MAX_PEER_MESSAGE);
        let to_label = format!("{:x}", self.to);
        let mut failing = false;
        while let Some(first) = rx.recv().await {
            let mut msgs = vec![first];
            while msgs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => msgs.push(m),
                    Err(_) => break,
                }
            }
            let snapshot = msgs.iter().any(is_snapshot);
            let batch = RaftBatch {
                cluster_id: self.cluster_id,
                from: self.from,
                to: self.to,
                messages: msgs.iter().map(|m| m.write_to_bytes().expect("encode raft message")).collect(),
            };
            let bytes = batch.encoded_len() as u64;
            let timeout = if snapshot { Duration::from_secs(120) } else { Duration::from_secs(5) };
            let mut req = Request::new(batch);
            req.set_timeout(timeout);
            match client.send(req).await {
                Ok(_) => {
                    if failing {
                        tracing::info!(peer = %to_label, "peer reachable again");
                        failing = false;
                    }
                    self.metrics.peer_sent_bytes.with_label_values(&[&to_label]).inc_by(bytes);
                    if snapshot {
                        let _ = try_input(&self.raft_tx, Input::SnapshotDelivered { to: self.to, ok: true });
                    }
                }
                Err(status) => {
                    if !failing {
                        tracing::warn!(peer = %to_label, error = %status.message(), "cannot reach peer");
                        failing = true;
                    }
                    self.metrics.peer_sent_failures.with_label_values(&[&to_label]).inc();
                    let _ = try_input(&self.raft_tx, Input::Unreachable(self.to));
                    if snapshot {
                        let _ = try_input(&self.raft_tx, Input::SnapshotDelivered { to: self.to, ok: false });
                    }
                    // Messages queued meanwhile are stale; raft resends what matters.
                    while rx.try_recv().is_ok() {}
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// The receiving side: checks the sender is a configured member of this
/// cluster before decoding anything, then feeds the raft thread.
pub struct PeerService {
    pub cluster_id: u64,
    pub members: HashSet<u64>,
    pub raft_tx: Sender<Input>,
    pub metrics: Arc<Metrics>,
}

#[tonic::async_trait]
impl RaftTransport for PeerService {
    async fn send(&self, req: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        let batch = req.into_inner();
        if batch.cluster_id != self.cluster_id {
            return Err(Status::failed_precondition(format!(
                "cluster ID mismatch: local {:x}, remote {:x}",
                self.cluster_id, batch.cluster_id
            )));
        }
        if !self.members.contains(&batch.from) {
            return Err(Status::permission_denied(format!("{:x} is not a member of this cluster", batch.from)));
        }
        let from_label = format!("{:x}", batch.from);
        let bytes = batch.messages.iter().map(|m| m.len() as u64).sum::<u64>();
        for msg in decode_messages(&batch).map_err(Status::invalid_argument)? {
            // A full raft channel refuses the rest of the batch; the sender
            // counts it as failed and raft resends.
            try_input(&self.raft_tx, Input::Step(msg)).map_err(|e| Status::unavailable(e.to_string()))?;
        }
        self.metrics.peer_received_bytes.with_label_values(&[&from_label]).inc_by(bytes);
        Ok(Response::new(RaftAck {}))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> (PeerService, crossbeam_channel::Receiver<Input>) {
        let (tx, rx) = crossbeam_channel::bounded(8);
        let svc =
            PeerService { cluster_id: 7, members: [1, 2].into(), raft_tx: tx, metrics: Arc::new(Metrics::default()) };
        (svc, rx)
    }

    fn batch(cluster_id: u64, from: u64, msg_from: u64) -> RaftBatch {
        let mut m = Message::default();
        m.from = msg_from;
        m.to = 1;
        RaftBatch { cluster_id, from, to: 1, messages: vec![m.write_to_bytes().unwrap()] }
    }

    #[tokio::test]
    async fn only_configured_members_of_this_cluster_reach_raft() {
        let (svc, rx) = service();
        let err = svc.send(Request::new(batch(8, 2, 2))).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "another cluster");
        let err = svc.send(Request::new(batch(7, 9, 9))).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "not a member");
        let err = svc.send(Request::new(batch(7, 2, 9))).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "a message claiming another sender");
        assert!(rx.try_recv().is_err(), "nothing reached raft");
        svc.send(Request::new(batch(7, 2, 2))).await.unwrap();
        assert!(matches!(rx.try_recv(), Ok(Input::Step(m)) if m.from == 2));
    }
}
