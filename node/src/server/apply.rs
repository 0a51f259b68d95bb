//! The etcd state machine that raft drives: decodes each committed
//! [`InternalRequest`], executes it on the MVCC store, and hands the result
//! to the gRPC call waiting for it (on the member that proposed it).

use std::collections::HashMap;
use std::sync::Arc;

use fjall::OwnedWriteBatch;
use meridian_proto::etcdserverpb::alarm_request::AlarmAction;
use meridian_proto::etcdserverpb::{
    AlarmMember, AlarmResponse, AlarmType, DeleteRangeResponse, LeaseGrantResponse, PutResponse, TxnResponse,
};
use meridian_proto::meridian::v1::internal_request::Request;
use meridian_proto::meridian::v1::member_change::Kind as MemberKind;
use meridian_proto::meridian::v1::{
    InternalRequest, KvRecord, MemberChange, MirrorApplyRequest, RegionChange, RequestAuth, SnapshotData,
};
use meridian_wire::telemetry;
use parking_lot::Mutex;
use prost::Message;
use raft::eraftpb::ConfChange;
use tokio::sync::oneshot;

use super::auth::store::AuthStore;
use super::cluster::{Alarms, Members};
use super::lease::Lessor;
use super::lease::LEASE_META_PREFIX;
use super::ops;
use super::region::{Lineage, Role, RoleCell, RoleState};
use super::version::{self, VersionCell};
use super::watch::WatchHub;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::mvcc::{KeyRange, Marks, Mvcc, Received, StoreImage};
use crate::raft::storage::{ReceivedSnapshot, SnapshotImage, SnapshotSource};
use crate::raft::{Committed, StateMachine};

/// An entry whose apply takes longer counts in `etcd_server_slow_apply_total`
/// (etcd's threshold).
const SLOW_APPLY: std::time::Duration = std::time::Duration::from_millis(100);

/// What applying one request produced.
#[derive(Debug)]
pub enum Applied {
    Put(PutResponse),
    LeaseGrant(LeaseGrantResponse),
    /// A revoke; the revision after its deletes.
    LeaseRevoke(i64),
    /// A mirror batch; the secondary's revision after it (the checkpoint).
    Mirror(i64),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    /// A compaction; the revision of the store when it applied.
    Compaction(i64),
    Alarm(AlarmResponse),
    /// A membership change; the member list after it.
    Members(Members),
    /// An auth change; the simple token it handed out, if it was one.
    Auth(Option<String>),
    Done,
}

/// Calls waiting for their proposal to apply, by request id.
#[derive(Default)]
pub struct Waiters {
    map: Mutex<HashMap<u64, oneshot::Sender<Result<Applied>>>>,
}

impl Waiters {
    pub fn register(&self, id: u64) -> oneshot::Receiver<Result<Applied>> {
        let (tx, rx) = oneshot::channel();
        self.map.lock().insert(id, tx);
        rx
    }

    pub fn cancel(&self, id: u64) {
        self.map.lock().remove(&id);
    }

    fn complete(&self, id: u64, result: Result<Applied>) {
        if let Some(tx) = self.map.lock().remove(&id) {
            let _ = tx.send(result);
        }
    }
}

pub struct EtcdStateMachine {
    mvcc: Arc<Mvcc>,
    role: RoleCell,
    version: VersionCell,
    lessor: Arc<Lessor>,
    auth: Arc<AuthStore>,
    /// Where published changes go.
    watch: WatchHub,
    waiters: Arc<Waiters>,
    metrics: Arc<Metrics>,
    /// Results of the entries in the batch being committed.
    done: Vec<(u64, Result<Applied>)>,
    nospace: bool,
    /// A snapshot was restored in the batch being committed.
    restored: bool,
    /// Traced entries of the batch: the revision each made, and its apply
    /// span's traceparent, for the watch responses of that revision.
    traced: Vec<(i64, String)>,
    /// The member list changed since the transport last heard of it.
    peers_changed: bool,
}

