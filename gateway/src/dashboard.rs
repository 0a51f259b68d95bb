//! The lag dashboard at `/dashboard`: what the probes saw over the last 15
//! minutes, kept in memory, and the page that charts it.
//!
//! Every probe round hands the regions' states to [`History::record`]. Once a
//! second that becomes a [`Sample`] (role, epoch, health, applied revision,
//! lag in revisions and seconds, RTT per region); a change of primary or of a
//! region's health becomes an [`Event`] at once, so a failover is marked on
//! the charts to the probe interval. Samples and events carry a sequence
//! number: the page asks `GET /v1/dashboard?since=N` every second and gets
//! only what is new.
//!
//! The RTT matrix has one row per gateway. This gateway fills its own row;
//! with `--peer-gateway REGION=URL` it reads every other region's gateway's
//! `/v1/regions` every few seconds for theirs.
//!
//! The page's HTML, script and style are compiled into the binary
//! (`gateway/assets/`) and served with a `default-src 'self'` policy: nothing
//! comes from elsewhere.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;

use crate::regions::Regions;

/// How far back the charts go.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// One sample per this interval, whatever the probe interval.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Events kept (failovers and health changes); older ones are dropped.
const MAX_EVENTS: usize = 500;
/// How often the peers' rows of the RTT matrix are read, and how long one
/// read may take.
const PEER_EVERY: Duration = Duration::from_secs(2);
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// The page, its script and its style, served as they are.
pub const PAGE: &str = include_str!("../assets/dashboard.html");
pub const SCRIPT: &str = include_str!("../assets/dashboard.js");
pub const STYLE: &str = include_str!("../assets/dashboard.css");

/// One region at one sample.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RegionSample {
    pub name: String,
    pub role: String,
    pub epoch: u64,
    pub healthy: bool,
    pub revision: i64,
    /// Revisions behind the primary as this gateway sees both (0 for the
    /// primary; -1 while no primary is known).
    pub lag_revisions: i64,
    /// Seconds since the region last held everything its source had (0 for
    /// the primary; -1 while unknown).
    pub lag_seconds: f64,
    pub rtt_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub seq: u64,
    /// Unix time, milliseconds.
    pub t_ms: u64,
    pub regions: Vec<RegionSample>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub t_ms: u64,
    /// "failover" (writes now go to `region`), "no-primary", "down" or "up".
    pub kind: String,
    pub region: String,
    pub detail: String,
}

/// Samples and events after a sequence number, the peers' RTT rows, and
/// the newest sequence number (the page's next `since`).
pub struct Since {
    pub samples: Vec<Sample>,
    pub events: Vec<Event>,
    pub peers: BTreeMap<String, BTreeMap<String, f64>>,
    pub seq: u64,
}

/// What the dashboard shows, kept for [`WINDOW`].
pub struct History {
    inner: Mutex<Inner>,
    /// When this gateway started (Unix ms): a page that sees it change
    /// knows the sequence numbers began again.
    pub started_ms: u64,
}

#[derive(Default)]
struct Inner {
    seq: u64,
    samples: VecDeque<Sample>,
    events: VecDeque<Event>,
    last_sample: Option<Instant>,
    /// The primary (name, epoch) and each region's health at the last round.
    primary: Option<(String, u64)>,
    health: BTreeMap<String, bool>,
    /// Other gateways' RTT rows: their region → (region → ms).
    peers: BTreeMap<String, BTreeMap<String, f64>>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    pub fn new() -> Self {
        Self { inner: Mutex::new(Inner::default()), started_ms: now_ms() }
    }

    /// Takes one probe round: events for what changed, and a sample when
    /// the last is a second old.
    pub fn record(&self, regions: &Regions) {
        let now = now_ms();
        let primary = regions.primary().map(|p| (p.region.name.clone(), p.state.epoch));
        let primary_revision = regions.primary().map(|p| p.state.revision);
        let current: Vec<RegionSample> = regions
            .all
            .iter()
            .map(|r| {
                let st = r.state();
                let is_primary = primary.as_ref().is_some_and(|(n, _)| n == &r.name);
                RegionSample {
                    name: r.name.clone(),
                    role: st.role.clone(),
                    epoch: st.epoch,
                    healthy: st.healthy,
                    revision: st.revision,
                    lag_revisions: match primary_revision {
                        _ if is_primary => 0,
                        Some(p) => (p - st.revision).max(0),
                        None => -1,
                    },
                    lag_seconds: if is_primary {
                        0.0
                    } else {
                        st.staleness().map_or(-1.0, |d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
                    },
                    rtt_ms: (st.rtt_ms * 1000.0).round() / 1000.0,
                }
            })
            .collect();
        let mut inner = self.inner.lock();
        inner.observe(now, primary, &current);
        if inner.last_sample.is_none_or(|t| t.elapsed() >= SAMPLE_EVERY) {
            inner.last_sample = Some(Instant::now());
            let seq = inner.next_seq();
            inner.samples.push_back(Sample { seq, t_ms: now, regions: current });
            let oldest = now.saturating_sub(WINDOW.as_millis() as u64);
            while inner.samples.front().is_some_and(|s| s.t_ms < oldest) {
                inner.samples.pop_front();
            }
        }
    }

    /// Sets another gateway's row of the RTT matrix.
    pub fn set_peer_row(&self, region: &str, row: BTreeMap<String, f64>) {
        self.inner.lock().peers.insert(region.to_string(), row);
    }

    /// What is new after `since`.
    pub fn since(&self, since: u64) -> Since {
        let inner = self.inner.lock();
        Since {
            samples: inner.samples.iter().filter(|s| s.seq > since).cloned().collect(),
            events: inner.events.iter().filter(|e| e.seq > since).cloned().collect(),
            peers: inner.peers.clone(),
            seq: inner.seq,
        }
    }
}

impl Inner {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn event(&mut self, t_ms: u64, kind: &str, region: &str, detail: String) {
        let seq = self.next_seq();
        self.events.push_back(Event { seq, t_ms, kind: kind.into(), region: region.into(), detail });
        if self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }

