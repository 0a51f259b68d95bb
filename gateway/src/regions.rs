//! What the gateway knows of each region, learned and kept fresh by probes:
//! role, epoch, leader, applied revision, staleness, health and RTT. No role
//! is configured: a region says what it is (`Mirror.Status`), and the
//! primary is the healthy region that says "primary" with the highest epoch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_proto::meridian::v1::mirror_client::MirrorClient;
use meridian_proto::meridian::v1::MirrorStatusRequest;
use meridian_wire::region::RegionClient;
use parking_lot::RwLock;
use serde::Serialize;
use tonic::transport::Channel;

use crate::config::Upstream;

/// The weight of one probe in the RTT average: with probes every 200 ms, the
/// average spans a few seconds, so one slow probe does not move traffic.
const RTT_WEIGHT: f64 = 0.1;
/// A probe that takes longer counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// RTTs closer than this, or than this share of the smaller, are a tie,
/// which the gateway's own region wins: measurement noise does not move
/// traffic away from it.
const RTT_TIE_MS: f64 = 1.0;
const RTT_TIE_SHARE: f64 = 0.1;
/// Failed probes in a row before a region that answered before counts as
/// down: one slow answer on a busy machine does not move traffic.
const FAILURES_TO_DOWN: u32 = 2;

/// HTTP/2 connections to each member. One: requests from many clients
/// share it, and the more share a connection, the more of their frames
/// leave in one write (`meridian_wire::coalesce`); with four, a 64-client
/// read load cost the gateway and the members 15% more CPU per read.
const CONNECTIONS_PER_MEMBER: usize = 1;

/// A region's state as the last probe saw it (`GET /v1/regions` prints it).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RegionState {
    /// "primary", "secondary", or "unknown" before the first answer.
    pub role: String,
    pub epoch: u64,
    /// The leader's member id (hex) and URL, when known.
    pub leader: Option<String>,
    pub leader_url: Option<String>,
    pub healthy: bool,
    /// Smoothed round trip of a Status call, in milliseconds.
    pub rtt_ms: f64,
    /// The region's applied revision.
    pub revision: i64,
    /// Revisions behind its source, and seconds since it last held all the
    /// source had (0 for a primary; -1 while unknown).
    pub lag_revisions: i64,
    pub staleness_seconds: f64,
    /// Why the last probe failed, if it did.
    pub error: Option<String>,
    #[serde(skip)]
    probed_at: Option<Instant>,
    /// When the Mirror.Status that gave `staleness_seconds` was sent.
    #[serde(skip)]
    staleness_at: Option<Instant>,
    #[serde(skip)]
    failures: u32,
}

impl RegionState {
    /// Staleness now, as a duration; `None` while unknown. A secondary's
    /// staleness grows at most as fast as time passes, so the figure the
    /// last probe read plus the time since is an upper bound: a bounded
    /// read is never sent to a region that may have gone past its bound
    /// since the probe.
    pub fn staleness(&self) -> Option<Duration> {
        if self.staleness_seconds < 0.0 {
            return None;
        }
        let since =
            if self.is_primary() { Duration::ZERO } else { self.staleness_at.map(|t| t.elapsed()).unwrap_or_default() };
        Some(Duration::from_secs_f64(self.staleness_seconds) + since)
    }
    pub fn is_primary(&self) -> bool {
        self.role == "primary"
    }
}

pub struct Region {
    pub name: String,
    /// Its members, their connections, and which one leads.
    pub client: RegionClient,
    /// Swapped whole by each probe: a request takes a cheap reference.
    state: RwLock<Arc<RegionState>>,
    /// Point reads gathered while many are out at once.
    pub reads: Arc<crate::batch::Reads>,
}

impl Region {
    pub fn state(&self) -> Arc<RegionState> {
        self.state.read().clone()
    }

    /// The member to send to: the leader when known, else the first member
    /// that answered the last probe, else the first.
    pub fn channel(&self) -> (Channel, String) {
        let (channel, url) = self.client.channel();
        (channel, url.to_string())
    }

    /// A member to read from, in turn among those that answered.
    pub fn read_channel(&self) -> Channel {
        self.client.read_channel()
    }
}

/// Every region, and which one is this gateway's.
pub struct Regions {
    pub local: String,
    pub all: Vec<Arc<Region>>,
}

/// A region picked for a request, with what it said at the last probe.
pub struct Pick {
    pub region: Arc<Region>,
    pub state: Arc<RegionState>,
}

impl Regions {
    pub fn new(
        local: &str,
        upstreams: &[Upstream],
        tls: &meridian_wire::tls::ClientTls,
        metrics: &crate::metrics::Metrics,
    ) -> anyhow::Result<Self> {
        let mut all = Vec::new();
        for u in upstreams {
            let urls: Vec<String> = u.endpoints.iter().map(ToString::to_string).collect();
            let client = RegionClient::new(&urls, CONNECTIONS_PER_MEMBER, tls)?;
            let state = RegionState { role: "unknown".into(), staleness_seconds: -1.0, ..Default::default() };
            let reads = Arc::new(crate::batch::Reads::new(&u.region, metrics));
            all.push(Arc::new(Region { name: u.region.clone(), client, state: RwLock::new(Arc::new(state)), reads }));
        }
        Ok(Self { local: local.to_string(), all })
    }