impl EtcdStateMachine {
    pub fn new(
        mvcc: Arc<Mvcc>,
        waiters: Arc<Waiters>,
        metrics: Arc<Metrics>,
        watch: WatchHub,
        lessor: Arc<Lessor>,
        role: RoleCell,
        version: VersionCell,
        auth: Arc<AuthStore>,
    ) -> Self {
        let nospace = Alarms::load(&mvcc).has(AlarmType::Nospace);
        metrics.auth_revision.set(auth.state().revision as i64);
        lessor.rebuild(&mvcc);
        version.update(&Members::load(&mvcc));
        Self {
            mvcc,
            role,
            version,
            lessor,
            auth,
            watch,
            waiters,
            metrics,
            done: Vec::new(),
            nospace,
            restored: false,
            traced: Vec::new(),
            peers_changed: false,
        }
    }

    /// Applies the request of the entry at raft `index`.
    fn execute(
        &mut self,
        index: u64,
        request: Request,
        auth: Option<RequestAuth>,
        batch: &mut OwnedWriteBatch,
    ) -> Result<Applied> {
        // A secondary takes no client writes, even one proposed just before
        // it became a secondary: the check is part of apply.
        let client_write = match &request {
            Request::Put(_) | Request::DeleteRange(_) | Request::Compaction(_) => true,
            Request::LeaseGrant(_) | Request::LeaseRevoke(_) => true,
            Request::Txn(t) => !ops::txn_is_read_only(t),
            // A secondary's users and roles are its primary's; a token it
            // may hand out, so that its readers can authenticate.
            Request::AuthChange(c) => {
                !matches!(c.change, Some(meridian_proto::meridian::v1::auth_change::Change::SimpleToken(_)))
            }
            _ => false,
        };
        if client_write {
            self.role.check_writable()?;
        }
        // A client's request: its user's permissions as of this entry.
        if let Some(auth) = &auth {
            let lessor = &self.lessor;
            self.auth.state().permits(auth, &request, &|id| lessor.keys(id).unwrap_or_default())?;
        }
        match request {
            Request::Put(p) => {
                if self.nospace {
                    return Err(Error::NoSpace);
                }
                self.metrics.put_total.inc();
                self.metrics.put_size.add((p.key.len() + p.value.len()) as i64);
                let lessor = &self.lessor;
                let mut w = self.mvcc.write();
                let r = ops::put(&mut w, &p, &|id| lessor.exists(id));
                lessor.apply_moves(w.take_lease_moves());
                w.end();
                r.map(Applied::Put)
            }
            Request::DeleteRange(d) => {
                self.metrics.delete_total.inc();
                let mut w = self.mvcc.write();
                let r = ops::delete_range(&mut w, &d);
                self.lessor.apply_moves(w.take_lease_moves());
                w.end();
                r.map(Applied::DeleteRange)
            }
            Request::Txn(t) => {
                if self.nospace && ops::txn_has_put(&t) {
                    return Err(Error::NoSpace);
                }
                self.metrics.txn_total.inc();
                let lessor = &self.lessor;
                let mut w = self.mvcc.write();
                let r = ops::txn(&mut w, &t, &|id| lessor.exists(id));
                lessor.apply_moves(w.take_lease_moves());
                w.end();
                r.map(Applied::Txn)
            }
            Request::Compaction(c) | Request::AutoCompaction(c) => {
                self.mvcc.compact(c.revision)?;
                Ok(Applied::Compaction(self.mvcc.write().rev()))
            }
            Request::Alarm(a) => {
                let mut alarms = Alarms::load(&self.mvcc);
                let member = AlarmMember { member_id: a.member_id, alarm: a.alarm };
                let changed = match AlarmAction::try_from(a.action).unwrap_or(AlarmAction::Get) {
                    AlarmAction::Get => Vec::new(),
                    AlarmAction::Activate => {
                        if a.alarm == AlarmType::None as i32 {
                            Vec::new()
                        } else {
                            alarms.activate(member.clone()).then(|| vec![member]).unwrap_or_default()
                        }
                    }
                    AlarmAction::Deactivate => alarms.deactivate(&member),
                };
                alarms.store(&self.mvcc);
                self.nospace = alarms.has(AlarmType::Nospace);
                Ok(Applied::Alarm(AlarmResponse { header: None, alarms: changed }))
            }
            Request::LeaseGrant(g) => {
                if self.nospace {
                    return Err(Error::NoSpace);
                }
                let ttl = self.lessor.grant(&self.mvcc, g.id, g.ttl)?;
                self.metrics.lease_granted.inc();
                self.metrics.lease_ttl.observe(ttl as f64);
                Ok(Applied::LeaseGrant(LeaseGrantResponse { header: None, id: g.id, ttl, error: String::new() }))
            }
            Request::LeaseRevoke(r) => {
                let keys = self.lessor.keys(r.id)?;
                let mut w = self.mvcc.write();
                for key in keys {
                    w.delete_range(&KeyRange::Single(key))?;
                }
                self.lessor.apply_moves(w.take_lease_moves());
                let rev = w.end();
                self.lessor.remove(&self.mvcc, r.id);
                self.metrics.lease_revoked.inc();
                Ok(Applied::LeaseRevoke(rev))
            }
            Request::MirrorApply(m) => self.mirror_apply(m, batch),
            Request::LeaseCheckpoint(c) => {
                for cp in c.checkpoints {
                    self.lessor.checkpoint(&self.mvcc, cp.id, cp.remaining_ttl);
                }
                Ok(Applied::Done)
            }
            Request::RegionChange(c) => self.region_change(c, batch),
            Request::MemberAttributes(attrs) => {
                let mut members = Members::load(&self.mvcc);
                members.set_attributes(&attrs);
                members.store(&self.mvcc);
                self.version.update(&members);
                Ok(Applied::Done)
            }
            // Only an update is a plain entry; the others are configuration
            // changes, which must change raft's configuration with the list.
            Request::MemberChange(change) if change.kind == MemberKind::Update as i32 => self.change_members(&change),
            Request::MemberChange(_) => Err(Error::MemberBadUrls),
            Request::AuthChange(c) => {
                let change = c.change.ok_or(Error::InvalidAuthMgmt)?;
                let token = self.auth.apply(&change, index, &self.mvcc)?;
                self.auth_changed();
                Ok(Applied::Auth(token))
            }
        }
    }
}

