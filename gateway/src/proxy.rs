//! The etcd v3 services, proxied: each request goes to the region its class
//! and consistency call for, its answer (code and message included) comes
//! back unchanged, with `x-meridian-region` and `x-meridian-revision` added.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use meridian_proto::etcdserverpb::cluster_client::ClusterClient;
use meridian_proto::etcdserverpb::cluster_server::Cluster;
use meridian_proto::etcdserverpb::kv_client::KvClient;
use meridian_proto::etcdserverpb::kv_server::Kv;
use meridian_proto::etcdserverpb::lease_client::LeaseClient;
use meridian_proto::etcdserverpb::lease_server::Lease;
use meridian_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use meridian_proto::etcdserverpb::maintenance_server::Maintenance;
use meridian_proto::etcdserverpb::watch_server::Watch;
use meridian_proto::etcdserverpb::*;
use meridian_wire::telemetry;
use parking_lot::Mutex;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

mod auth;
mod recipes;
pub use auth::AuthProxy;
pub use recipes::{ElectionProxy, LockProxy};

use crate::config::GatewayConfig;
use crate::metrics::Metrics;
use crate::regions::{Pick, Region, Regions};
use crate::route::{self, Class, Consistency};

/// What a client sees when no region takes writes: `Unavailable`, which
/// etcd clients retry, at once rather than after a timeout.
pub const NO_PRIMARY: &str = "meridian: no primary region is reachable through this gateway";
/// Client connections whose last revision is remembered, at most.
/// A user a token of this gateway's names, and their tokens in the other
/// regions.
pub(crate) struct Identity {
    pub user: String,
    pub regions: HashMap<String, tonic::metadata::AsciiMetadataValue>,
}

/// Tokens whose user the gateway remembers, at most.
const KNOWN_TOKENS: usize = 100_000;
const SEEN_CONNECTIONS: usize = 100_000;
/// How long a linearizable read waits for a nearer region to apply the
/// primary's revision before the primary serves it.
const LINEARIZABLE_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The routing core every service shares.
pub struct Gateway {
    pub cfg: GatewayConfig,
    pub regions: Arc<Regions>,
    pub metrics: Arc<Metrics>,
    /// This gateway's id in MemberList.
    pub member_id: u64,
    /// The highest revision each client connection wrote or read, so no
    /// later read on it is served from a region behind that.
    seen: Mutex<HashMap<SocketAddr, i64>>,
    /// Each token this gateway handed out (Authenticate through it): whose
    /// it is, for per-user rate limits, and the tokens the same user got in
    /// the other regions, for the calls it sends there; at most
    /// [`KNOWN_TOKENS`].
    users: Mutex<HashMap<String, Identity>>,
    read_index: Arc<crate::linear::ReadIndex>,
    /// Test faults, so the history checkers can be shown to catch a gateway
    /// that breaks its promise: `MERIDIAN_FAILPOINT=gateway-stale-reads`
    /// (linearizable reads skip the read index) and `gateway-ignores-bounds`
    /// (bounded reads go to the nearest region, however stale).
    stale_reads: bool,
    ignores_bounds: bool,
    pub limiter: Arc<crate::limits::Limiter>,
    /// Identical "now" watches sharing one upstream watch.
    pub coalescer: Arc<crate::watches::Coalescer>,
}

impl Gateway {
    pub fn new(cfg: GatewayConfig, regions: Arc<Regions>, metrics: Arc<Metrics>) -> Self {
        let member_id =
            cfg.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let cfg_limits = cfg.rate_limits.clone();
        let failpoint = std::env::var("MERIDIAN_FAILPOINT").unwrap_or_default();
        let (stale_reads, ignores_bounds) = (failpoint == "gateway-stale-reads", failpoint == "gateway-ignores-bounds");
        if stale_reads || ignores_bounds {
            tracing::warn!(failpoint, "failpoint armed: this gateway breaks its read promises");
        }
        Self {
            cfg,
            regions,
            metrics,
            member_id,
            seen: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            read_index: Default::default(),
            stale_reads,
            ignores_bounds,
            limiter: Arc::new(crate::limits::Limiter::new(&cfg_limits)),
            coalescer: crate::watches::Coalescer::start(),
        }
    }

