//! [`RaftNode`]: the one place that owns the `RawNode` and runs raft-rs's
//! Ready cycle. It is driven step by step (tick, step, propose, handle_ready),
//! by [`super::driver`] in production and by hand in the deterministic tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fjall::{Database, OwnedWriteBatch, PersistMode};
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, Message};
use raft::{RawNode, ReadOnlyOption, StateRole};
use tokio::sync::{oneshot, watch};

use super::storage::{LogStore, SnapshotImages, SnapshotSource};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Static raft settings of one member.
#[derive(Clone, Debug)]
pub struct RaftConfig {
    pub id: u64,
    /// Voters of a brand-new cluster (or, for a member joining one, the
    /// cluster's after it was added); ignored once the log is initialized.
    pub voters: Vec<u64>,
    /// Learners of that first configuration.
    pub learners: Vec<u64>,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Applied entries between log compactions.
    pub snapshot_count: u64,
    /// Entries kept behind the applied index after a compaction, so a
    /// slightly slow follower catches up from the log instead of a snapshot.
    pub catchup_entries: u64,
}

/// A committed entry handed to the state machine. `data` is empty for
/// raft's own entries (leader no-ops, configuration changes).
pub struct Committed<'a> {
    pub index: u64,
    pub term: u64,
    pub data: &'a [u8],
}

/// The replicated state machine raft drives. Raft knows nothing of its
/// contents: entries are opaque bytes.
pub trait StateMachine: Send + 'static {
    /// Applies entries in log order, staging every write (and the applied
    /// index) into `batch`. Must be deterministic; a non-deterministic failure
    /// (I/O) must panic rather than skip an entry.
    fn apply(&mut self, entries: &[Committed<'_>], batch: &mut OwnedWriteBatch);
    /// The batch holding the last `apply`/`restore` has committed: publish the
    /// new state and answer whoever waits on it.
    fn on_commit(&mut self);
    /// Replaces the whole state with the snapshot taken at raft index
    /// `index`: `header` is its [`super::storage::SnapshotImage::header`], and
    /// its body was stored by [`SnapshotSource::receive`] before raft saw
    /// the snapshot.
    fn restore(&mut self, index: u64, header: &[u8], batch: &mut OwnedWriteBatch);
    /// The last applied raft index.
    fn applied(&self) -> u64;
    /// Applies the membership side of a committed configuration change at
    /// `index` (its context is the proposal), staging into `batch`; false
    /// refuses it, and raft then leaves its configuration as it was. Called
    /// in log order with [`StateMachine::apply`]. Must be deterministic.
    fn apply_conf_change(&mut self, index: u64, cc: &ConfChange, batch: &mut OwnedWriteBatch) -> bool {
        let _ = (index, cc, batch);
        true
    }
    /// The peers (`id -> peer URL`) and the removed members after the
    /// member list changed, once.
    fn peers_changed(&mut self) -> Option<PeerChange> {
        None
    }
}

/// The peers (`id -> peer URL`), and the ids removed from the cluster.
pub type PeerChange = (HashMap<u64, String>, std::collections::HashSet<u64>);

/// How far each member's log matches the leader's, on the leader.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// The leader's own last index.
    pub leader_match: u64,
    /// Member id -> its matched index.
    pub matched: HashMap<u64, u64>,
}

/// The member's raft state as the rest of the process sees it.
pub struct RaftStatus {
    pub id: u64,
    leader: AtomicU64,
    term: AtomicU64,
    commit: AtomicU64,
    applied: AtomicU64,
    leader_tx: watch::Sender<u64>,
    /// Set once a committed change removed this member from the cluster.
    removed_tx: watch::Sender<bool>,
    /// Whether this member is a learner in the current configuration.
    learner: std::sync::atomic::AtomicBool,
    /// When this member last became leader; `None` while it is not.
    leader_since: parking_lot::Mutex<Option<Instant>>,
}

