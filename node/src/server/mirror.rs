//! `meridian.v1.Mirror`: what the mirror process calls. On a secondary,
//! `Apply` writes source revisions at their own revision numbers (through
//! raft, like any write); on any member, `Status` reports the revision the
//! mirror resumes from, and `RangeStream` hands out raw history for a
//! first copy.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use meridian_proto::meridian::v1::internal_request::Request as Internal;
use meridian_proto::meridian::v1::mirror_server::Mirror;
use meridian_proto::meridian::v1::{
    MirrorApplyRequest, MirrorApplyResponse, MirrorAuthRequest, MirrorAuthResponse, MirrorHeartbeat,
    MirrorHeartbeatResponse, MirrorStatusRequest, MirrorStatusResponse, RangeStreamChunk, RangeStreamRequest,
};
use meridian_wire::token::{self, TOKEN_METADATA};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::apply::Applied;
use super::freshness::MirrorReport;
use super::region::Role;
use super::EtcdServer;
use crate::error::Error;
use crate::mvcc::KeyRange;

/// Staleness in whole ms for the wire; -1 when unknown.
fn staleness_ms(seconds: f64) -> i64 {
    if seconds.is_finite() {
        (seconds * 1000.0) as i64
    } else {
        -1
    }
}

/// Records per `RangeStream` chunk.
const CHUNK_RECORDS: usize = 1000;
/// Chunks a `RangeStream` reads ahead of its client, at most.
const CHUNKS_AHEAD: usize = 4;

/// The Mirror service of every member. A secondary's staleness comes from
/// the mirror's heartbeats (`server::freshness`), which reach every member;
/// the mirror's own counters arrive with each Apply and heartbeat and are
/// only echoed by Status (they are the mirror's metrics, not the node's).
pub struct MirrorService {
    pub server: Arc<EtcdServer>,
    /// What `Apply` must present in [`TOKEN_METADATA`]; `None` refuses every Apply.
    token: Option<String>,
}

impl MirrorService {
    pub fn new(server: Arc<EtcdServer>, token: Option<String>) -> Self {
        Self { server, token }
    }

    /// Only a secondary takes mirror writes, and only from a caller holding
    /// its mirror token, or, with auth on, a user with the role `root` or
    /// [`MIRROR_ROLE`] (see [`MirrorService::check_mirror_user`]).
    async fn check_apply(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        const WHAT: &str = "mirror writes (Mirror.Apply, Mirror.Heartbeat)";
        if self.server.auth.enabled() {
            self.check_mirror_user(metadata).await?;
        } else {
            check_token(self.token.as_deref(), metadata, WHAT)?;
        }
        if !self.server.role.is_secondary() {
            return Err(Error::Fenced("mirror writes go to a secondary; this cluster is a primary".into()).into());
        }
        Ok(())
    }
}

/// The role that lets a user mirror, besides `root`: read a source's raw
/// history and auth store, and write into a secondary.
pub const MIRROR_ROLE: &str = "mirror";

impl MirrorService {
    /// With auth on: the caller's token must name a user with the role
    /// `root` or [`MIRROR_ROLE`].
    async fn check_mirror_user(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        let who = self.server.auth_info(metadata).await?;
        let state = self.server.auth.state();
        if who.user.is_empty() {
            return Err(Error::UserEmpty.into());
        }
        let roles = state.users.get(&who.user).map(|u| u.roles.as_slice()).unwrap_or_default();
        if roles.iter().any(|r| r == super::auth::ROOT || r == MIRROR_ROLE) {
            Ok(())
        } else {
            Err(Error::PermissionDenied.into())
        }
    }

    /// A source's raw history and auth store: with auth on, for a user with
    /// the role `root` or [`MIRROR_ROLE`]; with it off, history for anyone
    /// (it is what Watch serves) and the auth store for the mirror token.
    async fn check_source_read(&self, metadata: &tonic::metadata::MetadataMap, auth_store: bool) -> Result<(), Status> {
        if self.server.auth.enabled() {
            self.check_mirror_user(metadata).await
        } else if auth_store {
            check_token(self.token.as_deref(), metadata, "reads of the auth store (Mirror.AuthStore)")
        } else {
            Ok(())
        }
    }
}

