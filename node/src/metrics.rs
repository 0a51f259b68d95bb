//! Prometheus metrics under etcd's own names, so existing etcd dashboards
//! and alerts work against Meridian unchanged.

use prometheus::{
    exponential_buckets, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric a member exports. Cheap to clone handles out of; shared by
/// the raft loop, apply and the gRPC services.
pub struct Metrics {
    registry: Registry,
    pub has_leader: IntGauge,
    pub is_leader: IntGauge,
    pub leader_changes: IntCounter,
    pub proposals_committed: IntGauge,
    pub proposals_applied: IntGauge,
    pub proposals_pending: IntGauge,
    pub proposals_failed: IntCounter,
    pub read_indexes_failed: IntCounter,
    pub wal_fsync: Histogram,
    pub backend_commit: Histogram,
    pub db_total_size: IntGauge,
    pub db_in_use: IntGauge,
    pub quota_backend_bytes: IntGauge,
    pub keys_total: IntGauge,
    pub current_revision: IntGauge,
    pub compact_revision: IntGauge,
    pub snapshot_apply_in_progress: IntGauge,
    pub put_total: Twin,
    pub delete_total: Twin,
    pub range_total: Twin,
    pub txn_total: Twin,
    /// Bytes of every value put (etcd's `etcd_debugging_mvcc_total_put_size_in_bytes`).
    pub put_size: IntGauge,
    pub lease_granted: IntCounter,
    pub lease_renewed: IntCounter,
    pub lease_revoked: IntCounter,
    pub lease_expired: IntCounter,
    pub lease_ttl: Histogram,
    pub hash_duration: Histogram,
    pub hash_rev_duration: Histogram,
    pub defrag_duration: Histogram,
    /// Maintenance.Snapshot: from the image to the last chunk sent.
    pub backend_snapshot_duration: Histogram,
    pub defrag_inflight: IntGauge,
    pub health_success: IntCounter,
    pub health_failures: IntCounter,
    pub slow_apply: IntCounter,
    pub open_read_txns: IntGauge,
    pub db_total_size_debugging: IntGauge,
    pub is_learner: IntGauge,
    /// The auth store's revision.
    pub auth_revision: IntGauge,
    /// Learners this member promoted while it led.
    pub learner_promotions: IntCounter,
    pub cluster_version: IntGaugeVec,
    pub peer_sent_bytes: IntCounterVec,
    pub peer_received_bytes: IntCounterVec,
    pub peer_sent_failures: IntCounterVec,
    /// Raft snapshots, under etcd's names: taking an image for a follower
    /// (`snap_save`, and `snap_save_marshalling` for its header), storing a
    /// follower's incoming body (`snap_db_save`, its durable finish
    /// `snap_db_fsync`) and the restore's commit (`snap_fsync`).
    pub snap_save: Histogram,
    pub snap_save_marshalling: Histogram,
    pub snap_db_save: Histogram,
    pub snap_db_fsync: Histogram,
    pub snap_fsync: Histogram,
    pub snapshot_send_success: IntCounterVec,
    pub snapshot_send_failures: IntCounterVec,
    pub snapshot_send_duration: HistogramVec,
    pub snapshot_send_inflights: IntGaugeVec,
    pub snapshot_receive_success: IntCounterVec,
    pub snapshot_receive_failures: IntCounterVec,
    pub snapshot_receive_duration: HistogramVec,
    pub snapshot_receive_inflights: IntGaugeVec,
    /// Watchers, watch streams, unsynced watchers and events sent.
    pub watchers: IntGauge,
    pub watch_streams: IntGauge,
    pub slow_watchers: IntGauge,
    pub watch_events: IntCounter,
    /// Physical compaction: records removed, and how long (milliseconds) the
    /// index walk and the whole removal held the store.
    pub compaction_keys: IntCounter,
    pub compaction_pause: Histogram,
    pub compaction_total: Histogram,
    pub index_compaction_pause: Histogram,
    /// Bytes of raft entries appended to the log (etcd's name says WAL).
    pub wal_write_bytes: IntGauge,
    /// Bytes on client connections, HTTP/2 framing included.
    pub client_received_bytes: IntCounter,
    pub client_sent_bytes: IntCounter,
    /// gRPC calls by `type` (unary, stream) and the client's `client-api-version` metadata.
    pub client_requests: IntCounterVec,
    /// Heartbeats that left later than twice the heartbeat interval after the previous one to
    /// the same peer, or were dropped: the leader is overloaded.
    pub heartbeat_send_failures: IntCounter,
    /// ReadIndex batches not confirmed within half an election timeout.
    pub slow_read_indexes: IntCounter,
    pub server_id: IntGaugeVec,
    pub server_version: IntGaugeVec,
    /// Secondary only (0 on a primary), from the mirror's heartbeats (see
    /// `server::freshness`); each labelled with the member's region.
    pub secondary_staleness: Gauge,
    pub secondary_lag_revisions: IntGauge,
    pub secondary_source_revision: IntGauge,
    pub secondary_heartbeat_age: Gauge,
}

/// One count exported under two names: etcd 3.4 keeps both the `etcd_mvcc_*`
/// and the older `etcd_debugging_mvcc_*` name of its mvcc counters.
pub struct Twin(IntCounter, IntCounter);

impl Twin {
    pub fn inc(&self) {
        self.0.inc();
        self.1.inc();
    }
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    r.register(Box::new(m.clone())).expect("metric names are unique");
    m
}

impl Metrics {
    /// The metrics of a member of `region`: every `meridian_*` metric carries
    /// it as its `region` label; etcd's metrics keep etcd's exact labels.
    pub fn new(region: &str) -> Self {
        let r = Registry::new();
        let region_opts = |name: &str, help: &str| Opts::new(name, help).const_label("region", region);
        let gauge = |name: &str, help: &str| reg(&r, IntGauge::new(name, help).expect("valid metric"));
        let counter = |name: &str, help: &str| reg(&r, IntCounter::new(name, help).expect("valid metric"));
        let counter_vec = |name: &str, help: &str, label: &str| {
            reg(&r, IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"))
        };
        let gauge_vec = |name: &str, help: &str, label: &str| {
            reg(&r, IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric"))
        };
        // etcd's buckets for snapshot transfers: 0.1 s to about 27 minutes.
        let transfer_hist = |name: &str, help: &str, label: &str| {
            let opts = HistogramOpts::new(name, help).buckets(exponential_buckets(0.1, 2.0, 14).expect("buckets"));
            reg(&r, HistogramVec::new(opts, &[label]).expect("valid metric"))
        };
        let ms_hist = |name: &str, help: &str, start: f64, count: usize| {
            let opts = HistogramOpts::new(name, help).buckets(exponential_buckets(start, 2.0, count).expect("buckets"));
            reg(&r, Histogram::with_opts(opts).expect("valid metric"))
        };
        let disk_hist = |name: &str, help: &str| {
            let opts = HistogramOpts::new(name, help).buckets(exponential_buckets(0.001, 2.0, 14).expect("buckets"));
            reg(&r, Histogram::with_opts(opts).expect("valid metric"))
        };
        Self {
            secondary_staleness: reg(
                &r,
                Gauge::with_opts(region_opts(
                    "meridian_secondary_staleness_seconds",
                    "Seconds since this secondary member last held everything its source had committed \
                     (+Inf until known; grows while no mirror heartbeat arrives).",
                ))
                .expect("valid metric"),
            ),
            secondary_lag_revisions: reg(
                &r,
                IntGauge::with_opts(region_opts(
                    "meridian_secondary_lag_revisions",
                    "Source revisions this secondary member has not applied.",
                ))
                .expect("valid metric"),
            ),
            secondary_source_revision: reg(
                &r,
                IntGauge::with_opts(region_opts(
                    "meridian_secondary_source_revision",
                    "The newest source revision the mirror told this secondary member of.",
                ))
                .expect("valid metric"),
            ),
            secondary_heartbeat_age: reg(
                &r,
                Gauge::with_opts(region_opts(
                    "meridian_secondary_heartbeat_age_seconds",
                    "Seconds since the last mirror heartbeat reached this secondary member (+Inf before the first).",
                ))
                .expect("valid metric"),
            ),
            has_leader: gauge("etcd_server_has_leader", "Whether or not a leader exists. 1 is existence, 0 is not."),
            is_leader: gauge("etcd_server_is_leader", "Whether or not this member is a leader. 1 if is, 0 otherwise."),
            leader_changes: counter("etcd_server_leader_changes_seen_total", "The number of leader changes seen."),
            proposals_committed: gauge(
                "etcd_server_proposals_committed_total",
                "The total number of consensus proposals committed.",
            ),
            proposals_applied: gauge(
                "etcd_server_proposals_applied_total",
                "The total number of consensus proposals applied.",
            ),
            proposals_pending: gauge(
                "etcd_server_proposals_pending",
                "The current number of pending proposals to commit.",
            ),
            proposals_failed: counter(
                "etcd_server_proposals_failed_total",
                "The total number of failed proposals seen.",
            ),
            read_indexes_failed: counter(
                "etcd_server_read_indexes_failed_total",
                "The total number of failed read indexes seen.",
            ),
            wal_fsync: disk_hist(
                "etcd_disk_wal_fsync_duration_seconds",
                "The latency distributions of fsync called by the raft log.",
            ),
            backend_commit: disk_hist(
                "etcd_disk_backend_commit_duration_seconds",
                "The latency distributions of commit called by the backend.",
            ),
            db_total_size: gauge(
                "etcd_mvcc_db_total_size_in_bytes",
                "Total size of the underlying database physically allocated in bytes.",
            ),
            db_in_use: gauge(
                "etcd_mvcc_db_total_size_in_use_in_bytes",
                "Total size of the underlying database logically in use in bytes.",
            ),
            quota_backend_bytes: gauge(
                "etcd_server_quota_backend_bytes",
                "Current backend storage quota size in bytes.",
            ),
            keys_total: gauge("etcd_debugging_mvcc_keys_total", "Total number of keys."),
            current_revision: gauge("etcd_debugging_mvcc_current_revision", "The current revision of store."),
            compact_revision: gauge(
                "etcd_debugging_mvcc_compact_revision",
                "The revision of the last compaction in store.",
            ),
            snapshot_apply_in_progress: gauge(
                "etcd_server_snapshot_apply_in_progress_total",
                "1 if the server is applying the incoming snapshot. 0 if none.",
            ),
            put_total: Twin(
                counter("etcd_mvcc_put_total", "Total number of puts seen by this member."),
                counter("etcd_debugging_mvcc_put_total", "Total number of puts seen by this member."),
            ),
            delete_total: Twin(
                counter("etcd_mvcc_delete_total", "Total number of deletes seen by this member."),
                counter("etcd_debugging_mvcc_delete_total", "Total number of deletes seen by this member."),
            ),
            range_total: Twin(
                counter("etcd_mvcc_range_total", "Total number of ranges seen by this member."),
                counter("etcd_debugging_mvcc_range_total", "Total number of ranges seen by this member."),
            ),
            txn_total: Twin(
                counter("etcd_mvcc_txn_total", "Total number of txns seen by this member."),
                counter("etcd_debugging_mvcc_txn_total", "Total number of txns seen by this member."),
            ),
            put_size: gauge(
                "etcd_debugging_mvcc_total_put_size_in_bytes",
                "The total size of put kv pairs seen by this member.",
            ),
            lease_granted: counter("etcd_debugging_lease_granted_total", "The total number of granted leases."),
            lease_renewed: counter(
                "etcd_debugging_lease_renewed_total",
                "The number of renewed leases seen by the leader.",
            ),
            lease_revoked: counter("etcd_debugging_lease_revoked_total", "The total number of revoked leases."),
            lease_expired: counter("etcd_debugging_server_lease_expired_total", "The total number of expired leases."),
            lease_ttl: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("etcd_debugging_lease_ttl_total", "Bucketed histogram of lease TTLs.")
                        .buckets(exponential_buckets(1.0, 2.0, 14).expect("buckets")),
                )
                .expect("valid metric"),
            ),
            hash_duration: disk_hist(
                "etcd_mvcc_hash_duration_seconds",
                "The latency distribution of storage hash operation.",
            ),
            hash_rev_duration: disk_hist(
                "etcd_mvcc_hash_rev_duration_seconds",
                "The latency distribution of storage hash by revision operation.",
            ),
            defrag_duration: disk_hist(
                "etcd_disk_backend_defrag_duration_seconds",
                "The latency distribution of backend defragmentation.",
            ),
            backend_snapshot_duration: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "etcd_disk_backend_snapshot_duration_seconds",
                        "The latency distribution of backend snapshots.",
                    )
                    .buckets(exponential_buckets(0.01, 2.0, 17).expect("buckets")),
                )
                .expect("valid metric"),
            ),
            defrag_inflight: gauge(
                "etcd_disk_defrag_inflight",
                "Whether or not defrag is active on the member. 1 means active, 0 means not.",
            ),
            health_success: counter("etcd_server_health_success", "The total number of successful health checks"),
            health_failures: counter("etcd_server_health_failures", "The total number of failed health checks"),
            slow_apply: counter(
                "etcd_server_slow_apply_total",
                "The total number of slow apply requests (likely overloaded from slow disk).",
            ),
            open_read_txns: gauge(
                "etcd_mvcc_db_open_read_transactions",
                "The number of currently open read transactions",
            ),
            is_learner: gauge(
                "etcd_server_is_learner",
                "Whether or not this member is a learner. 1 if is, 0 otherwise.",
            ),
            auth_revision: gauge("etcd_debugging_auth_revision", "The current revision of auth store."),
            learner_promotions: counter(
                "etcd_server_learner_promote_successes",
                "The total number of successful learner promotions while this member is leader.",
            ),
            cluster_version: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "etcd_cluster_version",
                        "Which version is running. 1 for 'cluster_version' label with current cluster version",
                    ),
                    &["cluster_version"],
                )
                .expect("valid metric"),
            ),
            db_total_size_debugging: gauge(
                "etcd_debugging_mvcc_db_total_size_in_bytes",
                "Total size of the underlying database physically allocated in bytes.",
            ),
            peer_sent_bytes: counter_vec(
                "etcd_network_peer_sent_bytes_total",
                "The total number of bytes sent to peers.",
                "To",
            ),
            peer_received_bytes: counter_vec(
                "etcd_network_peer_received_bytes_total",
                "The total number of bytes received from peers.",
                "From",
            ),
            peer_sent_failures: counter_vec(
                "etcd_network_peer_sent_failures_total",
                "The total number of send failures from peers.",
                "To",
            ),
            snap_save: disk_hist(
                "etcd_debugging_snap_save_total_duration_seconds",
                "The total latency distributions of save called by snapshot.",
            ),
            snap_save_marshalling: disk_hist(
                "etcd_debugging_snap_save_marshalling_duration_seconds",
                "The marshalling cost distributions of save called by snapshot.",
            ),
            snap_db_save: disk_hist(
                "etcd_snap_db_save_total_duration_seconds",
                "The total latency distributions of v3 snapshot save",
            ),
            snap_db_fsync: disk_hist(
                "etcd_snap_db_fsync_duration_seconds",
                "The latency distributions of fsyncing .snap.db file",
            ),
            snap_fsync: disk_hist(
                "etcd_snap_fsync_duration_seconds",
                "The latency distributions of fsync called by snap.",
            ),
            snapshot_send_success: counter_vec(
                "etcd_network_snapshot_send_success",
                "Total number of successful snapshot sends",
                "To",
            ),
            snapshot_send_failures: counter_vec(
                "etcd_network_snapshot_send_failures",
                "Total number of snapshot send failures",
                "To",
            ),
            snapshot_send_duration: transfer_hist(
                "etcd_network_snapshot_send_total_duration_seconds",
                "Total latency distributions of v3 snapshot sends",
                "To",
            ),
            snapshot_send_inflights: gauge_vec(
                "etcd_network_snapshot_send_inflights_total",
                "Total number of inflight snapshot sends",
                "To",
            ),
            snapshot_receive_success: counter_vec(
                "etcd_network_snapshot_receive_success",
                "Total number of successful snapshot receives",
                "From",
            ),
            snapshot_receive_failures: counter_vec(
                "etcd_network_snapshot_receive_failures",
                "Total number of snapshot receive failures",
                "From",
            ),
            snapshot_receive_duration: transfer_hist(
                "etcd_network_snapshot_receive_total_duration_seconds",
                "Total latency distributions of v3 snapshot receives",
                "From",
            ),
            snapshot_receive_inflights: gauge_vec(
                "etcd_network_snapshot_receive_inflights_total",
                "Total number of inflight snapshot receives",
                "From",
            ),
            watchers: gauge("etcd_debugging_mvcc_watcher_total", "Total number of watchers."),
            watch_streams: gauge("etcd_debugging_mvcc_watch_stream_total", "Total number of watch streams."),
            slow_watchers: gauge("etcd_debugging_mvcc_slow_watcher_total", "Total number of unsynced slow watchers."),
            watch_events: counter("etcd_debugging_mvcc_events_total", "Total number of events sent by this member."),
            compaction_keys: counter(
                "etcd_debugging_mvcc_db_compaction_keys_total",
                "Total number of db keys compacted.",
            ),
            compaction_pause: ms_hist(
                "etcd_debugging_mvcc_db_compaction_pause_duration_milliseconds",
                "Bucketed histogram of db compaction pause duration.",
                1.0,
                13,
            ),
            compaction_total: ms_hist(
                "etcd_debugging_mvcc_db_compaction_total_duration_milliseconds",
                "Bucketed histogram of db compaction total duration.",
                100.0,
                14,
            ),
            index_compaction_pause: ms_hist(
                "etcd_debugging_mvcc_index_compaction_pause_duration_milliseconds",
                "Bucketed histogram of index compaction pause duration.",
                0.5,
                12,
            ),
            wal_write_bytes: gauge("etcd_disk_wal_write_bytes_total", "Total number of bytes written in WAL."),
            client_received_bytes: counter(
                "etcd_network_client_grpc_received_bytes_total",
                "The total number of bytes received from grpc clients.",
            ),
            client_sent_bytes: counter(
                "etcd_network_client_grpc_sent_bytes_total",
                "The total number of bytes sent to grpc clients.",
            ),
            client_requests: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "etcd_server_client_requests_total",
                        "The total number of client requests per client version.",
                    ),
                    &["type", "client_api_version"],
                )
                .expect("valid metric"),
            ),
            heartbeat_send_failures: counter(
                "etcd_server_heartbeat_send_failures_total",
                "The total number of leader heartbeat send failures (likely overloaded from slow disk).",
            ),
            slow_read_indexes: counter(
                "etcd_server_slow_read_indexes_total",
                "The total number of pending read indexes not in sync with leader's or timed out read index requests.",
            ),
            server_id: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "etcd_server_id",
                        "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.",
                    ),
                    &["server_id"],
                )
                .expect("valid metric"),
            ),
            server_version: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "etcd_server_version",
                        "Which version is running. 1 for 'server_version' label with current version.",
                    ),
                    &["server_version"],
                )
                .expect("valid metric"),
            ),
            registry: r,
        }
    }

    /// All metrics in Prometheus text format.
    pub fn render(&self) -> String {
        TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new("default")
    }
}
