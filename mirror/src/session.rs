//! One mirror session: connect, resume from the secondary's checkpoint,
//! follow the source's Watch, and resync when the source has compacted past
//! the checkpoint. Any error ends the session; `run` in lib.rs retries.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use meridian_proto::etcdserverpb::auth_client::AuthClient;
use meridian_proto::etcdserverpb::kv_client::KvClient;
use meridian_proto::etcdserverpb::lease_client::LeaseClient;
use meridian_proto::etcdserverpb::watch_client::WatchClient;
use meridian_proto::etcdserverpb::watch_request::RequestUnion;
use meridian_proto::etcdserverpb::{
    AuthenticateRequest, LeaseLeasesRequest, LeaseTimeToLiveRequest, RangeRequest, ResponseHeader, WatchCreateRequest,
    WatchProgressRequest, WatchRequest,
};
use meridian_proto::meridian::v1::mirror_client::MirrorClient;
use meridian_proto::meridian::v1::region_client::RegionClient as RegionRpcClient;
use meridian_proto::meridian::v1::{
    KvRecord, MirrorApplyRequest, MirrorLease, MirrorRevision, MirrorStatusRequest, RangeStreamRequest,
};
use meridian_proto::meridian::v1::{LineageEntry, MirrorAuthRequest, MirrorHeartbeat, RegionStatusRequest};
use meridian_proto::mvccpb::event::EventType;
use meridian_proto::mvccpb::Event;
use meridian_wire::progress::{Lines, Progress};
use meridian_wire::region::RegionClient;
use meridian_wire::telemetry;
use meridian_wire::token::{unix_ms, TOKEN_METADATA};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::catchup;
use crate::config::MirrorConfig;
use crate::metrics::Metrics;
use meridian_wire::tls::ClientTls;

/// Bytes of changes per Apply call; well under the secondary's limit.
const BATCH_BYTES: usize = 512 * 1024;
/// Keys per page when reading an etcd source's state.
const PAGE: i64 = 1000;
/// How often the source is asked for progress; each answer becomes the next
/// heartbeat, so a secondary's staleness is measured to about this.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// How often every target member gets a heartbeat.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(100);
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(2);
/// How often a mirror with several sources checks that its source is still
/// the primary.
const TOPOLOGY_EVERY: Duration = Duration::from_millis(250);
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(5);
/// How long the first probe of the source or the target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the mirror shows on every call to one side: the mirror token (to
/// the target), and the token its user got there (`--user`, `--dest-user`)
/// when auth is on on that side.
#[derive(Clone, Default)]
pub(crate) struct Creds {
    mirror: Option<AsciiMetadataValue>,
    user: Option<AsciiMetadataValue>,
}

impl tonic::service::Interceptor for Creds {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.mirror {
            req.metadata_mut().insert(TOKEN_METADATA, t.clone());
        }
        if let Some(t) = &self.user {
            req.metadata_mut().insert("token", t.clone());
        }
        // Inside a traced apply, the secondary continues the trace.
        meridian_wire::telemetry::inject(req.metadata_mut());
        Ok(req)
    }
}

/// A channel to one side, with the mirror's credentials there.
pub(crate) type Upstream = InterceptedService<Channel, Creds>;

/// Authenticates `user` (NAME:PASSWORD) on `channel`'s cluster: the token
/// to show there, or none when no user is given or auth is off there (the
/// mirror authenticates again at its next session, so auth turned on later
/// is picked up then).
async fn authenticate(channel: &Channel, user: Option<&str>, side: &str) -> anyhow::Result<Option<AsciiMetadataValue>> {
    let Some(user) = user else { return Ok(None) };
    let (name, password) = user.split_once(':').unwrap_or((user, ""));
    let req = AuthenticateRequest { name: name.to_string(), password: password.to_string() };
    match AuthClient::new(channel.clone()).authenticate(req).await {
        Ok(r) => Ok(Some(r.into_inner().token.parse().context("the token is not valid gRPC metadata")?)),
        Err(s) if s.message() == "etcdserver: authentication is not enabled" => Ok(None),
        Err(s) => Err(anyhow::anyhow!("authenticate {name:?} on the {side}: {}", s.message())),
    }
}