    /// The rate limit for `class`, counted as a refused request when over.
    /// Admits a request of `class` from the client `conn` and `meta` name
    /// (see `limits`).
    pub(crate) fn admit(&self, class: Class, conn: Option<SocketAddr>, meta: &MetadataMap) -> Result<(), Status> {
        let user = ["token", "authorization"]
            .iter()
            .find_map(|k| meta.get(*k))
            .and_then(|t| t.to_str().ok())
            .and_then(|t| self.users.lock().get(t).map(|i| i.user.clone()));
        self.limiter.admit(class, crate::limits::Client::of(user, conn)).inspect_err(|_| {
            self.metrics.rate_limited.with_label_values(&[class.label()]).inc();
        })
    }

    /// Remembers that `token` is `user`'s, and what they got in other regions.
    pub(crate) fn learn_token(&self, token: String, identity: Identity) {
        let mut users = self.users.lock();
        if users.len() >= KNOWN_TOKENS && !users.contains_key(&token) {
            // Forgetting only makes a user count as their address again, and
            // their calls go on with the primary's token (the user
            // authenticates again once a region answers `invalid auth token`).
            users.clear();
        }
        users.insert(token, identity);
    }

    /// Authenticates `ask` in every region but the primary, at once: the
    /// tokens each handed out (a region that is down, has auth off or
    /// refuses is left out; calls there carry the primary's token).
    pub(crate) async fn authenticate_elsewhere(
        &self,
        ask: &meridian_proto::etcdserverpb::AuthenticateRequest,
    ) -> HashMap<String, tonic::metadata::AsciiMetadataValue> {
        let primary = self.regions.primary().map(|p| p.region.name.clone());
        let asks = self.regions.all.iter().filter(|r| Some(&r.name) != primary.as_ref()).map(|r| {
            let (r, ask) = (r.clone(), ask.clone());
            async move {
                let mut client = meridian_proto::etcdserverpb::auth_client::AuthClient::new(r.channel().0);
                let call = client.authenticate(ask);
                let token = tokio::time::timeout(std::time::Duration::from_secs(2), call).await.ok()?.ok()?;
                Some((r.name.clone(), token.into_inner().token.parse().ok()?))
            }
        });
        futures::future::join_all(asks).await.into_iter().flatten().collect()
    }

