//! Deterministic multi-member raft tests: members driven by hand over an
//! in-memory network, with partitions, heals and restarts. No threads, no
//! sleeps: time is `tick()`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch};
use parking_lot::Mutex;
use raft::eraftpb::{Message, MessageType};
use tempfile::TempDir;

use super::node::{Committed, RaftConfig, RaftNode, StateMachine};
use super::storage::{ReceivedSnapshot, SnapshotImage, SnapshotImages, SnapshotSource};
use crate::error::Result;
use crate::metrics::Metrics;

/// Applied commands, as the test state machine persists them.
#[derive(Default, Clone, PartialEq, Debug)]
struct Applied {
    index: u64,
    commands: Vec<Vec<u8>>,
}

/// A state machine that records every command it applies, durably, with
/// its applied index in the same batch.
struct LogSm {
    ks: Keyspace,
    staged: Applied,
    published: Arc<Mutex<Applied>>,
    restores: Arc<Mutex<u32>>,
    received: Received,
}

/// Snapshot bodies a member received and kept, by raft index.
type Received = Arc<Mutex<HashMap<u64, Vec<Vec<u8>>>>>;

impl LogSm {
    fn open(db: &Database, received: Received) -> (Self, Arc<Mutex<Applied>>, Arc<Mutex<u32>>) {
        let ks = db.keyspace("sm", KeyspaceCreateOptions::default).unwrap();
        let applied = match ks.get("state").unwrap() {
            Some(b) => decode(&b),
            None => Applied::default(),
        };
        let published = Arc::new(Mutex::new(applied.clone()));
        let restores = Arc::new(Mutex::new(0));
        let sm = Self { ks, staged: applied, published: published.clone(), restores: restores.clone(), received };
        (sm, published, restores)
    }
}

fn encode(a: &Applied) -> Vec<u8> {
    let mut out = a.index.to_be_bytes().to_vec();
    for c in &a.commands {
        out.extend_from_slice(&(c.len() as u32).to_be_bytes());
        out.extend_from_slice(c);
    }
    out
}

fn decode(b: &[u8]) -> Applied {
    let index = u64::from_be_bytes(b[..8].try_into().unwrap());
    let mut commands = Vec::new();
    let mut at = 8;
    while at < b.len() {
        let n = u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
        commands.push(b[at + 4..at + 4 + n].to_vec());
        at += 4 + n;
    }
    Applied { index, commands }
}

impl StateMachine for LogSm {
    fn apply(&mut self, entries: &[Committed<'_>], batch: &mut OwnedWriteBatch) {
        for e in entries {
            assert_eq!(e.index, self.staged.index + 1, "entries apply in order, exactly once");
            if !e.data.is_empty() {
                self.staged.commands.push(e.data.to_vec());
            }
            self.staged.index = e.index;
        }
        batch.insert(&self.ks, "state", encode(&self.staged));
    }
    fn on_commit(&mut self) {
        *self.published.lock() = self.staged.clone();
    }
    fn restore(&mut self, index: u64, header: &[u8], batch: &mut OwnedWriteBatch) {
        assert_eq!(header, index.to_be_bytes(), "the header travels in the message");
        let commands = self.received.lock().remove(&index).expect("the body arrived before raft saw the snapshot");
        self.staged = Applied { index, commands };
        *self.restores.lock() += 1;
        batch.insert(&self.ks, "state", encode(&self.staged));
    }
    fn applied(&self) -> u64 {
        self.staged.index
    }
}

/// Snapshots of a [`LogSm`]: the header is the index, the body one chunk
/// per command (so a body is always many chunks).
struct Source {
    published: Arc<Mutex<Applied>>,
    received: Received,
}

struct Image(Applied);

impl SnapshotImage for Image {
    fn index(&self) -> u64 {
        self.0.index
    }
    fn header(&self) -> Vec<u8> {
        self.0.index.to_be_bytes().to_vec()
    }
    fn write_body(&self, _chunk_bytes: usize, each: &mut dyn FnMut(Vec<u8>) -> bool) -> Result<()> {
        for c in &self.0.commands {
            if !each(c.clone()) {
                break;
            }
        }
        Ok(())
    }
}

struct Body(u64, Vec<Vec<u8>>, Received);

impl ReceivedSnapshot for Body {
    fn keep(self: Box<Self>) {
        self.2.lock().insert(self.0, self.1);
    }
}

impl SnapshotSource for Source {
    fn prepare(&self) -> Result<Arc<dyn SnapshotImage>> {
        Ok(Arc::new(Image(self.published.lock().clone())))
    }
    fn receive(
        &self,
        index: u64,
        header: &[u8],
        body: &mut dyn Iterator<Item = Vec<u8>>,
    ) -> Result<Box<dyn ReceivedSnapshot>> {
        assert_eq!(header, index.to_be_bytes());
        Ok(Box::new(Body(index, body.collect(), self.received.clone())))
    }
}

struct Member {
    dir: TempDir,
    node: Option<RaftNode<LogSm>>,
    applied: Arc<Mutex<Applied>>,
    restores: Arc<Mutex<u32>>,
    images: Arc<SnapshotImages>,
    source: Option<Arc<Source>>,
}

/// N members and the messages between them.
struct Net {
    members: Vec<Member>,
    ids: Vec<u64>,
    cut: HashSet<u64>,
    snapshot_count: u64,
}

impl Net {
    fn new(n: usize, snapshot_count: u64) -> Self {
        let ids: Vec<u64> = (1..=n as u64).collect();
        let mut net = Net { members: Vec::new(), ids: ids.clone(), cut: HashSet::new(), snapshot_count };
        for _ in &ids {
            let dir = tempfile::tempdir().unwrap();
            net.members.push(Member {
                dir,
                node: None,
                applied: Default::default(),
                restores: Default::default(),
                images: Default::default(),
                source: None,
            });
        }
        for id in ids {
            net.start(id);
        }
        net
    }