/// Sends every target member a heartbeat every [`HEARTBEAT_EVERY`]: the
/// newest revision the source said it had committed, and when. Stops when
/// dropped (the session ended).
struct Heartbeats(tokio::task::JoinHandle<()>);

impl Heartbeats {
    fn start(target: &RegionClient, m: &Arc<Metrics>, token: Creds, cluster_id: u64) -> Self {
        let mut members: Vec<_> = target
            .members
            .iter()
            .map(|member| (member.url.clone(), MirrorClient::with_interceptor(member.channel(), token.clone())))
            .collect();
        let m = m.clone();
        Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some((source_revision, source_time_ms)) = *m.heard.lock() else { continue };
                let counters = m.snapshot();
                let beat = MirrorHeartbeat {
                    source_cluster_id: cluster_id,
                    source_revision,
                    source_time_ms,
                    apply_rate: counters.apply_rate,
                    resyncs_total: counters.resyncs_total,
                    errors_total: counters.errors_total,
                };
                let sends = members.iter_mut().map(|(url, c)| {
                    let mut req = tonic::Request::new(beat);
                    req.set_timeout(HEARTBEAT_EVERY);
                    async move {
                        if let Err(e) = c.heartbeat(req).await {
                            tracing::debug!(target = %url, error = %e, "heartbeat not delivered");
                        }
                    }
                });
                futures::future::join_all(sends).await;
            }
        }))
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum Kind {
    /// A Meridian primary: raw history through RangeStream, compactions repeated.
    Meridian,
    /// etcd: the public v3 API only.
    Etcd,
}

struct Session<'a> {
    cfg: &'a MirrorConfig,
    m: &'a Metrics,
    src: Upstream,
    kind: Kind,
    cluster_id: u64,
    epoch: u64,
    region: String,
    /// The source's lineage, which the target keeps as its own.
    lineage: Vec<LineageEntry>,
    target: MirrorClient<Upstream>,
    /// The auth revision of the source's store the target has (0: none sent).
    auth_revision: u64,
    /// Whether the mirror shows the target a user's token (auth was on there
    /// when the session started).
    target_user: bool,
    checkpoint: i64,
    /// Source compact revision last repeated on the target.
    compacted: i64,
    known_leases: HashSet<i64>,
    last_progress: Instant,
    /// The traceparent of a traced write in the batch being gathered (the
    /// source put it on the watch response): its apply continues the trace.
    trace: Option<String>,
}

/// A session ends with this when it must start again, not as a failure:
/// its source is no longer the primary and other sources are configured
/// (the next session follows the new primary), or auth came on at the
/// target (the next session authenticates there).
#[derive(Debug)]
pub struct TopologyChanged(pub String);

impl std::fmt::Display for TopologyChanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TopologyChanged {}

/// A region's members, probed once: the session sends to the leader (or,
/// with none known, the first member that answered).
async fn connect(endpoints: &[String], tls: &ClientTls) -> anyhow::Result<RegionClient> {
    RegionClient::connect(endpoints, CONNECT_TIMEOUT, tls).await.map_err(|e| anyhow::anyhow!(e))
}

/// Every lease id a cluster has.
async fn lease_ids(channel: Upstream) -> anyhow::Result<HashSet<i64>> {
    let leases = LeaseClient::new(channel).lease_leases(LeaseLeasesRequest {}).await?.into_inner().leases;
    Ok(leases.iter().map(|l| l.id).collect())
}

/// The header of a cheap read on the source: its cluster id and current revision.
async fn source_header(src: &Upstream) -> anyhow::Result<ResponseHeader> {
    let r = KvClient::new(src.clone())
        .range(RangeRequest { key: vec![0], count_only: true, ..Default::default() })
        .await
        .context("source range")?
        .into_inner();
    Ok(r.header.unwrap_or_default())
}