    /// `meta` for a call into `region`: a token this gateway handed out is
    /// swapped for the one its user got in that region (a simple token is
    /// known only to the cluster that handed it out).
    pub(crate) fn meta_for<'m>(&self, region: &str, meta: &'m MetadataMap) -> std::borrow::Cow<'m, MetadataMap> {
        let token = meta.get("token").and_then(|t| t.to_str().ok());
        let theirs = token.and_then(|t| self.users.lock().get(t).and_then(|i| i.regions.get(region).cloned()));
        match theirs {
            Some(t) => {
                let mut meta = meta.clone();
                meta.insert("token", t);
                std::borrow::Cow::Owned(meta)
            }
            None => std::borrow::Cow::Borrowed(meta),
        }
    }

    fn seen(&self, conn: Option<SocketAddr>) -> i64 {
        conn.and_then(|c| self.seen.lock().get(&c).copied()).unwrap_or(0)
    }

    fn saw(&self, conn: Option<SocketAddr>, revision: i64) {
        let Some(c) = conn else { return };
        let mut seen = self.seen.lock();
        if seen.len() >= SEEN_CONNECTIONS && !seen.contains_key(&c) {
            seen.clear(); // forgetting only weakens a hint the client never asked for
        }
        let r = seen.entry(c).or_default();
        *r = (*r).max(revision);
    }

    /// The region for a request of `class` on connection `conn`.
    fn pick(&self, class: Class, conn: Option<SocketAddr>) -> Result<Pick, Status> {
        let primary = || self.regions.primary().ok_or_else(|| Status::unavailable(NO_PRIMARY));
        match class {
            Class::Write | Class::Lease | Class::Read(Consistency::Linearizable) => primary(),
            Class::Read(Consistency::Bounded { max_staleness, min_revision }) => {
                let need = min_revision.max(self.seen(conn));
                self.regions
                    .nearest(|st| st.staleness().is_some_and(|s| s <= max_staleness) && st.revision >= need)
                    .map_or_else(primary, Ok)
            }
            Class::Watch | Class::Maintenance => {
                let pick = if class == Class::Watch {
                    self.regions.nearest(|_| true)
                } else {
                    self.regions.local_or_nearest()
                };
                pick.ok_or_else(|| Status::unavailable("meridian: no region is reachable through this gateway"))
            }
        }
    }

    /// Counts the answer, remembers its revision for the connection, and
    /// says who served it.
    fn answer<T>(
        &self,
        class: Class,
        pick: &Pick,
        conn: Option<SocketAddr>,
        started: Instant,
        result: Result<Response<T>, Status>,
        revision: impl Fn(&T) -> i64,
        remember: bool,
    ) -> Result<Response<T>, Status> {
        let code = match &result {
            Ok(_) => "OK",
            Err(s) => code_label(s.code()),
        };
        self.metrics.requests.with_label_values(&[class.label(), &pick.region.name, code]).inc();
        tracing::Span::current().record("region", pick.region.name.as_str());
        self.metrics.latency.with_label_values(&[class.label()]).observe(started.elapsed().as_secs_f64());
        let mut resp = result?;
        let rev = revision(resp.get_ref());
        // A stream's figure is the region's, from the probe: the client has
        // read nothing at it yet.
        if remember {
            self.saw(conn, rev);
        }
        served_by(resp.metadata_mut(), &pick.region.name, rev);
        Ok(resp)
    }

    async fn unary<T, R, F, Fut>(
        &self,
        class: Class,
        req: Request<T>,
        call: F,
        revision: fn(&R) -> i64,
    ) -> Result<Response<R>, Status>
    where
        F: FnOnce(tonic::transport::Channel, Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<R>, Status>>,
    {
        let conn = req.remote_addr();
        self.admit(class, conn, req.metadata())?;
        let pick = self.pick(class, conn)?;
        let started = Instant::now();
        let (channel, _) = pick.region.channel();
        let (meta, _, msg) = req.into_parts();
        let meta = self.meta_for(&pick.region.name, &meta);
        let result = call(channel, forward(&meta, msg)).await;
        self.answer(class, &pick, conn, started, result, revision, true)
    }
}

