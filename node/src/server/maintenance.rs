//! etcd's Maintenance service: status, hashes, alarms, defragmentation, leader moves.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use meridian_proto::etcdserverpb::alarm_request::AlarmAction;
use meridian_proto::etcdserverpb::maintenance_server::Maintenance;
use meridian_proto::etcdserverpb::*;
use meridian_proto::meridian::v1::internal_request::Request as Internal;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::mvcc::StoreImage;
use crate::raft::Input;
use crate::snapshot::write_etcd_db;

use super::apply::Applied;
use super::cluster::{Alarms, Members};
use super::EtcdServer;

/// The etcd API version Meridian reproduces; clients and tools read it.
pub const ETCD_VERSION: &str = "3.4.23";
/// The cluster version etcd 3.4 reports.
pub const ETCD_CLUSTER_VERSION: &str = "3.4.0";

pub struct MaintenanceService {
    pub server: Arc<EtcdServer>,
    /// Where Maintenance.Snapshot writes its scratch file (the data
    /// directory, so the copy counts against the same disk).
    pub scratch_dir: PathBuf,
}

/// The chunk size of a snapshot stream, as etcd's.
const SNAPSHOT_CHUNK: usize = 32 * 1024;

/// Writes `image` as etcd's backend into a scratch file in `dir` and sends
/// it on `tx`; returns early, quietly, when the client has gone.
fn stream_snapshot(
    image: &StoreImage,
    dir: &Path,
    tx: &tokio::sync::mpsc::Sender<Result<SnapshotResponse, Status>>,
) -> crate::error::Result<()> {
    let started = Instant::now();
    let mut file = tempfile::tempfile_in(dir)?;
    let size = write_etcd_db(image, file.try_clone()?)?;
    file.seek(SeekFrom::Start(0))?;
    tracing::info!(revision = image.marks.current, size, "sending database snapshot to client");
    let mut sha = Sha256::new();
    let mut sent = 0u64;
    while sent < size {
        let n = SNAPSHOT_CHUNK.min((size - sent) as usize);
        let mut blob = vec![0; n];
        file.read_exact(&mut blob)?;
        sha.update(&blob);
        sent += n as u64;
        let chunk = SnapshotResponse { header: None, remaining_bytes: size - sent, blob };
        if tx.blocking_send(Ok(chunk)).is_err() {
            tracing::info!(sent, size, "snapshot client went away");
            return Ok(());
        }
    }
    let digest = SnapshotResponse { header: None, remaining_bytes: 0, blob: sha.finalize().to_vec() };
    if tx.blocking_send(Ok(digest)).is_ok() {
        tracing::info!(size, took = ?started.elapsed(), "sent database snapshot to client");
    }
    Ok(())
}

fn alarm_name(alarm: i32) -> &'static str {
    AlarmType::try_from(alarm).map(|a| a.as_str_name()).unwrap_or("NONE")
}

impl MaintenanceService {
    /// `Mvcc::hash_kv`, a scan of the whole history, on a blocking thread.
    /// Defragment, Hash, HashKV and Snapshot are root's. etcd 3.4 refuses
    /// them with its auth store's own errors, code Unknown; so does this.
    async fn check_admin(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        let refused = match self.server.check_admin(metadata).await {
            Ok(_) => return Ok(()),
            Err(Error::UserEmpty) => "user name is empty",
            Err(Error::UserNotFound) => "user not found",
            Err(Error::PermissionDenied) => "permission denied",
            Err(Error::InvalidAuthToken) => "invalid auth token",
            Err(other) => return Err(other.into()),
        };
        Err(Status::unknown(format!("auth: {refused}")))
    }