/// Refuses `what` unless the caller presents this member's mirror token;
/// a member with none refuses it to everyone.
pub(super) fn check_token(
    want: Option<&str>,
    metadata: &tonic::metadata::MetadataMap,
    what: &str,
) -> Result<(), Status> {
    let Some(want) = want else {
        return Err(Status::permission_denied(format!(
            "meridian: {what} are refused: this member has no --mirror-token-file"
        )));
    };
    let given = metadata.get(TOKEN_METADATA).map(|v| v.as_bytes()).unwrap_or_default();
    if !token::same_secret(given, want.as_bytes()) {
        return Err(Status::unauthenticated(format!(
            "meridian: {what} need the mirror token in {TOKEN_METADATA} (the --mirror-token-file of this cluster)"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Mirror for MirrorService {
    async fn apply(&self, req: Request<MirrorApplyRequest>) -> Result<Response<MirrorApplyResponse>, Status> {
        let span = meridian_wire::telemetry::request_span("Mirror/Apply", req.metadata());
        self.apply_traced(req).instrument(span).await
    }

    async fn heartbeat(&self, req: Request<MirrorHeartbeat>) -> Result<Response<MirrorHeartbeatResponse>, Status> {
        self.check_apply(req.metadata()).await?;
        let h = req.into_inner();
        let source = self.server.role.get().source_cluster_id;
        if source != 0 && source != h.source_cluster_id {
            return Err(Error::Fenced(format!(
                "heartbeat from source cluster {:x}, not this secondary's source {source:x}",
                h.source_cluster_id
            ))
            .into());
        }
        let report =
            MirrorReport { apply_rate: h.apply_rate, resyncs_total: h.resyncs_total, errors_total: h.errors_total };
        self.server.freshness.heartbeat(h.source_revision, h.source_time_ms, report);
        let f = self.server.freshness();
        Ok(Response::new(MirrorHeartbeatResponse {
            applied_revision: self.server.mvcc.marks().current,
            staleness_ms: staleness_ms(f.staleness_seconds),
        }))
    }

    async fn status(&self, req: Request<MirrorStatusRequest>) -> Result<Response<MirrorStatusResponse>, Status> {
        if req.get_ref().linearizable {
            self.server.read_barrier().await?;
        }
        let marks = self.server.mvcc.marks();
        let role = self.server.role.get();
        let f = self.server.freshness();
        let report = self.server.freshness.report();
        Ok(Response::new(MirrorStatusResponse {
            header: Some(self.server.header(marks.current)),
            revision: marks.current,
            compact_revision: marks.compacted,
            role: match role.role {
                Role::Primary => "primary".into(),
                Role::Secondary => "secondary".into(),
            },
            region: role.region,
            source_cluster_id: role.source_cluster_id,
            epoch: role.epoch,
            primary_region: role.primary_region,
            source_revision: f.source_revision,
            lag_revisions: f.lag_revisions,
            // The secondary's own measure: how long since it held everything
            // the source had (see `freshness`).
            lag_ms: staleness_ms(f.staleness_seconds).max(0),
            apply_rate: report.apply_rate,
            resyncs_total: report.resyncs_total,
            errors_total: report.errors_total,
            staleness_ms: staleness_ms(f.staleness_seconds),
        }))
    }

    async fn auth_store(&self, req: Request<MirrorAuthRequest>) -> Result<Response<MirrorAuthResponse>, Status> {
        self.check_source_read(req.metadata(), true).await?;
        self.server.read_barrier().await?;
        let state = self.server.auth.state();
        let store = serde_json::to_vec(&*state).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(MirrorAuthResponse { revision: state.revision, store }))
    }

    type RangeStreamStream = Pin<Box<dyn Stream<Item = Result<RangeStreamChunk, Status>> + Send>>;

    async fn range_stream(
        &self,
        req: Request<RangeStreamRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        self.check_source_read(req.metadata(), false).await?;
        let r = req.into_inner();
        let key = if r.key.is_empty() { vec![0] } else { r.key };
        let range = KeyRange::new(&key, &r.range_end);
        let mvcc = self.server.mvcc.clone();
        // A blocking thread reads one store snapshot and sends chunks as the
        // client takes them: at most CHUNKS_AHEAD chunks are held, however
        // large the store. The marks ride in every chunk, so they are those
        // of the snapshot the records came from.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<RangeStreamChunk, Status>>(CHUNKS_AHEAD);
        tokio::task::spawn_blocking(move || {
            let mut chunk = Vec::with_capacity(CHUNK_RECORDS);
            let mut sent_any = false;
            let send = |records: Vec<_>, marks: &crate::mvcc::Marks| {
                tx.blocking_send(Ok(RangeStreamChunk {
                    records,
                    compact_revision: marks.compacted,
                    revision: marks.current,
                }))
                .is_ok()
            };
            let scanned = mvcc.export_each(|marks, rec| {
                if !range.contains(&rec.key) {
                    return true;
                }
                chunk.push(rec);
                if chunk.len() < CHUNK_RECORDS {
                    return true;
                }
                sent_any = true;
                send(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_RECORDS)), marks)
            });
            match scanned {
                // The last (or only, possibly empty) chunk.
                Ok((marks, _)) if !chunk.is_empty() || !sent_any => {
                    send(chunk, &marks);
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::from(e)));
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// The bodies of the traced RPCs, run inside their spans.
impl MirrorService {
    async fn apply_traced(&self, req: Request<MirrorApplyRequest>) -> Result<Response<MirrorApplyResponse>, Status> {
        // One source revision may carry as much as one source request, plus
        // the record fields etcd keeps per key; allow twice the client limit.
        let limit = 2 * self.server.limits.max_request_bytes;
        self.check_apply(req.metadata()).await?;
        let req = req.into_inner();
        let report = MirrorReport {
            apply_rate: req.apply_rate,
            resyncs_total: req.resyncs_total,
            errors_total: req.errors_total,
        };
        let source_revision = req.source_revision;
        match self.server.propose_sized(Internal::MirrorApply(req), limit).await? {
            Applied::Mirror(rev) => {
                self.server.freshness.heard(source_revision, report);
                Ok(Response::new(MirrorApplyResponse { header: Some(self.server.header(rev)), applied_revision: rev }))
            }
            other => Err(Status::internal(format!("unexpected apply result {other:?}"))),
        }
    }
}