impl Gateway {
    /// A linearizable Range from the nearest region: when that is not the
    /// primary, the primary's leader gives its committed revision R (one
    /// round trip, shared by concurrent reads), and the near region serves
    /// the read as soon as it has applied R (its answer's revision proves
    /// it). A region that does not get there within [`LINEARIZABLE_WAIT`]
    /// hands the read to the primary, as do reads of an older revision.
    async fn linearizable_range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let class = Class::Read(Consistency::Linearizable);
        let conn = req.remote_addr();
        self.admit(class, conn, req.metadata())?;
        let started = Instant::now();
        let primary = self.pick(class, conn)?;
        // A read of an older revision goes to the primary: a compaction does
        // not move the revision, so a region could have the revision and not
        // yet the compaction that makes that read fail.
        let near = self
            .regions
            .nearest(|_| true)
            .filter(|p| p.region.name != primary.region.name && req.get_ref().revision <= 0);
        let (meta, _, msg) = req.into_parts();
        if let Some(near) = near {
            let need = if self.stale_reads { 0 } else { self.read_index.revision(&self.regions).await? };
            let local = RangeRequest { serializable: true, ..msg.clone() };
            if let Some(resp) = self.range_at_least(&near, &meta, &local, need).await {
                return self.answer(class, &near, conn, started, Ok(resp), |r| rev(&r.header), true);
            }
        }
        let result = kv(primary.region.channel().0).range(forward(&meta, msg)).await;
        self.answer(class, &primary, conn, started, result, |r| rev(&r.header), true)
    }

    /// A serializable Range from the nearest region within `max_staleness`
    /// whose answer is at `min_revision` or later, and at the revision this
    /// connection last wrote or read (read-your-writes, monotonic reads);
    /// the primary when none gets there within [`LINEARIZABLE_WAIT`].
    async fn bounded_range(
        &self,
        req: Request<RangeRequest>,
        max_staleness: std::time::Duration,
        min_revision: i64,
    ) -> Result<Response<RangeResponse>, Status> {
        let class = Class::Read(Consistency::Bounded { max_staleness, min_revision });
        let conn = req.remote_addr();
        self.admit(class, conn, req.metadata())?;
        let started = Instant::now();
        let need = min_revision.max(self.seen(conn));
        let near = if self.ignores_bounds {
            self.regions.nearest(|_| true)
        } else {
            self.regions.nearest(|st| st.staleness().is_some_and(|s| s <= max_staleness))
        };
        let (meta, _, msg) = req.into_parts();
        if let Some(near) = near {
            if let Some(resp) = self.range_at_least(&near, &meta, &msg, need).await {
                return self.answer(class, &near, conn, started, Ok(resp), |r| rev(&r.header), true);
            }
        }
        let primary = self.pick(Class::Write, conn)?;
        let result = kv(primary.region.channel().0).range(forward(&meta, msg)).await;
        self.answer(class, &primary, conn, started, result, |r| rev(&r.header), true)
    }

    /// `msg` served by `pick` once its answer's revision is `need` or later
    /// (the answer proves what the region had applied), polled for up to
    /// [`LINEARIZABLE_WAIT`]; `None` when it does not get there, or fails.
    async fn range_at_least(
        &self,
        pick: &Pick,
        meta: &MetadataMap,
        msg: &RangeRequest,
        need: i64,
    ) -> Option<Response<RangeResponse>> {
        let deadline = tokio::time::Instant::now() + LINEARIZABLE_WAIT;
        let meta = &self.meta_for(&pick.region.name, meta);
        loop {
            let read = pick.region.reads.range(&pick.region, meta, msg.clone());
            match tokio::time::timeout_at(deadline, read).await {
                Ok(Ok(resp)) if rev(&resp.get_ref().header) >= need => return Some(resp),
                Ok(Ok(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await
                }
                _ => return None, // behind past the wait, failed, or silent
            }
        }
    }
}

