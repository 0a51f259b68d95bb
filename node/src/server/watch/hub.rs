//! The watch hub: one task that owns every watcher of the member, matches
//! published changes against them and catches up the ones behind.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use meridian_proto::etcdserverpb::{ResponseHeader, WatchResponse};
use meridian_proto::meridian::v1::KvRecord;
use meridian_proto::mvccpb::{event::EventType, Event, KeyValue};
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{mpsc, Notify};
use tonic::Status;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::mvcc::{KeyRange, Mvcc, RangeOpts};

/// The outgoing side of one gRPC watch stream.
pub type Outbox = mpsc::Sender<Result<WatchResponse, Status>>;

/// A watch as the client asked for it, after etcd's key normalization.
pub struct Spec {
    pub watch_id: i64,
    pub range: KeyRange,
    pub start_revision: i64,
    pub no_put: bool,
    pub no_delete: bool,
    pub prev_kv: bool,
    pub progress_notify: bool,
    pub fragment: bool,
}

/// Fills response headers (ids and the raft term at send time).
pub type HeaderFn = Arc<dyn Fn(i64) -> ResponseHeader + Send + Sync>;

/// A handle to the member's watchers. Apply publishes into it directly, so a
/// watcher's event is queued before the write's own response, as in etcd.
#[derive(Clone)]
pub struct WatchHub {
    hub: Arc<Mutex<Hub>>,
    wake_sync: Arc<Notify>,
    metrics: Arc<Metrics>,
}

/// Most revisions one catch-up read covers.
const SYNC_BATCH_REVISIONS: usize = 1000;
const SYNC_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Pending,
    Synced,
    Unsynced,
    /// Canceled by compaction; kept until the client cancels or leaves.
    Compacted,
}

struct Watcher {
    spec: Spec,
    out: Outbox,
    /// First revision not yet sent to this watcher.
    next_rev: i64,
    state: State,
    /// An event went out since the last progress tick.
    active: bool,
}

type Key = (u64, i64);

struct Hub {
    mvcc: Arc<Mvcc>,
    metrics: Arc<Metrics>,
    header: HeaderFn,
    max_response_bytes: usize,
    /// The store revision the hub has processed.
    rev: i64,
    watchers: HashMap<Key, Watcher>,
    next_auto_id: HashMap<u64, i64>,
    /// Synced single-key watchers by key, and synced range watchers.
    by_key: HashMap<Vec<u8>, HashSet<Key>>,
    ranges: HashSet<Key>,
    unsynced: HashSet<Key>,
    /// Progress requests not answered yet, by stream: where to answer and
    /// how many.
    progress_asked: HashMap<u64, (Outbox, u32)>,
    /// The traceparent of the revision being published, when its write was
    /// traced (see `telemetry`).
    trace: Option<String>,
}

impl WatchHub {
    /// Creates the hub and starts its catch-up and progress task. Call
    /// before apply can publish anything, so no change slips between the
    /// store revision read here and the first publish.
    pub fn start(
        mvcc: Arc<Mvcc>,
        header: HeaderFn,
        max_response_bytes: usize,
        progress_interval: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let rev = mvcc.marks().current;
        let hub = Hub {
            mvcc: mvcc.clone(),
            metrics: metrics.clone(),
            header,
            max_response_bytes,
            rev,
            watchers: HashMap::new(),
            next_auto_id: HashMap::new(),
            by_key: HashMap::new(),
            ranges: HashSet::new(),
            unsynced: HashSet::new(),
            progress_asked: HashMap::new(),
            trace: None,
        };
        let this = Self { hub: Arc::new(Mutex::new(hub)), wake_sync: Arc::new(Notify::new()), metrics };
        tokio::spawn(this.clone().run(mvcc, progress_interval));
        this
    }

    /// Hands changes that just became visible (in revision order) to the
    /// synced watchers; `rev` is the store's revision after them.
    pub fn publish(&self, records: Vec<KvRecord>, rev: i64) {
        self.hub.lock().publish(records, rev, &[]);
    }