    fn start(&mut self, id: u64) {
        let m = &mut self.members[(id - 1) as usize];
        let db = Database::builder(m.dir.path()).open().unwrap();
        let received = Received::default();
        let (sm, applied, restores) = LogSm::open(&db, received.clone());
        let cfg = RaftConfig {
            id,
            voters: self.ids.clone(),
            learners: Vec::new(),
            election_ticks: 10,
            heartbeat_ticks: 1,
            snapshot_count: self.snapshot_count,
            catchup_entries: 2,
        };
        let source = Arc::new(Source { published: applied.clone(), received });
        let logger = super::logger::logger();
        m.images = Arc::new(SnapshotImages::default());
        let node = RaftNode::open(cfg, db, sm, source.clone(), m.images.clone(), Arc::new(Metrics::default()), &logger);
        m.node = Some(node.unwrap());
        m.source = Some(source);
        m.applied = applied;
        m.restores = restores;
    }

    /// Simulates a crash: the member's in-memory state is dropped.
    fn stop(&mut self, id: u64) {
        self.members[(id - 1) as usize].node = None;
    }

    fn node(&mut self, id: u64) -> &mut RaftNode<LogSm> {
        self.members[(id - 1) as usize].node.as_mut().expect("member is running")
    }

    fn applied(&self, id: u64) -> Applied {
        self.members[(id - 1) as usize].applied.lock().clone()
    }

    /// Runs Ready cycles and delivers messages until the network is quiet.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut msgs: Vec<Message> = Vec::new();
            for m in &mut self.members {
                if let Some(node) = m.node.as_mut() {
                    node.flush_reads();
                    node.handle_ready(&mut |m| msgs.extend(m)).unwrap();
                }
            }
            if msgs.is_empty() {
                return;
            }
            for msg in msgs {
                let (from, to) = (msg.from, msg.to);
                let snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
                let delivered = !self.cut.contains(&from)
                    && !self.cut.contains(&to)
                    && self.members[(to - 1) as usize].node.is_some();
                if delivered && snapshot {
                    // As the transport does: the body first, from the
                    // leader's image into the follower's store, then the message.
                    let index = msg.get_snapshot().get_metadata().index;
                    let image = self.members[(from - 1) as usize].images.get(index).expect("the leader's image");
                    assert_eq!(msg.get_snapshot().get_data(), image.header().as_slice());
                    let mut chunks = Vec::new();
                    image
                        .write_body(1, &mut |c| {
                            chunks.push(c);
                            true
                        })
                        .unwrap();
                    let source = self.members[(to - 1) as usize].source.clone().expect("running");
                    source.receive(index, &image.header(), &mut chunks.into_iter()).unwrap().keep();
                }
                if delivered {
                    self.node(to).step(msg);
                }
                if snapshot && self.members[(from - 1) as usize].node.is_some() {
                    self.node(from).report_snapshot(to, delivered);
                }
            }
        }
        panic!("network did not settle");
    }

    fn tick(&mut self, n: usize) {
        for _ in 0..n {
            for m in &mut self.members {
                if let Some(node) = m.node.as_mut() {
                    node.tick();
                }
            }
            self.settle();
        }
    }

    /// The leader that every running, connected member agrees on.
    fn leader(&mut self) -> Option<u64> {
        let mut seen = HashSet::new();
        for m in &self.members {
            if let Some(node) = &m.node {
                let id = node.status().id;
                if !self.cut.contains(&id) {
                    seen.insert(node.status().leader());
                }
            }
        }
        (seen.len() == 1).then(|| *seen.iter().next().unwrap()).filter(|l| *l != 0)
    }

    fn elect(&mut self) -> u64 {
        self.elect_other_than(0)
    }

    /// Ticks until the connected members agree on a leader other than `old`.
    fn elect_other_than(&mut self, old: u64) -> u64 {
        for _ in 0..100 {
            self.tick(1);
            if let Some(l) = self.leader().filter(|l| *l != old) {
                return l;
            }
        }
        panic!("no leader elected");
    }

    fn propose(&mut self, via: u64, cmd: &str) {
        self.node(via).propose(cmd.as_bytes().to_vec()).unwrap();
        self.settle();
    }
}

