//! Watches that survive a region. Each client Watch stream is one session
//! with one upstream stream in the nearest healthy region. The session keeps,
//! for every watcher, its create request and the first revision not yet
//! delivered; when the upstream fails it opens a stream in the next nearest
//! region and re-creates every watcher from that revision with the same
//! watch id, hiding the second `created`. The client sees every event once,
//! in order, with no error; a watcher whose revision was compacted in the
//! new region gets etcd's compaction cancel, as from any member.
//!
//! The gateway chooses auto watch ids itself (0, 1, 2, ... skipping ids in
//! use, as etcd does) and sends them explicitly, so ids stay the same in
//! every region.
//!
//! Identical watches from "now" (same range, filters, prev_kv and progress
//! notification, same credentials) share one upstream watch: a [`Group`]
//! runs an internal session of its own (so it moves regions the same way)
//! and fans its responses out to every client watcher in it, each joining
//! at the group's delivered revision. A client's progress request is
//! answered with the lowest revision every one of its watchers has been
//! delivered to, the shared ones included (asked of their groups in order
//! with their events). A client too slow for its group leaves it and goes
//! on from its next revision with a watcher of its own.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use meridian_proto::etcdserverpb::ResponseHeader;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use meridian_proto::etcdserverpb::watch_client::WatchClient;
use meridian_proto::etcdserverpb::watch_request::RequestUnion;
use meridian_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Status, Streaming};

use crate::proxy::{forward, Gateway};
use crate::regions::Pick;

/// Responses queued for a client stream, and requests for an upstream one.
const BUFFER: usize = 256;
/// How long a session looks for another region before it gives up.
const FAILOVER_FOR: Duration = Duration::from_secs(10);

struct Watcher {
    create: WatchCreateRequest,
    /// First revision not yet delivered (0 until the watcher is created).
    next_rev: i64,
    created: bool,
    /// Re-created after a failover: its `created` answer is not the client's.
    recreating: bool,
    /// In a group: its handle, and this watcher's subscription there.
    shared: Option<(mpsc::Sender<GroupCmd>, u64)>,
    /// The client asked to cancel it; the upstream has not confirmed yet.
    canceling: bool,
}

/// Upstream watch ids are the client's plus one: 0 means "choose one" to a
/// member, and the gateway's own ids start at 0, as etcd's do.
fn upstream_id(id: i64) -> i64 {
    id + 1
}

pub struct Upstream {
    region: String,
    requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
}

/// Opens an upstream Watch stream in `pick`'s region.
pub async fn open(gw: &Gateway, pick: &Pick, meta: &MetadataMap) -> Result<Upstream, Status> {
    let (requests, rx) = mpsc::channel(BUFFER);
    let meta = gw.meta_for(&pick.region.name, meta);
    // One revision's events come in one response, however large (as from a member).
    let resp = WatchClient::new(pick.region.channel().0)
        .max_decoding_message_size(usize::MAX)
        .watch(forward(&meta, ReceiverStream::new(rx)))
        .await?;
    Ok(Upstream { region: pick.region.name.clone(), requests, responses: resp.into_inner() })
}

/// Events a group queues for one session, at most, before it drops that
/// session's watchers from the group (they go on with watchers of their own).
const GROUP_BUFFER: usize = 1024;
/// A progress request the upstream has not answered after this long is
/// sent again (a member answers only once its stream has caught up).
const PROGRESS_RETRY: Duration = Duration::from_millis(500);

/// Upstream errors that are the client's to see (a failover would not help).
fn is_final(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        InvalidArgument
            | FailedPrecondition
            | OutOfRange
            | PermissionDenied
            | Unauthenticated
            | Unimplemented
            | ResourceExhausted
    )
}

/// A client's progress request waiting on its watchers' groups.
struct PendingProgress {
    /// The session's own upstream answer, once it came (or a stand-in when
    /// the session has no watcher of its own).
    own: Option<WatchResponse>,
    asked_at: Instant,
    /// Shared watchers (client ids) whose group has not answered yet.
    groups: BTreeSet<i64>,
    lowest: i64,
    /// Further progress requests that arrived meanwhile: they get the same answer.
    extra: usize,
}

type GroupEvents = (i64, u64, GroupEvent);