impl EtcdStateMachine {
    /// The auth store changed (a change, a primary's copy, a snapshot): its revision gauge follows.
    fn auth_changed(&self) {
        self.metrics.auth_revision.set(self.auth.state().revision as i64);
    }

    /// Applies a change to the member list, with etcd's refusals.
    fn change_members(&mut self, change: &MemberChange) -> Result<Applied> {
        let mut members = Members::load(&self.mvcc);
        members.apply(change)?;
        members.store(&self.mvcc);
        if change.kind == MemberKind::Remove as i32 {
            let mut removed = Members::load_removed(&self.mvcc);
            removed.insert(change.member_id);
            Members::store_removed(&self.mvcc, &removed);
        }
        self.version.update(&members);
        self.peers_changed = true;
        Ok(Applied::Members(members))
    }

    /// A promotion or a demotion. Both need a higher epoch than the current
    /// one (asking again for the change already made, same epoch and role,
    /// answers it again, so a retried call is safe). The fence is the
    /// revision at which the entry applies: writes ordered before it in the
    /// log are in the old role's history, every later one is refused or
    /// goes on at fence + 1.
    fn region_change(&mut self, c: RegionChange, batch: &mut OwnedWriteBatch) -> Result<Applied> {
        let role = self.role.get();
        let to = match c.role.as_str() {
            "primary" => Role::Primary,
            "secondary" => Role::Secondary,
            other => return Err(Error::Fenced(format!("unknown region role {other:?}"))),
        };
        let epoch = if c.epoch == 0 { role.epoch + 1 } else { c.epoch };
        // A rejoin may rewind a secondary that already has the new epoch.
        let rejoin = to == Role::Secondary && (c.rewind_to > 0 || c.wipe);
        if to == role.role && epoch == role.epoch && !rejoin {
            return Ok(Applied::Done);
        }
        if epoch < role.epoch || (epoch == role.epoch && !rejoin) {
            return Err(Error::Fenced(format!("epoch {epoch} is not above the current epoch {}", role.epoch)));
        }
        let current = self.mvcc.staged_marks().current;
        let mut next = RoleState { epoch, fence_revision: current, ..role.clone() };
        match to {
            Role::Primary => {
                if role.role != Role::Secondary {
                    return Err(Error::Fenced("this cluster is already a primary".into()));
                }
                if c.expect_revision != 0 && c.expect_revision != current {
                    return Err(Error::Fenced(format!(
                        "applied revision {current} is not the expected fence {}",
                        c.expect_revision
                    )));
                }
                next.role = Role::Primary;
                next.primary_region = role.region.clone();
                next.lineage.push(Lineage {
                    epoch,
                    first_revision: current + 1,
                    primary_cluster_id: c.primary_cluster_id,
                    region: role.region.clone(),
                });
                // Clients may have kept their leases alive on the old
                // primary after the mirror last saw them.
                self.lessor.rearm_full(&self.mvcc);
            }
            Role::Secondary => {
                if role.role != Role::Primary && !rejoin {
                    return Err(Error::Fenced("this cluster is already a secondary".into()));
                }
                if c.wipe {
                    // Histories differ: the mirror copies the new primary's whole.
                    let applied = self.mvcc.staged_marks().applied;
                    let mut meta = self.mvcc.all_meta();
                    meta.retain(|name, _| !name.starts_with(LEASE_META_PREFIX));
                    self.mvcc.import(Marks { current: 1, compacted: 0, applied }, Vec::new(), meta, batch)?;
                    self.lessor.rebuild(&self.mvcc);
                    self.restored = true;
                    next.fence_revision = c.rewind_to;
                } else if c.rewind_to > 0 {
                    // The revisions after the fence were never the new primary's.
                    self.mvcc.rewind(c.rewind_to, batch)?;
                    self.lessor.rebuild(&self.mvcc);
                    self.restored = true;
                    next.fence_revision = c.rewind_to;
                }
                if !c.lineage.is_empty() {
                    next.lineage = c.lineage.iter().map(Lineage::from).collect();
                } else if role.lineage.is_empty() {
                    // Bootstrapped before lineages were kept: its own history.
                    let own = self.mvcc.meta(crate::META_CLUSTER_ID).and_then(|b| b.try_into().ok());
                    let own = own.map_or(0, u64::from_be_bytes);
                    next.lineage = role.lineage_for(own).iter().map(Lineage::from).collect();
                }
                next.role = Role::Secondary;
                next.primary_region = c.primary_region.clone();
                next.source_cluster_id = c.primary_cluster_id;
            }
        }
        next.store(&self.mvcc);
        self.role.set(next);
        Ok(Applied::Done)
    }

