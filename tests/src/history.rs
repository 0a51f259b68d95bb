//! Recorded client histories and the checkers that prove a consistency promise from them.
//!
//! The store gives every write a revision, and the primary commits writes in revision order in
//! real time, so a history of one register (one key, each write a unique value) is checked
//! exactly without searching orders: a read that saw the write at revision `x` (0: none yet) is
//! linearizable iff
//! 1. no write with a higher revision had completed before the read began (it is not stale);
//! 2. the write it saw had begun before the read ended (it is not from the future);
//! 3. a read that began after another read ended saw at least that read's revision (reads do not
//!    go back in time).

use std::time::{Duration, Instant};

/// One completed operation on the register.
#[derive(Clone, Debug)]
pub struct Op {
    pub client: usize,
    pub start: Instant,
    pub end: Instant,
    pub kind: OpKind,
}

#[derive(Clone, Debug)]
pub enum OpKind {
    /// A write acknowledged at this revision.
    Write { revision: i64 },
    /// A read that saw the write of this revision (0: the key did not exist yet).
    Read { saw: i64 },
}

/// Checks a history of one register for linearizability (see the module doc). Returns every
/// violation found, described, so a failure says what went wrong.
pub fn check_linearizable(history: &[Op]) -> Result<(), Vec<String>> {
    let writes: Vec<(i64, Instant, Instant)> = history
        .iter()
        .filter_map(|op| match op.kind {
            OpKind::Write { revision } => Some((revision, op.start, op.end)),
            OpKind::Read { .. } => None,
        })
        .collect();
    let mut reads: Vec<(&Op, i64)> = history
        .iter()
        .filter_map(|op| match op.kind {
            OpKind::Read { saw } => Some((op, saw)),
            OpKind::Write { .. } => None,
        })
        .collect();
    let mut problems = Vec::new();
    for (op, saw) in &reads {
        if let Some((rev, _, end)) =
            writes.iter().filter(|(rev, _, end)| rev > saw && *end < op.start).max_by_key(|w| w.0)
        {
            problems.push(format!(
                "client {} read revision {saw} {:?} after the write at revision {rev} had completed",
                op.client,
                op.start.duration_since(*end)
            ));
        }
        if *saw > 0 {
            match writes.iter().find(|(rev, _, _)| rev == saw) {
                Some((_, start, _)) if *start > op.end => {
                    problems.push(format!("client {} read revision {saw} before its write began", op.client))
                }
                None => problems.push(format!("client {} read revision {saw}, which no client wrote", op.client)),
                _ => {}
            }
        }
    }
    reads.sort_by_key(|(op, _)| op.start);
    // The highest revision seen by a read that ended before each read began.
    let mut ended: Vec<(Instant, i64)> = reads.iter().map(|(op, saw)| (op.end, *saw)).collect();
    ended.sort_by_key(|e| e.0);
    let (mut i, mut floor) = (0, 0);
    for (op, saw) in &reads {
        while i < ended.len() && ended[i].0 < op.start {
            floor = floor.max(ended[i].1);
            i += 1;
        }
        if *saw < floor {
            problems.push(format!(
                "client {} read revision {saw} after another read had already returned revision {floor}",
                op.client
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Checks that no read was staler than `bound`: a read that began at `t` saw every write that
/// had completed before `t - bound` (it may miss later ones: it is a bounded, not a linearizable,
/// read).
pub fn check_bounded(history: &[Op], bound: Duration) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    for op in history {
        let OpKind::Read { saw } = op.kind else { continue };
        let Some(horizon) = op.start.checked_sub(bound) else { continue };
        let missed = history
            .iter()
            .filter_map(|w| match w.kind {
                OpKind::Write { revision } if revision > saw && w.end < horizon => Some((revision, w.end)),
                _ => None,
            })
            .max_by_key(|w| w.0);
        if let Some((rev, end)) = missed {
            problems.push(format!(
                "client {} read revision {saw}, missing revision {rev} that completed {:?} before the read began (bound {bound:?})",
                op.client,
                op.start.duration_since(end)
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Operations of `kind` in a history, for reports.
pub fn count(history: &[Op], writes: bool) -> usize {
    history.iter().filter(|op| matches!(op.kind, OpKind::Write { .. }) == writes).count()
}

/// The longest operation, for reports.
pub fn longest(history: &[Op]) -> Duration {
    history.iter().map(|op| op.end - op.start).max().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, start: u64, end: u64, kind: OpKind) -> Op {
        let t0 = Instant::now();
        Op { client, start: t0 + Duration::from_millis(start), end: t0 + Duration::from_millis(end), kind }
    }

    #[test]
    fn a_stale_read_a_future_read_and_a_read_going_back_are_caught() {
        let good = vec![
            op(0, 0, 10, OpKind::Write { revision: 2 }),
            op(1, 5, 8, OpKind::Read { saw: 0 }), // concurrent with the write: either answer
            op(1, 11, 12, OpKind::Read { saw: 2 }),
            op(0, 20, 30, OpKind::Write { revision: 3 }),
            op(2, 21, 25, OpKind::Read { saw: 2 }),
            op(2, 26, 29, OpKind::Read { saw: 3 }),
        ];
        assert!(check_linearizable(&good).is_ok(), "{:?}", check_linearizable(&good));
        let mut stale = good.clone();
        stale.push(op(3, 31, 32, OpKind::Read { saw: 2 }));
        assert!(check_linearizable(&stale).unwrap_err()[0].contains("had completed"));
        let mut future = good.clone();
        future.push(op(3, 1, 2, OpKind::Read { saw: 3 }));
        assert!(!check_linearizable(&future).unwrap_err().is_empty());
        let mut back = good;
        back.push(op(3, 27, 28, OpKind::Read { saw: 3 }));
        back.push(op(4, 29, 30, OpKind::Read { saw: 2 })); // write 3 still running, but a read saw it
        assert!(check_linearizable(&back).unwrap_err().iter().any(|p| p.contains("already returned")));
    }

    #[test]
    fn a_read_older_than_its_bound_is_caught() {
        let h = vec![
            op(0, 0, 10, OpKind::Write { revision: 2 }),
            op(1, 500, 501, OpKind::Read { saw: 0 }), // 490 ms after the write: within 1 s
        ];
        assert!(check_bounded(&h, Duration::from_secs(1)).is_ok());
        let h = vec![op(0, 0, 10, OpKind::Write { revision: 2 }), op(1, 1500, 1501, OpKind::Read { saw: 0 })];
        assert!(check_bounded(&h, Duration::from_secs(1)).is_err());
    }
}
