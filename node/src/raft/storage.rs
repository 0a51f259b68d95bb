//! The durable raft log: entries, HardState, ConfState and the log's starting
//! point, in fjall's `raft` keyspace, with an in-memory copy of the live
//! entries for raft-rs's reads.
//!
//! Every change goes into a caller's [`OwnedWriteBatch`], so one Ready's log
//! append, HardState and the state machine's writes commit together and are
//! made durable by one fsync.

use std::collections::VecDeque;
use std::sync::Arc;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use crate::error::{Error, Result};

const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
/// Index and term of the last entry dropped from the log (0,0 if none).
const KEY_LOG_START: &[u8] = b"log_start";
const ENTRY_PREFIX: u8 = b'e';

/// A point-in-time image of the state machine, offered to a follower that
/// fell behind the log. Taking one is cheap (a storage snapshot); its body is
/// read only while it streams to the follower, off the raft thread.
pub trait SnapshotImage: Send + Sync {
    /// The applied index the image was taken at.
    fn index(&self) -> u64;
    /// A small header that travels inside raft's MsgSnapshot.
    fn header(&self) -> Vec<u8>;
    /// Hands the body to `each` in pieces of about `chunk_bytes`, in order;
    /// stops early when `each` returns false.
    ///
    /// # Errors
    ///
    /// Storage errors while reading the image.
    fn write_body(&self, chunk_bytes: usize, each: &mut dyn FnMut(Vec<u8>) -> bool) -> Result<()>;
}

/// A snapshot body a follower has stored beside its live state. Dropping it
/// discards it; [`ReceivedSnapshot::keep`] leaves it for
/// [`super::StateMachine::restore`] to install.
pub trait ReceivedSnapshot: Send {
    fn keep(self: Box<Self>);
}

/// The state machine's side of snapshots: images for followers (leader) and
/// storage for incoming bodies (follower).
pub trait SnapshotSource: Send + Sync {
    /// Takes an image of the published state.
    ///
    /// # Errors
    ///
    /// Storage errors.
    fn prepare(&self) -> Result<Arc<dyn SnapshotImage>>;
    /// Stores the body of the snapshot at `index`, piece by piece as the
    /// leader's [`SnapshotImage::write_body`] produced it, without holding it
    /// whole in memory; `header` is the one raft will hand to
    /// [`super::StateMachine::restore`], checked here. Blocking: run it off
    /// the runtime.
    ///
    /// # Errors
    ///
    /// A header or piece that does not decode, or storage errors; nothing is
    /// kept then.
    fn receive(
        &self,
        index: u64,
        header: &[u8],
        body: &mut dyn Iterator<Item = Vec<u8>>,
    ) -> Result<Box<dyn ReceivedSnapshot>>;
}

/// The image the leader last offered, for the transport to stream: raft-rs
/// sends only the MsgSnapshot, whose metadata names the image's index.
#[derive(Default)]
pub struct SnapshotImages {
    latest: parking_lot::Mutex<Option<Arc<dyn SnapshotImage>>>,
}

impl SnapshotImages {
    /// The image taken at `index`, while it is the latest.
    pub fn get(&self, index: u64) -> Option<Arc<dyn SnapshotImage>> {
        self.latest.lock().as_ref().filter(|i| i.index() == index).cloned()
    }

    fn set(&self, image: Option<Arc<dyn SnapshotImage>>) {
        *self.latest.lock() = image;
    }
}

/// How long an unused image is kept: it pins its storage snapshot, and so
/// the space of everything written since.
const IMAGE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(300);

/// Raft log storage for one member.
pub struct LogStore {
    ks: Keyspace,
    hard_state: HardState,
    conf_state: ConfState,
    /// The entry just before `entries[0]`: index and term.
    start: (u64, u64),
    entries: VecDeque<Entry>,
    source: Arc<dyn SnapshotSource>,
    images: Arc<SnapshotImages>,
    /// The last snapshot message built for a follower, and when; reused
    /// while it is fresh enough (its image is in `images`).
    cached: parking_lot::Mutex<Option<(std::time::Instant, Snapshot)>>,
    /// Set while committed entries are being applied: the state machine is
    /// then between two states (raft-rs asks for a snapshot from inside a
    /// configuration change), so no new image is taken.
    pub applying: bool,
}

