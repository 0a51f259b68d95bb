//! The etcd v3 server: gRPC services over the raft log and the MVCC store.
//!
//! [`EtcdServer`] is the shared core every service calls: it proposes
//! requests through raft and waits for their apply result, runs linearizable
//! read barriers, and fills response headers.
//!
//! Paths, in order:
//! - write: `kv::KvService::put` → checks (`ops::check_put`, size, quota) →
//!   [`EtcdServer::propose`] → raft → `apply::EtcdStateMachine::apply` →
//!   `ops::put` on a `WriteTxn` → published → the waiting call answers.
//! - linearizable read: [`EtcdServer::read_barrier`] (batched ReadIndex) →
//!   `ops::range` on a `ReadTxn` of this member.
//! - serializable read: `ops::range` on this member's published state.

pub mod apply;
pub mod auth;
pub mod authority;
pub mod cluster;
pub mod compactor;
pub mod freshness;
pub mod http;
pub mod json;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod membership;
pub mod mirror;
pub mod ops;
pub mod primary_lease;
pub mod recipes;
pub mod region;
pub mod region_service;
pub mod version;
pub mod watch;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_proto::etcdserverpb::ResponseHeader;
use meridian_proto::meridian::v1::internal_request::Request;
use meridian_proto::meridian::v1::{InternalRequest, RequestAuth};
use meridian_wire::telemetry;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{oneshot, Semaphore};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::mvcc::Mvcc;
use crate::raft::{Input, RaftHandle};
use apply::{Applied, Waiters};
use region::RoleCell;
use version::VersionCell;

/// Extra room grpc-go grants above `--max-request-bytes` before refusing a
/// message at the transport, as etcd configures it.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;
/// Proposals accepted and not yet applied, at most; past it new proposals
/// get etcd's "too many requests". etcd refuses once apply trails commit by
/// 5,000 entries; here apply follows commit in the same Ready cycle, so the
/// backlog that can grow is the proposals not yet applied.
pub const MAX_PENDING_PROPOSALS: usize = 5000;
/// Bytes of proposals accepted and not yet applied, at most (one larger
/// proposal is still taken when nothing else is pending).
pub const MAX_PENDING_PROPOSAL_BYTES: usize = 64 << 20;
/// Proposals nobody waits for (alarms, lease revokes and checkpoints) in
/// flight at once; more are dropped, and each is proposed again by whatever
/// raised it (the next over-quota write, the next renewal, the next expiry
/// pass).
const MAX_DETACHED_PROPOSALS: usize = 64;

/// Settings the services need at request time.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    pub quota_backend_bytes: u64,
    pub election_timeout: Duration,
}

/// The state every etcd service shares.
pub struct EtcdServer {
    pub member_id: u64,
    pub cluster_id: u64,
    pub name: String,
    pub raft: RaftHandle,
    pub mvcc: Arc<Mvcc>,
    pub waiters: Arc<Waiters>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Primary or read-only secondary; kept current by apply.
    pub role: RoleCell,
    /// The replicated cluster version; kept current by apply.
    pub version: VersionCell,
    /// On a secondary: how stale this member is, from the mirror's heartbeats.
    pub freshness: freshness::Freshness,
    /// With a topology cluster: whether this primary holds the primary lease.
    pub primary_lease: primary_lease::PrimaryLease,
    /// Users, roles and tokens; kept current by apply.
    pub auth: Arc<auth::store::AuthStore>,
    /// The leases, for the keys each holds (auth checks a lease's keys).
    pub lessor: Arc<lease::Lessor>,
    ids: IdGen,
    /// Proposals (count, bytes) accepted and not yet answered.
    pending: Mutex<(usize, usize)>,
    detached: Arc<Semaphore>,
}

