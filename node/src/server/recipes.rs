//! etcd's Lock and Election services (`v3lockpb`, `v3electionpb`), served
//! on the client port as etcd 3.4 serves them: the lock and election
//! recipes run inside the member, through its own KV and Lease services
//! (so every check, quota and read-only refusal applies), on keys a client
//! could read.
//!
//! - A lock `name` held under lease L is the key `name/<L in hex>`, made in
//!   one txn if absent; the holder is the key of the prefix with the lowest
//!   create revision. `Lock` waits until no key of the prefix older than its
//!   own is left, keeping the lease alive meanwhile (a call that fails or is
//!   dropped deletes its key). `Unlock` deletes the key.
//! - An election is the same queue: `Campaign` puts `value` on its key and
//!   waits for the older keys to go; `Proclaim` and `Resign` act only while
//!   the key still has the leadership's create revision; `Leader` is the
//!   oldest key; `Observe` streams the leader and each value it proclaims,
//!   from a watch on the leader's key.
//! - Lease 0 has the member grant a 60 s lease, as etcd's sessions do.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use meridian_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use meridian_proto::etcdserverpb::kv_server::Kv;
use meridian_proto::etcdserverpb::lease_server::Lease;
use meridian_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use meridian_proto::etcdserverpb::request_op::Request as Op;
use meridian_proto::etcdserverpb::response_op::Response as OpResponse;
use meridian_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest, RangeResponse, RequestOp, ResponseHeader,
    TxnRequest, TxnResponse,
};
use meridian_proto::mvccpb::event::EventType;
use meridian_proto::mvccpb::KeyValue;
use meridian_proto::v3electionpb::election_server::Election;
use meridian_proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest, ProclaimResponse,
    ResignRequest, ResignResponse,
};
use meridian_proto::v3lockpb::lock_server::Lock;
use meridian_proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use meridian_wire::etcd::prefix_end;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::kv::KvService;
use super::lease::service::LeaseService;
use super::watch::hub::Spec;
use super::watch::WatchHub;
use crate::mvcc::KeyRange;

/// The TTL of a lease granted for a call that named none (etcd's session default).
const SESSION_TTL: i64 = 60;
/// Watch streams of `Observe` calls, numbered apart from clients' streams.
static NEXT_STREAM: AtomicU64 = AtomicU64::new(1 << 62);

tokio::task_local! {
    /// The metadata of the call a recipe runs for, so that its KV and lease
    /// calls carry the caller's token and are checked as theirs.
    static CALLER: MetadataMap;
}

/// A request made on behalf of the call being served (see [`CALLER`]).
fn as_caller<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    if let Ok(metadata) = CALLER.try_with(Clone::clone) {
        *req.metadata_mut() = metadata;
    }
    req
}

/// Runs `work` as the caller whose call carried `metadata`.
async fn as_caller_of<F: std::future::Future>(metadata: &MetadataMap, work: F) -> F::Output {
    CALLER.scope(metadata.clone(), work).await
}

/// What the two services share: the member's KV and Lease services, and its watchers.
pub struct Recipes {
    kv: KvService,
    leases: Arc<LeaseService>,
    hub: WatchHub,
}

