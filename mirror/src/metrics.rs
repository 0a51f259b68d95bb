//! What the mirror reports: Prometheus text on `/metrics`, the same as JSON
//! on `/status` (what `meridian mirror status --metrics` prints).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::routing::get;
use parking_lot::Mutex;
use serde::Serialize;

#[derive(Default)]
pub struct Metrics {
    /// Newest revision seen on the source.
    pub source_revision: AtomicI64,
    /// Revision the secondary has applied (the checkpoint).
    pub applied_revision: AtomicI64,
    /// Revisions applied since start.
    pub applied_total: AtomicU64,
    pub resyncs: AtomicU64,
    /// Every copy of the source's whole history (a first copy, a new
    /// source, a resync): what a rejoin without a full copy avoids.
    pub copies: AtomicU64,
    pub errors: AtomicU64,
    /// When the oldest revision not yet applied was first seen.
    pub oldest_unapplied: Mutex<Option<Instant>>,
    /// (time, applied_total) samples for the apply rate.
    rate: Mutex<Option<(Instant, u64, f64)>>,
    /// The newest (revision, unix ms) at which the source said it had
    /// committed that revision: what heartbeats carry.
    pub heard: Mutex<Option<(i64, u64)>>,
    /// `region="…",source_region="…"`: the secondary's region and the region
    /// it mirrors, on every metric; learned from the target at session start.
    pub labels: Mutex<String>,
    /// What the mirror does now: `following <endpoints>`, `idle: <why>`,
    /// or `choosing` before the first choice.
    pub state: Mutex<String>,
}

#[derive(Serialize)]
pub struct Snapshot {
    pub source_revision: i64,
    pub applied_revision: i64,
    pub lag_revisions: i64,
    pub lag_seconds: f64,
    pub apply_rate: f64,
    pub applied_total: u64,
    pub resyncs_total: u64,
    pub copies_total: u64,
    pub errors_total: u64,
    pub state: String,
}

impl Metrics {
    pub fn lag_seconds(&self) -> f64 {
        self.oldest_unapplied.lock().map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    pub fn snapshot(&self) -> Snapshot {
        let source = self.source_revision.load(Ordering::Relaxed);
        let applied = self.applied_revision.load(Ordering::Relaxed);
        let total = self.applied_total.load(Ordering::Relaxed);
        // Revisions per second over the time since the previous look.
        let apply_rate = {
            let mut r = self.rate.lock();
            let now = Instant::now();
            let rate = match *r {
                Some((t, _, last)) if now.duration_since(t).as_secs_f64() < 1.0 => last,
                Some((t, n, _)) => (total - n) as f64 / now.duration_since(t).as_secs_f64(),
                None => 0.0,
            };
            if r.is_none_or(|(t, _, _)| now.duration_since(t).as_secs_f64() >= 1.0) {
                *r = Some((now, total, rate));
            }
            rate
        };
        Snapshot {
            source_revision: source,
            applied_revision: applied,
            lag_revisions: (source - applied).max(0),
            lag_seconds: if source > applied { self.lag_seconds() } else { 0.0 },
            apply_rate,
            applied_total: total,
            resyncs_total: self.resyncs.load(Ordering::Relaxed),
            copies_total: self.copies.load(Ordering::Relaxed),
            state: self.state.lock().clone(),
            errors_total: self.errors.load(Ordering::Relaxed),
        }
    }

    fn prometheus(&self) -> String {
        let s = self.snapshot();
        let labels = self.labels.lock().clone();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, v: String| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {v}\n"));
        };
        metric(
            "meridian_mirror_source_revision",
            "gauge",
            "Newest revision seen on the source.",
            s.source_revision.to_string(),
        );
        metric(
            "meridian_mirror_applied_revision",
            "gauge",
            "Revision applied on the secondary (the checkpoint).",
            s.applied_revision.to_string(),
        );
        metric(
            "meridian_mirror_lag_revisions",
            "gauge",
            "Source revisions not yet applied.",
            s.lag_revisions.to_string(),
        );
        metric(
            "meridian_mirror_lag_seconds",
            "gauge",
            "The mirror's view: age of the oldest source revision it has seen and not yet applied \
             (the secondary's own staleness is meridian_secondary_staleness_seconds on its members).",
            format!("{:.3}", s.lag_seconds),
        );
        metric(
            "meridian_mirror_apply_rate",
            "gauge",
            "Revisions applied per second, recently.",
            format!("{:.1}", s.apply_rate),
        );
        metric(
            "meridian_mirror_applied_revisions_total",
            "counter",
            "Revisions applied since start.",
            s.applied_total.to_string(),
        );
        metric(
            "meridian_mirror_resyncs_total",
            "counter",
            "Full copies after the source compacted past the checkpoint.",
            s.resyncs_total.to_string(),
        );
        metric(
            "meridian_mirror_copies_total",
            "counter",
            "Copies of the source's whole history (first copy, new source, resync).",
            s.copies_total.to_string(),
        );
        metric(
            "meridian_mirror_errors_total",
            "counter",
            "Sessions ended by an error (each retried).",
            s.errors_total.to_string(),
        );
        out
    }
}

/// Serves `/metrics` and `/status` on `addr` in the background.
pub async fn serve(addr: &str, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let addr = addr.trim_start_matches("http://").to_string();
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let (m1, m2) = (metrics.clone(), metrics);
    let router = axum::Router::new()
        .route("/metrics", get(move || async move { m1.prometheus() }))
        .route("/status", get(move || async move { serde_json::to_string(&m2.snapshot()).unwrap_or_default() }));
    let routes = tonic::service::Routes::from(router);
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        if let Err(e) = tonic::transport::Server::builder()
            .accept_http1(true)
            .add_routes(routes)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(error = %e, "metrics listener failed");
        }
    });
    tracing::info!(%addr, "mirror metrics on /metrics and /status");
    Ok(())
}