    /// [`WatchHub::publish`], with the traceparent of traced revisions
    /// (revision, traceparent) put on their responses.
    pub fn publish_traced(&self, records: Vec<KvRecord>, rev: i64, traced: &[(i64, String)]) {
        self.hub.lock().publish(records, rev, traced);
    }

    /// The store was replaced by a snapshot: every watcher re-reads from it.
    pub fn restored(&self) {
        let mut hub = self.hub.lock();
        let now = hub.mvcc.marks().current;
        if now < hub.rev {
            // A rewind (rejoin): revisions the watchers may have seen are
            // gone, and the numbers will be reused by other writes. Every
            // watcher ends, saying why.
            let keys: Vec<Key> = hub.watchers.keys().copied().collect();
            for key in keys {
                if let Some(w) = hub.watchers.get(&key) {
                    let resp = WatchResponse {
                        header: Some((hub.header)(now)),
                        watch_id: key.1,
                        canceled: true,
                        cancel_reason: format!(
                            "meridian: the store was rewound to revision {now} (rejoin); later revisions were lost"
                        ),
                        ..Default::default()
                    };
                    let _ = w.out.try_send(Ok(resp));
                }
                hub.remove(key);
            }
            hub.rev = now;
            return;
        }
        let synced: Vec<Key> = hub.by_key.values().flatten().chain(&hub.ranges).copied().collect();
        let old = hub.rev;
        for key in synced {
            if let Some(w) = hub.watchers.get_mut(&key) {
                w.next_rev = old + 1;
            }
            hub.set_state(key, State::Unsynced);
        }
        hub.rev = hub.mvcc.marks().current;
        drop(hub);
        self.wake_sync.notify_one();
    }

    /// Registers a watcher; returns its id and the revision for the Created
    /// header, or etcd's reason for refusing it. The watcher gets nothing
    /// until [`WatchHub::announce`].
    pub fn create(&self, stream: u64, spec: Spec, out: Outbox) -> Result<(i64, i64), String> {
        self.hub.lock().create(stream, spec, out)
    }

    /// The Created response is queued: the watcher may now receive events.
    pub fn announce(&self, stream: u64, id: i64) {
        let mut hub = self.hub.lock();
        let key = (stream, id);
        if let Some(w) = hub.watchers.get(&key) {
            let state = if w.next_rev <= hub.rev { State::Unsynced } else { State::Synced };
            hub.set_state(key, state);
            if state == State::Unsynced {
                drop(hub);
                self.wake_sync.notify_one();
            }
        }
    }

    /// Removes a watcher; `Some(revision)` if it existed.
    pub fn cancel(&self, stream: u64, id: i64) -> Option<i64> {
        let mut hub = self.hub.lock();
        hub.remove((stream, id)).then_some(hub.rev)
    }

    /// The member's metrics (the Watch service counts its streams there).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Answers a progress request on `stream` through `out` with the
    /// revision up to which every watcher of the stream has its events
    /// queued. While one of them still catches up the answer waits until
    /// none does: an answer before would claim events not sent yet. (etcd
    /// drops such a request; a client waiting on it would wait forever.)
    pub fn progress(&self, stream: u64, out: Outbox) {
        let mut hub = self.hub.lock();
        hub.progress_asked.entry(stream).or_insert((out, 0)).1 += 1;
        hub.answer_progress(stream);
    }

    /// Drops every watcher of a stream that ended.
    pub fn close(&self, stream: u64) {
        let mut hub = self.hub.lock();
        let keys: Vec<Key> = hub.watchers.keys().filter(|k| k.0 == stream).copied().collect();
        for k in keys {
            hub.remove(k);
        }
        hub.next_auto_id.remove(&stream);
        hub.progress_asked.remove(&stream);
    }