fn entry_key(index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = ENTRY_PREFIX;
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::Corrupt(format!("raft log: {e}"))
}

impl LogStore {
    /// Opens (or creates) the log in `db`.
    ///
    /// # Errors
    ///
    /// Storage errors, or a stored record that does not decode.
    pub fn open(db: &Database, source: Arc<dyn SnapshotSource>, images: Arc<SnapshotImages>) -> Result<Self> {
        let ks = db.keyspace("raft", KeyspaceCreateOptions::default)?;
        let hard_state = match ks.get(KEY_HARD_STATE)? {
            Some(b) => HardState::parse_from_bytes(&b).map_err(corrupt)?,
            None => HardState::default(),
        };
        let conf_state = match ks.get(KEY_CONF_STATE)? {
            Some(b) => ConfState::parse_from_bytes(&b).map_err(corrupt)?,
            None => ConfState::default(),
        };
        let start = match ks.get(KEY_LOG_START)? {
            Some(b) if b.len() == 16 => (
                u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
                u64::from_be_bytes(b[8..].try_into().expect("8 bytes")),
            ),
            Some(_) => return Err(corrupt("bad log start")),
            None => (0, 0),
        };
        let mut entries = VecDeque::new();
        for item in ks.prefix([ENTRY_PREFIX]) {
            let (_, v) = item.into_inner()?;
            let e = Entry::parse_from_bytes(&v).map_err(corrupt)?;
            if e.index <= start.0 {
                continue; // dropped by a compaction whose deletes had not all landed
            }
            let expected = start.0 + entries.len() as u64 + 1;
            if e.index != expected {
                return Err(corrupt(format!("gap in log: found {} expected {}", e.index, expected)));
            }
            entries.push_back(e);
        }
        Ok(Self {
            ks,
            hard_state,
            conf_state,
            start,
            entries,
            source,
            images,
            cached: Default::default(),
            applying: false,
        })
    }

    /// True once the member has a configuration (bootstrapped or restored).
    pub fn is_initialized(&self) -> bool {
        !self.conf_state.voters.is_empty()
    }

    /// Sets the first configuration of a brand-new cluster, or of a member
    /// joining one (the configuration the cluster had after adding it).
    pub fn bootstrap(&mut self, voters: Vec<u64>, learners: Vec<u64>, batch: &mut OwnedWriteBatch) {
        self.conf_state.voters = voters;
        self.conf_state.learners = learners;
        batch.insert(&self.ks, KEY_CONF_STATE, self.conf_state.write_to_bytes().expect("encode"));
    }

