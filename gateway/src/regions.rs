//! What the gateway knows of each region, learned and kept fresh by probes:
//! role, epoch, leader, applied revision, staleness, health and RTT. No role
//! is configured: a region says what it is (`Mirror.Status`), and the
//! primary is the healthy region that says "primary" with the highest epoch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use meridian_proto::etcdserverpb::StatusRequest;
use meridian_proto::meridian::v1::mirror_client::MirrorClient;
use meridian_proto::meridian::v1::MirrorStatusRequest;
use parking_lot::RwLock;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

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

/// HTTP/2 connections to each member: requests from many clients share
/// them, and one connection's stream bookkeeping is a point of contention.
const CONNECTIONS_PER_MEMBER: usize = 4;

/// One member endpoint of a region.
pub struct Member {
    pub url: String,
    channels: Vec<Channel>,
    turn: std::sync::atomic::AtomicUsize,
}

impl Member {
    /// One of the member's connections, in turn.
    pub fn channel(&self) -> Channel {
        let turn = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.channels[turn % self.channels.len()].clone()
    }
}

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
    leader_index: Option<usize>,
    #[serde(skip)]
    probed_at: Option<Instant>,
    /// When the Mirror.Status that gave `staleness_seconds` was sent.
    #[serde(skip)]
    staleness_at: Option<Instant>,
    #[serde(skip)]
    failures: u32,
    /// Members that answered the last probe, by index.
    #[serde(skip)]
    answering: Vec<usize>,
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
    pub members: Vec<Member>,
    /// Swapped whole by each probe: a request takes a cheap reference.
    state: RwLock<Arc<RegionState>>,
    /// Turns for [`Region::read_channel`].
    next_reader: std::sync::atomic::AtomicUsize,
}

impl Region {
    pub fn state(&self) -> Arc<RegionState> {
        self.state.read().clone()
    }

    /// The member to send to: the leader when known, else the first member
    /// that answered the last probe, else the first.
    pub fn channel(&self) -> (Channel, String) {
        let st = self.state.read();
        let i = st.leader_index.or_else(|| st.answering.first().copied()).unwrap_or(0);
        (self.members[i].channel(), self.members[i].url.clone())
    }

    /// A member to read from: the members that answered the last probe in
    /// turn (a read's answer carries its own revision, so any member that
    /// has what the read needs may serve it).
    pub fn read_channel(&self) -> Channel {
        let st = self.state.read();
        if st.answering.is_empty() {
            let i = st.leader_index.unwrap_or(0);
            return self.members[i].channel();
        }
        let turn = self.next_reader.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.members[st.answering[turn % st.answering.len()]].channel()
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
    pub fn new(local: &str, upstreams: &[Upstream]) -> anyhow::Result<Self> {
        let mut all = Vec::new();
        for u in upstreams {
            let members = u
                .endpoints
                .iter()
                .map(|url| {
                    let endpoint = Endpoint::from_shared(url.to_string())?
                        .connect_timeout(Duration::from_secs(1))
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(10))
                        .keep_alive_timeout(Duration::from_secs(10));
                    let channels = (0..CONNECTIONS_PER_MEMBER).map(|_| endpoint.connect_lazy()).collect();
                    Ok(Member { url: url.to_string(), channels, turn: Default::default() })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let state = RegionState { role: "unknown".into(), staleness_seconds: -1.0, ..Default::default() };
            all.push(Arc::new(Region {
                name: u.region.clone(),
                members,
                state: RwLock::new(Arc::new(state)),
                next_reader: Default::default(),
            }));
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

/// Probes every region every `interval`, forever.
pub async fn run_probes(regions: Arc<Regions>, interval: Duration, metrics: Arc<crate::metrics::Metrics>) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let probes = regions.all.iter().map(|r| probe(r.clone()));
        futures::future::join_all(probes).await;
        for r in &regions.all {
            metrics.observe_region(&r.name, &r.state());
        }
        let names: Vec<String> = regions.all.iter().map(|r| r.name.clone()).collect();
        metrics.set_primary(&names, regions.primary().map(|p| p.region.name.clone()).as_deref());
    }
}

/// One probe of a region: Status on every member (leader, revision, RTT),
/// then Mirror.Status on the leader (role, epoch, staleness).
async fn probe(region: Arc<Region>) {
    let calls = region.members.iter().map(|m| async move {
        let started = Instant::now();
        let mut client = MaintenanceClient::new(m.channel());
        let answer = tokio::time::timeout(PROBE_TIMEOUT, client.status(StatusRequest {})).await;
        match answer {
            Ok(Ok(resp)) => Ok((resp.into_inner(), started.elapsed())),
            Ok(Err(status)) => Err((false, status.message().to_string())),
            Err(_) => Err((true, format!("no answer within {PROBE_TIMEOUT:?}"))),
        }
    });
    let answers = futures::future::join_all(calls).await;
    let mut leader_index = None;
    let mut leader_id = 0;
    let mut rtts = Vec::new();
    let mut revision = 0;
    let mut error = None;
    let mut slow = false;
    for (i, a) in answers.iter().enumerate() {
        match a {
            Ok((status, rtt)) => {
                rtts.push(rtt.as_secs_f64() * 1000.0);
                let member = status.header.as_ref().map_or(0, |h| h.member_id);
                revision = revision.max(status.header.as_ref().map_or(0, |h| h.revision));
                if status.leader != 0 {
                    leader_id = status.leader;
                    if member == status.leader {
                        leader_index = Some(i);
                    }
                }
            }
            Err((timed_out, e)) => {
                slow |= *timed_out;
                error = Some(format!("{}: {e}", region.members[i].url));
            }
        }
    }
    let reachable = !rtts.is_empty();
    let mut mirror = None;
    let mut mirror_sent = Instant::now();
    if reachable && leader_id != 0 {
        let i = leader_index.unwrap_or_else(|| answers.iter().position(Result::is_ok).unwrap_or(0));
        let mut client = MirrorClient::new(region.members[i].channel());
        mirror_sent = Instant::now();
        match tokio::time::timeout(PROBE_TIMEOUT, client.status(MirrorStatusRequest {})).await {
            Ok(Ok(resp)) => mirror = Some(resp.into_inner()),
            Ok(Err(status)) => error = Some(format!("Mirror.Status: {}", status.message())),
            Err(_) => error = Some("Mirror.Status: no answer".to_string()),
        }
    }
    let mut st = RegionState::clone(&region.state());
    st.probed_at = Some(Instant::now());
    st.error = error;
    let passed = reachable && leader_id != 0 && mirror.is_some();
    st.failures = if passed { 0 } else { st.failures + 1 };
    // A region that refuses every connection is down at once; one that is
    // slow to answer, or answered but failed a check, gets a second chance.
    st.healthy = passed || ((reachable || slow) && st.healthy && st.failures < FAILURES_TO_DOWN);
    if let Some(rtt) = rtts.iter().copied().reduce(f64::min) {
        st.rtt_ms = if st.rtt_ms == 0.0 { rtt } else { st.rtt_ms + RTT_WEIGHT * (rtt - st.rtt_ms) };
    }
    st.leader = (leader_id != 0).then(|| format!("{leader_id:x}"));
    st.leader_index = leader_index;
    st.answering = answers.iter().enumerate().filter(|(_, a)| a.is_ok()).map(|(i, _)| i).collect();
    st.leader_url = leader_index.map(|i| region.members[i].url.clone());
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