    /// Catch-up and progress notifications. The store read of a catch-up
    /// happens outside the lock, so apply never waits on it.
    async fn run(self, mvcc: Arc<Mvcc>, progress_interval: Duration) {
        let mut sync_tick = tokio::time::interval(SYNC_INTERVAL);
        let mut progress_tick = tokio::time::interval(progress_interval);
        progress_tick.tick().await;
        loop {
            tokio::select! {
                _ = self.wake_sync.notified() => {}
                _ = sync_tick.tick() => self.hub.lock().answer_all_progress(),
                _ = progress_tick.tick() => {
                    self.hub.lock().progress_notify();
                    continue;
                }
            }
            // Rounds until nobody is behind or a round makes no progress.
            for _ in 0..64 {
                let Some(plan) = self.hub.lock().plan_sync() else { break };
                // A scan of up to a batch of revisions: on a blocking thread,
                // not a runtime worker that serves RPCs.
                let (reader, from, to) = (mvcc.clone(), plan.from, plan.to);
                let read = tokio::task::spawn_blocking(move || reader.history(from, to, SYNC_BATCH_REVISIONS));
                let records = match read.await.unwrap_or_else(|e| Err(Error::Internal(e.to_string()))) {
                    Ok(r) => r,
                    Err(Error::Compacted) => continue, // the next plan cancels them
                    Err(e) => {
                        tracing::warn!(error = %e, "watch catch-up read failed");
                        break;
                    }
                };
                if !self.hub.lock().finish_sync(plan, records) {
                    break;
                }
            }
        }
    }
}

/// One catch-up round: who reads, and which revisions.
struct SyncPlan {
    from: i64,
    to: i64,
    /// Each watcher with the `next_rev` it had when planned.
    readers: Vec<(Key, i64)>,
}

impl Hub {
    fn create(&mut self, stream: u64, spec: Spec, out: Outbox) -> Result<(i64, i64), String> {
        if let KeyRange::Span(start, end) = &spec.range {
            if start >= end {
                return Err("mvcc: watcher range is empty".into());
            }
        }
        let id = if spec.watch_id == 0 {
            let next = self.next_auto_id.entry(stream).or_insert(0);
            while self.watchers.contains_key(&(stream, *next)) {
                *next += 1;
            }
            *next += 1;
            *next - 1
        } else {
            if self.watchers.contains_key(&(stream, spec.watch_id)) {
                return Err(meridian_wire::etcd::DUPLICATE_WATCH_ID.into());
            }
            spec.watch_id
        };
        let next_rev = if spec.start_revision <= 0 { self.rev + 1 } else { spec.start_revision };
        self.watchers.insert((stream, id), Watcher { spec, out, next_rev, state: State::Pending, active: false });
        self.metrics.watchers.set(self.watchers.len() as i64);
        Ok((id, self.rev))
    }

    fn remove(&mut self, key: Key) -> bool {
        if self.watchers.contains_key(&key) {
            self.set_state(key, State::Pending);
            self.watchers.remove(&key);
            self.metrics.watchers.set(self.watchers.len() as i64);
            self.answer_progress(key.0);
            true
        } else {
            false
        }
    }

    /// Moves a watcher between the synced index and the unsynced set.
    fn set_state(&mut self, key: Key, state: State) {
        let Some(w) = self.watchers.get_mut(&key) else {
            return;
        };
        let old = w.state;
        if old == state {
            return;
        }
        if old == State::Synced {
            match &w.spec.range {
                KeyRange::Single(k) => {
                    if let Some(set) = self.by_key.get_mut(k) {
                        set.remove(&key);
                        if set.is_empty() {
                            self.by_key.remove(k);
                        }
                    }
                }
                _ => {
                    self.ranges.remove(&key);
                }
            }
        }
        if old == State::Unsynced {
            self.unsynced.remove(&key);
        }
        let w = self.watchers.get_mut(&key).expect("present");
        w.state = state;
        match state {
            State::Synced => match &w.spec.range {
                KeyRange::Single(k) => {
                    self.by_key.entry(k.clone()).or_default().insert(key);
                }
                _ => {
                    self.ranges.insert(key);
                }
            },
            State::Unsynced => {
                self.unsynced.insert(key);
            }
            State::Pending | State::Compacted => {}
        }
        self.metrics.slow_watchers.set(self.unsynced.len() as i64);
        if matches!(old, State::Pending | State::Unsynced) && matches!(state, State::Synced | State::Compacted) {
            self.answer_progress(key.0);
        }
    }