impl Gateway {
    /// A write: refused while the RPO guard is engaged, sent to the
    /// primary, and acknowledged once the regions it must wait for have it.
    async fn write<T, R, F, Fut>(
        &self,
        req: Request<T>,
        call: F,
        revision: fn(&R) -> i64,
    ) -> Result<Response<R>, Status>
    where
        F: FnOnce(tonic::transport::Channel, Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<R>, Status>>,
    {
        let wait = route::wait_regions(req.metadata(), self.cfg.write_wait_regions)?;
        let secondaries: Vec<Arc<Region>> =
            self.regions.all.iter().filter(|r| !r.state().is_primary()).cloned().collect();
        if wait > secondaries.len() {
            return Err(Status::invalid_argument(format!(
                "{}: {wait} regions asked, but this gateway knows {} secondary regions",
                route::WAIT_REGIONS,
                secondaries.len()
            )));
        }
        self.rpo_guard(&secondaries)?;
        let resp = self.unary(Class::Write, req, call, revision).await?;
        if wait > 0 {
            self.metrics.write_waits.inc();
            let confirmed = self.wait_for_regions(&secondaries, revision(resp.get_ref()), wait).await;
            self.metrics.write_waits.dec();
            confirmed?;
        }
        Ok(resp)
    }

    /// With `--max-write-lag`: refuses writes while every secondary is
    /// further behind than the bound (or down, or of unknown staleness).
    fn rpo_guard(&self, secondaries: &[Arc<Region>]) -> Result<(), Status> {
        let Some(max) = self.cfg.max_write_lag else { return Ok(()) };
        let behind = !secondaries.is_empty()
            && secondaries.iter().all(|r| {
                let st = r.state();
                !st.healthy || st.staleness().is_none_or(|s| s > max)
            });
        self.metrics.rpo_guard.set(i64::from(behind));
        if behind {
            tracing::debug!(?max, "refusing a write: every secondary is further behind than --max-write-lag");
            return Err(Status::resource_exhausted(meridian_wire::etcd::TOO_MANY_REQUESTS));
        }
        Ok(())
    }

    /// Waits until `n` of `secondaries` have applied `revision` (each
    /// answer's revision proves it), up to `--write-wait-timeout`.
    async fn wait_for_regions(&self, secondaries: &[Arc<Region>], revision: i64, n: usize) -> Result<(), Status> {
        let deadline = Instant::now() + self.cfg.write_wait_timeout;
        let until = tokio::time::Instant::now() + self.cfg.write_wait_timeout;
        let mut confirmed: Vec<String> = Vec::new();
        loop {
            let probes = secondaries.iter().filter(|r| !confirmed.contains(&r.name)).map(|r| async move {
                let probe =
                    RangeRequest { key: vec![0], count_only: true, serializable: true, limit: 1, ..Default::default() };
                let resp = tokio::time::timeout_at(until, kv(r.channel().0).range(probe)).await;
                (r.name.clone(), matches!(resp, Ok(Ok(resp)) if rev(&resp.get_ref().header) >= revision))
            });
            for (name, has) in futures::future::join_all(probes).await {
                if has {
                    confirmed.push(name);
                }
            }
            if confirmed.len() >= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.metrics.write_wait_timeouts.inc();
                return Err(Status::deadline_exceeded(format!(
                    "meridian: the write committed on the primary at revision {revision}, but {n} secondary regions \
                     did not confirm it within {:?} (confirmed by {confirmed:?})",
                    self.cfg.write_wait_timeout
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// A KV client of `channel` that takes answers of any size, as etcd's
/// clients do (tonic's default limit is 4 MiB; a large range would fail
/// through the gateway and not straight to a member).
pub(crate) fn kv(channel: tonic::transport::Channel) -> KvClient<tonic::transport::Channel> {
    KvClient::new(channel).max_decoding_message_size(usize::MAX)
}

/// The metadata that carries a client's credentials, all a call upstream
/// takes from the client's.
pub(crate) const CREDENTIALS: [&str; 2] = ["token", "authorization"];

/// A request for the upstream, with the client's credentials (etcd's
/// `token` metadata) and nothing else of its transport.
pub(crate) fn forward<T>(meta: &MetadataMap, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    for key in CREDENTIALS {
        if let Some(v) = meta.get(key) {
            req.metadata_mut().insert(key, v.clone());
        }
    }
    // The trace goes on (the gateway's span is the parent upstream).
    telemetry::inject(req.metadata_mut());
    req
}

/// gRPC's name for a code, as the `code` label.
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

fn served_by(meta: &mut MetadataMap, region: &str, revision: i64) {
    if let Ok(v) = MetadataValue::try_from(region) {
        meta.insert(route::SERVED_BY, v);
    }
    meta.insert(route::SERVED_AT, MetadataValue::from(revision));
}

fn rev(h: &Option<ResponseHeader>) -> i64 {
    h.as_ref().map_or(0, |h| h.revision)
}

pub struct KvProxy(pub Arc<Gateway>);

#[tonic::async_trait]
impl Kv for KvProxy {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let span = telemetry::route_span("KV/Range", req.metadata());
        self.range_traced(req).instrument(span).await
    }
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let span = telemetry::route_span("KV/Put", req.metadata());
        self.put_traced(req).instrument(span).await
    }
    async fn delete_range(&self, req: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let span = telemetry::route_span("KV/DeleteRange", req.metadata());
        self.delete_range_traced(req).instrument(span).await
    }
    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let span = telemetry::route_span("KV/Txn", req.metadata());
        self.txn_traced(req).instrument(span).await
    }
    async fn compact(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let span = telemetry::route_span("KV/Compact", req.metadata());
        self.compact_traced(req).instrument(span).await
    }
}

pub struct WatchProxy(pub Arc<Gateway>);

#[tonic::async_trait]
impl Watch for WatchProxy {
    type WatchStream = BoxStream<WatchResponse>;

    /// A session per client stream, with its upstream in the nearest healthy
    /// region, moved to another region when that one fails (see `watches`).
    async fn watch(&self, req: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let gw = &self.0;
        let conn = req.remote_addr();
        gw.admit(Class::Watch, conn, req.metadata())?;
        let pick = gw.pick(Class::Watch, conn)?;
        let started = Instant::now();
        let (meta, _, inbound) = req.into_parts();
        let result = match crate::watches::open(gw, &pick, &meta).await {
            Ok(up) => {
                let (out, rx) = tokio::sync::mpsc::channel(256);
                tokio::spawn(crate::watches::Session::new(gw.clone(), meta, out).run(inbound, up));
                Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as Self::WatchStream))
            }
            Err(status) => Err(status),
        };
        gw.answer(Class::Watch, &pick, conn, started, result, |_| pick.state.revision, false)
    }
}

pub struct LeaseProxy(pub Arc<Gateway>);

#[tonic::async_trait]
impl Lease for LeaseProxy {
    type LeaseKeepAliveStream = BoxStream<LeaseKeepAliveResponse>;

    async fn lease_grant(&self, req: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        self.0
            .unary(
                Class::Lease,
                req,
                |c, r| async move { LeaseClient::new(c).lease_grant(r).await },
                |r| rev(&r.header),
            )
            .await
    }
    async fn lease_revoke(&self, req: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
        self.0
            .unary(
                Class::Lease,
                req,
                |c, r| async move { LeaseClient::new(c).lease_revoke(r).await },
                |r| rev(&r.header),
            )
            .await
    }
    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let gw = &self.0;
        let conn = req.remote_addr();
        gw.admit(Class::Lease, conn, req.metadata())?;
        let pick = gw.pick(Class::Lease, conn)?;
        let started = Instant::now();
        let (meta, _, inbound) = req.into_parts();
        let result = match crate::keepalive::open(&pick, &meta).await {
            Ok(up) => {
                let (out, rx) = tokio::sync::mpsc::channel(64);
                tokio::spawn(crate::keepalive::Session::new(gw.clone(), meta, out).run(inbound, up));
                Ok(Response::new(
                    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as Self::LeaseKeepAliveStream
                ))
            }
            Err(status) => Err(status),
        };
        gw.answer(Class::Lease, &pick, conn, started, result, |_| pick.state.revision, false)
    }
    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        self.0
            .unary(
                Class::Lease,
                req,
                |c, r| async move { LeaseClient::new(c).lease_time_to_live(r).await },
                |r| rev(&r.header),
            )
            .await
    }
    async fn lease_leases(&self, req: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.0
            .unary(
                Class::Lease,
                req,
                |c, r| async move { LeaseClient::new(c).lease_leases(r).await },
                |r| rev(&r.header),
            )
            .await
    }
}