/// One session from `source` (one region's endpoints) into the target.
/// Ends with `Ok` when the source stops being the primary while other
/// sources are configured: the next session follows the new primary.
pub async fn run(cfg: &MirrorConfig, source: &[String], m: &Arc<Metrics>) -> anyhow::Result<()> {
    let src_region = connect(source, &cfg.source_tls).await.context("source")?;
    let dst_region = connect(&cfg.target, &cfg.target_tls).await.context("target")?;
    let (src, dst) = (src_region.channel().0, dst_region.channel().0);
    let src_creds = Creds { mirror: None, user: authenticate(&src, cfg.user.as_deref(), "source").await? };
    let token = Creds {
        mirror: Some(cfg.token.parse().context("the mirror token is not valid gRPC metadata")?),
        user: authenticate(&dst, cfg.dest_user.as_deref(), "target").await?,
    };
    let src = InterceptedService::new(src, src_creds);
    let dst = InterceptedService::new(dst, token.clone());
    let mut target =
        MirrorClient::new(dst.clone()).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
    let ts = target.status(MirrorStatusRequest::default()).await.context("target status")?.into_inner();
    anyhow::ensure!(ts.role == "secondary", "the target is a {}, not a secondary", ts.role);

    let (kind, cluster_id, epoch, region) =
        match MirrorClient::new(src.clone()).status(MirrorStatusRequest::default()).await {
            Ok(s) => {
                let s = s.into_inner();
                (Kind::Meridian, s.header.map_or(0, |h| h.cluster_id), s.epoch, s.region)
            }
            // No Mirror service: an etcd cluster, read through the public API only.
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                (Kind::Etcd, source_header(&src).await?.cluster_id, 0, String::new())
            }
            Err(e) => return Err(e).context("source status"),
        };
    let lineage = match kind {
        Kind::Meridian => RegionRpcClient::new(src.clone())
            .status(RegionStatusRequest {})
            .await
            .map(|s| s.into_inner().lineage)
            .unwrap_or_default(),
        Kind::Etcd => Vec::new(),
    };
    let target_lineage = RegionRpcClient::new(dst.clone())
        .status(RegionStatusRequest {})
        .await
        .map(|s| s.into_inner().lineage)
        .unwrap_or_default();
    let known_leases = lease_ids(dst).await.context("target leases")?;
    *m.labels.lock() = format!("region={:?},source_region={:?}", ts.region, ts.primary_region);
    let target_user = token.user.is_some();
    let _heartbeats = Heartbeats::start(&dst_region, m, token, cluster_id);
    m.applied_revision.store(ts.revision, Ordering::Relaxed);
    tracing::info!(
        source = match kind {
            Kind::Meridian => "meridian",
            Kind::Etcd => "etcd",
        },
        source_cluster = format!("{cluster_id:x}"),
        checkpoint = ts.revision,
        "mirror session started; resuming after the target's revision"
    );
    let mut s = Session {
        cfg,
        m,
        src,
        kind,
        cluster_id,
        epoch,
        region,
        lineage,
        target,
        auth_revision: 0,
        target_user,
        checkpoint: ts.revision,
        compacted: ts.compact_revision,
        known_leases,
        last_progress: Instant::now(),
        trace: None,
    };
    // A target that follows another source is only ever replaced on the
    // operator's word: its revisions mean nothing on this source.
    let foreign = ts.source_cluster_id != 0
        && ts.source_cluster_id != cluster_id
        && !meridian_wire::lineage::continues(&s.lineage, ts.source_cluster_id, ts.revision)
        && !meridian_wire::lineage::already_follows(&target_lineage, &s.lineage, cluster_id);
    if ts.source_cluster_id != cluster_id && !foreign && ts.source_cluster_id != 0 {
        tracing::info!(
            old = format!("{:x}", ts.source_cluster_id),
            new = format!("{cluster_id:x}"),
            "the source took over from the cluster the target followed: going on without a copy"
        );
    }
    if foreign && !cfg.allow_source_change {
        bail!(
            "the target follows source cluster {:x}, not this source {cluster_id:x}; start the mirror with \
             --allow-source-change to replace the target's store with this source's history",
            ts.source_cluster_id
        );
    }
    if foreign {
        tracing::warn!(old = format!("{:x}", ts.source_cluster_id), "--allow-source-change: replacing the target");
        s.resync(0).await?;
    } else if s.checkpoint <= 1 && matches!(s.kind, Kind::Meridian) {
        // An empty target takes a Meridian source's whole retained history in
        // bulk (RangeStream) rather than revision by revision through Watch.
        tracing::info!("the target is empty: copying the source's history");
        s.resync(0).await?;
    } else if matches!(s.kind, Kind::Meridian) && (ts.epoch != s.epoch || ts.source_cluster_id != s.cluster_id) {
        // The target records whom it follows (cluster, epoch, lineage, region)
        // from each Apply: tell it now, not at the source's next revision,
        // which may be long in coming (or was applied by the session before).
        let req = s.request();
        s.target.apply(req).await.context("apply the source's epoch on the target")?;
    }
    // The source's users and roles first: the target enforces them from now.
    s.housekeeping().await?;
    loop {
        let compacted = match s.catch_up().await? {
            Some(compacted) => compacted,
            None => s.follow().await?,
        };
        tracing::warn!(
            compacted,
            checkpoint = s.checkpoint,
            "the source compacted past the checkpoint: copying its history again"
        );
        s.m.resyncs.fetch_add(1, Ordering::Relaxed);
        s.resync(compacted).await?;
    }
}