pub struct Session {
    gw: Arc<Gateway>,
    meta: MetadataMap,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
    watchers: BTreeMap<i64, Watcher>,
    /// Own creates sent upstream and not answered yet, in order: a refused
    /// create comes back without its id.
    pending_creates: VecDeque<i64>,
    /// Whether this session's "now" watches may join groups (not for a
    /// group's own internal session).
    coalesce: bool,
    group_tx: mpsc::Sender<GroupEvents>,
    group_rx: mpsc::Receiver<GroupEvents>,
    progress: Option<PendingProgress>,
    /// The last response header seen, for answers the session makes itself.
    last_header: ResponseHeader,
}

fn progress_request() -> WatchRequest {
    WatchRequest { request_union: Some(RequestUnion::ProgressRequest(Default::default())) }
}

impl Session {
    /// A client's session.
    pub fn new(gw: Arc<Gateway>, meta: MetadataMap, out: mpsc::Sender<Result<WatchResponse, Status>>) -> Self {
        let (group_tx, group_rx) = mpsc::channel(GROUP_BUFFER);
        Self {
            gw,
            meta,
            out,
            watchers: BTreeMap::new(),
            pending_creates: VecDeque::new(),
            coalesce: true,
            group_tx,
            group_rx,
            progress: None,
            last_header: ResponseHeader::default(),
        }
    }

    fn internal(gw: Arc<Gateway>, meta: MetadataMap, out: mpsc::Sender<Result<WatchResponse, Status>>) -> Self {
        Self { coalesce: false, ..Self::new(gw, meta, out) }
    }

    /// Relays until the client leaves, moving regions when one fails.
    pub async fn run<S>(mut self, mut inbound: S, mut up: Upstream)
    where
        S: Stream<Item = Result<WatchRequest, Status>> + Unpin + Send,
    {
        loop {
            let step = tokio::select! {
                msg = inbound.next() => match msg {
                    Some(Ok(req)) => self.on_client_request(req).await,
                    _ => Err(()),
                },
                resp = up.responses.message() => match resp {
                    Ok(Some(r)) => self.on_upstream_response(r).await,
                    Err(status) if is_final(status.code()) => {
                        let _ = self.out.send(Err(status)).await;
                        Err(())
                    }
                    Ok(None) | Err(_) => match self.failover(&up.region).await {
                        Some(next) => {
                            up = next;
                            // A progress request the old region did not answer goes again.
                            Ok(self.progress.as_ref().filter(|p| p.own.is_none()).map(|_| progress_request()))
                        }
                        None => Err(()),
                    },
                },
                Some((id, sub, event)) = self.group_rx.recv() => self.on_group_event(id, sub, event).await,
            };
            match step {
                // A failed send means the upstream is gone; its response
                // stream ends next, and the failover re-sends what is needed.
                Ok(Some(req)) => {
                    let _ = up.requests.send(req).await;
                }
                Ok(None) => {}
                Err(()) => break,
            }
        }
        for w in self.watchers.values() {
            if let Some((group, sub)) = &w.shared {
                let _ = group.try_send(GroupCmd::Unsubscribe(*sub));
            }
        }
    }

    async fn send(&self, r: WatchResponse) -> Result<(), ()> {
        self.out.send(Ok(r)).await.map_err(|_| ())
    }