    /// Applies a batch of source revisions on a secondary, after fencing:
    /// the source cluster must be the one this secondary follows, and the
    /// epoch must not be older than the newest seen.
    fn mirror_apply(&mut self, m: MirrorApplyRequest, batch: &mut OwnedWriteBatch) -> Result<Applied> {
        let mut role = self.role.get();
        if role.role != Role::Secondary {
            return Err(Error::Fenced("mirror writes go to a secondary; this cluster is a primary".into()));
        }
        let switching = m.reset && m.allow_source_change;
        // A source that took over from the one this secondary followed
        // (its lineage says so, and the secondary holds nothing after the
        // takeover) is the same history going on.
        // Checked only when the source changes: not on every batch.
        let takeover = || {
            let own: Vec<_> = role.lineage.iter().map(meridian_proto::meridian::v1::LineageEntry::from).collect();
            meridian_wire::lineage::continues(&m.lineage, role.source_cluster_id, self.mvcc.staged_marks().current)
                || meridian_wire::lineage::already_follows(&own, &m.lineage, m.source_cluster_id)
        };
        if role.source_cluster_id != 0 && role.source_cluster_id != m.source_cluster_id && !switching && !takeover() {
            return Err(Error::Fenced(format!(
                "mirror source cluster {:x} is not this secondary's source {:x} \
                 (a mirror started with --allow-source-change may replace it)",
                m.source_cluster_id, role.source_cluster_id
            )));
        }
        if m.epoch < role.epoch {
            return Err(Error::Fenced(format!("stale mirror epoch {} (current {})", m.epoch, role.epoch)));
        }
        let adopted = RoleState {
            source_cluster_id: m.source_cluster_id,
            epoch: m.epoch,
            lineage: if m.lineage.is_empty() {
                role.lineage.clone()
            } else {
                m.lineage.iter().map(Lineage::from).collect()
            },
            primary_region: if m.source_region.is_empty() {
                role.primary_region.clone()
            } else {
                m.source_region.clone()
            },
            ..role.clone()
        };
        if adopted != role {
            role = adopted;
            role.store(&self.mvcc);
            self.role.set(role);
        }
        // The source's users and roles, so this secondary enforces the same.
        if !m.auth_store.is_empty() {
            self.auth.replace(&m.auth_store, &self.mvcc)?;
            self.auth_changed();
        }
        if m.reset {
            // The source's retained history replaces the store: state at its
            // compact revision, then every revision after it.
            let records: Vec<KvRecord> = m
                .revisions
                .into_iter()
                .flat_map(|r| {
                    r.changes.into_iter().map(move |mut c| {
                        c.main = r.revision;
                        c
                    })
                })
                .collect();
            // Later batches continue the copy above the last revision here;
            // a final empty revision lifts the store to the source's.
            let current = records.last().map_or(1, |r| r.main).max(1);
            let applied = self.mvcc.staged_marks().applied;
            let mut meta = self.mvcc.all_meta();
            meta.retain(|name, _| !name.starts_with(LEASE_META_PREFIX));
            self.mvcc.import(Marks { current, compacted: m.compact_revision, applied }, records, meta, batch)?;
            if !m.auth_store.is_empty() {
                // Again: the import replaced the metadata.
                self.auth.replace(&m.auth_store, &self.mvcc)?;
            }
            self.lessor.rebuild(&self.mvcc);
            for l in m.granted_leases {
                self.lessor.adopt(&self.mvcc, l.id, l.ttl, l.remaining_ttl);
            }
            self.lessor.rebuild(&self.mvcc);
            self.restored = true;
            return Ok(Applied::Mirror(current));
        }
        for l in m.granted_leases {
            self.lessor.adopt(&self.mvcc, l.id, l.ttl, l.remaining_ttl);
        }
        for r in m.revisions {
            if let Some(moves) = self.mvcc.apply_revision(r.revision, r.changes) {
                self.lessor.apply_moves(moves);
            }
        }
        for id in m.revoked_leases {
            self.lessor.remove(&self.mvcc, id);
        }
        let marks = self.mvcc.staged_marks();
        if m.compact_revision > marks.compacted && m.compact_revision <= marks.current {
            self.mvcc.compact(m.compact_revision)?;
        }
        Ok(Applied::Mirror(marks.current))
    }
}

