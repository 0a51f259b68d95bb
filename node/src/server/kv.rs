//! etcd's KV service.

use std::sync::Arc;

use meridian_proto::etcdserverpb::alarm_request::AlarmAction;
use meridian_proto::etcdserverpb::kv_server::Kv;
use meridian_proto::etcdserverpb::request_op::Request as Op;
use meridian_proto::etcdserverpb::{
    AlarmRequest, AlarmType, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use meridian_proto::meridian::v1::internal_request::Request as Internal;
use meridian_wire::telemetry;
use prost::Message;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::apply::Applied;
use super::cluster::Alarms;
use super::ops;
use super::EtcdServer;
use crate::error::{Error, Result};

/// Bytes etcd charges per put on top of key and value when checking the quota.
const KV_OVERHEAD: u64 = 256;

pub struct KvService {
    pub server: Arc<EtcdServer>,
}

impl KvService {
    /// etcd's space quota: a write that would take the store past
    /// `--quota-backend-bytes` raises the NOSPACE alarm (cluster-wide, through
    /// raft) and is refused. Deletes, reads and compaction still pass.
    fn check_quota(&self, cost: u64) -> Result<()> {
        if cost == 0 {
            return Ok(());
        }
        let quota = self.server.limits.quota_backend_bytes;
        if self.server.mvcc.size_in_use() + cost > quota {
            if Alarms::load(&self.server.mvcc).has(AlarmType::Nospace) {
                return Err(Error::NoSpace);
            }
            self.server.propose_detached(Internal::Alarm(AlarmRequest {
                action: AlarmAction::Activate as i32,
                member_id: self.server.member_id,
                alarm: AlarmType::Nospace as i32,
            }));
            return Err(Error::NoSpace);
        }
        Ok(())
    }

    /// The keys lease `id` holds (none for a lease that does not exist).
    fn lease_keys(&self, id: i64) -> Vec<Vec<u8>> {
        self.server.lease_keys(id)
    }

    fn unexpected(a: Applied) -> Status {
        Status::internal(format!("unexpected apply result {a:?}"))
    }
}

fn put_cost(p: &PutRequest) -> u64 {
    KV_OVERHEAD + (p.key.len() + p.value.len()) as u64
}

fn txn_cost(t: &TxnRequest) -> u64 {
    let branch = |ops: &[meridian_proto::etcdserverpb::RequestOp]| -> u64 {
        ops.iter()
            .map(|op| match &op.request {
                Some(Op::RequestPut(p)) => put_cost(p),
                Some(Op::RequestTxn(t)) => txn_cost(t),
                _ => 0,
            })
            .sum()
    };
    branch(&t.success).max(branch(&t.failure))
}

/// Ranges that may return more key-values than this are read on a blocking thread.
const LONG_RANGE: i64 = 256;

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let span = telemetry::request_span("KV/Range", req.metadata());
        self.range_traced(req).instrument(span).await
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let span = telemetry::request_span("KV/Put", req.metadata());
        self.put_traced(req).instrument(span).await
    }

    async fn delete_range(&self, req: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let span = telemetry::request_span("KV/DeleteRange", req.metadata());
        self.delete_range_traced(req).instrument(span).await
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let span = telemetry::request_span("KV/Txn", req.metadata());
        self.txn_traced(req).instrument(span).await
    }

    async fn compact(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let span = telemetry::request_span("KV/Compact", req.metadata());
        self.compact_traced(req).instrument(span).await
    }
}

