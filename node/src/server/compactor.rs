//! Automatic compaction, as etcd's `--auto-compaction-mode` and
//! `--auto-compaction-retention` set it. Only the leader compacts; the
//! compaction goes through raft like a client's, as
//! `Internal::AutoCompaction`, which a secondary also applies (its history
//! is then trimmed by its own retention, whatever its source keeps).
//!
//! [`Schedule`] holds the timing rules and no clock or I/O, so they are unit
//! tested; [`run`] drives it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_proto::etcdserverpb::CompactionRequest;
use meridian_proto::meridian::v1::internal_request::Request as Internal;

use super::EtcdServer;
pub use crate::config::Retention;
use crate::error::Error;

/// How often revision mode looks at the revision (etcd's fixed interval).
const REVISION_POLL: Duration = Duration::from_secs(300);
/// Periodic mode samples the revision this many times per window.
const SAMPLES_PER_WINDOW: u32 = 10;
/// Periodic mode compacts at most this often, however long the window.
const MAX_PERIODIC_INTERVAL: Duration = Duration::from_secs(3600);

/// When to compact, and to which revision.
pub struct Schedule {
    retention: Retention,
    /// Periodic mode: revisions sampled once per poll, oldest first; the
    /// first is the revision about one window ago.
    samples: VecDeque<i64>,
    /// Periodic mode: when the last compaction succeeded (or the schedule started).
    last_success: Instant,
    /// Periodic mode: the first compaction waits a whole window, later ones
    /// the (capped) compaction interval.
    wait: Duration,
    /// Revision mode: the last revision compacted to.
    last_revision: i64,
}

impl Schedule {
    pub fn new(retention: Retention, now: Instant) -> Self {
        let wait = match retention {
            Retention::Periodic(window) => window,
            Retention::Revision(_) => Duration::ZERO,
        };
        Self { retention, samples: VecDeque::new(), last_success: now, wait, last_revision: 0 }
    }

    /// Time between two calls of [`Schedule::poll`].
    pub fn poll_interval(&self) -> Duration {
        match self.retention {
            Retention::Periodic(window) => window.min(MAX_PERIODIC_INTERVAL) / SAMPLES_PER_WINDOW,
            Retention::Revision(_) => REVISION_POLL,
        }
    }

    /// Called every poll interval with the current revision; returns the
    /// revision to compact to, if it is time. `leader` is whether this
    /// member leads: a follower keeps sampling but never compacts.
    pub fn poll(&mut self, now: Instant, current: i64, leader: bool) -> Option<i64> {
        match self.retention {
            Retention::Periodic(_) => {
                self.samples.push_back(current);
                if self.samples.len() > SAMPLES_PER_WINDOW as usize + 1 {
                    self.samples.pop_front();
                }
                if !leader || now.duration_since(self.last_success) < self.wait {
                    return None;
                }
                self.samples.front().copied().filter(|rev| *rev > 0)
            }
            Retention::Revision(keep) => {
                let rev = current - keep;
                (leader && rev > 0 && rev != self.last_revision).then_some(rev)
            }
        }
    }

    /// Records that the compaction to `rev` was applied (or was already done).
    pub fn compacted(&mut self, now: Instant, rev: i64) {
        self.last_success = now;
        self.last_revision = rev;
        if let Retention::Periodic(window) = self.retention {
            self.wait = window.min(MAX_PERIODIC_INTERVAL);
        }
    }
}

