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
    MirrorApplyRequest, MirrorApplyResponse, MirrorStatusRequest, MirrorStatusResponse, RangeStreamChunk,
    RangeStreamRequest,
};
use meridian_wire::token::{self, TOKEN_METADATA};
use tonic::{Request, Response, Status};

use super::apply::Applied;
use super::region::Role;
use super::EtcdServer;
use crate::error::Error;
use crate::mvcc::KeyRange;

/// Records per `RangeStream` chunk.
const CHUNK_RECORDS: usize = 1000;
/// Chunks a `RangeStream` reads ahead of its client, at most.
const CHUNKS_AHEAD: usize = 4;

/// The mirror's own view of its lag (source revision, time behind) arrives
/// with each Apply and is kept in the `meridian_mirror_*` metrics of the
/// member it called; Status reads it back from there.
pub struct MirrorService {
    pub server: Arc<EtcdServer>,
    /// What `Apply` must present in [`TOKEN_METADATA`]; `None` refuses every Apply.
    token: Option<String>,
}

impl MirrorService {
    pub fn new(server: Arc<EtcdServer>, token: Option<String>) -> Self {
        Self { server, token }
    }

    /// Until auth exists, only a caller holding the token configured on this
    /// secondary may write into it, and only a secondary takes mirror writes.
    fn check_apply(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        let Some(want) = &self.token else {
            return Err(Status::permission_denied(
                "meridian: Mirror.Apply is refused: this member has no --mirror-token-file",
            ));
        };
        let given = metadata.get(TOKEN_METADATA).map(|v| v.as_bytes()).unwrap_or_default();
        if !token::same_secret(given, want.as_bytes()) {
            return Err(Status::unauthenticated(format!(
                "meridian: Mirror.Apply needs the mirror token in {TOKEN_METADATA} (the --mirror-token-file of this secondary)"
            )));
        }
        if !self.server.role.is_secondary() {
            return Err(Error::Fenced("mirror writes go to a secondary; this cluster is a primary".into()).into());
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Mirror for MirrorService {
    async fn apply(&self, req: Request<MirrorApplyRequest>) -> Result<Response<MirrorApplyResponse>, Status> {
        // One source revision may carry as much as one source request, plus
        // the record fields etcd keeps per key; allow twice the client limit.
        let limit = 2 * self.server.limits.max_request_bytes;
        self.check_apply(req.metadata())?;
        let req = req.into_inner();
        let reported = (req.source_revision, req.lag_ms, req.apply_rate, req.resyncs_total, req.errors_total);
        match self.server.propose_sized(Internal::MirrorApply(req), limit).await? {
            Applied::Mirror(rev) => {
                let (source_revision, lag_ms, rate, resyncs, errors) = reported;
                let m = &self.server.metrics;
                m.mirror_apply_rate.set(rate);
                m.mirror_resyncs.set(resyncs as i64);
                m.mirror_errors.set(errors as i64);
                m.mirror_source_revision.set(source_revision);
                m.mirror_lag_revisions.set((source_revision - rev).max(0));
                m.mirror_lag_seconds.set(if source_revision > rev { lag_ms as f64 / 1000.0 } else { 0.0 });
                Ok(Response::new(MirrorApplyResponse { header: Some(self.server.header(rev)), applied_revision: rev }))
            }
            other => Err(Status::internal(format!("unexpected apply result {other:?}"))),
        }
    }

    async fn status(&self, _: Request<MirrorStatusRequest>) -> Result<Response<MirrorStatusResponse>, Status> {
        let marks = self.server.mvcc.marks();
        let role = self.server.role.get();
        let source_revision = self.server.metrics.mirror_source_revision.get();
        let lag_ms = (self.server.metrics.mirror_lag_seconds.get() * 1000.0) as i64;
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
            source_revision,
            lag_revisions: (source_revision - marks.current).max(0),
            lag_ms: if source_revision > marks.current { lag_ms } else { 0 },
            apply_rate: self.server.metrics.mirror_apply_rate.get(),
            resyncs_total: self.server.metrics.mirror_resyncs.get() as u64,
            errors_total: self.server.metrics.mirror_errors.get() as u64,
        }))
    }

    type RangeStreamStream = Pin<Box<dyn Stream<Item = Result<RangeStreamChunk, Status>> + Send>>;

    async fn range_stream(
        &self,
        req: Request<RangeStreamRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
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