impl StateMachine for EtcdStateMachine {
    fn apply(&mut self, entries: &[Committed<'_>], batch: &mut OwnedWriteBatch) {
        for e in entries {
            if !e.data.is_empty() {
                let (id, request, traceparent, auth) = decode_entry(e.index, e.data);
                let started = std::time::Instant::now();
                // A traced proposal: its commit and its apply continue the trace.
                let span = (!traceparent.is_empty() && telemetry::enabled()).then(|| {
                    let commit = tracing::info_span!(target: telemetry::TARGET, "raft.commit", raft.index = e.index);
                    telemetry::follow_traceparent(&commit, &traceparent);
                    tracing::info_span!(target: telemetry::TARGET, parent: &commit, "apply", raft.index = e.index)
                });
                let entered = span.as_ref().map(tracing::Span::enter);
                let result =
                    failpoint::before_apply(&self.mvcc).and_then(|()| self.execute(e.index, request, auth, batch));
                drop(entered);
                if let Some(span) = &span {
                    self.traced.push((self.mvcc.staged_marks().current, telemetry::traceparent(span)));
                }
                if started.elapsed() > SLOW_APPLY {
                    self.metrics.slow_apply.inc();
                }
                if let Err(err) = &result {
                    if !err.is_deterministic() {
                        // Another replica would not fail the same way: skipping
                        // the entry would let this one diverge.
                        panic!("apply of entry {} failed: {err}", e.index);
                    }
                }
                self.done.push((id, result));
            }
            self.mvcc.set_applied(e.index);
        }
        self.mvcc.stage(batch);
    }

    fn on_commit(&mut self) {
        let feed = match self.mvcc.publish() {
            Ok(feed) => feed,
            Err(e) => panic!("publishing applied state failed: {e}"),
        };
        let marks = self.mvcc.marks();
        if std::mem::take(&mut self.restored) {
            self.watch.restored();
        } else if !feed.is_empty() {
            self.watch.publish_traced(feed, marks.current, &self.traced);
        }
        self.traced.clear();
        self.metrics.current_revision.set(marks.current);
        self.metrics.compact_revision.set(marks.compacted);
        for c in self.mvcc.take_compactions() {
            self.metrics.compaction_keys.inc_by(c.keys);
            self.metrics.index_compaction_pause.observe(c.index.as_secs_f64() * 1000.0);
            self.metrics.compaction_pause.observe(c.total.as_secs_f64() * 1000.0);
            self.metrics.compaction_total.observe(c.total.as_secs_f64() * 1000.0);
        }
        for (id, result) in self.done.drain(..) {
            self.waiters.complete(id, result);
        }
    }

    fn apply_conf_change(&mut self, index: u64, cc: &ConfChange, batch: &mut OwnedWriteBatch) -> bool {
        if cc.context.is_empty() {
            self.mvcc.set_applied(index);
            self.mvcc.stage(batch);
            return true;
        }
        let (id, request, ..) = decode_entry(index, &cc.context);
        let result = match request {
            Request::MemberChange(change) if change.member_id == cc.node_id => self.change_members(&change),
            other => panic!("configuration change at {index} carries {other:?}, not its member change"),
        };
        let accepted = result.is_ok();
        self.done.push((id, result));
        self.mvcc.set_applied(index);
        self.mvcc.stage(batch);
        accepted
    }

    fn peers_changed(&mut self) -> Option<crate::raft::node::PeerChange> {
        std::mem::take(&mut self.peers_changed)
            .then(|| (Members::load(&self.mvcc).peers(), Members::load_removed(&self.mvcc)))
    }

    fn restore(&mut self, index: u64, header: &[u8], batch: &mut OwnedWriteBatch) {
        let snap = SnapshotData::decode(header).unwrap_or_else(|e| panic!("snapshot at {index} does not decode: {e}"));
        let marks = Marks { current: snap.current_revision, compacted: snap.compact_revision, applied: index };
        // The body came first, by the transport, and was kept under this
        // index; without it the member cannot restore, and must not restore
        // an empty store instead.
        let restored = match self.mvcc.install(index, marks, batch) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::Internal(format!("no snapshot body was received for raft index {index}"))),
            Err(e) => Err(e),
        };
        if let Err(e) = restored {
            panic!("restoring snapshot at {index} failed: {e}");
        }
        self.restored = true;
        self.peers_changed = true;
        self.lessor.rebuild(&self.mvcc);
        self.auth.reload(&self.mvcc);
        self.auth_changed();
        if let Some(role) = RoleState::load(&self.mvcc) {
            self.role.set(role);
        }
        self.version.update(&Members::load(&self.mvcc));
        self.nospace =
            self.mvcc.meta(Alarms::META_KEY).map(|b| Alarms::decode(&b).has(AlarmType::Nospace)).unwrap_or(false);
    }

    fn applied(&self) -> u64 {
        self.mvcc.marks().applied
    }
}

