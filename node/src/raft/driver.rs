//! The raft thread: a blocking loop around [`RaftNode`] that turns inputs
//! from the rest of the process into Ready cycles.
//!
//! It runs on its own OS thread, not a tokio task: each cycle fsyncs, and a
//! blocking fsync on a runtime worker would stall unrelated RPCs.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use raft::eraftpb::{Message, MessageType};
use tokio::sync::oneshot;

use super::node::{RaftNode, RaftStatus, ReadReply, StateMachine};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Most inputs folded into one Ready cycle.
const MAX_INPUTS_PER_CYCLE: usize = 4096;
/// Inputs the raft thread's channel holds; past it senders are refused
/// (proposals with etcd's "too many requests", peer messages are dropped and
/// resent by raft) instead of queueing without end.
pub const INPUT_CAPACITY: usize = 4 * MAX_INPUTS_PER_CYCLE;

/// What the rest of the process asks of the raft thread.
pub enum Input {
    /// Propose opaque data; `dropped` fires if raft refuses it outright.
    Propose { data: Vec<u8>, dropped: oneshot::Sender<Error> },
    /// Propose a configuration change; `dropped` fires if raft refuses it.
    ProposeConfChange { cc: raft::eraftpb::ConfChange, dropped: oneshot::Sender<Error> },
    /// On the leader: how far each member's log matches (`None` elsewhere).
    Progress(oneshot::Sender<Option<super::node::Progress>>),
    /// A linearizable read barrier.
    ReadIndex(ReadReply),
    /// A message from a peer.
    Step(Message),
    /// The transport could not reach a peer.
    Unreachable(u64),
    /// On the leader: hand leadership to this member.
    TransferLeader(u64),
    /// Stop the raft thread after the current cycle.
    Shutdown,
}

/// Sends raft messages to peers.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, msgs: Vec<Message>);
    /// The member list changed: these are the peers now (`id -> peer URL`),
    /// and the members removed from the cluster.
    fn set_peers(&self, peers: HashMap<u64, String>, removed: std::collections::HashSet<u64>) {
        let _ = (peers, removed);
    }
}

/// Whether snapshots reached their followers, for raft. Kept apart from the
/// input channel, which can be full: a lost report would leave raft waiting
/// on that follower's snapshot for good. One entry per snapshot sent, and
/// raft sends a follower one at a time, so it stays small; the raft thread
/// drains it every cycle.
#[derive(Default)]
pub struct SnapshotReports(parking_lot::Mutex<Vec<(u64, bool)>>);

impl SnapshotReports {
    pub fn push(&self, to: u64, ok: bool) {
        self.0.lock().push((to, ok));
    }

    fn drain(&self) -> Vec<(u64, bool)> {
        std::mem::take(&mut *self.0.lock())
    }
}

/// A cheap, cloneable way into the raft thread.
#[derive(Clone)]
pub struct RaftHandle {
    tx: Sender<Input>,
    status: Arc<RaftStatus>,
}

impl RaftHandle {
    pub fn status(&self) -> &Arc<RaftStatus> {
        &self.status
    }

    /// Delivers an input without waiting: the channel is bounded.
    ///
    /// # Errors
    ///
    /// [`Error::TooManyRequests`] while the channel is full, [`Error::Stopped`]
    /// after shutdown.
    pub fn send(&self, input: Input) -> Result<()> {
        try_input(&self.tx, input)
    }

    /// Asks the raft thread to stop, waiting up to a second for room in its
    /// channel; the thread drains it continuously.
    pub fn shutdown(&self) {
        let _ = self.tx.send_timeout(Input::Shutdown, Duration::from_secs(1));
    }

    /// Waits until this member may serve a linearizable read.
    ///
    /// # Errors
    ///
    /// [`Error::NoLeader`], [`Error::Timeout`] or [`Error::Stopped`].
    pub async fn read_barrier(&self) -> Result<u64> {
        let (tx, rx) = oneshot::channel();
        self.send(Input::ReadIndex(tx))?;
        rx.await.map_err(|_| Error::Stopped)?
    }
}

/// The input channel of a raft thread, bounded by [`INPUT_CAPACITY`];
/// create it first so the transport can hold a sender before the thread
/// starts.
pub fn channel() -> (Sender<Input>, Receiver<Input>) {
    crossbeam_channel::bounded(INPUT_CAPACITY)
}

/// Sends an input without waiting.
///
/// # Errors
///
/// [`Error::TooManyRequests`] while the channel is full, [`Error::Stopped`]
/// after shutdown.
pub fn try_input(tx: &Sender<Input>, input: Input) -> Result<()> {
    tx.try_send(input).map_err(|e| match e {
        TrySendError::Full(_) => Error::TooManyRequests,
        TrySendError::Disconnected(_) => Error::Stopped,
    })
}