impl RaftStatus {
    pub(crate) fn new(id: u64) -> Self {
        Self {
            id,
            leader: AtomicU64::new(0),
            term: AtomicU64::new(0),
            commit: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            leader_tx: watch::channel(0).0,
            removed_tx: watch::channel(false).0,
            learner: std::sync::atomic::AtomicBool::new(false),
            leader_since: parking_lot::Mutex::new(None),
        }
    }
    /// Current leader id, 0 when unknown.
    pub fn leader(&self) -> u64 {
        self.leader.load(Ordering::Relaxed)
    }
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Relaxed)
    }
    pub fn commit(&self) -> u64 {
        self.commit.load(Ordering::Relaxed)
    }
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }
    pub fn is_leader(&self) -> bool {
        self.leader() == self.id
    }
    /// When this member became leader, while it leads.
    pub fn leader_since(&self) -> Option<Instant> {
        *self.leader_since.lock()
    }
    /// A receiver that changes whenever the known leader does.
    pub fn watch_leader(&self) -> watch::Receiver<u64> {
        self.leader_tx.subscribe()
    }
    /// Whether this member is a learner (no vote; refuses most client calls).
    pub fn is_learner(&self) -> bool {
        self.learner.load(Ordering::Relaxed)
    }
    /// Marks this member removed (a peer said so: it missed its own removal).
    pub fn mark_removed(&self) {
        self.removed_tx.send_replace(true);
    }
    /// A receiver that turns true once this member is removed from the cluster.
    pub fn watch_removed(&self) -> watch::Receiver<bool> {
        self.removed_tx.subscribe()
    }
}

/// Answer to a linearizable read barrier: the index the read may be served at.
pub type ReadReply = oneshot::Sender<Result<u64>>;

/// ReadIndex requests, batched: every request that arrives while a batch is
/// in flight joins the next one, so N concurrent reads cost one heartbeat
/// round, not N.
#[derive(Default)]
struct Reads {
    queued: Vec<ReadReply>,
    in_flight: HashMap<u64, (u32, Vec<ReadReply>)>,
    confirmed: Vec<(u64, Vec<ReadReply>)>,
    next_ctx: u64,
}

pub struct RaftNode<S: StateMachine> {
    raw: RawNode<LogStore>,
    sm: S,
    db: Database,
    cfg: RaftConfig,
    status: Arc<RaftStatus>,
    metrics: Arc<Metrics>,
    reads: Reads,
    role: StateRole,
    /// Compact the log up to here at the end of the cycle: set when a
    /// member is added, so that every leader sends the new member a
    /// snapshot (which carries the configuration) instead of the log from
    /// its first entry.
    compact_to: Option<u64>,
}