/// Decodes a committed entry. An entry that does not decode, or whose kind
/// this binary does not know (a newer binary proposed it, which the cluster
/// version should have prevented), stops the member: skipping it would make
/// this replica diverge from those that applied it.
fn decode_entry(index: u64, data: &[u8]) -> (u64, Request, String, Option<RequestAuth>) {
    match InternalRequest::decode(data) {
        Ok(InternalRequest { id, request: Some(request), traceparent, auth }) => (id, request, traceparent, auth),
        Ok(InternalRequest { request: None, .. }) => panic!(
            "entry {index} has a kind this binary does not apply (it applies entry version {}): \
             run the same or a newer meridian on every member",
            version::APPLY_VERSION
        ),
        Err(e) => panic!("entry {index} does not decode: {e}"),
    }
}

/// Fault injection for the crash tests: `MERIDIAN_FAILPOINT=apply-io-error@R`
/// makes apply fail with an I/O error once the store has reached revision R,
/// as a failed disk would. Read once; off unless set.
mod failpoint {
    use std::sync::OnceLock;

    use crate::error::{Error, Result};
    use crate::mvcc::Mvcc;

    pub(super) fn before_apply(mvcc: &Mvcc) -> Result<()> {
        static AT: OnceLock<Option<i64>> = OnceLock::new();
        let at = AT.get_or_init(|| {
            let v = std::env::var("MERIDIAN_FAILPOINT").ok()?;
            let at = v.strip_prefix("apply-io-error@")?.parse().ok()?;
            tracing::warn!(revision = at, "failpoint armed: apply fails with an I/O error at this revision");
            Some(at)
        });
        match at {
            Some(at) if mvcc.staged_marks().current >= *at => {
                Err(Error::Io(std::io::Error::other("injected by MERIDIAN_FAILPOINT")))
            }
            _ => Ok(()),
        }
    }
}