    /// Records a client request and gives what to send upstream; `Err`
    /// once the client is gone.
    async fn on_client_request(&mut self, req: WatchRequest) -> Result<Option<WatchRequest>, ()> {
        match req.request_union {
            Some(RequestUnion::CreateRequest(mut c)) => {
                if c.watch_id == 0 {
                    c.watch_id = (0..).find(|id| !self.watchers.contains_key(id)).expect("a free id");
                } else if self.watchers.contains_key(&c.watch_id) {
                    let refused = WatchResponse {
                        header: Some(self.last_header),
                        watch_id: -1,
                        created: true,
                        canceled: true,
                        cancel_reason: meridian_wire::etcd::DUPLICATE_WATCH_ID.into(),
                        ..Default::default()
                    };
                    return self.send(refused).await.map(|()| None);
                }
                let id = c.watch_id;
                if self.coalesce && c.start_revision <= 0 && !c.fragment {
                    let joined = self.gw.coalescer.join(&self.gw, &self.meta, &c, self.group_tx.clone()).await;
                    if let Some((group, sub, header)) = joined {
                        let next_rev = header.revision + 1;
                        let w = Watcher {
                            create: c,
                            next_rev,
                            created: true,
                            recreating: false,
                            shared: Some((group, sub)),
                            canceling: false,
                        };
                        self.watchers.insert(id, w);
                        let created =
                            WatchResponse { header: Some(header), watch_id: id, created: true, ..Default::default() };
                        return self.send(created).await.map(|()| None);
                    }
                }
                let next_rev = c.start_revision.max(0);
                let w = Watcher {
                    create: c.clone(),
                    next_rev,
                    created: false,
                    recreating: false,
                    shared: None,
                    canceling: false,
                };
                self.watchers.insert(id, w);
                self.pending_creates.push_back(id);
                c.watch_id = upstream_id(id);
                Ok(Some(WatchRequest { request_union: Some(RequestUnion::CreateRequest(c)) }))
            }
            Some(RequestUnion::CancelRequest(mut c)) => {
                let id = c.watch_id;
                match self.watchers.get_mut(&id) {
                    Some(w) if w.shared.is_some() => {
                        let w = self.watchers.remove(&id).expect("present");
                        if let Some((group, sub)) = w.shared {
                            let _ = group.try_send(GroupCmd::Unsubscribe(sub));
                        }
                        let header = ResponseHeader { revision: w.next_rev - 1, ..self.last_header };
                        let canceled =
                            WatchResponse { header: Some(header), watch_id: id, canceled: true, ..Default::default() };
                        self.send(canceled).await?;
                        self.progress_done(id, i64::MAX).await.map(|()| None)
                    }
                    Some(w) => {
                        w.canceling = true;
                        c.watch_id = upstream_id(id);
                        Ok(Some(WatchRequest { request_union: Some(RequestUnion::CancelRequest(c)) }))
                    }
                    None => Ok(None), // etcd ignores a cancel for an id it does not know
                }
            }
            Some(RequestUnion::ProgressRequest(p)) => {
                let forward = Some(WatchRequest { request_union: Some(RequestUnion::ProgressRequest(p)) });
                let shared: Vec<(i64, mpsc::Sender<GroupCmd>, u64)> = self
                    .watchers
                    .iter()
                    .filter_map(|(id, w)| w.shared.as_ref().map(|(g, s)| (*id, g.clone(), *s)))
                    .collect();
                if shared.is_empty() && self.progress.is_none() {
                    return Ok(forward);
                }
                if let Some(pending) = &mut self.progress {
                    pending.extra += 1;
                    return Ok(None);
                }
                let mut groups = BTreeSet::new();
                for (id, group, sub) in shared {
                    if group.try_send(GroupCmd::Progress(sub)).is_ok() {
                        groups.insert(id);
                    }
                }
                let has_own = self.watchers.values().any(|w| w.shared.is_none());
                // With no watcher of its own, the session's upstream has nothing to add:
                // the groups' answers alone set the revision (the header seen so far may
                // be older than events the groups deliver before they answer).
                let own = (!has_own).then(|| WatchResponse {
                    header: Some(ResponseHeader { revision: i64::MAX, ..self.last_header }),
                    watch_id: -1,
                    ..Default::default()
                });
                self.progress =
                    Some(PendingProgress { own, asked_at: Instant::now(), groups, lowest: i64::MAX, extra: 0 });
                self.answer_progress().await?;
                Ok(if has_own { forward } else { None })
            }
            other => Ok(Some(WatchRequest { request_union: other })),
        }
    }