/// The bodies of the traced RPCs, run inside their spans.
impl KvService {
    async fn range_traced(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let who = self.server.auth_info(req.metadata()).await?;
        let r = req.into_inner();
        self.server.check_message_size(r.encoded_len())?;
        ops::check_range(&r)?;
        let auth = self.server.auth.state();
        auth.check_fresh(&who)?;
        auth.check_range(&who.user, &r.key, &r.range_end)?;
        if !r.serializable {
            if self.server.raft.status().is_learner() {
                return Err(Error::NotSupportedForLearner.into());
            }
            self.server.read_barrier().await?;
        }
        self.server.metrics.range_total.inc();
        // A key or a short range is read here; a long one on a blocking
        // thread, so runtime workers keep serving while values load.
        let long = !r.range_end.is_empty() && !r.count_only && (r.limit == 0 || r.limit > LONG_RANGE);
        let mut resp = if long {
            let mvcc = self.server.mvcc.clone();
            let read = tokio::task::spawn_blocking(move || ops::range(&mvcc.read(), &r));
            read.await.map_err(|e| Status::internal(e.to_string()))??
        } else {
            ops::range(&self.server.mvcc.read(), &r)?
        };
        resp.header = Some(self.server.header(resp.header.map(|h| h.revision).unwrap_or_default()));
        Ok(Response::new(resp))
    }

    async fn put_traced(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let who = self.server.auth_info(req.metadata()).await?;
        let r = req.into_inner();
        self.server.check_message_size(r.encoded_len())?;
        ops::check_put(&r)?;
        let auth = self.server.auth.state();
        auth.check_fresh(&who)?;
        auth.check_put(&who.user, &r, &|id| self.lease_keys(id))?;
        self.server.check_writable()?;
        self.check_quota(put_cost(&r))?;
        match self.server.propose_as(Internal::Put(r), &who).await? {
            Applied::Put(mut resp) => {
                resp.header = Some(self.server.header(resp.header.map(|h| h.revision).unwrap_or_default()));
                Ok(Response::new(resp))
            }
            other => Err(Self::unexpected(other)),
        }
    }

    async fn delete_range_traced(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let who = self.server.auth_info(req.metadata()).await?;
        let r = req.into_inner();
        self.server.check_message_size(r.encoded_len())?;
        ops::check_delete(&r)?;
        let auth = self.server.auth.state();
        auth.check_fresh(&who)?;
        auth.check_delete(&who.user, &r)?;
        self.server.check_writable()?;
        match self.server.propose_as(Internal::DeleteRange(r), &who).await? {
            Applied::DeleteRange(mut resp) => {
                resp.header = Some(self.server.header(resp.header.map(|h| h.revision).unwrap_or_default()));
                Ok(Response::new(resp))
            }
            other => Err(Self::unexpected(other)),
        }
    }

    async fn txn_traced(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let who = self.server.auth_info(req.metadata()).await?;
        let r = req.into_inner();
        self.server.check_message_size(r.encoded_len())?;
        ops::check_txn(&r, self.server.limits.max_txn_ops)?;
        let auth = self.server.auth.state();
        auth.check_fresh(&who)?;
        auth.check_txn(&who.user, &r, &|id| self.lease_keys(id))?;
        let mut resp = if ops::txn_is_read_only(&r) {
            // Reads need no log entry: serve them here, after a barrier unless serializable.
            if !ops::txn_is_serializable(&r) {
                self.server.read_barrier().await?;
            }
            self.server.metrics.txn_total.inc();
            ops::txn(&mut self.server.mvcc.read(), &r, &|_| true)?
        } else {
            self.server.check_writable()?;
            self.check_quota(txn_cost(&r))?;
            match self.server.propose_as(Internal::Txn(r), &who).await? {
                Applied::Txn(resp) => resp,
                other => return Err(Self::unexpected(other)),
            }
        };
        resp.header = Some(self.server.header(resp.header.map(|h| h.revision).unwrap_or_default()));
        Ok(Response::new(resp))
    }

    async fn compact_traced(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let who = self.server.auth_info(req.metadata()).await?;
        let r = req.into_inner();
        self.server.auth.state().check_admin(&who.user)?;
        self.server.check_writable()?;
        match self.server.propose_as(Internal::Compaction(r), &who).await? {
            Applied::Compaction(rev) => Ok(Response::new(CompactionResponse { header: Some(self.server.header(rev)) })),
            other => Err(Self::unexpected(other)),
        }
    }
}
