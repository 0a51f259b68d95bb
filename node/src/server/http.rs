//! Plain HTTP beside gRPC, as etcd serves on its client and metrics URLs:
//! `/health`, `/version` and `/metrics` (Prometheus text).

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::cluster::Alarms;
use super::maintenance::{ETCD_CLUSTER_VERSION, ETCD_VERSION};
use super::EtcdServer;

/// Adds the HTTP endpoints to `router`.
pub fn routes(router: Router, server: Arc<EtcdServer>) -> Router {
    let s1 = server.clone();
    let s2 = server;
    router
        .route("/health", get(move || health(s1.clone())))
        .route("/version", get(version))
        .route("/metrics", get(move || metrics(s2.clone())))
}

/// Healthy when a leader is known, no alarm is raised, and a linearizable
/// read barrier passes within a second, as etcd 3.4 checks.
async fn health(server: Arc<EtcdServer>) -> impl IntoResponse {
    let ok = server.raft.status().leader() != 0
        && Alarms::load(&server.mvcc).0.is_empty()
        && matches!(tokio::time::timeout(Duration::from_secs(1), server.read_barrier()).await, Ok(Ok(())));
    if ok { &server.metrics.health_success } else { &server.metrics.health_failures }.inc();
    let (code, body) = if ok {
        (StatusCode::OK, r#"{"health":"true"}"#)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, r#"{"health":"false"}"#)
    };
    (code, [(header::CONTENT_TYPE, "application/json")], body)
}

async fn version() -> impl IntoResponse {
    let body = format!(
        r#"{{"etcdserver":"{ETCD_VERSION}","etcdcluster":"{ETCD_CLUSTER_VERSION}","meridian":"{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    ([(header::CONTENT_TYPE, "application/json")], body)
}

async fn metrics(server: Arc<EtcdServer>) -> impl IntoResponse {
    let disk = server.mvcc.disk_size() as i64;
    server.metrics.db_total_size.set(disk);
    server.metrics.db_total_size_debugging.set(disk);
    server.metrics.open_read_txns.set(server.mvcc.open_reads());
    server.metrics.db_in_use.set(server.mvcc.size_in_use() as i64);
    server.metrics.keys_total.set(server.mvcc.key_count() as i64);
    // Read at scrape time, so a silent mirror shows as growing staleness.
    let f = server.freshness();
    server.metrics.secondary_staleness.set(f.staleness_seconds);
    server.metrics.secondary_lag_revisions.set(f.lag_revisions);
    server.metrics.secondary_source_revision.set(f.source_revision);
    server.metrics.secondary_heartbeat_age.set(f.heartbeat_age_seconds);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], server.metrics.render())
}