impl EtcdServer {
    pub fn new(
        member_id: u64,
        cluster_id: u64,
        name: String,
        raft: RaftHandle,
        mvcc: Arc<Mvcc>,
        waiters: Arc<Waiters>,
        metrics: Arc<Metrics>,
        limits: Limits,
        role: RoleCell,
        version: VersionCell,
        auth: Arc<auth::store::AuthStore>,
        lessor: Arc<lease::Lessor>,
    ) -> Self {
        Self {
            member_id,
            cluster_id,
            name,
            raft,
            mvcc,
            waiters,
            metrics,
            limits,
            role,
            version,
            freshness: freshness::Freshness::default(),
            primary_lease: primary_lease::PrimaryLease::default(),
            auth,
            lessor,
            ids: IdGen::new(member_id),
            pending: Mutex::new((0, 0)),
            detached: Arc::new(Semaphore::new(MAX_DETACHED_PROPOSALS)),
        }
    }

    /// Refuses a client write on a secondary, and on a primary that does
    /// not hold the primary lease. (Apply checks only the role: the lease
    /// is a matter of time, which apply must not depend on.)
    ///
    /// # Errors
    ///
    /// [`Error::ReadOnly`] or [`Error::NoPrimaryLease`].
    pub fn check_writable(&self) -> Result<()> {
        self.role.check_writable()?;
        self.primary_lease.check()
    }