    async fn scan_hash(&self, revision: i64) -> Result<(u32, i64, i64), Status> {
        let mvcc = self.server.mvcc.clone();
        let started = std::time::Instant::now();
        let hashed = tokio::task::spawn_blocking(move || mvcc.hash_kv(revision));
        let hashed = hashed.await.map_err(|e| Status::internal(e.to_string()))??;
        let histogram =
            if revision == 0 { &self.server.metrics.hash_duration } else { &self.server.metrics.hash_rev_duration };
        histogram.observe(started.elapsed().as_secs_f64());
        Ok(hashed)
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let metadata = req.metadata().clone();
        let r = req.into_inner();
        let rev = self.server.mvcc.marks().current;
        if r.action == AlarmAction::Get as i32 {
            let alarms = Alarms::load(&self.server.mvcc);
            return Ok(Response::new(AlarmResponse { header: Some(self.server.header(rev)), alarms: alarms.0 }));
        }
        // Raising or clearing an alarm is root's (etcd 3.4.42 and later; 3.4.23 lets anyone).
        self.server.check_admin(&metadata).await?;
        match self.server.propose(Internal::Alarm(r)).await? {
            Applied::Alarm(mut resp) => {
                resp.header = Some(self.server.header(self.server.mvcc.marks().current));
                Ok(Response::new(resp))
            }
            other => Err(Status::internal(format!("unexpected apply result {other:?}"))),
        }
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = &self.server;
        let status = s.raft.status();
        let marks = s.mvcc.marks();
        let mut errors = Vec::new();
        if status.leader() == 0 {
            errors.push(crate::error::Error::NoLeader.to_string());
        }
        for a in Alarms::load(&s.mvcc).0 {
            errors.push(format!("memberID:{} alarm:{} ", a.member_id, alarm_name(a.alarm)));
        }
        let db_size = s.mvcc.disk_size() as i64;
        let in_use = s.mvcc.size_in_use() as i64;
        s.metrics.db_total_size.set(db_size);
        s.metrics.db_in_use.set(in_use);
        Ok(Response::new(StatusResponse {
            header: Some(s.header(marks.current)),
            version: ETCD_VERSION.to_string(),
            db_size,
            leader: status.leader(),
            raft_index: status.commit(),
            raft_term: status.term(),
            raft_applied_index: status.applied(),
            errors,
            db_size_in_use: in_use,
            is_learner: status.is_learner(),
        }))
    }

    async fn defragment(&self, req: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        self.check_admin(req.metadata()).await?;
        let mvcc = self.server.mvcc.clone();
        let m = &self.server.metrics;
        let started = std::time::Instant::now();
        m.defrag_inflight.set(1);
        let done = tokio::task::spawn_blocking(move || mvcc.defragment()).await;
        m.defrag_inflight.set(0);
        m.defrag_duration.observe(started.elapsed().as_secs_f64());
        done.map_err(|e| Status::internal(e.to_string()))??;
        // etcd 3.4 answers with no header; clients (the etcd-client crate's
        // own tests) expect exactly that.
        Ok(Response::new(DefragmentResponse { header: None }))
    }

    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.check_admin(req.metadata()).await?;
        let (hash, _, rev) = self.scan_hash(0).await?;
        Ok(Response::new(HashResponse { header: Some(self.server.header(rev)), hash }))
    }

    async fn hash_kv(&self, req: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        self.check_admin(req.metadata()).await?;
        let (hash, compact_revision, rev) = self.scan_hash(req.into_inner().revision).await?;
        Ok(Response::new(HashKvResponse { header: Some(self.server.header(rev)), hash, compact_revision }))
    }

    type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

    /// etcd 3.4's stream: the backend file in chunks, each with the bytes
    /// still to come after it, then one message holding the file's sha256
    /// (which `etcdctl snapshot restore` checks). The file is written to a
    /// nameless scratch file beside the store first, so the size is known
    /// and a slow client holds no store snapshot open for longer than it
    /// takes to write.
    async fn snapshot(&self, req: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        self.check_admin(req.metadata()).await?;
        let image = self.server.mvcc.settled_image().map_err(|_| {
            Status::unavailable("meridian: this member is restoring a raft snapshot; retry the snapshot")
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let dir = self.scratch_dir.clone();
        let metrics = self.server.metrics.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            match stream_snapshot(&image, &dir, &tx) {
                Ok(()) => metrics.backend_snapshot_duration.observe(started.elapsed().as_secs_f64()),
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::internal(format!("meridian: snapshot: {e}"))));
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    /// On the leader only, as etcd: hands leadership to a voting member and
    /// answers once this member sees it lead.
    async fn move_leader(&self, req: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        self.server.check_admin(req.metadata()).await?;
        let target = req.into_inner().target_id;
        let status = self.server.raft.status().clone();
        if !status.is_leader() {
            return Err(Error::NotLeader.into());
        }
        if Members::load(&self.server.mvcc).get(target).is_none() {
            return Err(Error::BadLeaderTransferee.into());
        }
        let mut leader = status.watch_leader();
        self.server.raft.send(Input::TransferLeader(target))?;
        // raft abandons a transfer after an election timeout; allow for a
        // campaign after it, as a client waiting longer would.
        let deadline = 3 * self.server.limits.election_timeout;
        tracing::info!(from = format!("{:x}", status.id), to = format!("{target:x}"), "leadership transfer starting");
        let moved = tokio::time::timeout(deadline, leader.wait_for(|l| *l == target)).await;
        match moved {
            Ok(Ok(_)) => {
                tracing::info!(to = format!("{target:x}"), "leadership transfer finished");
                Ok(Response::new(MoveLeaderResponse { header: None }))
            }
            Ok(Err(_)) => Err(Error::Stopped.into()),
            Err(_) => Err(Error::LeaderTransferTimeout.into()),
        }
    }
}
