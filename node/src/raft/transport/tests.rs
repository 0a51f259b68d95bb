//! The peer transport's sending and receiving sides, over real gRPC on loopback.

use meridian_proto::meridian::v1::raft_transport_server::{RaftTransport, RaftTransportServer};
use tonic::Response;

use super::*;
use crate::raft::storage::{ReceivedSnapshot, SnapshotSource};

/// Refuses every snapshot: these tests send none.
struct NoSnapshots;

impl SnapshotSource for NoSnapshots {
    fn prepare(&self) -> crate::error::Result<Arc<dyn crate::raft::storage::SnapshotImage>> {
        Err(crate::error::Error::Stopped)
    }
    fn receive(
        &self,
        _: u64,
        _: &[u8],
        _: &mut dyn Iterator<Item = Vec<u8>>,
    ) -> crate::error::Result<Box<dyn ReceivedSnapshot>> {
        Err(crate::error::Error::Stopped)
    }
}

fn service() -> (PeerService, crossbeam_channel::Receiver<Input>) {
    service_with(8)
}

/// A peer service whose raft channel holds `capacity` inputs.
fn service_with(capacity: usize) -> (PeerService, crossbeam_channel::Receiver<Input>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let svc = PeerService {
        cluster_id: 7,
        members: Arc::new(parking_lot::RwLock::new(Peers {
            members: [1, 2].into(),
            removed: [5].into(),
            learned: HashMap::new(),
        })),
        raft_tx: tx,
        source: Arc::new(NoSnapshots),
        metrics: Arc::new(Metrics::default()),
        receiving: Default::default(),
    };
    (svc, rx)
}

fn batch(cluster_id: u64, from: u64, msg_from: u64) -> RaftBatch {
    let m = Message { from: msg_from, to: 1, ..Default::default() };
    RaftBatch { cluster_id, from, to: 1, messages: vec![m.write_to_bytes().unwrap()], from_url: String::new() }
}

#[tokio::test]
async fn only_members_of_this_cluster_reach_raft() {
    let (svc, rx) = service();
    let err = svc.send(Request::new(batch(8, 2, 2))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "another cluster");
    let err = svc.send(Request::new(batch(7, 9, 9))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "not a member, and no URL to answer it at");
    let err = svc.send(Request::new(batch(7, 5, 5))).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (tonic::Code::PermissionDenied, REMOVED), "removed");
    let err = svc.send(Request::new(batch(7, 2, 9))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "a message claiming another sender");
    assert!(rx.try_recv().is_err(), "nothing reached raft");
    svc.send(Request::new(batch(7, 2, 2))).await.unwrap();
    assert!(matches!(rx.try_recv(), Ok(Input::Step(m)) if m.from == 2));
    // A member added while this one was away is taken, and answered at its URL.
    let newcomer = RaftBatch { from_url: "http://127.0.0.1:9".into(), ..batch(7, 9, 9) };
    svc.send(Request::new(newcomer)).await.unwrap();
    assert!(matches!(rx.try_recv(), Ok(Input::Step(m)) if m.from == 9));
    assert_eq!(svc.members.read().learned.get(&9).map(String::as_str), Some("http://127.0.0.1:9"));
}

#[tokio::test]
async fn a_snapshot_comes_only_by_its_own_stream() {
    let (svc, rx) = service();
    let mut snap = Message { from: 2, to: 1, ..Default::default() };
    snap.set_msg_type(raft::eraftpb::MessageType::MsgSnapshot);
    let raw = snap.write_to_bytes().unwrap();
    let batch = RaftBatch { cluster_id: 7, from: 2, to: 1, messages: vec![raw.clone()], from_url: String::new() };
    let err = svc.send(Request::new(batch)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "its body would be missing");
    assert!(rx.try_recv().is_err(), "nothing reached raft");

    let first = SnapshotChunk { cluster_id: 7, from: 2, to: 1, message: raw, ..Default::default() };
    assert!(decode_snapshot_message(&first).is_ok());
    let other_sender = SnapshotChunk { from: 3, ..first.clone() };
    assert!(decode_snapshot_message(&other_sender).is_err());
    let append = SnapshotChunk { message: batch_message(2), ..first };
    assert!(decode_snapshot_message(&append).is_err(), "the first chunk must carry a snapshot");
}