impl Session<'_> {
    /// An Apply request with this session's identity and current lag, and nothing to apply yet.
    fn request(&self) -> MirrorApplyRequest {
        let counters = self.m.snapshot();
        MirrorApplyRequest {
            apply_rate: counters.apply_rate,
            resyncs_total: counters.resyncs_total,
            errors_total: counters.errors_total,
            source_cluster_id: self.cluster_id,
            epoch: self.epoch,
            source_region: self.region.clone(),
            allow_source_change: self.cfg.allow_source_change,
            source_revision: self.m.source_revision.load(Ordering::Relaxed),
            lag_ms: (self.m.lag_seconds() * 1000.0) as i64,
            lineage: self.lineage.clone(),
            ..Default::default()
        }
    }

    /// A source key-value as the target stores it; a delete keeps only the key.
    fn record(&self, kv: &meridian_proto::mvccpb::KeyValue, sub: i64, tombstone: bool) -> KvRecord {
        let mut rec =
            KvRecord { key: self.cfg.target_key(&kv.key), main: kv.mod_revision, sub, tombstone, ..Default::default() };
        if !tombstone {
            rec.value = kv.value.clone();
            rec.create_revision = kv.create_revision;
            rec.version = kv.version;
            rec.lease = kv.lease;
        }
        rec
    }

    /// Follows the source's Watch from the checkpoint until an error, or
    /// until the source reports the start revision compacted (returned).
    async fn follow(&mut self) -> anyhow::Result<i64> {
        let (key, range_end) = self.cfg.source_range();
        let (tx, rx) = mpsc::channel(4);
        let create = WatchCreateRequest { key, range_end, start_revision: self.checkpoint + 1, ..Default::default() };
        tx.send(WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) }).await?;
        let mut stream = WatchClient::new(self.src.clone())
            .max_decoding_message_size(usize::MAX)
            .watch(ReceiverStream::new(rx))
            .await
            .context("source watch")?
            .into_inner();
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_EVERY);
        let mut topology = tokio::time::interval(TOPOLOGY_EVERY);
        let mut batch: Vec<MirrorRevision> = Vec::new();
        let mut bytes = 0;
        loop {
            let next = if batch.is_empty() {
                tokio::select! {
                    r = stream.message() => Some(r?),
                    _ = progress.tick() => {
                        let _ = tx.try_send(WatchRequest { request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})) });
                        None
                    }
                    _ = topology.tick() => {
                        self.check_source_role().await?;
                        None
                    }
                    _ = housekeeping.tick() => {
                        self.housekeeping().await?;
                        self.log_progress();
                        None
                    }
                }
            } else {
                match tokio::time::timeout(Duration::ZERO, stream.message()).await {
                    Ok(r) => Some(r?),
                    Err(_) => {
                        self.flush(std::mem::take(&mut batch)).await?;
                        bytes = 0;
                        None
                    }
                }
            };
            let Some(resp) = next else { continue };
            let Some(resp) = resp else { bail!("the source closed the watch") };
            if resp.canceled {
                if resp.compact_revision > 0 {
                    return Ok(resp.compact_revision);
                }
                bail!("the source canceled the watch: {}", resp.cancel_reason);
            }
            if let Some(h) = &resp.header {
                self.m.source_revision.fetch_max(h.revision, Ordering::Relaxed);
                // The source had committed h.revision when it sent this.
                let mut heard = self.m.heard.lock();
                if heard.is_none_or(|(rev, _)| rev <= h.revision) {
                    *heard = Some((h.revision, unix_ms()));
                }
            }
            if resp.events.is_empty() {
                continue;
            }
            self.m.oldest_unapplied.lock().get_or_insert_with(Instant::now);
            if !resp.meridian_traceparent.is_empty() && self.trace.is_none() {
                self.trace = Some(resp.meridian_traceparent);
            }
            for ev in &resp.events {
                bytes += self.add_event(&mut batch, ev);
            }
            if bytes >= BATCH_BYTES {
                self.flush(std::mem::take(&mut batch)).await?;
                bytes = 0;
            }
        }
    }

    /// Adds a watch event to `batch`, grouped by revision; returns its size.
    fn add_event(&self, batch: &mut Vec<MirrorRevision>, ev: &Event) -> usize {
        let Some(kv) = &ev.kv else { return 0 };
        let rev = kv.mod_revision;
        self.m.source_revision.fetch_max(rev, Ordering::Relaxed);
        if batch.last().is_none_or(|b| b.revision != rev) {
            batch.push(MirrorRevision { revision: rev, changes: Vec::new() });
        }
        let last = batch.last_mut().expect("pushed");
        let rec = self.record(kv, last.changes.len() as i64, ev.r#type == EventType::Delete as i32);
        let len = rec.encoded_len();
        last.changes.push(rec);
        len
    }

    /// Far behind an etcd source, fetches the missing history with many
    /// watches at once (see catchup.rs) and applies it in order. Returns the
    /// source's compact revision if it has compacted past the checkpoint.
    async fn catch_up(&mut self) -> anyhow::Result<Option<i64>> {
        if !matches!(self.kind, Kind::Etcd) {
            return Ok(None);
        }
        let head = source_header(&self.src).await?.revision;
        if head - self.checkpoint < catchup::MIN_BEHIND {
            return Ok(None);
        }
        let started = Instant::now();
        let from = self.checkpoint + 1;
        tracing::info!(from, to = head, "far behind the source: fetching its history with parallel watches");
        self.m.source_revision.fetch_max(head, Ordering::Relaxed);
        self.m.oldest_unapplied.lock().get_or_insert_with(Instant::now);
        let (key, range_end) = self.cfg.source_range();
        let keep = move |k: &[u8]| k >= key.as_slice() && (range_end == [0] || k < range_end.as_slice());
        let mut next = from;
        let mut in_flight = VecDeque::new();
        let mut parallel = catchup::FIRST_PARALLEL;
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut progress =
            Progress::new("fetching the source's history", "revisions", (head - from + 1) as u64, Lines::Tracing);
        loop {
            while in_flight.len() < parallel && next <= head {
                let to = (next + catchup::SEGMENT_REVS).min(head + 1);
                in_flight.push_back(catchup::spawn(self.src.clone(), keep.clone(), next, to));
                next = to;
            }
            let Some(fetch) = in_flight.pop_front() else { break };
            let events = match fetch.await.context("catch-up watch")?? {
                catchup::Segment::Compacted(rev) => return Ok(Some(rev)),
                catchup::Segment::Events(events) => events,
            };
            let mut segment_bytes = 0;
            for ev in &events {
                segment_bytes += self.add_event(&mut batch, ev);
            }
            // Hold about BUFFER_BYTES of fetched history, whatever the value sizes.
            parallel = (catchup::BUFFER_BYTES / segment_bytes.max(1)).clamp(2, catchup::MAX_PARALLEL);
            bytes += segment_bytes;
            if bytes >= BATCH_BYTES {
                self.flush(std::mem::take(&mut batch)).await?;
                bytes = 0;
                progress.set((self.checkpoint - from + 1).max(0) as u64);
            }
        }
        self.flush(batch).await?;
        progress.set((self.checkpoint - from + 1).max(0) as u64);
        progress.finish();
        tracing::info!(revision = self.checkpoint, took = ?started.elapsed(), "caught up; following the source");
        Ok(None)
    }

    /// Logs how far behind the target is (a long first copy says so every few seconds).
    fn log_progress(&mut self) {
        self.last_progress = Instant::now();
        let source = self.m.source_revision.load(Ordering::Relaxed);
        if source > self.checkpoint {
            tracing::info!(applied = self.checkpoint, source, behind = source - self.checkpoint, "mirroring");
        }
    }

    /// Applies revisions on the target, granting any lease they use first,
    /// and logs progress now and then.
    async fn flush(&mut self, revisions: Vec<MirrorRevision>) -> anyhow::Result<()> {
        match self.trace.take().filter(|_| telemetry::enabled()) {
            Some(traceparent) => {
                let span = tracing::info_span!(target: telemetry::TARGET, "mirror.apply", revisions = revisions.len());
                telemetry::follow_traceparent(&span, &traceparent);
                self.apply(revisions, None).instrument(span).await?;
            }
            None => self.apply(revisions, None).await?,
        }
        if self.last_progress.elapsed() >= PROGRESS_LOG_EVERY {
            self.log_progress();
        }
        Ok(())
    }

    /// Sends one Apply: `revisions`, the leases they use that the target
    /// lacks, and for a copy's first batch `reset` with the source's compact
    /// revision. Moves the checkpoint and the counters.
    async fn apply(&mut self, revisions: Vec<MirrorRevision>, reset: Option<i64>) -> anyhow::Result<()> {
        let last = revisions.last().map(|r| r.revision);
        if last.is_none() && reset.is_none() {
            return Ok(());
        }
        let granted = self.leases_for(&revisions).await?;
        let n = revisions.len() as u64;
        let req = MirrorApplyRequest {
            revisions,
            granted_leases: granted.clone(),
            compact_revision: reset.unwrap_or(0),
            reset: reset.is_some(),
            ..self.request()
        };
        let resp = self.target.apply(req).await.context("apply on the target")?.into_inner();
        self.checkpoint = resp.applied_revision;
        self.known_leases.extend(granted.iter().map(|l| l.id));
        self.m.applied_revision.store(resp.applied_revision, Ordering::Relaxed);
        self.m.applied_total.fetch_add(n, Ordering::Relaxed);
        if last.is_some_and(|last| resp.applied_revision >= last) {
            *self.m.oldest_unapplied.lock() = None;
        }
        Ok(())
    }

    /// Leases used by `revisions` that the target does not have yet, with
    /// their TTLs as granted on the source.
    async fn leases_for(&mut self, revisions: &[MirrorRevision]) -> anyhow::Result<Vec<MirrorLease>> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for rec in revisions.iter().flat_map(|r| &r.changes) {
            if rec.lease == 0 || self.known_leases.contains(&rec.lease) || !seen.insert(rec.lease) {
                continue;
            }
            let ttl = LeaseClient::new(self.src.clone())
                .lease_time_to_live(LeaseTimeToLiveRequest { id: rec.lease, keys: false })
                .await
                .context("source lease TTL")?
                .into_inner();
            let granted = if ttl.granted_ttl > 0 { ttl.granted_ttl } else { 1 };
            out.push(MirrorLease { id: rec.lease, ttl: granted, remaining_ttl: ttl.ttl.max(0) });
        }
        Ok(out)
    }

    /// Drops leases the source no longer has, and repeats the source's
    /// compactions (Meridian sources; etcd sources compact on their own).
    /// With several sources: ends the session once its source is no longer
    /// the primary at the epoch the session started with (see
    /// [`crate::topology::moved`]): a source that is no longer the primary
    /// once the target holds what it wrote as primary, one promoted or
    /// demoted again at once. The source's lineage is refreshed on the way
    /// and handed to the target (an old primary that now follows the new
    /// one carries the new lineage), so the target may follow the new
    /// primary next without a copy.
    async fn check_source_role(&mut self) -> anyhow::Result<()> {
        if self.cfg.sources.len() > 1 && matches!(self.kind, Kind::Meridian) {
            let s = RegionRpcClient::new(self.src.clone()).status(RegionStatusRequest {}).await?.into_inner();
            if let Some(why) = crate::topology::moved(self.epoch, self.checkpoint, &s) {
                if s.lineage != self.lineage {
                    self.lineage = s.lineage.clone();
                    let req = self.request();
                    self.target.apply(req).await.context("lineage apply")?;
                }
                return Err(TopologyChanged(why).into());
            }
            self.lineage = s.lineage;
        }
        Ok(())
    }

    /// A Meridian source's auth store, when it moved on since the target got
    /// it. `None` too when the source does not give it to this mirror (no
    /// `--user` with the role root or mirror there, or, with auth off, no
    /// mirror token there): the target keeps the users it has.
    async fn source_auth_store(&self) -> anyhow::Result<Option<(u64, Vec<u8>)>> {
        if !matches!(self.kind, Kind::Meridian) {
            return Ok(None);
        }
        match MirrorClient::new(self.src.clone()).auth_store(MirrorAuthRequest {}).await {
            Ok(r) => {
                let r = r.into_inner();
                Ok((r.revision != self.auth_revision).then_some((r.revision, r.store)))
            }
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::PermissionDenied
                        | tonic::Code::Unauthenticated
                        | tonic::Code::InvalidArgument
                        | tonic::Code::Unimplemented
                ) =>
            {
                tracing::debug!(error = s.message(), "the source does not give this mirror its auth store");
                Ok(None)
            }
            Err(e) => Err(e).context("source auth store"),
        }
    }

    async fn housekeeping(&mut self) -> anyhow::Result<()> {
        let mut req = self.request();
        if !self.known_leases.is_empty() {
            let live = lease_ids(self.src.clone()).await.context("source leases")?;
            req.revoked_leases = self.known_leases.iter().filter(|id| !live.contains(id)).copied().collect();
        }
        if matches!(self.kind, Kind::Meridian) {
            let s = MirrorClient::new(self.src.clone()).status(MirrorStatusRequest::default()).await?.into_inner();
            if s.compact_revision > self.compacted && s.compact_revision <= self.checkpoint {
                req.compact_revision = s.compact_revision;
            }
        }
        let auth = self.source_auth_store().await?;
        if let Some((_, store)) = &auth {
            req.auth_store = store.clone();
        }
        if req.revoked_leases.is_empty() && req.compact_revision == 0 && req.auth_store.is_empty() {
            return Ok(());
        }
        let (revoked, compacted) = (req.revoked_leases.clone(), req.compact_revision);
        self.target.apply(req).await.context("housekeeping apply")?;
        if let Some((revision, store)) = auth {
            tracing::info!(auth_revision = revision, "the source's users and roles are on the target");
            self.auth_revision = revision;
            let enabled = serde_json::from_slice::<serde_json::Value>(&store).is_ok_and(|v| v["enabled"] == true);
            if enabled && !self.target_user && self.cfg.dest_user.is_some() {
                return Err(TopologyChanged("auth is on at the target now: authenticating there".into()).into());
            }
        }
        for id in &revoked {
            self.known_leases.remove(id);
        }
        self.compacted = self.compacted.max(compacted);
        Ok(())
    }

    /// Copies the source's retained history into the target, replacing what
    /// the target had, then lifts it to the source's revision at the copy.
    async fn resync(&mut self, compacted: i64) -> anyhow::Result<()> {
        let started = Instant::now();
        self.m.copies.fetch_add(1, Ordering::Relaxed);
        let (records, compact, rev) = match self.kind {
            Kind::Meridian => self.read_meridian_history().await?,
            Kind::Etcd => self.read_etcd_state(compacted).await?,
        };
        tracing::info!(records = records.len(), compact, revision = rev, "copying history to the target");
        let mut revisions: Vec<MirrorRevision> = Vec::new();
        for rec in records {
            if revisions.last().is_none_or(|r| r.revision != rec.main) {
                revisions.push(MirrorRevision { revision: rec.main, changes: Vec::new() });
            }
            revisions.last_mut().expect("pushed").changes.push(rec);
        }
        if revisions.last().is_none_or(|r| r.revision < rev) {
            revisions.push(MirrorRevision { revision: rev, changes: Vec::new() });
        }
        self.known_leases.clear();
        let mut first = true;
        let mut copied = 0usize;
        let mut chunk = Vec::new();
        let mut bytes = 0;
        let total = revisions.len();
        let mut progress = Progress::new("copying to the target", "revisions", total as u64, Lines::Tracing);
        for r in revisions {
            bytes += r.changes.iter().map(Message::encoded_len).sum::<usize>();
            chunk.push(r);
            if bytes >= BATCH_BYTES {
                copied += chunk.len();
                self.apply(std::mem::take(&mut chunk), first.then_some(compact)).await?;
                first = false;
                bytes = 0;
                progress.set(copied as u64);
            }
        }
        copied += chunk.len();
        self.apply(chunk, first.then_some(compact)).await?;
        progress.set(copied as u64);
        progress.finish();
        self.compacted = compact;
        tracing::info!(revision = self.checkpoint, took = ?started.elapsed(), "copy done; following the source");
        Ok(())
    }

    /// Every retained raw record (with sub-revisions and tombstones) of a
    /// Meridian source, its compact revision and its revision.
    async fn read_meridian_history(&self) -> anyhow::Result<(Vec<KvRecord>, i64, i64)> {
        let (key, range_end) = self.cfg.source_range();
        let mut stream = MirrorClient::new(self.src.clone())
            .max_decoding_message_size(usize::MAX)
            .range_stream(RangeStreamRequest { key, range_end })
            .await?
            .into_inner();
        let (mut records, mut compact, mut rev) = (Vec::new(), 0, 0);
        let mut progress = Progress::new("reading the source's history", "records", 0, Lines::Tracing);
        while let Some(chunk) = stream.message().await? {
            progress.inc(chunk.records.len() as u64);
            compact = chunk.compact_revision;
            rev = chunk.revision;
            records.extend(chunk.records.into_iter().map(|mut r| {
                r.key = self.cfg.target_key(&r.key);
                r
            }));
        }
        progress.finish();
        Ok((records, compact, rev))
    }

    /// An etcd source's state at its compact revision, as records: each key
    /// at its own mod revision, sub-revisions in key order.
    async fn read_etcd_state(&self, at: i64) -> anyhow::Result<(Vec<KvRecord>, i64, i64)> {
        let (mut key, range_end) = self.cfg.source_range();
        let mut kv = KvClient::new(self.src.clone()).max_decoding_message_size(usize::MAX);
        let mut kvs = Vec::new();
        let mut progress = Progress::new("reading the source's keys", "keys", 0, Lines::Tracing);
        loop {
            let r = kv
                .range(RangeRequest {
                    key: key.clone(),
                    range_end: range_end.clone(),
                    revision: at,
                    limit: PAGE,
                    ..Default::default()
                })
                .await
                .context("source range at the compact revision")?
                .into_inner();
            let more = r.more;
            if let Some(last) = r.kvs.last() {
                key = last.key.clone();
                key.push(0);
            }
            if kvs.is_empty() {
                // The first page counts every key in the range.
                progress.set_total(r.count.max(0) as u64);
            }
            kvs.extend(r.kvs);
            progress.set(kvs.len() as u64);
            if !more {
                break;
            }
        }
        progress.finish();
        kvs.sort_by(|a, b| (a.mod_revision, &a.key).cmp(&(b.mod_revision, &b.key)));
        let mut records: Vec<KvRecord> = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            let sub = match records.last() {
                Some(prev) if prev.main == kv.mod_revision => prev.sub + 1,
                _ => 0,
            };
            records.push(self.record(kv, sub, false));
        }
        Ok((records, at, at))
    }
}
