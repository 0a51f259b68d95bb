//! The gateway's Prometheus metrics: requests by class, region and code,
//! their latency, and what the probes see of each region.

use prometheus::{
    exponential_buckets, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::regions::RegionState;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    /// Writes waiting now for other regions, and those that gave up.
    pub write_waits: IntGauge,
    pub write_wait_timeouts: IntCounter,
    /// 1 while the RPO guard (`--max-write-lag`) refuses writes.
    pub rpo_guard: IntGauge,
    /// Requests refused by a rate limit, by class.
    pub rate_limited: IntCounterVec,
    /// Watch streams moved to another region after theirs failed.
    pub watch_failovers: IntCounter,
    pub keepalive_failovers: IntCounter,
    /// Upstream watches shared by identical client watches, and the client
    /// watchers in the group that changed last.
    pub watch_groups: IntGauge,
    pub watch_coalesced: IntGauge,
    /// Point reads sent to a region together in one Txn, and those Txns.
    pub reads_gathered: IntCounterVec,
    pub read_batches: IntCounterVec,
    region_rtt: GaugeVec,
    region_revision: IntGaugeVec,
    region_staleness: GaugeVec,
    region_healthy: IntGaugeVec,
    region_primary: IntGaugeVec,
}

impl Metrics {
    pub fn new(gateway_region: &str) -> Self {
        let r = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("region", gateway_region);
        let reg = |c: Box<dyn prometheus::core::Collector>| r.register(c).expect("metric names are unique");
        let requests = IntCounterVec::new(
            opts("meridian_gateway_requests_total", "Requests by RPC class, serving region and gRPC code."),
            &["class", "serving_region", "code"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::from(opts("meridian_gateway_request_duration_seconds", "Request latency by RPC class."))
                .buckets(exponential_buckets(0.0001, 2.0, 18).expect("buckets")),
            &["class"],
        )
        .expect("valid metric");
        let gauge =
            |name: &str, help: &str| GaugeVec::new(opts(name, help), &["upstream_region"]).expect("valid metric");
        let int_gauge =
            |name: &str, help: &str| IntGaugeVec::new(opts(name, help), &["upstream_region"]).expect("valid metric");
        let m = Self {
            requests,
            latency,
            write_waits: IntGauge::with_opts(opts(
                "meridian_gateway_write_waits",
                "Writes waiting now for secondary regions to apply them (x-meridian-wait-regions).",
            ))
            .expect("valid metric"),
            write_wait_timeouts: IntCounter::with_opts(opts(
                "meridian_gateway_write_wait_timeouts_total",
                "Writes that committed on the primary but were not confirmed by enough regions in time.",
            ))
            .expect("valid metric"),
            rpo_guard: IntGauge::with_opts(opts(
                "meridian_gateway_rpo_guard_engaged",
                "1 while writes are refused because every secondary is further behind than --max-write-lag.",
            ))
            .expect("valid metric"),
            watch_failovers: IntCounter::with_opts(opts(
                "meridian_gateway_watch_failovers_total",
                "Watch streams moved to another region after theirs failed.",
            ))
            .expect("valid metric"),
            keepalive_failovers: IntCounter::with_opts(opts(
                "meridian_gateway_keepalive_failovers_total",
                "Lease keep-alive streams moved to the primary after theirs ended or was refused.",
            ))
            .expect("valid metric"),
            watch_groups: IntGauge::with_opts(opts(
                "meridian_gateway_watch_groups",
                "Upstream watches that identical client watches share.",
            ))
            .expect("valid metric"),
            watch_coalesced: IntGauge::with_opts(opts(
                "meridian_gateway_watch_coalesced",
                "Client watchers in the watch group that last changed (a sample of coalescing).",
            ))
            .expect("valid metric"),
            reads_gathered: IntCounterVec::new(
                opts(
                    "meridian_gateway_reads_gathered_total",
                    "Point reads sent to a region together with others, in one read-only Txn.",
                ),
                &["upstream_region"],
            )
            .expect("valid metric"),
            read_batches: IntCounterVec::new(
                opts("meridian_gateway_read_batches_total", "Read-only Txns that carried gathered point reads."),
                &["upstream_region"],
            )
            .expect("valid metric"),
            rate_limited: IntCounterVec::new(
                opts(
                    "meridian_gateway_rate_limited_total",
                    "Requests refused by a rate limit ([rate_limits]), by class.",
                ),
                &["class"],
            )
            .expect("valid metric"),
            region_rtt: gauge("meridian_gateway_region_rtt_seconds", "Smoothed round trip to each region."),
            region_revision: int_gauge("meridian_gateway_region_revision", "Each region's applied revision."),
            region_staleness: gauge(
                "meridian_gateway_region_staleness_seconds",
                "Each region's staleness as it reports it (0 for the primary, -1 unknown).",
            ),
            region_healthy: int_gauge("meridian_gateway_region_healthy", "1 when the last probe of the region passed."),
            region_primary: int_gauge("meridian_gateway_region_primary", "1 for the region writes go to."),
            registry: r.clone(),
        };
        reg(Box::new(m.requests.clone()));
        reg(Box::new(m.latency.clone()));
        reg(Box::new(m.write_waits.clone()));
        reg(Box::new(m.write_wait_timeouts.clone()));
        reg(Box::new(m.rpo_guard.clone()));
        reg(Box::new(m.rate_limited.clone()));
        reg(Box::new(m.watch_failovers.clone()));
        reg(Box::new(m.keepalive_failovers.clone()));
        reg(Box::new(m.watch_groups.clone()));
        reg(Box::new(m.watch_coalesced.clone()));
        reg(Box::new(m.reads_gathered.clone()));
        reg(Box::new(m.read_batches.clone()));
        reg(Box::new(m.region_rtt.clone()));
        reg(Box::new(m.region_revision.clone()));
        reg(Box::new(m.region_staleness.clone()));
        reg(Box::new(m.region_healthy.clone()));
        reg(Box::new(m.region_primary.clone()));
        m
    }

    pub fn observe_region(&self, name: &str, st: &RegionState) {
        self.region_rtt.with_label_values(&[name]).set(st.rtt_ms / 1000.0);
        self.region_revision.with_label_values(&[name]).set(st.revision);
        self.region_staleness.with_label_values(&[name]).set(st.staleness_seconds);
        self.region_healthy.with_label_values(&[name]).set(i64::from(st.healthy));
    }

    pub fn set_primary(&self, regions: &[String], primary: Option<&str>) {
        for r in regions {
            self.region_primary.with_label_values(&[r]).set(i64::from(Some(r.as_str()) == primary));
        }
    }

    pub fn render(&self) -> String {
        TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_default()
    }
}