impl Recipes {
    pub fn new(kv: KvService, leases: Arc<LeaseService>, hub: WatchHub) -> Arc<Self> {
        Arc::new(Self { kv, leases, hub })
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, Status> {
        Ok(Kv::txn(&self.kv, as_caller(req)).await?.into_inner())
    }

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Status> {
        Ok(Kv::range(&self.kv, as_caller(req)).await?.into_inner())
    }

    async fn delete(&self, key: Vec<u8>) -> Result<ResponseHeader, Status> {
        let req = DeleteRangeRequest { key, ..Default::default() };
        Ok(Kv::delete_range(&self.kv, as_caller(req)).await?.into_inner().header.unwrap_or_default())
    }

    /// The lease a call's key lives on: the one named, or a new 60 s one.
    async fn session_lease(&self, lease: i64) -> Result<i64, Status> {
        if lease != 0 {
            return Ok(lease);
        }
        let req = LeaseGrantRequest { ttl: SESSION_TTL, id: 0 };
        let granted = Lease::lease_grant(&*self.leases, as_caller(req)).await?.into_inner();
        Ok(granted.id)
    }

    /// The lease, prefix and key of a call on lock or election `name`.
    async fn queue_key(&self, name: &[u8], lease: i64) -> Result<(i64, Vec<u8>, Vec<u8>), Status> {
        let lease = self.session_lease(lease).await?;
        let prefix = prefix_of(name);
        let key = key_of(&prefix, lease);
        Ok((lease, prefix, key))
    }

    /// Keeps `lease` alive while a call waits; ends only with the error
    /// that stopped it (the lease is gone).
    async fn keep_alive(&self, lease: i64) -> Status {
        loop {
            match self.leases.leader.renew(lease).await {
                Ok(ttl) if ttl > 0 => {
                    tokio::time::sleep(Duration::from_millis((ttl as u64 * 1000 / 3).max(500))).await;
                }
                Ok(_) => return crate::error::Error::LeaseNotFound.into(),
                Err(e) => return e.into(),
            }
        }
    }

    /// The oldest key of `prefix` (the holder, the leader).
    async fn first_created(&self, prefix: &[u8]) -> Result<RangeResponse, Status> {
        self.range(oldest(prefix)).await
    }

    /// Waits until no key of `prefix` created at or before `max_create` is
    /// left; returns the header of the read that found none. Wakes on every
    /// published revision.
    async fn wait_deletes(&self, prefix: &[u8], max_create: i64) -> Result<ResponseHeader, Status> {
        let mut published = self.kv.server.mvcc.published();
        loop {
            published.borrow_and_update();
            let req = RangeRequest {
                key: prefix.to_vec(),
                range_end: prefix_end(prefix),
                limit: 1,
                sort_order: SortOrder::Descend as i32,
                sort_target: SortTarget::Create as i32,
                max_create_revision: max_create,
                ..Default::default()
            };
            let resp = self.range(req).await?;
            if resp.kvs.is_empty() {
                return Ok(resp.header.unwrap_or_default());
            }
            if published.changed().await.is_err() {
                return Err(crate::error::Error::Stopped.into());
            }
        }
    }

    /// Puts `value` on `key` (under `lease`) if it still has create
    /// revision `rev`; whether it did.
    async fn put_if_created_at(
        &self,
        key: &[u8],
        rev: i64,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<(bool, ResponseHeader), Status> {
        let txn =
            TxnRequest { compare: vec![created_at(key, rev)], success: vec![put(key, value, lease)], failure: vec![] };
        let resp = self.txn(txn).await?;
        Ok((resp.succeeded, resp.header.unwrap_or_default()))
    }

    /// Joins the queue `prefix` with `key` (value, lease) unless it is in
    /// it already: the key's create revision and the txn's answer.
    async fn enqueue(&self, key: &[u8], value: Vec<u8>, lease: i64) -> Result<(i64, TxnResponse), Status> {
        let txn = TxnRequest {
            compare: vec![created_at(key, 0)],
            success: vec![put(key, value, lease)],
            failure: vec![RequestOp {
                request: Some(Op::RequestRange(RangeRequest { key: key.to_vec(), ..Default::default() })),
            }],
        };
        let resp = self.txn(txn).await?;
        let rev = if resp.succeeded {
            resp.header.as_ref().map_or(0, |h| h.revision)
        } else {
            range_kvs(&resp, 0).first().map_or(0, |kv| kv.create_revision)
        };
        Ok((rev, resp))
    }
}

/// `name/`, the prefix of a lock's or an election's keys.
fn prefix_of(name: &[u8]) -> Vec<u8> {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

/// `name/<lease in hex>`.
fn key_of(prefix: &[u8], lease: i64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(format!("{lease:x}").as_bytes());
    k
}

fn oldest(prefix: &[u8]) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: SortOrder::Ascend as i32,
        sort_target: SortTarget::Create as i32,
        ..Default::default()
    }
}

fn created_at(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.to_vec(),
        range_end: vec![],
        target_union: Some(TargetUnion::CreateRevision(rev)),
    }
}