/// Starts the raft thread. It stops on [`Input::Shutdown`] or when every
/// sender is gone.
///
/// # Errors
///
/// [`Error::Io`] if the thread cannot be spawned.
pub fn spawn<S: StateMachine>(
    mut node: RaftNode<S>,
    (tx, rx): (Sender<Input>, Receiver<Input>),
    transport: Arc<dyn Transport>,
    reports: Arc<SnapshotReports>,
    tick: Duration,
) -> Result<(RaftHandle, JoinHandle<()>)> {
    let handle = RaftHandle { tx, status: node.status() };
    let thread = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || run(&mut node, &rx, transport.as_ref(), &reports, tick))?;
    Ok((handle, thread))
}

fn run<S: StateMachine>(
    node: &mut RaftNode<S>,
    rx: &Receiver<Input>,
    transport: &dyn Transport,
    reports: &SnapshotReports,
    tick: Duration,
) {
    let mut next_tick = Instant::now() + tick;
    let mut heartbeats = HeartbeatWatch::new(tick, node.metrics());
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(input) => {
                let mut stop = !handle(node, input);
                for input in rx.try_iter().take(MAX_INPUTS_PER_CYCLE) {
                    stop |= !handle(node, input);
                }
                if stop {
                    break;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        for (to, ok) in reports.drain() {
            node.report_snapshot(to, ok);
        }
        let now = Instant::now();
        if now >= next_tick {
            node.tick();
            next_tick += tick;
            if next_tick < now {
                next_tick = now + tick;
            }
        }
        node.flush_reads();
        let leader = node.status().is_leader();
        if let Err(e) = node.handle_ready(&mut |msgs| {
            heartbeats.observe(&msgs, leader);
            transport.send(msgs)
        }) {
            // The durable state is unknown after a failed write: stop rather
            // than let this replica diverge.
            tracing::error!(error = %e, "raft storage failed; stopping the member");
            std::process::abort();
        }
        if let Some((peers, removed)) = node.peers_changed() {
            transport.set_peers(peers, removed);
        }
    }
    tracing::info!("raft thread stopped");
}

/// Handles one input; false means stop.
fn handle<S: StateMachine>(node: &mut RaftNode<S>, input: Input) -> bool {
    match input {
        Input::Propose { data, dropped } => {
            if let Err(e) = node.propose(data) {
                let _ = dropped.send(e);
            }
        }
        Input::ProposeConfChange { cc, dropped } => {
            if let Err(e) = node.propose_conf_change(cc) {
                let _ = dropped.send(e);
            }
        }
        Input::Progress(reply) => {
            let _ = reply.send(node.progress());
        }
        Input::ReadIndex(reply) => node.read_index(reply),
        Input::Step(msg) => node.step(msg),
        Input::Unreachable(id) => node.report_unreachable(id),
        Input::TransferLeader(to) => node.transfer_leader(to),
        Input::Shutdown => return false,
    }
    true
}

/// etcd's check that a leader sends its heartbeats on time: one that leaves
/// more than two heartbeat intervals after the previous one to the same
/// peer means the leader is overloaded (a slow disk, most often), and
/// counts in `etcd_server_heartbeat_send_failures_total`.
struct HeartbeatWatch {
    interval: Duration,
    last: HashMap<u64, Instant>,
    metrics: Arc<Metrics>,
    warned: Option<Instant>,
}

impl HeartbeatWatch {
    fn new(interval: Duration, metrics: Arc<Metrics>) -> Self {
        Self { interval, last: HashMap::new(), metrics, warned: None }
    }

    fn observe(&mut self, msgs: &[Message], leader: bool) {
        if !leader {
            self.last.clear(); // a new term starts its own clock
            return;
        }
        let now = Instant::now();
        for m in msgs.iter().filter(|m| m.get_msg_type() == MessageType::MsgHeartbeat) {
            let Some(previous) = self.last.insert(m.to, now) else { continue };
            let gap = now - previous;
            if gap > 2 * self.interval {
                self.metrics.heartbeat_send_failures.inc();
                if self.warned.is_none_or(|w| now - w > Duration::from_secs(10)) {
                    self.warned = Some(now);
                    tracing::warn!(
                        peer = format!("{:x}", m.to),
                        gap_ms = gap.as_millis() as u64,
                        "leader failed to send a heartbeat on time; it is overloaded, likely by a slow disk"
                    );
                }
            }
        }
    }
}

/// True for messages that carry a snapshot, which the transport must confirm.
pub fn is_snapshot(msg: &Message) -> bool {
    msg.get_msg_type() == MessageType::MsgSnapshot
}