    /// Answers the progress requests waiting on `stream` once none of its
    /// watchers is behind. A full outbox keeps them for the next sync tick.
    fn answer_progress(&mut self, stream: u64) {
        if !self.progress_asked.contains_key(&stream) {
            return;
        }
        let behind =
            self.watchers.iter().any(|(k, w)| k.0 == stream && matches!(w.state, State::Unsynced | State::Pending));
        if behind {
            return;
        }
        let Some((out, mut count)) = self.progress_asked.remove(&stream) else { return };
        // Broadcast to every watcher of the stream: no single watch id.
        let resp = WatchResponse { header: Some((self.header)(self.rev)), watch_id: -1, ..Default::default() };
        while count > 0 {
            match out.try_send(Ok(resp.clone())) {
                Ok(()) => count -= 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.progress_asked.insert(stream, (out, count));
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }

    fn answer_all_progress(&mut self) {
        let streams: Vec<u64> = self.progress_asked.keys().copied().collect();
        for stream in streams {
            self.answer_progress(stream);
        }
    }

    /// Hands newly published revisions to the synced watchers they match.
    fn publish(&mut self, records: Vec<KvRecord>, rev: i64, traced: &[(i64, String)]) {
        let mut at = 0;
        while at < records.len() {
            let main = records[at].main;
            let end = records[at..].iter().position(|r| r.main != main).map_or(records.len(), |n| at + n);
            self.trace = traced.iter().find(|(r, _)| *r == main).map(|(_, t)| t.clone());
            self.publish_revision(main, &records[at..end]);
            at = end;
        }
        self.trace = None;
        self.rev = self.rev.max(rev);
    }

    fn publish_revision(&mut self, main: i64, records: &[KvRecord]) {
        let mut matched: HashMap<Key, Vec<&KvRecord>> = HashMap::new();
        for rec in records {
            if let Some(keys) = self.by_key.get(&rec.key) {
                for k in keys {
                    matched.entry(*k).or_default().push(rec);
                }
            }
            for k in &self.ranges {
                if self.watchers[k].spec.range.contains(&rec.key) {
                    matched.entry(*k).or_default().push(rec);
                }
            }
        }
        self.rev = main;
        let mut prev = PrevKvs::new();
        for (key, recs) in matched {
            let w = &self.watchers[&key];
            if main < w.next_rev {
                continue;
            }
            match self.deliver(key, &recs, main, &mut prev) {
                Delivery::Sent | Delivery::Nothing => {
                    if let Some(w) = self.watchers.get_mut(&key) {
                        w.next_rev = main + 1;
                    }
                }
                Delivery::Full => {
                    if let Some(w) = self.watchers.get_mut(&key) {
                        w.next_rev = main;
                    }
                    self.set_state(key, State::Unsynced);
                }
                Delivery::Gone => {
                    self.remove(key);
                }
            }
        }
    }

    /// Sends `recs` to one watcher in one response (or fragments), applying
    /// its filters and prev_kv. `prev` keeps the previous versions already
    /// read, so watchers of the same key share one store read.
    fn deliver(&mut self, key: Key, recs: &[&KvRecord], header_rev: i64, prev: &mut PrevKvs) -> Delivery {
        let w = &self.watchers[&key];
        let kept: Vec<&KvRecord> = recs
            .iter()
            .copied()
            .filter(|rec| !((rec.tombstone && w.spec.no_delete) || (!rec.tombstone && w.spec.no_put)))
            .collect();
        if kept.is_empty() {
            return Delivery::Nothing;
        }
        // Decided before any response is built.
        if w.out.is_closed() {
            return Delivery::Gone;
        }
        if w.out.capacity() == 0 {
            return Delivery::Full;
        }
        let sent = kept.len() as u64;
        let events = kept
            .into_iter()
            .map(|rec| {
                let prev_kv = if w.spec.prev_kv {
                    prev.entry((rec.main, rec.sub)).or_insert_with(|| self.prev_kv(rec)).clone()
                } else {
                    None
                };
                to_event(rec, prev_kv)
            })
            .collect();
        let resp = WatchResponse {
            header: Some((self.header)(header_rev)),
            watch_id: key.1,
            events,
            meridian_traceparent: self.trace.clone().unwrap_or_default(),
            ..Default::default()
        };
        let parts = if w.spec.fragment { fragment(resp, self.max_response_bytes) } else { vec![resp] };
        if w.out.capacity() < parts.len() {
            return Delivery::Full;
        }
        for p in parts {
            if w.out.try_send(Ok(p)).is_err() {
                return Delivery::Gone;
            }
        }
        if let Some(w) = self.watchers.get_mut(&key) {
            w.active = true;
        }
        self.metrics.watch_events.inc_by(sent);
        Delivery::Sent
    }

    /// The version of `rec`'s key just before `rec`, as prev_kv carries it.
    fn prev_kv(&self, rec: &KvRecord) -> Option<KeyValue> {
        let r =
            self.mvcc.range(&KeyRange::Single(rec.key.clone()), RangeOpts { rev: rec.main - 1, ..Default::default() });
        r.ok().and_then(|r| r.kvs.into_iter().next())
    }

    /// Plans a catch-up round for the unsynced watchers: one history read
    /// for all of them, from the oldest revision any of them needs. Watchers
    /// behind the compact revision get etcd's compaction cancel instead.
    fn plan_sync(&mut self) -> Option<SyncPlan> {
        if self.unsynced.is_empty() {
            return None;
        }
        let compacted = self.mvcc.marks().compacted;
        let behind: Vec<Key> = self.unsynced.iter().copied().collect();
        let mut readers = Vec::new();
        for key in behind {
            let w = &self.watchers[&key];
            if w.next_rev < compacted {
                let resp = WatchResponse {
                    header: Some((self.header)(0)),
                    watch_id: key.1,
                    compact_revision: compacted,
                    canceled: true,
                    ..Default::default()
                };
                if w.out.try_send(Ok(resp)).is_ok() {
                    self.set_state(key, State::Compacted);
                }
                continue;
            }
            if w.next_rev > self.rev {
                self.set_state(key, State::Synced);
                continue;
            }
            readers.push((key, w.next_rev));
        }
        let from = readers.iter().map(|r| r.1).min()?;
        Some(SyncPlan { from, to: self.rev, readers })
    }

    /// Delivers a catch-up read to the planned watchers that are still where
    /// the plan found them. Returns true if any watcher moved forward.
    fn finish_sync(&mut self, plan: SyncPlan, records: Vec<KvRecord>) -> bool {
        // A read cut at its revision limit covers up to its last revision;
        // otherwise everything up to the planned revision has been seen.
        let mut revisions = 0;
        for pair in records.windows(2) {
            revisions += usize::from(pair[0].main != pair[1].main);
        }
        let upto = match records.last() {
            Some(last) if revisions + 1 >= SYNC_BATCH_REVISIONS => last.main,
            _ => plan.to,
        };
        let mut progressed = false;
        let mut prev = PrevKvs::new();
        for (key, planned_next) in plan.readers {
            let Some(w) = self.watchers.get(&key) else { continue };
            if w.state != State::Unsynced || w.next_rev != planned_next {
                continue;
            }
            let range = w.spec.range.clone();
            let recs: Vec<&KvRecord> =
                records.iter().filter(|r| r.main >= planned_next && r.main <= upto && range.contains(&r.key)).collect();
            let outcome = if recs.is_empty() { Delivery::Nothing } else { self.deliver(key, &recs, upto, &mut prev) };
            match outcome {
                Delivery::Sent | Delivery::Nothing => {
                    progressed = true;
                    if let Some(w) = self.watchers.get_mut(&key) {
                        w.next_rev = upto + 1;
                    }
                    if upto >= self.rev {
                        self.set_state(key, State::Synced);
                    }
                }
                Delivery::Full => {}
                Delivery::Gone => {
                    self.remove(key);
                }
            }
        }
        progressed
    }

    /// Sends an empty response to every synced watcher that asked for
    /// progress notifications and got no event since the last tick.
    fn progress_notify(&mut self) {
        let rev = self.rev;
        let header = self.header.clone();
        for ((_, id), w) in self.watchers.iter_mut() {
            if !w.spec.progress_notify || w.state != State::Synced {
                continue;
            }
            if !w.active {
                let resp = WatchResponse { header: Some(header(rev)), watch_id: *id, ..Default::default() };
                let _ = w.out.try_send(Ok(resp));
            }
            w.active = false;
        }
    }
}

/// Previous versions read during one fan-out, by (main, sub) revision.
type PrevKvs = HashMap<(i64, i64), Option<KeyValue>>;

enum Delivery {
    Sent,
    Nothing,
    Full,
    Gone,
}

/// An event as etcd sends it: a delete carries only the key and its revision.
fn to_event(rec: &KvRecord, prev_kv: Option<KeyValue>) -> Event {
    let (kind, kv) = if rec.tombstone {
        (EventType::Delete, KeyValue { key: rec.key.clone(), mod_revision: rec.main, ..Default::default() })
    } else {
        (
            EventType::Put,
            KeyValue {
                key: rec.key.clone(),
                create_revision: rec.create_revision,
                mod_revision: rec.main,
                version: rec.version,
                value: rec.value.clone(),
                lease: rec.lease,
            },
        )
    };
    Event { r#type: kind as i32, kv: Some(kv), prev_kv }
}

/// Splits a response whose encoding exceeds `limit` into several, each
/// marked `fragment` but the last; an event is never split.
fn fragment(resp: WatchResponse, limit: usize) -> Vec<WatchResponse> {
    if resp.encoded_len() <= limit {
        return vec![resp];
    }
    let mut parts = Vec::new();
    let mut cur = WatchResponse { events: Vec::new(), ..resp.clone() };
    let mut size = cur.encoded_len();
    for ev in resp.events {
        let n = ev.encoded_len() + 8;
        if !cur.events.is_empty() && size + n > limit {
            let next = WatchResponse { events: Vec::new(), ..cur.clone() };
            parts.push(std::mem::replace(&mut cur, next));
            size = cur.encoded_len();
        }
        size += n;
        cur.events.push(ev);
    }
    parts.push(cur);
    let last = parts.len() - 1;
    for (i, p) in parts.iter_mut().enumerate() {
        p.fragment = i != last;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_never_split_an_event_and_mark_all_but_the_last() {
        let ev = |n: usize| Event {
            r#type: 0,
            kv: Some(KeyValue { key: vec![b'k'; 10], value: vec![0; n], ..Default::default() }),
            prev_kv: None,
        };
        let resp =
            WatchResponse { watch_id: 3, events: vec![ev(400), ev(400), ev(400), ev(2000)], ..Default::default() };
        let parts = fragment(resp.clone(), 1000);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.iter().map(|p| p.fragment).collect::<Vec<_>>(), [true, true, false]);
        assert_eq!(parts.iter().map(|p| p.events.len()).sum::<usize>(), 4);
        assert!(parts.iter().all(|p| p.watch_id == 3));
        assert_eq!(fragment(resp, 1 << 20).len(), 1, "small responses are not fragmented");
    }
}