/// Deletes `key` if it still has create revision `rev`.
fn delete_if_created_at(key: Vec<u8>, rev: i64) -> TxnRequest {
    TxnRequest {
        compare: vec![created_at(&key, rev)],
        success: vec![RequestOp {
            request: Some(Op::RequestDeleteRange(DeleteRangeRequest { key, ..Default::default() })),
        }],
        failure: vec![],
    }
}

fn put(key: &[u8], value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp { request: Some(Op::RequestPut(PutRequest { key: key.to_vec(), value, lease, ..Default::default() })) }
}

/// The kvs of the `i`th answer of a txn, if it was a range.
fn range_kvs(resp: &TxnResponse, i: usize) -> &[KeyValue] {
    match resp.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(OpResponse::ResponseRange(r)) => &r.kvs,
        _ => &[],
    }
}

/// Deletes a key that a call put, unless the call succeeded: a lock or a
/// campaign given up (error, or the client went away) leaves no key behind.
struct Withdraw {
    recipes: Arc<Recipes>,
    key: Vec<u8>,
    rev: i64,
    armed: bool,
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (recipes, key, rev) = (self.recipes.clone(), std::mem::take(&mut self.key), self.rev);
        let caller = CALLER.try_with(Clone::clone).unwrap_or_default();
        tokio::spawn(CALLER.scope(caller, async move {
            if let Err(e) = recipes.txn(delete_if_created_at(key, rev)).await {
                tracing::warn!(error = %e, "could not withdraw an abandoned lock or campaign key");
            }
        }));
    }
}

/// `v3lockpb.Lock`.
pub struct LockService(pub Arc<Recipes>);

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let metadata = req.metadata().clone();
        as_caller_of(&metadata, async move {
            let req = req.into_inner();
            let recipes = &self.0;
            let (lease, prefix, key) = recipes.queue_key(&req.name, req.lease).await?;
            let work = async {
                let (rev, resp) = recipes.enqueue(&key, Vec::new(), lease).await?;
                let mut withdraw = Withdraw { recipes: recipes.clone(), key: key.clone(), rev, armed: true };
                let holder = recipes.first_created(&prefix).await?;
                let header = match holder.kvs.first() {
                    Some(kv) if kv.create_revision != rev => recipes.wait_deletes(&prefix, rev - 1).await?,
                    _ => resp.header.unwrap_or_default(),
                };
                withdraw.armed = false;
                Ok(LockResponse { header: Some(header), key: key.clone() })
            };
            tokio::select! {
                r = work => r.map(Response::new),
                e = recipes.keep_alive(lease) => Err(e),
            }
        })
        .await
    }

    async fn unlock(&self, req: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let metadata = req.metadata().clone();
        as_caller_of(&metadata, async move {
            let header = self.0.delete(req.into_inner().key).await?;
            Ok(Response::new(UnlockResponse { header: Some(header) }))
        })
        .await
    }
}

fn no_leader_key() -> Status {
    Status::unknown("\"leader\" field must be provided")
}

/// `v3electionpb.Election`.
pub struct ElectionService(pub Arc<Recipes>);