/// Raft snapshots of the MVCC store: images for followers, bodies from the leader.
///
/// The header (in raft's MsgSnapshot) is a `SnapshotData` with the marks
/// only, so it stays small whatever the store holds; the body is a run of
/// `SnapshotData` chunks: the replicated metadata first (members, alarms,
/// one entry per lease...), then the records in revision order, each chunk
/// about `chunk_bytes`.
pub struct MvccSnapshots {
    pub mvcc: Arc<Mvcc>,
    pub metrics: Arc<Metrics>,
}

impl SnapshotSource for MvccSnapshots {
    fn prepare(&self) -> Result<Arc<dyn SnapshotImage>> {
        let started = std::time::Instant::now();
        let image = self.mvcc.image();
        let encoding = std::time::Instant::now();
        let header = SnapshotData {
            current_revision: image.marks.current,
            compact_revision: image.marks.compacted,
            ..Default::default()
        }
        .encode_to_vec();
        self.metrics.snap_save_marshalling.observe(encoding.elapsed().as_secs_f64());
        self.metrics.snap_save.observe(started.elapsed().as_secs_f64());
        Ok(Arc::new(MvccImage { image, header }))
    }

    fn receive(
        &self,
        index: u64,
        header: &[u8],
        body: &mut dyn Iterator<Item = Vec<u8>>,
    ) -> Result<Box<dyn ReceivedSnapshot>> {
        SnapshotData::decode(header).map_err(|e| Error::Corrupt(format!("snapshot header does not decode: {e}")))?;
        if index <= self.mvcc.marks().applied {
            // Raft will refuse it (this member applied past it): store nothing.
            body.for_each(drop);
            return Ok(Box::new(Stale));
        }
        let mut meta = std::collections::BTreeMap::new();
        let mut records = body
            .map(|chunk| {
                SnapshotData::decode(chunk.as_slice())
                    .map(|d| {
                        meta.extend(d.meta);
                        d.records
                    })
                    .map_err(|e| Error::Corrupt(format!("snapshot chunk does not decode: {e}")))
            })
            .flat_map(|chunk| match chunk {
                Ok(records) => records.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            });
        let mut received = self.mvcc.ingest(index, &mut records)?;
        drop(records);
        received.meta = meta;
        self.metrics.snap_db_fsync.observe(received.fsync.as_secs_f64());
        Ok(Box::new(KeepReceived { mvcc: self.mvcc.clone(), received }))
    }
}

struct MvccImage {
    image: StoreImage,
    header: Vec<u8>,
}

impl SnapshotImage for MvccImage {
    fn index(&self) -> u64 {
        self.image.marks.applied
    }

    fn header(&self) -> Vec<u8> {
        self.header.clone()
    }

    fn write_body(&self, chunk_bytes: usize, each: &mut dyn FnMut(Vec<u8>) -> bool) -> Result<()> {
        let mut chunk = SnapshotData::default();
        let mut bytes = 0;
        for (name, value) in &self.image.meta {
            bytes += name.len() + value.len() + 8;
            chunk.meta.insert(name.clone(), value.clone());
            if bytes >= chunk_bytes {
                if !each(std::mem::take(&mut chunk).encode_to_vec()) {
                    return Ok(());
                }
                bytes = 0;
            }
        }
        let mut open = true;
        self.image.for_each(|rec| {
            bytes += rec.encoded_len() + 8;
            chunk.records.push(rec);
            if bytes >= chunk_bytes {
                open = each(std::mem::take(&mut chunk).encode_to_vec());
                bytes = 0;
            }
            open
        })?;
        if open && (!chunk.records.is_empty() || !chunk.meta.is_empty()) {
            each(chunk.encode_to_vec());
        }
        Ok(())
    }
}

/// A body for a snapshot this member already applied past: nothing to keep.
struct Stale;

impl ReceivedSnapshot for Stale {
    fn keep(self: Box<Self>) {}
}

struct KeepReceived {
    mvcc: Arc<Mvcc>,
    received: Received,
}

impl ReceivedSnapshot for KeepReceived {
    fn keep(self: Box<Self>) {
        let KeepReceived { mvcc, received } = *self;
        mvcc.keep(received);
    }
}