    /// The region that takes writes: healthy, "primary", highest epoch. A
    /// region that says primary with a lower epoch (a fenced old primary
    /// that has not heard yet) gets nothing.
    pub fn primary(&self) -> Option<Pick> {
        let mut best: Option<Pick> = None;
        for r in &self.all {
            let st = r.state();
            if st.healthy && st.is_primary() && best.as_ref().is_none_or(|b| st.epoch > b.state.epoch) {
                best = Some(Pick { region: r.clone(), state: st });
            }
        }
        best
    }

    /// The nearest healthy region that `fits`, by smoothed RTT; a tie goes
    /// to this gateway's region.
    pub fn nearest(&self, fits: impl Fn(&RegionState) -> bool) -> Option<Pick> {
        self.nearest_named(|_, st| fits(st))
    }

    /// [`Regions::nearest`], with the region's name given to `fits` too. A
    /// region that says primary but is not the primary (a fenced one with a
    /// lower epoch) serves nothing: its history may have diverged.
    pub fn nearest_named(&self, fits: impl Fn(&str, &RegionState) -> bool) -> Option<Pick> {
        let primary = self.primary().map(|p| p.region.name.clone());
        let mut best: Option<Pick> = None;
        for r in &self.all {
            let st = r.state();
            if !st.healthy || !fits(&r.name, &st) || (st.is_primary() && primary.as_deref() != Some(r.name.as_str())) {
                continue;
            }
            let better = match &best {
                None => true,
                Some(b) => {
                    let (mine, theirs) = (st.rtt_ms, b.state.rtt_ms);
                    if (mine - theirs).abs() < RTT_TIE_MS.max(RTT_TIE_SHARE * mine.min(theirs)) {
                        r.name == self.local
                    } else {
                        mine < theirs
                    }
                }
            };
            if better {
                best = Some(Pick { region: r.clone(), state: st });
            }
        }
        best
    }

    /// This gateway's own region if healthy, else the nearest healthy one.
    pub fn local_or_nearest(&self) -> Option<Pick> {
        self.all
            .iter()
            .find(|r| r.name == self.local)
            .map(|r| Pick { region: r.clone(), state: r.state() })
            .filter(|p| p.state.healthy)
            .or_else(|| self.nearest(|_| true))
    }

    /// True once every region has been probed at least once.
    pub fn probed(&self) -> bool {
        self.all.iter().all(|r| r.state.read().probed_at.is_some())
    }
}

/// Probes every region every `interval`, forever. Each region has its own
/// loop: a region whose probes time out (a partition) does not hold back
/// what the gateway learns of the others, so a new primary elsewhere is
/// seen within one interval. The gauges and the dashboard's history are
/// taken from the latest states on the same beat.
pub async fn run_probes(
    regions: Arc<Regions>,
    interval: Duration,
    metrics: Arc<crate::metrics::Metrics>,
    history: Arc<crate::dashboard::History>,
) {
    for r in &regions.all {
        let r = r.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                probe(r.clone()).await;
            }
        });
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for r in &regions.all {
            metrics.observe_region(&r.name, &r.state());
        }
        let names: Vec<String> = regions.all.iter().map(|r| r.name.clone()).collect();
        metrics.set_primary(&names, regions.primary().map(|p| p.region.name.clone()).as_deref());
        history.record(&regions);
    }
}

/// One probe of a region: Status on every member (leader, revision, RTT),
/// then Mirror.Status on the leader (role, epoch, staleness).
async fn probe(region: Arc<Region>) {
    let view = region.client.probe(PROBE_TIMEOUT).await;
    let reachable = !view.answering.is_empty();
    let mut error = view.error.clone();
    let mut mirror = None;
    let mut mirror_sent = Instant::now();
    if view.has_leader() {
        let mut client = MirrorClient::new(region.client.channel().0);
        mirror_sent = Instant::now();
        match tokio::time::timeout(PROBE_TIMEOUT, client.status(MirrorStatusRequest::default())).await {
            Ok(Ok(resp)) => mirror = Some(resp.into_inner()),
            Ok(Err(status)) => error = Some(format!("Mirror.Status: {}", status.message())),
            Err(_) => error = Some("Mirror.Status: no answer".to_string()),
        }
    }
    let mut st = RegionState::clone(&region.state());
    st.probed_at = Some(Instant::now());
    st.error = error;
    let passed = view.has_leader() && mirror.is_some();
    st.failures = if passed { 0 } else { st.failures + 1 };
    // A region that refuses every connection is down at once; one that is
    // slow to answer, or answered but failed a check, gets a second chance.
    st.healthy = passed || ((reachable || view.timed_out) && st.healthy && st.failures < FAILURES_TO_DOWN);
    if let Some(rtt) = view.min_rtt.map(|d| d.as_secs_f64() * 1000.0) {
        st.rtt_ms = if st.rtt_ms == 0.0 { rtt } else { st.rtt_ms + RTT_WEIGHT * (rtt - st.rtt_ms) };
    }
    st.leader = (view.leader_id != 0).then(|| format!("{:x}", view.leader_id));
    st.leader_url = view.leader_index.map(|i| region.client.members[i].url.clone());
    let revision = view.revision;
    if let Some(m) = mirror {
        st.role = m.role;
        st.epoch = m.epoch;
        st.revision = m.revision.max(revision);
        st.lag_revisions = m.lag_revisions;
        // The figure was true when the request left, at the latest.
        st.staleness_at = Some(mirror_sent);
        st.staleness_seconds = if st.role == "primary" {
            0.0
        } else if m.staleness_ms < 0 {
            -1.0
        } else {
            m.staleness_ms as f64 / 1000.0
        };
    } else {
        st.revision = revision.max(st.revision);
    }
    *region.state.write() = Arc::new(st);
}