    /// Tracks what a response delivers and passes it on (hiding the
    /// `created` of a re-created watcher, mapping ids back); gives what to
    /// send upstream; `Err` once the client is gone.
    async fn on_upstream_response(&mut self, mut r: WatchResponse) -> Result<Option<WatchRequest>, ()> {
        if let Some(h) = r.header {
            self.last_header = h;
        }
        if r.watch_id >= 1 {
            r.watch_id -= 1;
        }
        let header_rev = r.header.as_ref().map_or(0, |h| h.revision);
        let retry = self
            .progress
            .as_ref()
            .is_some_and(|p| p.own.is_none() && p.asked_at.elapsed() > PROGRESS_RETRY)
            .then(progress_request);
        if retry.is_some() {
            if let Some(p) = &mut self.progress {
                p.asked_at = Instant::now();
            }
        }
        if r.watch_id == -1 && r.created && r.canceled {
            // A refused create (it carries no id): the oldest one waiting.
            if let Some(id) = self.pending_creates.pop_front() {
                self.watchers.remove(&id);
            }
            return self.send(r).await.map(|()| retry);
        }
        if r.watch_id == -1 && !r.created {
            // A progress answer for the whole stream: a member answers only
            // once every watcher of the stream has caught up.
            for w in self.watchers.values_mut().filter(|w| w.created && w.shared.is_none()) {
                w.next_rev = w.next_rev.max(header_rev + 1);
            }
            if let Some(pending) = &mut self.progress {
                pending.own = Some(r);
                return self.answer_progress().await.map(|()| None);
            }
            return self.send(r).await.map(|()| None);
        }
        if let Some(w) = self.watchers.get_mut(&r.watch_id) {
            if r.created {
                self.pending_creates.retain(|id| *id != r.watch_id);
            }
            if r.created && !r.canceled {
                w.created = true;
                if w.next_rev == 0 {
                    w.next_rev = header_rev + 1;
                }
                if std::mem::take(&mut w.recreating) {
                    return Ok(retry); // the client has its `created` already
                }
            }
            if let Some(last) = r.events.last().and_then(|e| e.kv.as_ref()) {
                // Mid-fragment, the rest of this revision is still to come.
                let next = if r.fragment { last.mod_revision } else { last.mod_revision + 1 };
                w.next_rev = w.next_rev.max(next);
            } else if !r.created && !r.canceled && !r.fragment {
                w.next_rev = w.next_rev.max(header_rev + 1);
            }
            if r.canceled {
                self.watchers.remove(&r.watch_id);
            }
        }
        self.send(r).await.map(|()| retry)
    }