/// Runs the schedule on this member for as long as the server runs.
pub async fn run(server: Arc<EtcdServer>, retention: Retention) {
    let mut schedule = Schedule::new(retention, Instant::now());
    let mut tick = tokio::time::interval(schedule.poll_interval());
    tick.tick().await;
    loop {
        tick.tick().await;
        let leader = server.raft.status().is_leader();
        let Some(rev) = schedule.poll(Instant::now(), server.mvcc.marks().current, leader) else { continue };
        tracing::info!(revision = rev, retention = ?retention, "starting auto-compaction");
        match server.propose(Internal::AutoCompaction(CompactionRequest { revision: rev, physical: false })).await {
            Ok(_) | Err(Error::Compacted) => {
                tracing::info!(revision = rev, "finished auto-compaction");
                schedule.compacted(Instant::now(), rev);
            }
            Err(e) => tracing::warn!(revision = rev, error = %e, "auto-compaction failed; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_etcd_flags() {
        let p = Retention::parse;
        assert_eq!(p("periodic", "0").unwrap(), None);
        assert_eq!(p("periodic", "1").unwrap(), Some(Retention::Periodic(Duration::from_secs(3600))));
        assert_eq!(p("periodic", "30m").unwrap(), Some(Retention::Periodic(Duration::from_secs(1800))));
        assert_eq!(p("periodic", "1h30m").unwrap(), Some(Retention::Periodic(Duration::from_secs(5400))));
        assert_eq!(p("revision", "1000").unwrap(), Some(Retention::Revision(1000)));
        assert_eq!(p("revision", "0").unwrap(), None);
        assert!(p("revision", "1h").unwrap_err().to_string().contains("--auto-compaction-retention"));
        assert!(p("periodic", "-1").is_err());
        assert!(p("periodic", "soon").is_err());
        assert!(p("hourly", "1").unwrap_err().to_string().contains("--auto-compaction-mode \"hourly\""));
        // A window this short would poll in a busy loop (and a zero interval panics tokio).
        assert!(p("periodic", "5ns").unwrap_err().to_string().contains("at least 1s"));
    }

    #[test]
    fn periodic_keeps_one_window() {
        let t0 = Instant::now();
        let mut s = Schedule::new(Retention::Periodic(Duration::from_secs(10)), t0);
        assert_eq!(s.poll_interval(), Duration::from_secs(1));
        // The revision grows by 100 a second; nothing happens for a window.
        let mut result = None;
        for i in 1..=10u64 {
            result = s.poll(t0 + Duration::from_secs(i), 100 * i as i64, true);
            if i < 10 {
                assert_eq!(result, None, "second {i}");
            }
        }
        // After one window it compacts to the revision of a window ago.
        assert_eq!(result, Some(100));
        s.compacted(t0 + Duration::from_secs(10), 100);
        assert_eq!(s.poll(t0 + Duration::from_secs(11), 1100, true), None);
        for i in 12..=20u64 {
            result = s.poll(t0 + Duration::from_secs(i), 100 * i as i64, true);
        }
        // Always about a window behind.
        assert_eq!(result, Some(1000));
    }

    #[test]
    fn periodic_long_windows_compact_hourly() {
        let t0 = Instant::now();
        let s = Schedule::new(Retention::Periodic(Duration::from_secs(5 * 3600)), t0);
        assert_eq!(s.poll_interval(), Duration::from_secs(360));
    }

    #[test]
    fn followers_never_compact() {
        let t0 = Instant::now();
        let mut s = Schedule::new(Retention::Periodic(Duration::from_secs(1)), t0);
        for i in 1..=30u64 {
            assert_eq!(s.poll(t0 + Duration::from_millis(100 * i), i as i64, false), None);
        }
        // On becoming leader it compacts at once, a window behind.
        assert_eq!(s.poll(t0 + Duration::from_millis(3100), 31, true), Some(21));
        let mut r = Schedule::new(Retention::Revision(5), t0);
        assert_eq!(r.poll(t0, 100, false), None);
    }

    #[test]
    fn revision_mode_keeps_a_count() {
        let t0 = Instant::now();
        let mut s = Schedule::new(Retention::Revision(1000), t0);
        assert_eq!(s.poll_interval(), Duration::from_secs(300));
        assert_eq!(s.poll(t0, 900, true), None);
        assert_eq!(s.poll(t0, 1500, true), Some(500));
        s.compacted(t0, 500);
        // No second compaction to the same revision.
        assert_eq!(s.poll(t0, 1500, true), None);
        assert_eq!(s.poll(t0, 1501, true), Some(501));
    }
}