impl<S: StateMachine> RaftNode<S> {
    /// Opens the member's raft state in `db`, bootstrapping a new cluster's
    /// configuration on first start.
    ///
    /// # Errors
    ///
    /// Storage errors, or raft refusing the stored state.
    pub fn open(
        cfg: RaftConfig,
        db: Database,
        sm: S,
        source: Arc<dyn SnapshotSource>,
        images: Arc<SnapshotImages>,
        metrics: Arc<Metrics>,
        logger: &slog::Logger,
    ) -> Result<Self> {
        let mut store = LogStore::open(&db, source, images)?;
        if !store.is_initialized() {
            let mut batch = db.batch();
            store.bootstrap(cfg.voters.clone(), cfg.learners.clone(), &mut batch);
            batch.commit()?;
            db.persist(PersistMode::SyncData)?;
        }
        // Everything applied was committed; a commit index persisted behind
        // the applied one (it is not fsync-critical) must not make raft think
        // it applied past its commit.
        if store.hard_state().commit < sm.applied() {
            let mut batch = db.batch();
            store.set_commit(sm.applied(), &mut batch);
            batch.commit()?;
        }
        let raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied: sm.applied(),
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 512,
            read_only_option: ReadOnlyOption::Safe,
            ..Default::default()
        };
        raft_cfg.validate()?;
        let raw = RawNode::new(&raft_cfg, store, logger)?;
        let status = Arc::new(RaftStatus::new(cfg.id));
        status.applied.store(sm.applied(), Ordering::Relaxed);
        status.term.store(raw.raft.term, Ordering::Relaxed);
        // A one-member cluster elects itself at once instead of waiting out an election timeout.
        let mut node = Self {
            raw,
            sm,
            db,
            cfg,
            status,
            metrics,
            reads: Reads::default(),
            role: StateRole::Follower,
            compact_to: None,
        };
        node.note_learner();
        if node.raw.raft.prs().conf().voters().ids().len() == 1 && node.raw.raft.promotable() {
            node.raw.campaign()?;
        }
        Ok(node)
    }

    pub fn status(&self) -> Arc<RaftStatus> {
        self.status.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Advances raft's logical clock by one tick; expires stale reads.
    pub fn tick(&mut self) {
        self.raw.tick();
        self.raw.store().expire_snapshot();
        let limit = 2 * self.cfg.election_ticks as u32;
        let mut expired = Vec::new();
        let slow = (self.cfg.election_ticks / 2).max(1) as u32;
        for (ctx, (age, _)) in self.reads.in_flight.iter_mut() {
            *age += 1;
            if *age == slow {
                // etcd counts a read index not confirmed in 500 ms (half its
                // default election timeout) as slow.
                self.metrics.slow_read_indexes.inc();
            }
            if *age > limit {
                expired.push(*ctx);
            }
        }
        for ctx in expired {
            if let Some((_, replies)) = self.reads.in_flight.remove(&ctx) {
                self.metrics.read_indexes_failed.inc();
                for r in replies {
                    let _ = r.send(Err(Error::Timeout));
                }
            }
        }
    }

    /// Feeds a message from a peer.
    pub fn step(&mut self, msg: Message) {
        // The peer service has already refused other clusters and removed
        // members. A sender outside this member's configuration is taken: it
        // may be a leader added while this member was away, whose log is
        // what will tell it so.
        if let Err(e) = self.raw.step(msg) {
            tracing::debug!(error = %e, "raft step");
        }
    }

    /// Proposes opaque data. Followers forward it to the leader.
    ///
    /// # Errors
    ///
    /// [`Error::NoLeader`] when raft drops the proposal (no known leader, or
    /// a leadership transfer in progress).
    pub fn propose(&mut self, data: Vec<u8>) -> Result<()> {
        self.raw.propose(vec![], data).map_err(|_| {
            self.metrics.proposals_failed.inc();
            Error::NoLeader
        })
    }

    /// Proposes a configuration change (its context is the proposal).
    ///
    /// # Errors
    ///
    /// As [`RaftNode::propose`]; [`Error::NotLeader`] off the leader (the
    /// changes are judged there); [`Error::Unhealthy`] while an earlier
    /// change is still being applied (raft would turn this one into an
    /// empty entry).
    pub fn propose_conf_change(&mut self, cc: ConfChange) -> Result<()> {
        // The leader judged the change; another one must not take it unjudged.
        if self.role != StateRole::Leader {
            return Err(Error::NotLeader);
        }
        if self.raw.raft.pending_conf_index > self.raw.raft.raft_log.applied {
            return Err(Error::Unhealthy);
        }
        self.raw.propose_conf_change(vec![], cc).map_err(|_| {
            self.metrics.proposals_failed.inc();
            Error::NoLeader
        })
    }

    /// On the leader, how far each member's log matches; `None` elsewhere.
    pub fn progress(&self) -> Option<Progress> {
        if self.role != StateRole::Leader {
            return None;
        }
        let matched = self.raw.raft.prs().iter().map(|(id, pr)| (*id, pr.matched)).collect();
        Some(Progress { leader_match: self.raw.raft.raft_log.last_index(), matched })
    }

    /// Queues a linearizable read barrier.
    pub fn read_index(&mut self, reply: ReadReply) {
        self.reads.queued.push(reply);
    }

    /// Sends the queued reads as one ReadIndex request, unless one is
    /// already in flight: then they wait and ride in the next one, so a
    /// stream of reads costs one heartbeat round per batch, not per read.
    pub fn flush_reads(&mut self) {
        if self.reads.queued.is_empty() || !self.reads.in_flight.is_empty() {
            return;
        }
        let replies = std::mem::take(&mut self.reads.queued);
        if self.raw.raft.leader_id == raft::INVALID_ID {
            self.metrics.read_indexes_failed.inc();
            for r in replies {
                let _ = r.send(Err(Error::NoLeader));
            }
            return;
        }
        self.reads.next_ctx += 1;
        let ctx = self.reads.next_ctx;
        // The leader keys pending reads by context, across all members: a
        // bare counter would collide with another member's and be dropped.
        let mut rctx = self.cfg.id.to_be_bytes().to_vec();
        rctx.extend_from_slice(&ctx.to_be_bytes());
        self.raw.read_index(rctx);
        self.reads.in_flight.insert(ctx, (0, replies));
    }

    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    /// Runs one Ready cycle: persist, apply, and hand the messages to `send`.
    /// One fjall commit and at most one fsync per call, however many
    /// proposals it carries (group commit).
    ///
    /// The leader's appends go to `send` first, before this member writes
    /// its own log: the followers' fsyncs then run beside the leader's
    /// instead of after it, and a commit waits for one fsync, not two in
    /// series. raft-rs allows it: a quorum still needs the leader's own
    /// persisted ack to count it, which only comes after the write. What
    /// must wait for the write (votes, append responses) is sent after it.
    ///
    /// # Errors
    ///
    /// Storage errors. The caller must treat them as fatal: the member's
    /// durable state is then unknown.
    pub fn handle_ready(&mut self, send: &mut impl FnMut(Vec<Message>)) -> Result<()> {
        if !self.raw.has_ready() {
            self.release_reads();
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if let Some(ss) = ready.ss() {
            self.on_soft_state(ss.leader_id, ss.raft_state);
        }
        let early = ready.take_messages();
        if !early.is_empty() {
            send(early);
        }

        let mut batch = self.db.batch();
        let mut must_sync = ready.must_sync();
        let restoring = !ready.snapshot().is_empty();
        if restoring {
            let snap = ready.snapshot().clone();
            let meta = snap.get_metadata();
            tracing::info!(index = meta.index, term = meta.term, "restoring from snapshot");
            self.metrics.snapshot_apply_in_progress.set(1);
            self.sm.restore(meta.index, &snap.data, &mut batch);
            self.raw.mut_store().apply_snapshot(meta, &mut batch);
            must_sync = true;
            self.note_learner();
        }
        let committed = ready.take_committed_entries();
        self.apply(&committed, &mut batch)?;
        if !ready.entries().is_empty() {
            let bytes = self.raw.mut_store().append(ready.entries(), &mut batch);
            self.metrics.wal_write_bytes.add(bytes as i64);
        }
        if let Some(hs) = ready.hs() {
            self.raw.mut_store().set_hard_state(hs.clone(), &mut batch);
        }
        for rs in ready.take_read_states() {
            let ctx = rs.request_ctx.get(8..).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
            if let Some((_, replies)) = self.reads.in_flight.remove(&ctx) {
                self.reads.confirmed.push((rs.index, replies));
            }
        }
        let started = Instant::now();
        self.commit(batch, must_sync)?;
        if restoring {
            self.metrics.snap_fsync.observe(started.elapsed().as_secs_f64());
            self.metrics.snapshot_apply_in_progress.set(0);
        }
        let mut out = ready.take_persisted_messages();

        let mut light = self.raw.advance(ready);
        let mut batch = self.db.batch();
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit, &mut batch);
        }
        out.extend(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply(&committed, &mut batch)?;
        self.commit(batch, false)?;
        self.raw.advance_apply();

        let applied = self.sm.applied();
        self.status.applied.store(applied, Ordering::Relaxed);
        self.status.commit.store(self.raw.raft.raft_log.committed, Ordering::Relaxed);
        self.status.term.store(self.raw.raft.term, Ordering::Relaxed);
        self.metrics.proposals_committed.set(self.raw.raft.raft_log.committed as i64);
        self.metrics.proposals_applied.set(applied as i64);
        if !out.is_empty() {
            send(out);
        }
        self.release_reads();
        self.maybe_compact_log()
    }

    fn commit(&mut self, batch: OwnedWriteBatch, sync: bool) -> Result<()> {
        if batch.is_empty() && !sync {
            return Ok(());
        }
        let start = Instant::now();
        batch.commit()?;
        self.metrics.backend_commit.observe(start.elapsed().as_secs_f64());
        if sync {
            let start = Instant::now();
            self.db.persist(PersistMode::SyncData)?;
            self.metrics.wal_fsync.observe(start.elapsed().as_secs_f64());
        }
        self.sm.on_commit();
        Ok(())
    }

    fn apply(&mut self, entries: &[Entry], batch: &mut OwnedWriteBatch) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        self.raw.mut_store().applying = true;
        let applied = self.apply_entries(entries, batch);
        self.raw.mut_store().applying = false;
        applied
    }

    fn apply_entries(&mut self, entries: &[Entry], batch: &mut OwnedWriteBatch) -> Result<()> {
        let mut committed = Vec::with_capacity(entries.len());
        for e in entries {
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    committed.push(Committed { index: e.index, term: e.term, data: &e.data });
                }
                EntryType::EntryConfChange => {
                    // Everything before it applies first: the state machine
                    // judges the change against the member list as of here.
                    self.sm.apply(&std::mem::take(&mut committed), batch);
                    let cc = ConfChange::parse_from_bytes(&e.data).map_err(|x| Error::Corrupt(x.to_string()))?;
                    self.apply_conf_change(e.index, &cc, batch)?;
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data).map_err(|x| Error::Corrupt(x.to_string()))?;
                    self.raw.apply_conf_change(&cc)?;
                    committed.push(Committed { index: e.index, term: e.term, data: &[] });
                }
            }
        }
        self.sm.apply(&committed, batch);
        Ok(())
    }

    /// One configuration change: the state machine's membership first, then
    /// raft's configuration, recorded in the same batch.
    fn apply_conf_change(&mut self, index: u64, cc: &ConfChange, batch: &mut OwnedWriteBatch) -> Result<()> {
        if !self.sm.apply_conf_change(index, cc, batch) {
            return Ok(());
        }
        let conf = self.raw.raft.prs().conf();
        let newcomer = !conf.voters().contains(cc.node_id) && !conf.learners().contains(&cc.node_id);
        let cs = self.raw.apply_conf_change(cc)?;
        tracing::info!(index, change = ?cc.get_change_type(), member = format!("{:x}", cc.node_id),
            voters = ?cs.voters, learners = ?cs.learners, "applied a configuration change");
        self.raw.mut_store().set_conf_state(cs, batch);
        self.note_learner();
        match cc.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode if newcomer => self.compact_to = Some(index),
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {}
            ConfChangeType::RemoveNode if cc.node_id == self.cfg.id => {
                tracing::warn!("this member was removed from the cluster; stopping");
                self.status.removed_tx.send_replace(true);
            }
            ConfChangeType::RemoveNode => {}
        }
        Ok(())
    }

    /// Publishes whether this member is a learner; the configuration
    /// changes only at open, by a configuration change, or by a snapshot.
    fn note_learner(&self) {
        let learner = self.raw.raft.prs().conf().learners().contains(&self.cfg.id);
        self.status.learner.store(learner, Ordering::Relaxed);
        self.metrics.is_learner.set(i64::from(learner));
    }

    /// The peers after a change of the member list, once (for the transport).
    pub fn peers_changed(&mut self) -> Option<PeerChange> {
        self.sm.peers_changed()
    }

    fn release_reads(&mut self) {
        let applied = self.sm.applied();
        if self.reads.confirmed.is_empty() {
            return;
        }
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.reads.confirmed).into_iter().partition(|(index, _)| *index <= applied);
        self.reads.confirmed = waiting;
        for (_, replies) in ready {
            for r in replies {
                let _ = r.send(Ok(applied));
            }
        }
    }

    fn on_soft_state(&mut self, leader: u64, role: StateRole) {
        let old = self.status.leader.swap(leader, Ordering::Relaxed);
        if old != leader {
            if leader != raft::INVALID_ID {
                self.metrics.leader_changes.inc();
            }
            self.metrics.has_leader.set(i64::from(leader != raft::INVALID_ID));
            self.status.leader_tx.send_replace(leader);
            tracing::info!(leader = format!("{leader:x}"), term = self.raw.raft.term, "leader changed");
        }
        if role != self.role {
            self.role = role;
            self.metrics.is_leader.set(i64::from(role == StateRole::Leader));
            *self.status.leader_since.lock() = (role == StateRole::Leader).then(Instant::now);
        }
    }

    fn maybe_compact_log(&mut self) -> Result<()> {
        let applied = self.sm.applied();
        if let Some(to) = self.compact_to.take().filter(|to| *to > self.raw.store().start_index() && *to <= applied) {
            let mut batch = self.db.batch();
            self.raw.mut_store().compact(to, &mut batch);
            batch.commit()?;
            tracing::info!(to, "compacted raft log at a member addition: new members start from a snapshot");
            return Ok(());
        }
        let store = self.raw.store();
        if applied < store.start_index() + self.cfg.snapshot_count + self.cfg.catchup_entries {
            return Ok(());
        }
        let to = applied - self.cfg.catchup_entries;
        let mut batch = self.db.batch();
        self.raw.mut_store().compact(to, &mut batch);
        batch.commit()?;
        tracing::info!(to, applied, "compacted raft log");
        Ok(())
    }

    /// Starts handing leadership to `to` (raft gives up after an election timeout).
    pub fn transfer_leader(&mut self, to: u64) {
        if self.role == StateRole::Leader {
            self.raw.transfer_leader(to);
        }
    }

    /// Tells raft a peer could not be reached, so it stops optimistic sends.
    pub fn report_unreachable(&mut self, id: u64) {
        self.raw.report_unreachable(id);
    }

    /// Tells raft whether a snapshot reached `id`.
    pub fn report_snapshot(&mut self, id: u64, ok: bool) {
        let status = if ok { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
        self.raw.report_snapshot(id, status);
    }

    /// Index of the last entry dropped from the log.
    pub fn log_start(&self) -> u64 {
        self.raw.store().start_index()
    }
}