fn commands(a: &Applied) -> Vec<String> {
    a.commands.iter().map(|c| String::from_utf8_lossy(c).into_owned()).collect()
}

#[test]
fn replicates_in_order_and_forwards_follower_proposals() {
    let mut net = Net::new(3, 1000);
    let leader = net.elect();
    let follower = if leader == 1 { 2 } else { 1 };
    net.propose(leader, "a");
    net.propose(follower, "b");
    net.propose(leader, "c");
    net.tick(2);
    for id in 1..=3 {
        assert_eq!(commands(&net.applied(id)), ["a", "b", "c"], "member {id}");
    }
    assert_eq!(net.applied(1), net.applied(2));
}

#[test]
fn minority_leader_cannot_commit_and_catches_up_after_heal() {
    let mut net = Net::new(3, 1000);
    let old = net.elect();
    net.propose(old, "before");
    net.cut.insert(old);
    net.node(old).propose(b"lost".to_vec()).unwrap();
    net.settle();
    let new = net.elect_other_than(old);
    net.propose(new, "after");
    assert_eq!(commands(&net.applied(old)), ["before"], "a partitioned leader commits nothing");

    net.cut.clear();
    net.tick(30);
    for id in 1..=3 {
        assert_eq!(commands(&net.applied(id)), ["before", "after"], "member {id}");
    }
    assert_eq!(net.leader(), Some(new), "check-quorum and pre-vote keep the healed member from disrupting");
}

#[test]
fn restart_resumes_after_the_last_applied_entry() {
    let mut net = Net::new(3, 1000);
    let leader = net.elect();
    let victim = if leader == 3 { 2 } else { 3 };
    net.propose(leader, "x1");
    net.stop(victim);
    net.propose(leader, "x2");
    net.propose(leader, "x3");
    net.start(victim);
    assert_eq!(commands(&net.applied(victim)), ["x1"], "applied state survives the restart");
    net.tick(15);
    assert_eq!(commands(&net.applied(victim)), ["x1", "x2", "x3"]);

    // Whole-cluster restart: everything committed is still there.
    for id in 1..=3 {
        net.stop(id);
    }
    for id in 1..=3 {
        net.start(id);
    }
    let leader = net.elect();
    net.propose(leader, "x4");
    for id in 1..=3 {
        assert_eq!(commands(&net.applied(id)), ["x1", "x2", "x3", "x4"], "member {id}");
    }
}

#[test]
fn member_behind_the_compacted_log_catches_up_by_snapshot() {
    let mut net = Net::new(3, 5);
    let leader = net.elect();
    let lagging = if leader == 1 { 2 } else { 1 };
    net.cut.insert(lagging);
    for i in 0..30 {
        net.propose(leader, &format!("k{i}"));
    }
    assert!(net.node(leader).log_start() > 10, "the leader compacted its log");
    net.cut.clear();
    net.tick(15);
    let want: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
    assert_eq!(commands(&net.applied(lagging)), want);
    assert_eq!(*net.members[(lagging - 1) as usize].restores.lock(), 1, "caught up through a snapshot");
    // And the snapshot survives its restart.
    net.stop(lagging);
    net.start(lagging);
    assert_eq!(commands(&net.applied(lagging)), want);
}

#[test]
fn read_index_on_a_follower_waits_for_the_leaders_commit() {
    let mut net = Net::new(3, 1000);
    let leader = net.elect();
    let follower = if leader == 1 { 2 } else { 1 };
    net.propose(leader, "w");
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    net.node(follower).read_index(tx);
    net.settle();
    let index = rx.try_recv().expect("read confirmed").expect("read ok");
    assert!(index >= net.applied(leader).index);

    // Reads from every member at once: none is lost at the leader.
    let mut waiting = Vec::new();
    for id in 1..=3 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        net.node(id).read_index(tx);
        waiting.push(rx);
    }
    net.settle();
    for mut rx in waiting {
        assert!(rx.try_recv().expect("every member's read is confirmed").is_ok());
    }

    // Without a quorum the read cannot be confirmed; it times out.
    net.cut.insert(leader);
    let other = (1..=3).find(|id| *id != leader && *id != follower).unwrap();
    net.cut.insert(other);
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    net.node(follower).read_index(tx);
    net.tick(25);
    assert!(rx.try_recv().expect("answered").is_err());
}