fn batch_message(from: u64) -> Vec<u8> {
    Message { from, ..Default::default() }.write_to_bytes().unwrap()
}

/// A peer as an older member serves it: `Send` only, `Stream` unknown.
struct SendOnly(PeerService);

#[tonic::async_trait]
impl RaftTransport for SendOnly {
    async fn send(&self, req: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        self.0.send(req).await
    }
    type StreamStream = <PeerService as RaftTransport>::StreamStream;
    async fn stream(&self, _: Request<Streaming<RaftBatch>>) -> Result<Response<Self::StreamStream>, Status> {
        Err(Status::unimplemented("no Stream here"))
    }
    async fn install_snapshot(&self, req: Request<Streaming<SnapshotChunk>>) -> Result<Response<RaftAck>, Status> {
        self.0.install_snapshot(req).await
    }
}

/// Member 2's transport to member 1 at `url`.
fn transport_to(url: String) -> GrpcTransport {
    let (raft_tx, _) = crossbeam_channel::bounded(8);
    let ctx = Arc::new(PeerContext {
        cluster_id: 7,
        self_id: 2,
        raft_tx,
        images: Default::default(),
        max_message: DEFAULT_MAX_PEER_MESSAGE,
        reports: Default::default(),
        metrics: Arc::new(Metrics::default()),
        tls: Default::default(),
        active: Default::default(),
        status: Arc::new(crate::raft::RaftStatus::new(2)),
        self_url: String::new(),
    });
    GrpcTransport::start(ctx, HashMap::from([(1, url)]), HashSet::new(), Default::default())
}

/// Messages reach the peer on the stream, in order; a peer without `Stream` gets them by
/// `Send`, one batch at a time.
#[tokio::test]
async fn messages_reach_a_peer_by_stream_or_by_send() {
    for old in [false, true] {
        let (svc, rx) = service_with(1024);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let router = if old {
            tonic::transport::Server::builder().add_service(RaftTransportServer::new(SendOnly(svc)))
        } else {
            tonic::transport::Server::builder().add_service(RaftTransportServer::new(svc))
        };
        let server = tokio::spawn(router.serve_with_incoming(incoming));
        let transport = transport_to(url);
        for round in 0..20u64 {
            let msgs = (0..3).map(|i| Message { from: 2, to: 1, index: round * 3 + i, ..Default::default() });
            transport.send(msgs.collect());
        }
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < 60 {
            assert!(Instant::now() < deadline, "old peer {old}: {} of 60 messages", got.len());
            match rx.try_recv() {
                Ok(Input::Step(m)) => got.push(m.index),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        assert_eq!(got, (0..60).collect::<Vec<_>>(), "old peer {old}: every message once, in order");
        server.abort();
    }
}

/// A batch the peer refuses (its raft channel is full) ends the stream; what was queued is
/// dropped (raft resends), and the next messages go out on a new stream.
#[tokio::test]
async fn a_refused_batch_ends_the_stream_and_the_next_messages_open_another() {
    let (svc, rx) = service_with(8);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let router = tonic::transport::Server::builder().add_service(RaftTransportServer::new(svc));
    let server = tokio::spawn(router.serve_with_incoming(incoming));
    let transport = transport_to(url);
    for index in 0..60 {
        transport.send(vec![Message { from: 2, to: 1, index, ..Default::default() }]);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first: Vec<u64> =
        rx.try_iter().filter_map(|i| if let Input::Step(m) = i { Some(m.index) } else { None }).collect();
    assert_eq!(first, (0..8).collect::<Vec<_>>(), "the raft channel took 8, in order");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        transport.send(vec![Message { from: 2, to: 1, index: 1000, ..Default::default() }]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        if rx.try_iter().any(|i| matches!(i, Input::Step(m) if m.index == 1000)) {
            break;
        }
        assert!(Instant::now() < deadline, "nothing got through after the refused batch");
    }
    server.abort();
}

#[test]
fn snapshot_chunks_fit_the_peer_limit() {
    assert_eq!(snapshot_chunk_bytes(DEFAULT_MAX_PEER_MESSAGE), 1 << 20);
    assert_eq!(snapshot_chunk_bytes(256 << 10), 128 << 10);
}