pub struct ClusterProxy(pub Arc<Gateway>);

#[tonic::async_trait]
impl Cluster for ClusterProxy {
    async fn member_add(&self, _: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        Err(Status::unimplemented("meridian: membership changes go to a region's members, not a gateway"))
    }
    async fn member_remove(&self, _: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(Status::unimplemented("meridian: membership changes go to a region's members, not a gateway"))
    }
    async fn member_update(&self, _: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(Status::unimplemented("meridian: membership changes go to a region's members, not a gateway"))
    }
    async fn member_promote(
        &self,
        _: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(Status::unimplemented("meridian: membership changes go to a region's members, not a gateway"))
    }
    /// The gateway lists itself, with its own client URLs (as etcd's
    /// grpc-proxy does), so a client that syncs its endpoints from
    /// MemberList keeps going through the gateway.
    async fn member_list(&self, req: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        let gw = self.0.clone();
        let mut resp = gw
            .unary(
                Class::Maintenance,
                req,
                |c, r| async move { ClusterClient::new(c).member_list(r).await },
                |r| rev(&r.header),
            )
            .await?;
        resp.get_mut().members = vec![Member {
            id: gw.member_id,
            name: gw.cfg.name.clone(),
            peer_ur_ls: Vec::new(),
            client_ur_ls: gw.cfg.listen_client_urls.iter().map(ToString::to_string).collect(),
            is_learner: false,
        }];
        Ok(resp)
    }
}