    /// A group's event for the client watcher `id` (subscription `sub`).
    /// Gives what to send upstream (a watcher leaving its group); `Err`
    /// once the client is gone.
    async fn on_group_event(&mut self, id: i64, sub: u64, event: GroupEvent) -> Result<Option<WatchRequest>, ()> {
        let Some(w) = self.watchers.get_mut(&id).filter(|w| w.shared.as_ref().is_some_and(|(_, s)| *s == sub)) else {
            return Ok(None); // from a subscription this watcher no longer is
        };
        match event {
            GroupEvent::Response(mut r) => {
                if let Some(h) = r.header {
                    self.last_header = h;
                }
                let header_rev = r.header.as_ref().map_or(0, |h| h.revision);
                if let Some(last) = r.events.last().and_then(|e| e.kv.as_ref()) {
                    w.next_rev = w.next_rev.max(last.mod_revision + 1);
                } else if !r.canceled {
                    w.next_rev = w.next_rev.max(header_rev + 1);
                }
                let canceled = r.canceled;
                if canceled {
                    self.watchers.remove(&id);
                }
                r.watch_id = id;
                self.send(r).await?;
                if canceled {
                    // A canceled watcher has nothing left to wait for.
                    self.progress_done(id, i64::MAX).await?;
                }
                Ok(None)
            }
            GroupEvent::Progress(rev) => {
                w.next_rev = w.next_rev.max(rev + 1);
                self.progress_done(id, rev).await.map(|()| None)
            }
            GroupEvent::Left => {
                // Too slow for the group, or the group ended: a watcher of
                // its own, from the first revision not delivered yet.
                w.shared = None;
                w.recreating = true;
                let next_rev = w.next_rev;
                let create =
                    WatchCreateRequest { start_revision: next_rev, watch_id: upstream_id(id), ..w.create.clone() };
                // Its progress now waits on the session's own upstream.
                self.progress_done(id, next_rev - 1).await?;
                Ok(Some(WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) }))
            }
        }
    }

    /// Watcher `id`'s group has answered a pending progress request (or it
    /// no longer waits on one: `rev` is `i64::MAX`).
    async fn progress_done(&mut self, id: i64, rev: i64) -> Result<(), ()> {
        if let Some(pending) = &mut self.progress {
            if pending.groups.remove(&id) {
                pending.lowest = pending.lowest.min(rev);
            }
        }
        self.answer_progress().await
    }

    /// Answers a pending progress request once the session's own upstream
    /// and every group asked have answered.
    async fn answer_progress(&mut self) -> Result<(), ()> {
        let ready = self.progress.as_ref().is_some_and(|p| p.own.is_some() && p.groups.is_empty());
        if !ready {
            return Ok(());
        }
        let pending = self.progress.take().expect("ready");
        let mut resp = pending.own.expect("ready");
        // Every shared watcher has been delivered up to its next revision.
        let shared_floor =
            self.watchers.values().filter(|w| w.shared.is_some()).map(|w| w.next_rev - 1).min().unwrap_or(i64::MAX);
        if let Some(h) = resp.header.as_mut() {
            h.revision = h.revision.min(pending.lowest).min(shared_floor);
            if h.revision == i64::MAX {
                h.revision = self.last_header.revision;
            }
        }
        for _ in 0..=pending.extra {
            self.send(resp.clone()).await?;
        }
        Ok(())
    }

    /// Opens a stream in the nearest other healthy region and re-creates
    /// every watcher from its next revision. `None` when no region answers
    /// within [`FAILOVER_FOR`] (the client gets `Unavailable`) or the client
    /// is gone.
    async fn failover(&mut self, failed: &str) -> Option<Upstream> {
        let deadline = Instant::now() + FAILOVER_FOR;
        let mut avoid = Some(failed.to_string());
        loop {
            let pick = self.gw.regions.nearest_named(|name, _| avoid.as_deref() != Some(name));
            if let Some(pick) = pick {
                if let Ok(up) = open(&self.gw, &pick, &self.meta).await {
                    tracing::info!(from = failed, to = %up.region, watchers = self.watchers.len(), "moved a watch stream");
                    self.gw.metrics.watch_failovers.inc();
                    if self.recreate(&up).await {
                        return Some(up);
                    }
                }
            }
            if self.out.is_closed() {
                return None;
            }
            if Instant::now() > deadline {
                let _ = self.out.send(Err(Status::unavailable("meridian: no region can serve this watch"))).await;
                return None;
            }
            // The failed region may be the only one left: try it again too.
            avoid = None;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn recreate(&mut self, up: &Upstream) -> bool {
        // A cancel the old region may not have seen: it is done here.
        let canceling: Vec<i64> = self.watchers.iter().filter(|(_, w)| w.canceling).map(|(id, _)| *id).collect();
        for id in canceling {
            let w = self.watchers.remove(&id).expect("present");
            let header = ResponseHeader { revision: w.next_rev - 1, ..self.last_header };
            let canceled = WatchResponse { header: Some(header), watch_id: id, canceled: true, ..Default::default() };
            if self.send(canceled).await.is_err() {
                return false;
            }
        }
        self.pending_creates.clear();
        for (id, w) in self.watchers.iter_mut().filter(|(_, w)| w.shared.is_none()) {
            let mut create = WatchCreateRequest { watch_id: upstream_id(*id), ..w.create.clone() };
            if w.created {
                create.start_revision = w.next_rev;
                w.recreating = true;
            } else {
                self.pending_creates.push_back(*id);
            }
            let req = WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) };
            if up.requests.send(req).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// A group's answer to one of its client watchers.
pub enum GroupEvent {
    Response(WatchResponse),
    /// Everything up to this revision has been delivered.
    Progress(i64),
    /// The watcher is no longer in the group (too slow, or the group ended).
    Left,
}

pub enum GroupCmd {
    Subscribe { sub: u64, client_id: i64, tx: mpsc::Sender<GroupEvents>, reply: oneshot::Sender<ResponseHeader> },
    Unsubscribe(u64),
    Progress(u64),
}

/// What makes two watch creates the same watch (and who asks: a cached
/// answer is never shared between identities).
#[derive(Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    key: Vec<u8>,
    range_end: Vec<u8>,
    filters: Vec<i32>,
    prev_kv: bool,
    progress_notify: bool,
    credentials: Option<Vec<u8>>,
}

/// The groups of identical "now" watches.
pub struct Coalescer {
    groups: Mutex<HashMap<GroupKey, mpsc::Sender<GroupCmd>>>,
    next_sub: AtomicU64,
    /// New groups go to a task that starts them: a session joining a group
    /// must not itself spawn the group's own session (that would make the
    /// session's future type contain itself).
    starts: mpsc::Sender<(Group, MetadataMap, WatchCreateRequest, mpsc::Receiver<GroupCmd>)>,
}

impl Coalescer {
    /// The coalescer, and the task that starts its groups. Call inside the runtime.
    pub fn start() -> Arc<Self> {
        let (starts, mut jobs) =
            mpsc::channel::<(Group, MetadataMap, WatchCreateRequest, mpsc::Receiver<GroupCmd>)>(64);
        tokio::spawn(async move {
            while let Some((group, meta, create, cmds)) = jobs.recv().await {
                tokio::spawn(group.run(meta, create, cmds));
            }
        });
        Arc::new(Self { groups: Mutex::new(HashMap::new()), next_sub: AtomicU64::new(0), starts })
    }

    /// Joins (or starts) the group for `create`; the header of the join
    /// point (its revision is the last one delivered to the group). `None`
    /// when no group can be had: the caller watches on its own.
    async fn join(
        self: &Arc<Self>,
        gw: &Arc<Gateway>,
        meta: &MetadataMap,
        create: &WatchCreateRequest,
        tx: mpsc::Sender<GroupEvents>,
    ) -> Option<(mpsc::Sender<GroupCmd>, u64, ResponseHeader)> {
        let mut filters = create.filters.clone();
        filters.sort_unstable();
        let key = GroupKey {
            key: create.key.clone(),
            range_end: create.range_end.clone(),
            filters,
            prev_kv: create.prev_kv,
            progress_notify: create.progress_notify,
            credentials: meta.get("token").map(|v| v.as_bytes().to_vec()),
        };
        let sub = self.next_sub.fetch_add(1, Ordering::Relaxed);
        for _ in 0..2 {
            let (cmds, new) = {
                let mut groups = self.groups.lock();
                match groups.get(&key) {
                    Some(c) if !c.is_closed() => (c.clone(), None),
                    _ => {
                        let (cmds, rx) = mpsc::channel(64);
                        groups.insert(key.clone(), cmds.clone());
                        let group =
                            Group { coalescer: self.clone(), key: key.clone(), gw: gw.clone(), cmds: cmds.clone() };
                        (cmds, Some((group, rx)))
                    }
                }
            };
            if let Some((group, rx)) = new {
                if self.starts.send((group, meta.clone(), create.clone(), rx)).await.is_err() {
                    return None;
                }
            }
            let (reply, answer) = oneshot::channel();
            let subscribe = GroupCmd::Subscribe { sub, client_id: create.watch_id, tx: tx.clone(), reply };
            if cmds.send(subscribe).await.is_err() {
                continue; // the group just ended: start another
            }
            return match tokio::time::timeout(Duration::from_secs(5), answer).await {
                Ok(Ok(header)) => Some((cmds, sub, header)),
                _ => None,
            };
        }
        None
    }
}

/// One upstream watch shared by identical client watches.
pub struct Group {
    coalescer: Arc<Coalescer>,
    key: GroupKey,
    gw: Arc<Gateway>,
    cmds: mpsc::Sender<GroupCmd>,
}

struct Member {
    client_id: i64,
    tx: mpsc::Sender<GroupEvents>,
}

impl Group {
    async fn run(self, meta: MetadataMap, create: WatchCreateRequest, mut cmds: mpsc::Receiver<GroupCmd>) {
        self.gw.metrics.watch_groups.inc();
        let mut members: HashMap<u64, Member> = HashMap::new();
        if let Some((to_session, mut from_session)) = self.start(meta, create).await {
            let mut joining: Vec<(u64, Member, oneshot::Sender<ResponseHeader>)> = Vec::new();
            let mut header: Option<ResponseHeader> = None;
            let mut delivered = 0;
            let mut asking: Vec<u64> = Vec::new();
            loop {
                tokio::select! {
                    cmd = cmds.recv() => match cmd {
                        None => break,
                        Some(GroupCmd::Subscribe { sub, client_id, tx, reply }) => {
                            let member = Member { client_id, tx };
                            match &header {
                                Some(h) => {
                                    // A joiner that gave up waiting is not added.
                                    if reply.send(ResponseHeader { revision: delivered, ..*h }).is_ok() {
                                        members.insert(sub, member);
                                    }
                                }
                                None => joining.push((sub, member, reply)),
                            }
                            self.gw.metrics.watch_coalesced.set(members.len() as i64);
                        }
                        Some(GroupCmd::Unsubscribe(sub)) => {
                            members.remove(&sub);
                            joining.retain(|(s, _, _)| *s != sub);
                            asking.retain(|s| *s != sub);
                            if members.is_empty() && joining.is_empty() {
                                break;
                            }
                        }
                        Some(GroupCmd::Progress(sub)) => {
                            // One request upstream at a time: its answer serves
                            // everyone asking meanwhile. Never waits on the
                            // internal session, which may be waiting on this loop.
                            if asking.is_empty() && to_session.try_send(Ok(progress_request())).is_err() {
                                continue;
                            }
                            asking.push(sub);
                        }
                    },
                    resp = from_session.recv() => {
                        let Some(Ok(r)) = resp else { break };
                        let rev = r.header.as_ref().map_or(0, |h| h.revision);
                        if r.created && r.canceled {
                            break; // the member refused the create: joiners watch on their own
                        }
                        if r.created {
                            header = r.header;
                            delivered = rev;
                            for (sub, member, reply) in joining.drain(..) {
                                if reply.send(ResponseHeader { revision: delivered, ..r.header.unwrap_or_default() }).is_ok() {
                                    members.insert(sub, member);
                                }
                            }
                            continue;
                        }
                        if r.watch_id == -1 {
                            delivered = delivered.max(rev);
                            for sub in asking.drain(..) {
                                if let Some(m) = members.get(&sub) {
                                    send_or_drop(&m.tx, m.client_id, sub, GroupEvent::Progress(delivered));
                                }
                            }
                            continue;
                        }
                        delivered = delivered.max(r.events.last().and_then(|e| e.kv.as_ref()).map_or(rev, |kv| kv.mod_revision));
                        if r.header.is_some() {
                            header = r.header;
                        }
                        let canceled = r.canceled;
                        members.retain(|sub, m| send_or_drop(&m.tx, m.client_id, *sub, GroupEvent::Response(r.clone())));
                        if canceled || (members.is_empty() && joining.is_empty()) {
                            members.clear();
                            break;
                        }
                    }
                }
            }
        }
        // Whoever is still here goes on alone.
        for (sub, m) in members.drain() {
            let (tx, id) = (m.tx, m.client_id);
            tokio::spawn(async move {
                let _ = tx.send((id, sub, GroupEvent::Left)).await;
            });
        }
        let mut groups = self.coalescer.groups.lock();
        if groups.get(&self.key).is_some_and(|c| c.same_channel(&self.cmds)) {
            groups.remove(&self.key);
        }
        drop(groups);
        self.gw.metrics.watch_groups.dec();
    }

    /// The group's internal session, with its one watcher (id 0) created.
    async fn start(
        &self,
        meta: MetadataMap,
        create: WatchCreateRequest,
    ) -> Option<(mpsc::Sender<Result<WatchRequest, Status>>, mpsc::Receiver<Result<WatchResponse, Status>>)> {
        let pick = self.gw.regions.nearest(|_| true)?;
        let up = open(&self.gw, &pick, &meta).await.ok()?;
        let (to_session, inbound) = mpsc::channel(16);
        let (out, from_session) = mpsc::channel(BUFFER);
        tokio::spawn(Session::internal(self.gw.clone(), meta, out).run(ReceiverStream::new(inbound), up));
        let create = WatchCreateRequest { watch_id: 0, start_revision: 0, ..create };
        to_session.send(Ok(WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) })).await.ok()?;
        Some((to_session, from_session))
    }
}

/// Queues `event` for a member; false (it leaves the group) when its
/// queue is full: it is told so once there is room, after what it has.
fn send_or_drop(tx: &mpsc::Sender<GroupEvents>, id: i64, sub: u64, event: GroupEvent) -> bool {
    match tx.try_send((id, sub, event)) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send((id, sub, GroupEvent::Left)).await;
            });
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}