    /// Events for a new primary (or none) and for regions going down or
    /// coming back. The first round only sets the baseline.
    fn observe(&mut self, now: u64, primary: Option<(String, u64)>, current: &[RegionSample]) {
        let first = self.last_sample.is_none();
        if !first && primary != self.primary {
            match (self.primary.clone(), &primary) {
                (before, Some((name, epoch))) => {
                    let from = before.map_or("none".to_string(), |(n, e)| format!("{n} (epoch {e})"));
                    self.event(now, "failover", name, format!("writes go to {name} at epoch {epoch}, from {from}"));
                }
                (Some((name, _)), None) => {
                    self.event(now, "no-primary", &name, format!("{name} no longer takes writes; no primary"));
                }
                (None, None) => {}
            }
        }
        self.primary = primary;
        for r in current {
            let before = self.health.insert(r.name.clone(), r.healthy);
            if !first && before.is_some_and(|h| h != r.healthy) {
                let (kind, what) =
                    if r.healthy { ("up", "answers probes again") } else { ("down", "stopped answering probes") };
                self.event(now, kind, &r.name, format!("{} {what}", r.name));
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Reads each peer gateway's `/v1/regions` every [`PEER_EVERY`] and keeps
/// its RTT row; a peer that does not answer keeps its last row.
pub async fn run_peers(history: Arc<History>, peers: Vec<(String, String)>) {
    if peers.is_empty() {
        return;
    }
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let mut tick = tokio::time::interval(PEER_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (region, base) in &peers {
            let Ok(uri) = format!("{}/v1/regions", base.trim_end_matches('/')).parse::<http::Uri>() else {
                continue;
            };
            let fetch = async {
                let resp = client.get(uri).await.ok()?;
                let body = http_body_util::BodyExt::collect(resp.into_body()).await.ok()?.to_bytes();
                serde_json::from_slice::<serde_json::Value>(&body).ok()
            };
            match tokio::time::timeout(PEER_TIMEOUT, fetch).await {
                Ok(Some(doc)) => history.set_peer_row(region, rtt_row(&doc)),
                _ => tracing::debug!(%region, url = %base, "peer gateway did not answer /v1/regions"),
            }
        }
    }
}

/// A gateway's `/v1/regions` as a row of the RTT matrix.
fn rtt_row(doc: &serde_json::Value) -> BTreeMap<String, f64> {
    doc["regions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| Some((r["name"].as_str()?.to_string(), r["rtt_ms"].as_f64()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(name: &str, role: &str, epoch: u64, healthy: bool) -> RegionSample {
        RegionSample {
            name: name.into(),
            role: role.into(),
            epoch,
            healthy,
            revision: 1,
            lag_revisions: 0,
            lag_seconds: 0.0,
            rtt_ms: 1.0,
        }
    }

    #[test]
    fn events_mark_failovers_and_health_changes_but_not_the_first_round() {
        let mut inner = Inner::default();
        let east = |h| region("us-east", "primary", 1, h);
        let west = |role, e| region("eu-west", role, e, true);
        inner.observe(1, Some(("us-east".into(), 1)), &[east(true), west("secondary", 1)]);
        inner.last_sample = Some(Instant::now());
        assert!(inner.events.is_empty(), "the first round is the baseline");
        inner.observe(2, Some(("us-east".into(), 1)), &[east(true), west("secondary", 1)]);
        assert!(inner.events.is_empty(), "nothing changed");
        inner.observe(3, None, &[east(false), west("secondary", 1)]);
        inner.observe(4, Some(("eu-west".into(), 2)), &[east(false), west("primary", 2)]);
        inner.observe(5, Some(("eu-west".into(), 2)), &[east(true), west("primary", 2)]);
        let kinds: Vec<_> = inner.events.iter().map(|e| (e.t_ms, e.kind.as_str(), e.region.as_str())).collect();
        assert_eq!(
            kinds,
            [(3, "no-primary", "us-east"), (3, "down", "us-east"), (4, "failover", "eu-west"), (5, "up", "us-east")]
        );
        assert!(inner.events[2].detail.contains("epoch 2"), "{}", inner.events[2].detail);
        let seqs: Vec<_> = inner.events.iter().map(|e| e.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    }

    #[test]
    fn a_peer_row_is_read_from_its_regions_document() {
        let doc = serde_json::json!({"regions": [
            {"name": "us-east", "rtt_ms": 66.5}, {"name": "eu-west", "rtt_ms": 0.4}, {"name": "odd"}
        ]});
        let row = rtt_row(&doc);
        assert_eq!(row.len(), 2);
        assert_eq!(row["us-east"], 66.5);
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for asset in [PAGE, SCRIPT, STYLE] {
            for bad in ["http://", "https://", "//cdn", "@import"] {
                assert!(!asset.contains(bad), "an asset names {bad:?}");
            }
        }
        assert!(PAGE.contains("dashboard.js") && PAGE.contains("dashboard.css"));
    }
}