    /// A response header at `revision`, with this member's ids and raft term.
    pub fn header(&self, revision: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: self.raft.status().term(),
        }
    }

    /// How long a proposal may wait for its apply, as etcd: 5 s plus two
    /// election timeouts.
    fn request_timeout(&self) -> Duration {
        Duration::from_secs(5) + 2 * self.limits.election_timeout
    }

    /// Refuses a message larger than the gRPC limit, with grpc-go's error.
    ///
    /// # Errors
    ///
    /// [`Error::MessageTooLarge`].
    pub fn check_message_size(&self, len: usize) -> Result<()> {
        let max = self.limits.max_request_bytes + GRPC_OVERHEAD_BYTES;
        if len > max {
            return Err(Error::MessageTooLarge(len, max));
        }
        Ok(())
    }

    /// Waits a bounded time for a known leader.
    async fn wait_for_leader(&self) -> Result<()> {
        let mut rx = self.raft.status().watch_leader();
        let wait = async {
            loop {
                if *rx.borrow_and_update() != 0 {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(2 * self.limits.election_timeout, wait).await.map_err(|_| Error::NoLeader)?;
        if self.raft.status().leader() == 0 {
            return Err(Error::NoLeader);
        }
        Ok(())
    }

    /// Replicates `request` through raft and returns what applying it produced.
    ///
    /// # Errors
    ///
    /// The request's own error from apply, [`Error::RequestTooLarge`],
    /// [`Error::NoLeader`], [`Error::Timeout`] or [`Error::Stopped`].
    pub async fn propose(&self, request: Request) -> Result<Applied> {
        self.propose_sized(request, self.limits.max_request_bytes).await
    }

    /// [`EtcdServer::propose`] for a client's request, made by `who`: apply
    /// checks their permissions again, as of the entry.
    ///
    /// # Errors
    ///
    /// As [`EtcdServer::propose`], and the auth errors of apply's check.
    pub async fn propose_as(&self, request: Request, who: &auth::store::AuthInfo) -> Result<Applied> {
        let limit = self.limits.max_request_bytes;
        let auth = Some(who.header());
        if !telemetry::in_trace() {
            return self.propose_traced(request, limit, String::new(), auth).await;
        }
        let span = tracing::info_span!(target: telemetry::TARGET, "raft.propose");
        let traceparent = telemetry::traceparent(&span);
        self.propose_traced(request, limit, traceparent, auth).instrument(span).await
    }

    /// The keys lease `id` holds (none for a lease that does not exist).
    pub fn lease_keys(&self, id: i64) -> Vec<Vec<u8>> {
        self.lessor.keys(id).unwrap_or_default()
    }

    /// Who `metadata`'s token names (see [`auth::store::AuthStore::info`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAuthToken`].
    pub async fn auth_info(&self, metadata: &tonic::metadata::MetadataMap) -> Result<auth::store::AuthInfo> {
        match self.auth.info(metadata) {
            Err(Error::InvalidAuthToken) => {}
            known => return known,
        }
        // A token handed out at an index this member has not applied yet
        // (the client authenticated at another member): wait for it, a
        // bounded time.
        let index = auth::store::token_of(metadata).and_then(auth::store::token_index).unwrap_or(0);
        if index <= self.mvcc.marks().applied {
            return Err(Error::InvalidAuthToken);
        }
        let deadline = tokio::time::Instant::now() + self.request_timeout();
        while self.mvcc.marks().applied < index && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.auth.info(metadata)
    }

    /// Refuses `metadata`'s caller unless auth is off or they hold the role
    /// `root`; returns who they are.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAuthToken`], [`Error::UserEmpty`],
    /// [`Error::PermissionDenied`].
    pub async fn check_admin(&self, metadata: &tonic::metadata::MetadataMap) -> Result<auth::store::AuthInfo> {
        let who = self.auth_info(metadata).await?;
        self.auth.state().check_admin(&who.user)?;
        Ok(who)
    }

    /// [`EtcdServer::propose`] with its own size limit (mirror batches).
    ///
    /// # Errors
    ///
    /// As [`EtcdServer::propose`].
    pub async fn propose_sized(&self, request: Request, limit: usize) -> Result<Applied> {
        if !telemetry::in_trace() {
            return self.propose_traced(request, limit, String::new(), None).await;
        }
        let span = tracing::info_span!(target: telemetry::TARGET, "raft.propose");
        let traceparent = telemetry::traceparent(&span);
        self.propose_traced(request, limit, traceparent, None).instrument(span).await
    }

    /// Proposes a membership change as a raft configuration change of
    /// `change_type` for `node_id`, the request riding in its context.
    ///
    /// # Errors
    ///
    /// As [`EtcdServer::propose`]; [`Error::Unhealthy`] while another
    /// configuration change is being applied.
    pub async fn propose_conf_change(
        &self,
        request: Request,
        change_type: raft::eraftpb::ConfChangeType,
        node_id: u64,
    ) -> Result<Applied> {
        let limit = self.limits.max_request_bytes;
        // The member that took the call checked its caller is root: a
        // follower hands adds and removals to the leader, which proposes.
        self.propose_with(request, limit, String::new(), None, move |context, dropped| {
            let mut cc = raft::eraftpb::ConfChange::default();
            cc.set_change_type(change_type);
            cc.node_id = node_id;
            cc.context = context.into();
            Input::ProposeConfChange { cc, dropped }
        })
        .await
    }

    /// Proposes with the proposal's `traceparent` in the entry ("" untraced).
    async fn propose_traced(
        &self,
        request: Request,
        limit: usize,
        traceparent: String,
        auth: Option<RequestAuth>,
    ) -> Result<Applied> {
        self.propose_with(request, limit, traceparent, auth, |data, dropped| Input::Propose { data, dropped }).await
    }

    /// Registers the proposal's waiter and hands the encoded entry to raft
    /// as `input` makes it.
    async fn propose_with(
        &self,
        request: Request,
        limit: usize,
        traceparent: String,
        auth: Option<RequestAuth>,
        input: impl FnOnce(Vec<u8>, oneshot::Sender<Error>) -> Input,
    ) -> Result<Applied> {
        version::check(&request, self.version.get())?;
        let id = self.ids.next();
        let data = InternalRequest { id, request: Some(request), traceparent, auth }.encode_to_vec();
        if data.len() > limit {
            return Err(Error::RequestTooLarge);
        }
        self.wait_for_leader().await?;
        let _admitted = self.admit(data.len())?;
        let applied = self.waiters.register(id);
        let (dropped_tx, dropped) = oneshot::channel();
        if let Err(e) = self.raft.send(input(data, dropped_tx)) {
            self.waiters.cancel(id);
            return Err(e);
        }
        self.metrics.proposals_pending.inc();
        let result = tokio::select! {
            r = applied => r.unwrap_or(Err(Error::Stopped)),
            Ok(e) = dropped => Err(e),
            _ = tokio::time::sleep(self.request_timeout()) => Err(Error::Timeout),
        };
        self.metrics.proposals_pending.dec();
        if result.is_err() {
            self.waiters.cancel(id);
        }
        result
    }

    /// Takes a place among the pending proposals, or refuses with etcd's
    /// backpressure error when apply is too far behind: too many proposals
    /// or bytes waiting, or raft's commit index far past the applied one.
    fn admit(&self, bytes: usize) -> Result<Admitted<'_>> {
        let status = self.raft.status();
        if status.commit().saturating_sub(status.applied()) > MAX_PENDING_PROPOSALS as u64 {
            return Err(Error::TooManyRequests);
        }
        let mut p = self.pending.lock();
        let (count, held) = *p;
        if count >= MAX_PENDING_PROPOSALS || (count > 0 && held + bytes > MAX_PENDING_PROPOSAL_BYTES) {
            self.metrics.proposals_failed.inc();
            return Err(Error::TooManyRequests);
        }
        *p = (count + 1, held + bytes);
        Ok(Admitted { server: self, bytes })
    }

    /// Waits until this member has applied everything committed before the
    /// call (ReadIndex), so a local read is linearizable.
    ///
    /// # Errors
    ///
    /// [`Error::NoLeader`], [`Error::Timeout`] or [`Error::Stopped`].
    pub async fn read_barrier(&self) -> Result<()> {
        self.wait_for_leader().await?;
        tokio::time::timeout(self.request_timeout(), self.raft.read_barrier()).await.map_err(|_| Error::Timeout)??;
        Ok(())
    }

    /// This member's staleness reading now: the mirror's view on a
    /// secondary, always fresh on a primary.
    pub fn freshness(&self) -> freshness::Reading {
        let applied = self.mvcc.marks().current;
        if !self.role.is_secondary() {
            return freshness::Reading {
                staleness_seconds: 0.0,
                source_revision: applied,
                lag_revisions: 0,
                heartbeat_age_seconds: 0.0,
            };
        }
        self.freshness.read(applied, meridian_wire::token::unix_ms())
    }

    /// A fresh lease id, positive and unique across members (etcd derives it
    /// from its request-id generator the same way).
    pub fn next_lease_id(&self) -> i64 {
        (self.ids.next() & (i64::MAX as u64)) as i64
    }

    /// Proposes a request nobody waits for (alarms, lease revokes and
    /// checkpoints). At most [`MAX_DETACHED_PROPOSALS`] are in flight; past
    /// that the request is dropped, to be raised again by its cause.
    pub fn propose_detached(self: &Arc<Self>, request: Request) {
        let Ok(permit) = self.detached.clone().try_acquire_owned() else {
            tracing::debug!("too many detached proposals in flight; dropped one");
            return;
        };
        let server = self.clone();
        tokio::spawn(async move {
            if let Err(e) = server.propose(request).await {
                tracing::warn!(error = %e, "detached proposal failed");
            }
            drop(permit);
        });
    }
}

/// A pending proposal's place, given back when its call ends however it ends.
struct Admitted<'a> {
    server: &'a EtcdServer,
    bytes: usize,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut p = self.server.pending.lock();
        p.0 -= 1;
        p.1 -= self.bytes;
    }
}

/// Request ids unique across members and restarts, as etcd builds them:
/// member bits, then start time in ms, then a counter.
struct IdGen {
    prefix: u64,
    counter: AtomicU64,
}

impl IdGen {
    fn new(member_id: u64) -> Self {
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let prefix = ((member_id & 0xffff) << 48) | ((ms & 0xff_ffff_ffff) << 8);
        Self { prefix, counter: AtomicU64::new(0) }
    }

    fn next(&self) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let id = self.prefix.wrapping_add(n);
        if id == 0 {
            1
        } else {
            id
        }
    }
}
