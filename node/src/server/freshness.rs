//! How stale a secondary member is, from the mirror's heartbeats.
//!
//! The mirror asks its source for progress at least every 100 ms and sends
//! each member of the secondary a heartbeat: "the source had committed
//! revision R at time t" (unix ms, the mirror's clock when the source
//! answered), also while the source is idle. A member that has applied R
//! held everything the source had at t. Its staleness is
//!
//! ```text
//!   staleness(now) = now − T,   T = the newest t of a heartbeat (R, t) with R ≤ applied
//! ```
//!
//! the time since it last held everything the source had committed: what a
//! bounded-staleness reader needs. Nothing here trusts a stopped process:
//! while no heartbeat arrives (the mirror or the source is down) T stands
//! still and staleness grows. Before the first covered heartbeat staleness
//! is unknown, reported as +Inf. Caveat: t is the mirror's clock and now is
//! this member's; clock skew between their hosts adds to (or hides) staleness.
//!
//! This is member-local, in-memory state: each member hears the heartbeats
//! itself, and a restarted member is unknown-stale until the next one.

use std::collections::VecDeque;
use std::time::Instant;

use parking_lot::Mutex;

/// Heartbeats kept until this member applies their revision; older ones go
/// first (which can only overstate staleness, never understate it).
const MAX_PENDING: usize = 1024;

/// What the mirror last reported of itself, for `Mirror.Status`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MirrorReport {
    pub apply_rate: f64,
    pub resyncs_total: u64,
    pub errors_total: u64,
}

#[derive(Default)]
struct State {
    /// Heartbeats (revision, source time ms) not yet covered by applied, in arrival order.
    pending: VecDeque<(i64, u64)>,
    /// T: the newest source time this member is known to have caught up with.
    fresh_at_ms: Option<u64>,
    /// The newest source revision heard of (heartbeat or apply).
    source_revision: i64,
    last_heartbeat: Option<Instant>,
    report: MirrorReport,
}

/// A secondary member's view of its own staleness.
#[derive(Default)]
pub struct Freshness(Mutex<State>);

/// One reading, at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reading {
    /// Seconds since this member last held everything the source had; +Inf when unknown.
    pub staleness_seconds: f64,
    pub source_revision: i64,
    /// Source revisions not applied here.
    pub lag_revisions: i64,
    /// Seconds since the last heartbeat arrived; +Inf before the first.
    pub heartbeat_age_seconds: f64,
}

impl Freshness {
    /// Records a heartbeat: the source had `revision` at `source_time_ms`.
    pub fn heartbeat(&self, revision: i64, source_time_ms: u64, report: MirrorReport) {
        let mut st = self.0.lock();
        st.last_heartbeat = Some(Instant::now());
        st.report = report;
        st.source_revision = st.source_revision.max(revision);
        if st.pending.back().is_some_and(|&(_, t)| t >= source_time_ms) {
            return;
        }
        if st.pending.len() == MAX_PENDING {
            st.pending.pop_front();
        }
        st.pending.push_back((revision, source_time_ms));
    }

    /// Notes a source revision the mirror reported with an Apply.
    pub fn heard(&self, revision: i64, report: MirrorReport) {
        let mut st = self.0.lock();
        st.source_revision = st.source_revision.max(revision);
        st.report = report;
    }

    pub fn report(&self) -> MirrorReport {
        self.0.lock().report
    }

    /// The reading at `now_ms` for a member that has applied `applied`.
    pub fn read(&self, applied: i64, now_ms: u64) -> Reading {
        let mut st = self.0.lock();
        while let Some(&(rev, t)) = st.pending.front() {
            if rev > applied {
                break;
            }
            st.fresh_at_ms = Some(st.fresh_at_ms.map_or(t, |f| f.max(t)));
            st.pending.pop_front();
        }
        Reading {
            staleness_seconds: st.fresh_at_ms.map_or(f64::INFINITY, |t| now_ms.saturating_sub(t) as f64 / 1000.0),
            source_revision: st.source_revision,
            lag_revisions: (st.source_revision - applied).max(0),
            heartbeat_age_seconds: st.last_heartbeat.map_or(f64::INFINITY, |t| t.elapsed().as_secs_f64()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: MirrorReport = MirrorReport { apply_rate: 0.0, resyncs_total: 0, errors_total: 0 };

    #[test]
    fn staleness_is_time_since_everything_the_source_had_was_held() {
        let f = Freshness::default();
        assert_eq!(f.read(5, 1000).staleness_seconds, f64::INFINITY, "unknown before any heartbeat");
        f.heartbeat(10, 1_000, R);
        // Not yet applied 10: still unknown.
        let r = f.read(9, 1_050);
        assert_eq!((r.staleness_seconds, r.lag_revisions), (f64::INFINITY, 1));
        // Applied: fresh as of the heartbeat's source time.
        assert_eq!(f.read(10, 1_050).staleness_seconds, 0.05);
        // An idle source: heartbeats at the same revision keep it fresh.
        f.heartbeat(10, 1_100, R);
        f.heartbeat(10, 1_200, R);
        assert_eq!(f.read(10, 1_250).staleness_seconds, 0.05);
        // Heartbeats stop (mirror dead): staleness grows with the clock.
        assert_eq!(f.read(10, 6_200).staleness_seconds, 5.0);
        // The source moved on and this member is behind: it held all the
        // source had at 6,300 (revision 20), not yet what it had at 6,400.
        f.heartbeat(20, 6_300, R);
        f.heartbeat(30, 6_400, R);
        assert_eq!(f.read(19, 6_500).staleness_seconds, 5.3, "still at the idle source's 1,200");
        assert_eq!(f.read(25, 6_500).staleness_seconds, 0.2, "held everything up to 20, heard at 6,300");
        assert_eq!(f.read(25, 6_500).lag_revisions, 5);
        assert_eq!(f.read(30, 6_500).staleness_seconds, 0.1);
    }

    #[test]
    fn a_late_or_repeated_heartbeat_never_moves_time_back() {
        let f = Freshness::default();
        f.heartbeat(10, 2_000, R);
        f.heartbeat(9, 1_000, R);
        assert_eq!(f.read(10, 2_500).staleness_seconds, 0.5);
        assert_eq!(f.read(10, 2_500).source_revision, 10);
    }
}