pub struct MaintenanceProxy(pub Arc<Gateway>);

/// Maintenance answers for the region that serves it: this gateway's own,
/// unless it is down.
#[tonic::async_trait]
impl Maintenance for MaintenanceProxy {
    type SnapshotStream = BoxStream<SnapshotResponse>;

    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        self.0
            .unary(
                Class::Maintenance,
                req,
                |c, r| async move { MaintenanceClient::new(c).alarm(r).await },
                |r| rev(&r.header),
            )
            .await
    }
    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.0
            .unary(
                Class::Maintenance,
                req,
                |c, r| async move { MaintenanceClient::new(c).status(r).await },
                |r| rev(&r.header),
            )
            .await
    }
    async fn defragment(&self, req: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        self.0
            .unary(
                Class::Maintenance,
                req,
                |c, r| async move { MaintenanceClient::new(c).defragment(r).await },
                |r| rev(&r.header),
            )
            .await
    }
    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.0
            .unary(
                Class::Maintenance,
                req,
                |c, r| async move { MaintenanceClient::new(c).hash(r).await },
                |r| rev(&r.header),
            )
            .await
    }
    async fn hash_kv(&self, req: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        self.0
            .unary(
                Class::Maintenance,
                req,
                |c, r| async move { MaintenanceClient::new(c).hash_kv(r).await },
                |r| rev(&r.header),
            )
            .await
    }
    async fn snapshot(&self, req: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        let gw = &self.0;
        let conn = req.remote_addr();
        let pick = gw.pick(Class::Maintenance, conn)?;
        let started = Instant::now();
        let (meta, _, msg) = req.into_parts();
        let result = MaintenanceClient::new(pick.region.channel().0).snapshot(forward(&meta, msg)).await;
        let result = result.map(|r| Response::new(Box::pin(r.into_inner()) as Self::SnapshotStream));
        gw.answer(Class::Maintenance, &pick, conn, started, result, |_| pick.state.revision, false)
    }
    async fn move_leader(&self, req: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        self.0
            .unary(
                Class::Maintenance,
                req,
                |c, r| async move { MaintenanceClient::new(c).move_leader(r).await },
                |r| rev(&r.header),
            )
            .await
    }
}

/// The bodies of the traced RPCs, run inside their spans.
impl KvProxy {
    async fn range_traced(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let gw = &self.0;
        let class = Class::Read(route::consistency(req.get_ref().serializable, req.metadata(), gw.cfg.max_staleness)?);
        match class {
            Class::Read(Consistency::Linearizable) => gw.linearizable_range(req).await,
            Class::Read(Consistency::Bounded { max_staleness, min_revision }) => {
                gw.bounded_range(req, max_staleness, min_revision).await
            }
            _ => unreachable!("a Range is a read"),
        }
    }

    async fn put_traced(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        self.0.write(req, |c, r| async move { kv(c).put(r).await }, |r| rev(&r.header)).await
    }

    async fn delete_range_traced(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        self.0.write(req, |c, r| async move { kv(c).delete_range(r).await }, |r| rev(&r.header)).await
    }

    async fn txn_traced(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let gw = &self.0;
        if !meridian_wire::etcd::txn_is_read_only(req.get_ref()) {
            return gw.write(req, |c, r| async move { kv(c).txn(r).await }, |r| rev(&r.header)).await;
        }
        let class = {
            Class::Read(route::consistency(
                meridian_wire::etcd::txn_is_serializable(req.get_ref()),
                req.metadata(),
                gw.cfg.max_staleness,
            )?)
        };
        gw.unary(class, req, |c, r| async move { kv(c).txn(r).await }, |r| rev(&r.header)).await
    }

    async fn compact_traced(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        self.0.unary(Class::Write, req, |c, r| async move { kv(c).compact(r).await }, |r| rev(&r.header)).await
    }
}