type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(&self, req: Request<CampaignRequest>) -> Result<Response<CampaignResponse>, Status> {
        let metadata = req.metadata().clone();
        as_caller_of(&metadata, async move {
            let req = req.into_inner();
            let recipes = &self.0;
            let (lease, prefix, key) = recipes.queue_key(&req.name, req.lease).await?;
            let work = async {
                let (rev, resp) = recipes.enqueue(&key, req.value.clone(), lease).await?;
                let mut withdraw = Withdraw { recipes: recipes.clone(), key: key.clone(), rev, armed: true };
                if !resp.succeeded && range_kvs(&resp, 0).first().is_some_and(|kv| kv.value != req.value) {
                    let (ok, _) = recipes.put_if_created_at(&key, rev, req.value.clone(), lease).await?;
                    if !ok {
                        return Err(Status::unknown("election: not leader"));
                    }
                }
                recipes.wait_deletes(&prefix, rev - 1).await?;
                withdraw.armed = false;
                let leader = LeaderKey { name: req.name.clone(), key: key.clone(), rev, lease };
                Ok(CampaignResponse { header: resp.header, leader: Some(leader) })
            };
            tokio::select! {
                r = work => r.map(Response::new),
                e = recipes.keep_alive(lease) => Err(e),
            }
        })
        .await
    }

    async fn proclaim(&self, req: Request<ProclaimRequest>) -> Result<Response<ProclaimResponse>, Status> {
        let metadata = req.metadata().clone();
        as_caller_of(&metadata, async move {
            let req = req.into_inner();
            let leader = req.leader.ok_or_else(no_leader_key)?;
            let (ok, header) = self.0.put_if_created_at(&leader.key, leader.rev, req.value, leader.lease).await?;
            if !ok {
                return Err(Status::unknown("election: not leader"));
            }
            Ok(Response::new(ProclaimResponse { header: Some(header) }))
        })
        .await
    }

    async fn leader(&self, req: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        let metadata = req.metadata().clone();
        as_caller_of(&metadata, async move {
            let resp = self.0.first_created(&prefix_of(&req.into_inner().name)).await?;
            let kv = resp.kvs.into_iter().next().ok_or_else(|| Status::unknown("election: no leader"))?;
            Ok(Response::new(LeaderResponse { header: resp.header, kv: Some(kv) }))
        })
        .await
    }

    type ObserveStream = ObserveStream;

    async fn observe(&self, req: Request<LeaderRequest>) -> Result<Response<ObserveStream>, Status> {
        let metadata = req.metadata().clone();
        let prefix = prefix_of(&req.into_inner().name);
        let (tx, rx) = mpsc::channel(16);
        let recipes = self.0.clone();
        tokio::spawn(CALLER.scope(metadata, async move {
            if let Err(e) = observe(&recipes, &prefix, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        }));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resign(&self, req: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        let metadata = req.metadata().clone();
        as_caller_of(&metadata, async move {
            let leader = req.into_inner().leader.ok_or_else(no_leader_key)?;
            let resp = self.0.txn(delete_if_created_at(leader.key, leader.rev)).await?;
            Ok(Response::new(ResignResponse { header: resp.header }))
        })
        .await
    }
}

/// Sends the leader of `prefix`, then every value it puts, until it goes;
/// then the next leader. Ends when the client does.
async fn observe(
    recipes: &Arc<Recipes>,
    prefix: &[u8],
    tx: &mpsc::Sender<Result<LeaderResponse, Status>>,
) -> Result<(), Status> {
    let mut published = recipes.kv.server.mvcc.published();
    loop {
        // The leader now, or the first key put once there is none.
        published.borrow_and_update();
        let resp = recipes.first_created(prefix).await?;
        let Some(kv) = resp.kvs.into_iter().next() else {
            tokio::select! {
                changed = published.changed() => changed.map_err(|_| Status::unavailable("member stopping"))?,
                _ = tx.closed() => return Ok(()),
            }
            continue;
        };
        let header = resp.header.unwrap_or_default();
        if tx.send(Ok(LeaderResponse { header: Some(header.clone()), kv: Some(kv.clone()) })).await.is_err() {
            return Ok(());
        }
        // Every change of the leader's key from the next revision on.
        let stream = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
        let (out, mut events) = mpsc::channel(64);
        let spec = Spec {
            watch_id: 0,
            range: KeyRange::new(&kv.key, &[]),
            start_revision: header.revision + 1,
            no_put: false,
            no_delete: false,
            prev_kv: false,
            progress_notify: false,
            fragment: false,
        };
        let (id, _) = recipes.hub.create(stream, spec, out).map_err(Status::internal)?;
        let _close = CloseStream(recipes.hub.clone(), stream);
        recipes.hub.announce(stream, id);
        'leader: loop {
            let wr = tokio::select! {
                wr = events.recv() => wr,
                _ = tx.closed() => return Ok(()),
            };
            let Some(wr) = wr.transpose()? else { return Err(Status::unavailable("member stopping")) };
            if wr.canceled {
                // Compacted past the leader's revision: read the leader afresh.
                break 'leader;
            }
            for ev in wr.events {
                if ev.r#type == EventType::Delete as i32 {
                    break 'leader;
                }
                let resp = LeaderResponse { header: wr.header.clone(), kv: ev.kv };
                if tx.send(Ok(resp)).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// Drops an internal watch stream's watchers.
struct CloseStream(WatchHub, u64);

impl Drop for CloseStream {
    fn drop(&mut self) {
        self.0.close(self.1);
    }
}