    /// Records the configuration a committed change produced.
    pub fn set_conf_state(&mut self, cs: ConfState, batch: &mut OwnedWriteBatch) {
        batch.insert(&self.ks, KEY_CONF_STATE, cs.write_to_bytes().expect("encode"));
        self.conf_state = cs;
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    fn last(&self) -> u64 {
        self.start.0 + self.entries.len() as u64
    }

    /// Appends `ents`, replacing any conflicting suffix of the log. Returns
    /// the bytes of the encoded entries.
    pub fn append(&mut self, ents: &[Entry], batch: &mut OwnedWriteBatch) -> u64 {
        let Some(first) = ents.first() else { return 0 };
        let first_index = first.index;
        assert!(first_index > self.start.0, "append below the log start {}: {}", self.start.0, first_index);
        let last = self.last();
        if first_index <= last {
            for i in first_index..=last {
                batch.remove(&self.ks, entry_key(i).to_vec());
            }
            self.entries.truncate((first_index - self.start.0 - 1) as usize);
        }
        assert_eq!(first_index, self.last() + 1, "log gap on append");
        let mut bytes = 0;
        for e in ents {
            let encoded = e.write_to_bytes().expect("encode");
            bytes += encoded.len() as u64;
            batch.insert(&self.ks, entry_key(e.index).to_vec(), encoded);
            self.entries.push_back(e.clone());
        }
        bytes
    }

    pub fn set_hard_state(&mut self, hs: HardState, batch: &mut OwnedWriteBatch) {
        batch.insert(&self.ks, KEY_HARD_STATE, hs.write_to_bytes().expect("encode"));
        self.hard_state = hs;
    }

    /// Records that entries up to `commit` are committed (not fsync-critical:
    /// raft re-learns the commit index from the leader).
    pub fn set_commit(&mut self, commit: u64, batch: &mut OwnedWriteBatch) {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(hs, batch);
    }

    /// Replaces the log with a snapshot's starting point.
    pub fn apply_snapshot(&mut self, meta: &SnapshotMetadata, batch: &mut OwnedWriteBatch) {
        for i in self.start.0 + 1..=self.last() {
            batch.remove(&self.ks, entry_key(i).to_vec());
        }
        self.entries.clear();
        self.set_start((meta.index, meta.term), batch);
        self.conf_state = meta.get_conf_state().clone();
        batch.insert(&self.ks, KEY_CONF_STATE, self.conf_state.write_to_bytes().expect("encode"));
        let mut hs = self.hard_state.clone();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        self.set_hard_state(hs, batch);
    }

    /// Drops entries up to and including `index`, which must be applied.
    pub fn compact(&mut self, index: u64, batch: &mut OwnedWriteBatch) {
        if index <= self.start.0 || index > self.last() {
            return;
        }
        let term = self.entries[(index - self.start.0 - 1) as usize].term;
        for i in self.start.0 + 1..=index {
            batch.remove(&self.ks, entry_key(i).to_vec());
        }
        self.entries.drain(..(index - self.start.0) as usize);
        self.set_start((index, term), batch);
    }

    fn set_start(&mut self, start: (u64, u64), batch: &mut OwnedWriteBatch) {
        self.start = start;
        let mut b = start.0.to_be_bytes().to_vec();
        b.extend_from_slice(&start.1.to_be_bytes());
        batch.insert(&self.ks, KEY_LOG_START, b);
    }

    /// Index of the last entry dropped by compaction or a snapshot.
    pub fn start_index(&self) -> u64 {
        self.start.0
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.start.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(high <= self.last() + 1, "entries [{low},{high}) past last index {}", self.last());
        let from = (low - self.start.0 - 1) as usize;
        let to = (high - self.start.0 - 1) as usize;
        let mut out: Vec<Entry> = self.entries.range(from..to).cloned().collect();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.start.0 {
            return Ok(self.start.1);
        }
        if idx < self.start.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.entries.get((idx - self.start.0 - 1) as usize) {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.start.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    /// Called by raft-rs on the raft thread when a follower needs a
    /// snapshot. Only the image is taken here (a storage snapshot, cheap);
    /// its body streams to the follower from the transport.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let mut cached = self.cached.lock();
        if let Some((used, s)) = cached.as_mut() {
            let index = s.get_metadata().index;
            if index >= request_index && index >= self.start.0 && self.images.get(index).is_some() {
                *used = std::time::Instant::now();
                return Ok(s.clone());
            }
        }
        if self.applying {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        let image = self.source.prepare().map_err(|e| raft::Error::Store(StorageError::Other(Box::new(e))))?;
        let applied = image.index();
        if applied < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        let term = self.term(applied)?;
        let mut snap = Snapshot { data: image.header().into(), ..Default::default() };
        let meta = snap.mut_metadata();
        meta.index = applied;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        self.images.set(Some(image));
        *cached = Some((std::time::Instant::now(), snap.clone()));
        Ok(snap)
    }
}

impl LogStore {
    /// Lets go of an image no follower has asked for in a while.
    pub fn expire_snapshot(&self) {
        let mut cached = self.cached.lock();
        if cached.as_ref().is_some_and(|(at, _)| at.elapsed() > IMAGE_MAX_AGE) {
            *cached = None;
            self.images.set(None);
        }
    }
}
