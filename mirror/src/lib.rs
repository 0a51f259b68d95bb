//! The mirror: follows a source cluster and writes every one of its
//! revisions into a read-only Meridian secondary, at the same revision.
//!
//! ```text
//!   source (Meridian or etcd)                         secondary (Meridian)
//!     Watch from checkpoint+1 ──events by revision──▶ Mirror.Apply (one raft entry
//!     (compacted? ─▶ resync)                          per revision, at that revision)
//!     RangeStream / paged Range ──first copy──────▶  Mirror.Apply(reset)
//! ```
//!
//! - **Checkpoint.** The secondary's own revision is the checkpoint: Apply
//!   commits it with the data, so a restarted mirror resumes where the last
//!   applied revision left off, with no full copy and nothing skipped.
//! - **History, not just state.** A first copy (or a resync after the source
//!   compacted past the checkpoint) brings the source's retained history:
//!   from a Meridian source the raw records (sub-revisions, tombstones,
//!   compact revision) through `RangeStream`; from etcd the state at its
//!   compact revision through paged Ranges. Then Watch continues from the
//!   next revision.
//! - **Fast catch-up from etcd.** etcd replays history to one watcher at
//!   about 10,000 revisions a second; far behind, the mirror watches many
//!   1,000-revision segments at once and applies them in order (catchup.rs).
//! - **Atomic revisions.** Watch delivers a revision's events together; one
//!   source txn becomes one Apply revision however many keys it touched.
//! - **Leases** keep their ids: a lease first seen on a mirrored key is
//!   granted on the secondary (with its source TTL) before that key; leases
//!   gone from the source are dropped. The secondary never expires them.
//! - **Never gives up.** Every failure (network, leader change, compaction)
//!   ends the session; the mirror logs why and starts a new one after a
//!   backoff.

mod catchup;
mod config;
mod metrics;
pub mod region;
mod session;
mod status;
mod topology;

pub use config::{MirrorConfig, MirrorFlags, StatusFlags};
pub use status::print_status;

use std::sync::Arc;
use std::time::Duration;

/// How often an idle mirror (its target is the primary) looks again.
const IDLE_RECHECK: Duration = Duration::from_millis(250);

/// Runs the mirror until `shutdown` resolves.
///
/// # Errors
///
/// Only a metrics listener that cannot be bound; everything else is retried.
pub async fn run(cfg: MirrorConfig, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::Metrics::default());
    if let Some(addr) = &cfg.listen_metrics {
        metrics::serve(addr, metrics.clone()).await?;
    }
    let work = async {
        let mut backoff = Duration::from_millis(100);
        loop {
            let source = match topology::choose(&cfg).await {
                Ok(topology::Choice::Follow(source)) => Ok(source),
                Ok(topology::Choice::Idle(why)) => {
                    let state = format!("idle: {why}");
                    if *metrics.state.lock() != state {
                        tracing::info!("{state}; looking again every {IDLE_RECHECK:?}");
                        *metrics.state.lock() = state;
                    }
                    backoff = Duration::from_millis(100);
                    tokio::time::sleep(IDLE_RECHECK).await;
                    continue;
                }
                Err(e) => Err(e),
            };
            let result = match source {
                Ok(source) => {
                    *metrics.state.lock() = format!("following {}", source.join(","));
                    session::run(&cfg, &source, &metrics).await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) if e.downcast_ref::<session::TopologyChanged>().is_some() => {
                    tracing::info!("{e}: choosing the source again");
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    metrics.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(error = format!("{e:#}"), retry_in = ?backoff, "mirror session ended");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    };
    tokio::select! {
        _ = work => {}
        _ = shutdown => tracing::info!("mirror stopping"),
    }
    Ok(())
}
