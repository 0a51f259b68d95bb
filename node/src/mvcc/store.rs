//! The MVCC store: the key index in memory, every revision's record in fjall,
//! and the staged/published split that lets apply build a write batch while
//! readers keep a consistent view.

use std::collections::BTreeMap;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch, Readable};
use meridian_proto::meridian::v1::KvRecord;
use meridian_proto::mvccpb::KeyValue;
use parking_lot::{RwLock, RwLockWriteGuard};
use prost::Message;

use super::index::{KeyIndex, KeyRange, Version};
use super::Revision;
use crate::error::{Error, Result};

mod hash;
mod snapshot;
pub use snapshot::{Received, StoreImage};

const META_CURRENT: &[u8] = b"mvcc/current_revision";
const META_COMPACTED: &[u8] = b"mvcc/compact_revision";
const META_APPLIED: &[u8] = b"mvcc/applied_index";
/// Name of the keyspace that holds the records (absent: `kv`). A restored
/// snapshot brings a keyspace of its own, and this switches to it in the
/// restore's batch.
const META_KV_KEYSPACE: &[u8] = b"mvcc/kv_keyspace";
/// The records keyspace of a store that never restored a snapshot.
const FIRST_KV_KEYSPACE: &str = "kv";
/// Names of keyspaces received from a leader start with this.
const RECEIVED_KV_PREFIX: &str = "kv-";
/// Prefix of the application's own replicated metadata (see [`Mvcc::set_meta`]).
const META_APP_PREFIX: &[u8] = b"app/";

/// What a read asks for beyond the key range.
#[derive(Clone, Copy, Debug, Default)]
pub struct RangeOpts {
    /// Revision to read at; 0 or less means the current one.
    pub rev: i64,
    /// Return at most this many key-values; 0 means no limit. `count` is
    /// always the full number of keys in range.
    pub limit: usize,
    /// Return no key-values, only `count`.
    pub count_only: bool,
}

/// The answer to a read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// Keys in range at the read revision, before any limit.
    pub count: usize,
    /// The store's revision that served the read (the header revision).
    pub rev: i64,
}

/// Current, compact revision and applied index, as one unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Marks {
    pub current: i64,
    pub compacted: i64,
    pub applied: u64,
}

struct State {
    /// The records, by revision key. Replaced whole by a snapshot restore;
    /// readers keep the one they started on.
    kv: Keyspace,
    /// Records keyspaces a restore replaced, deleted once it is durable.
    retired: Vec<Keyspace>,
    /// Counts restores, so a read view begun before one can tell.
    generation: u64,
    /// A restore is staged and not yet published: the index and keyspace
    /// are the new store's, the published marks the old one's.
    restoring: bool,
    index: KeyIndex,
    /// What readers see; advanced only by `publish`, after the batch is durable in the journal.
    published: Marks,
    /// What apply has reached; equal to `published` between batches.
    staged: Marks,
    /// Records written by apply and not yet published, by revision.
    pending: BTreeMap<Revision, KvRecord>,
    /// A compaction applied but not yet carried out on the index and disk.
    pending_compaction: Option<i64>,
    /// Application metadata (published and staged values together; see `set_meta`).
    meta: BTreeMap<String, Vec<u8>>,
    meta_dirty: Vec<String>,
    /// Encoded bytes of every retained record: the logical database size.
    size: u64,
}

/// One physical compaction: records removed, time walking the key index,
/// and the whole time the store was held (all of it under the store lock).
#[derive(Clone, Copy, Debug)]
pub struct Compacted {
    pub keys: u64,
    pub index: std::time::Duration,
    pub total: std::time::Duration,
}

impl State {
    /// Makes `index`, `size`, `marks` and `meta` the whole staged store (an
    /// import or a snapshot restore), dropping whatever apply had pending.
    fn replace_store(&mut self, index: KeyIndex, size: u64, marks: Marks, meta: BTreeMap<String, Vec<u8>>) {
        self.index = index;
        self.size = size;
        self.pending.clear();
        self.pending_compaction = None;
        self.staged = marks;
        self.meta_dirty = meta.keys().cloned().collect();
        self.meta = meta;
    }
}

/// The multi-version key-value store of one member.
pub struct Mvcc {
    db: Database,
    /// The database directory, for on-disk size.
    path: Option<std::path::PathBuf>,
    meta: Keyspace,
    state: RwLock<State>,
    /// Snapshot bodies received from a leader, by raft index, not yet restored.
    incoming: parking_lot::Mutex<BTreeMap<u64, Received>>,
    /// Compactions carried out and not yet reported.
    compactions: parking_lot::Mutex<Vec<Compacted>>,
    /// Read views alive now (`etcd_mvcc_db_open_read_transactions`).
    open_reads: std::sync::atomic::AtomicI64,
    /// The published revision, for callers that wait for a change (locks,
    /// elections).
    published_tx: tokio::sync::watch::Sender<i64>,
}

impl Mvcc {
    /// Opens the store in `db`, rebuilding the key index from the `kv` keyspace.
    ///
    /// # Errors
    ///
    /// Storage errors, or a record that does not decode.
    pub fn open(db: Database, path: Option<&std::path::Path>) -> Result<Self> {
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        let kv_name = match meta.get(META_KV_KEYSPACE)? {
            Some(v) => String::from_utf8(v.to_vec()).map_err(|_| Error::Corrupt("bad kv keyspace name".into()))?,
            None => FIRST_KV_KEYSPACE.to_string(),
        };
        let kv = db.keyspace(&kv_name, KeyspaceCreateOptions::default)?;
        // Bodies received but never restored, and keyspaces a restore
        // replaced just before a crash: nothing refers to them.
        for name in db.list_keyspace_names() {
            let name: &str = &name;
            let records = name == FIRST_KV_KEYSPACE || name.starts_with(RECEIVED_KV_PREFIX);
            if records && name != kv_name {
                tracing::info!(keyspace = name, "removing an unused snapshot keyspace");
                db.delete_keyspace(db.keyspace(name, KeyspaceCreateOptions::default)?)?;
            }
        }
        let read_i64 = |k: &[u8]| -> Result<Option<i64>> {
            Ok(meta.get(k)?.map(|v| decode_u64(&v).map(|x| x as i64)).transpose()?)
        };
        let marks = Marks {
            current: read_i64(META_CURRENT)?.unwrap_or(1),
            compacted: read_i64(META_COMPACTED)?.unwrap_or(0),
            applied: read_i64(META_APPLIED)?.unwrap_or(0) as u64,
        };
        let mut st = State {
            kv: kv.clone(),
            retired: Vec::new(),
            generation: 0,
            restoring: false,
            index: KeyIndex::default(),
            published: marks,
            staged: marks,
            pending: BTreeMap::new(),
            pending_compaction: None,
            meta: BTreeMap::new(),
            meta_dirty: Vec::new(),
            size: 0,
        };
        for item in kv.iter() {
            let (k, v) = item.into_inner()?;
            let rev = Revision::from_key(&k).ok_or_else(|| Error::Corrupt("bad kv key".into()))?;
            let rec = KvRecord::decode(v.as_ref()).map_err(|e| Error::Corrupt(e.to_string()))?;
            st.size += v.len() as u64;
            st.index.restore(&rec.key, version_of(rev, &rec));
        }
        for item in meta.prefix(META_APP_PREFIX) {
            let (k, v) = item.into_inner()?;
            let name = String::from_utf8_lossy(&k[META_APP_PREFIX.len()..]).into_owned();
            st.meta.insert(name, v.to_vec());
        }
        let store = Self {
            db,
            path: path.map(|p| p.to_path_buf()),
            meta,
            state: RwLock::new(st),
            incoming: Default::default(),
            compactions: Default::default(),
            open_reads: Default::default(),
            published_tx: tokio::sync::watch::Sender::new(0),
        };
        // A crash can fall between a compaction's commit and the removal of its
        // records: finish the removal now.
        if marks.compacted > 0 {
            let mut st = store.state.write();
            st.pending_compaction = Some(marks.compacted);
            store.carry_out_compaction(&mut st)?;
        }
        Ok(store)
    }

    /// The database this store lives in (shared with the raft log).
    pub fn db_handle(&self) -> Database {
        self.db.clone()
    }

    /// The marks apply has reached (equal to the published ones between batches).
    pub fn staged_marks(&self) -> Marks {
        self.state.read().staged
    }

    /// All replicated metadata, as staged.
    pub fn all_meta(&self) -> BTreeMap<String, Vec<u8>> {
        self.state.read().meta.clone()
    }

    /// The published marks: what a reader sees right now.
    pub fn marks(&self) -> Marks {
        self.state.read().published
    }

    /// Logical size of the retained records, in bytes.
    pub fn size_in_use(&self) -> u64 {
        self.state.read().size
    }

    /// Bytes the database's files occupy on disk. Counted in allocated
    /// blocks: fjall preallocates its journal sparsely, and its apparent size
    /// would overstate the store by tens of megabytes.
    pub fn disk_size(&self) -> u64 {
        self.path.as_deref().map(allocated_bytes).unwrap_or(0)
    }

    /// Rewrites the `kv` keyspace's files, reclaiming the space of removed
    /// records (etcd's defragment).
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn defragment(&self) -> Result<()> {
        let kv = self.state.read().kv.clone();
        kv.major_compact()?;
        Ok(())
    }

    /// Every live key that has a lease, with the lease, as of the staged
    /// state (for rebuilding the lessor at startup or after a snapshot).
    pub fn leased_keys(&self) -> Vec<(Vec<u8>, i64)> {
        let st = self.state.read();
        let mut out = Vec::new();
        st.index.visit(&KeyRange::From(Vec::new()), st.staged.current, |k, v| {
            if v.lease != 0 {
                out.push((k.to_vec(), v.lease));
            }
            true
        });
        out
    }

    /// Replicated metadata entries whose names start with `prefix`.
    pub fn meta_with_prefix(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let st = self.state.read();
        st.meta
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Removes a replicated metadata value; persisted with the next batch.
    pub fn remove_meta(&self, name: &str) {
        let mut st = self.state.write();
        st.meta.remove(name);
        st.meta_dirty.push(name.to_string());
    }

    /// Number of keys with a retained version.
    pub fn key_count(&self) -> usize {
        self.state.read().index.key_count()
    }

    /// A replicated metadata value set through [`Mvcc::set_meta`].
    pub fn meta(&self, name: &str) -> Option<Vec<u8>> {
        self.state.read().meta.get(name).cloned()
    }

    /// Reads `range` at the published revision (or `opts.rev`).
    ///
    /// # Errors
    ///
    /// [`Error::Compacted`] or [`Error::FutureRevision`] for a revision out of
    /// the retained history; storage errors.
    pub fn range(&self, range: &KeyRange, opts: RangeOpts) -> Result<RangeResult> {
        self.read().range(range, opts)
    }

    /// A consistent read view at the published revision, for requests that
    /// read more than once (read-only txns). It holds no lock: values come
    /// from a storage snapshot taken with the marks, and each read takes the
    /// store lock only to walk the in-memory key index.
    pub fn read(&self) -> ReadTxn<'_> {
        let st = self.state.read();
        self.open_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ReadTxn {
            mvcc: self,
            marks: st.published,
            generation: st.generation,
            kv: st.kv.clone(),
            snapshot: self.db.snapshot(),
        }
    }

    /// Read views alive now.
    pub fn open_reads(&self) -> i64 {
        self.open_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts a write transaction for apply. Only the apply thread writes.
    pub fn write(&self) -> WriteTxn<'_> {
        let st = self.state.write();
        let begin = st.staged.current;
        WriteTxn { mvcc: self, st, begin, sub: 0, lease_moves: Vec::new() }
    }

    /// Applies a mirrored revision: `records` are the source's changes of
    /// revision `rev`, kept as they are (sub-revisions, create revision,
    /// version, lease). The store's revision becomes `rev`. Returns the lease
    /// changes, or `None` if `rev` is not above the current revision (a
    /// retried batch).
    pub fn apply_revision(&self, rev: i64, records: Vec<KvRecord>) -> Option<Vec<LeaseMove>> {
        let mut st = self.state.write();
        if rev <= st.staged.current {
            return None;
        }
        let mut moves = Vec::new();
        for mut rec in records {
            rec.main = rev;
            let from = st.index.get(&rec.key, rev).map_or(0, |v| v.lease);
            let to = if rec.tombstone { 0 } else { rec.lease };
            if from != to {
                moves.push(LeaseMove { key: rec.key.clone(), from, to });
            }
            let r = Revision::new(rev, rec.sub);
            st.index.restore(&rec.key, version_of(r, &rec));
            st.size += rec.encoded_len() as u64;
            st.pending.insert(r, rec);
        }
        st.staged.current = rev;
        Some(moves)
    }

    /// Validates and records a compaction at `rev`; it takes effect at publish.
    ///
    /// # Errors
    ///
    /// [`Error::Compacted`] if `rev` is not above the compact revision,
    /// [`Error::FutureRevision`] if it is past the current revision.
    pub fn compact(&self, rev: i64) -> Result<()> {
        let mut st = self.state.write();
        if rev <= st.staged.compacted {
            return Err(Error::Compacted);
        }
        if rev > st.staged.current {
            return Err(Error::FutureRevision);
        }
        st.staged.compacted = rev;
        st.pending_compaction = Some(rev);
        Ok(())
    }

    /// Sets a replicated metadata value (for the application above: members,
    /// alarms, ...). It is staged and persisted with the next batch.
    pub fn set_meta(&self, name: &str, value: Vec<u8>) {
        let mut st = self.state.write();
        st.meta.insert(name.to_string(), value);
        st.meta_dirty.push(name.to_string());
    }

    /// Marks raft entry `index` as applied; persisted with the data it produced.
    pub fn set_applied(&self, index: u64) {
        self.state.write().staged.applied = index;
    }

    /// Writes everything applied since the last publish into `batch`: new
    /// records, the marks and dirty metadata, so they commit atomically.
    pub fn stage(&self, batch: &mut OwnedWriteBatch) {
        let mut st = self.state.write();
        for (rev, rec) in &st.pending {
            batch.insert(&st.kv, rev.to_key().to_vec(), rec.encode_to_vec());
        }
        let marks = st.staged;
        batch.insert(&self.meta, META_CURRENT, (marks.current as u64).to_be_bytes().to_vec());
        batch.insert(&self.meta, META_COMPACTED, (marks.compacted as u64).to_be_bytes().to_vec());
        batch.insert(&self.meta, META_APPLIED, marks.applied.to_be_bytes().to_vec());
        for name in std::mem::take(&mut st.meta_dirty) {
            let mut key = META_APP_PREFIX.to_vec();
            key.extend_from_slice(name.as_bytes());
            match st.meta.get(&name) {
                Some(v) => batch.insert(&self.meta, key, v.clone()),
                None => batch.remove(&self.meta, key),
            }
        }
    }

    /// Makes staged changes visible to readers. Call only after the batch from
    /// [`Mvcc::stage`] has committed. A pending compaction is carried out here.
    ///
    /// # Errors
    ///
    /// Storage errors while removing compacted records.
    ///
    /// Returns the records that became visible, in revision order: the
    /// change feed for watchers.
    pub fn publish(&self) -> Result<Vec<KvRecord>> {
        let mut st = self.state.write();
        let published = std::mem::take(&mut st.pending).into_values().collect();
        st.published = st.staged;
        st.restoring = false;
        for old in std::mem::take(&mut st.retired) {
            // Readers still on it keep it open until they finish.
            self.db.delete_keyspace(old)?;
        }
        self.carry_out_compaction(&mut st)?;
        self.published_tx.send_replace(st.published.current);
        Ok(published)
    }

    /// Follows the published revision: it changes after every publish.
    pub fn published(&self) -> tokio::sync::watch::Receiver<i64> {
        self.published_tx.subscribe()
    }

    /// Published changes with main revision in `from..=to`, in revision
    /// order, at most `limit` whole revisions (a revision's changes are never
    /// split).
    ///
    /// # Errors
    ///
    /// [`Error::Compacted`] if `from` is below the compact revision, since
    /// those changes are gone; storage errors.
    pub fn history(&self, from: i64, to: i64, limit: usize) -> Result<Vec<KvRecord>> {
        // The lock only for the marks and a matching storage snapshot; the
        // scan runs without it, so apply goes on meanwhile.
        let (published, kv, snapshot) = {
            let st = self.state.read();
            if st.restoring {
                return Err(Error::Compacted);
            }
            (st.published, st.kv.clone(), self.db.snapshot())
        };
        if from < published.compacted {
            return Err(Error::Compacted);
        }
        let to = to.min(published.current);
        let mut out: Vec<KvRecord> = Vec::new();
        if from > to {
            return Ok(out);
        }
        let (lo, hi) = (Revision::new(from, 0).to_key(), Revision::new(to + 1, 0).to_key());
        let mut revisions = 0;
        for item in snapshot.range(&kv, lo.as_slice()..hi.as_slice()) {
            let (k, v) = item.into_inner()?;
            let rec = decode_record(&k, &v)?;
            if out.last().is_none_or(|last| last.main != rec.main) {
                if revisions == limit {
                    break;
                }
                revisions += 1;
            }
            out.push(rec);
        }
        Ok(out)
    }

    fn carry_out_compaction(&self, st: &mut State) -> Result<()> {
        let Some(at) = st.pending_compaction.take() else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let removed = st.index.compact(at);
        let index = started.elapsed();
        if removed.is_empty() {
            self.compactions.lock().push(Compacted { keys: 0, index, total: started.elapsed() });
            return Ok(());
        }
        let mut batch = self.db.batch();
        for rev in &removed {
            let key = rev.to_key();
            if let Some(len) = st.kv.size_of(key)? {
                st.size = st.size.saturating_sub(u64::from(len));
            }
            batch.remove(&st.kv, key.to_vec());
        }
        batch.commit()?;
        tracing::debug!(at, removed = removed.len(), "compacted");
        self.compactions.lock().push(Compacted { keys: removed.len() as u64, index, total: started.elapsed() });
        Ok(())
    }

    /// The compactions carried out since the last call (for metrics).
    pub fn take_compactions(&self) -> Vec<Compacted> {
        std::mem::take(&mut *self.compactions.lock())
    }

    /// Every retained record with its revision, for a snapshot; with the
    /// published marks and metadata they were read at.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn export(&self) -> Result<(Marks, Vec<KvRecord>, BTreeMap<String, Vec<u8>>)> {
        let mut records = Vec::new();
        let (marks, meta) = self.export_each(|_, rec| {
            records.push(rec);
            true
        })?;
        Ok((marks, records, meta))
    }

    /// Hands every retained record to `each`, in revision order, with the
    /// published marks of the one store snapshot it reads, without holding the
    /// store lock or the whole history; stops early when `each` returns
    /// false. Returns the marks and the metadata of that snapshot. For long
    /// scans: call it from a blocking thread.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn export_each(
        &self,
        mut each: impl FnMut(&Marks, KvRecord) -> bool,
    ) -> Result<(Marks, BTreeMap<String, Vec<u8>>)> {
        let image = self.settled_image()?;
        image.for_each(|rec| each(&image.marks, rec))?;
        Ok((image.marks, image.meta))
    }

    /// Replaces the whole store with a snapshot's contents, staged into
    /// `batch`; visible after [`Mvcc::publish`].
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn import(
        &self,
        marks: Marks,
        records: Vec<KvRecord>,
        meta: BTreeMap<String, Vec<u8>>,
        batch: &mut OwnedWriteBatch,
    ) -> Result<()> {
        let mut st = self.state.write();
        let kv = st.kv.clone();
        for item in kv.iter() {
            batch.remove(&kv, item.key()?);
        }
        for item in self.meta.prefix(META_APP_PREFIX) {
            batch.remove(&self.meta, item.key()?);
        }
        let mut index = KeyIndex::default();
        let mut size = 0;
        for rec in records {
            let rev = Revision::new(rec.main, rec.sub);
            let bytes = rec.encode_to_vec();
            size += bytes.len() as u64;
            index.restore(&rec.key, version_of(rev, &rec));
            batch.insert(&kv, rev.to_key().to_vec(), bytes);
        }
        st.replace_store(index, size, marks, meta);
        drop(st);
        self.stage(batch);
        Ok(())
    }

    /// Drops every revision after `to`, staged into `batch`: the store
    /// becomes what it was at `to`, with its history up to there (a rejoin
    /// rewinds a failed primary to the fence). Readers see `Compacted`
    /// until the batch is published, and a read view begun before fails the
    /// same way after.
    ///
    /// # Errors
    ///
    /// [`Error::Compacted`] if `to` is below the compact revision (the
    /// history to rewind through is gone); storage errors.
    pub fn rewind(&self, to: i64, batch: &mut OwnedWriteBatch) -> Result<()> {
        let mut st = self.state.write();
        if to < st.staged.compacted {
            return Err(Error::Compacted);
        }
        if to >= st.staged.current {
            return Ok(());
        }
        st.pending.retain(|rev, _| rev.main <= to);
        let kv = st.kv.clone();
        let cut = Revision::new(to + 1, 0).to_key();
        let mut index = KeyIndex::default();
        let mut size = 0;
        for item in kv.iter() {
            let (k, v) = item.into_inner()?;
            if k.as_ref() >= cut.as_slice() {
                batch.remove(&kv, k.to_vec());
                continue;
            }
            let rec = decode_record(&k, &v)?;
            size += v.len() as u64;
            index.restore(&rec.key, version_of(Revision::new(rec.main, rec.sub), &rec));
        }
        for (rev, rec) in &st.pending {
            size += rec.encoded_len() as u64;
            index.restore(&rec.key, version_of(*rev, rec));
        }
        st.index = index;
        st.size = size;
        st.staged.current = to;
        st.restoring = true;
        st.generation += 1;
        Ok(())
    }

    /// Walks the index for `range` at `opts.rev` (or `current`): the
    /// versions to return (at most the limit) and the full count.
    fn visit_in(
        st: &State,
        range: &KeyRange,
        opts: RangeOpts,
        current: i64,
        compacted: i64,
    ) -> Result<(Vec<(Vec<u8>, Version)>, usize)> {
        let at = if opts.rev <= 0 { current } else { opts.rev };
        if at > current {
            return Err(Error::FutureRevision);
        }
        if at < compacted {
            return Err(Error::Compacted);
        }
        let mut hits = Vec::new();
        st.index.visit(range, at, |key, v| {
            hits.push((key.to_vec(), v));
            true
        });
        let count = hits.len();
        if opts.count_only {
            hits.clear();
        }
        let take = if opts.limit == 0 { count } else { opts.limit.min(count) };
        hits.truncate(take);
        Ok((hits, count))
    }

    /// Builds a read's answer from index hits, loading each value with `load`.
    fn answer(
        hits: Vec<(Vec<u8>, Version)>,
        count: usize,
        current: i64,
        mut load: impl FnMut(Revision) -> Result<KvRecord>,
    ) -> Result<RangeResult> {
        let mut kvs = Vec::with_capacity(hits.len());
        for (key, v) in hits {
            let value = load(v.rev)?.value;
            kvs.push(KeyValue {
                key,
                create_revision: v.create,
                mod_revision: v.rev.main,
                version: v.version,
                value,
                lease: v.lease,
            });
        }
        Ok(RangeResult { kvs, count, rev: current })
    }

    fn load(&self, st: &State, rev: Revision) -> Result<KvRecord> {
        if let Some(rec) = st.pending.get(&rev) {
            return Ok(rec.clone());
        }
        decode_stored(rev, st.kv.get(rev.to_key())?)
    }
}

/// A read-only view at one published revision.
pub struct ReadTxn<'a> {
    mvcc: &'a Mvcc,
    marks: Marks,
    /// The store's restore count when the view began.
    generation: u64,
    /// The records keyspace and the storage as of `marks`: every published
    /// record, whatever apply writes meanwhile.
    kv: Keyspace,
    snapshot: fjall::Snapshot,
}

impl Drop for ReadTxn<'_> {
    fn drop(&mut self) {
        self.mvcc.open_reads.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ReadTxn<'_> {
    /// The revision this view reads at.
    pub fn rev(&self) -> i64 {
        self.marks.current
    }

    /// The compact revision as of this view.
    pub fn compacted(&self) -> i64 {
        self.marks.compacted
    }

    /// Reads `range` in this view. The store lock is held only while the
    /// in-memory index is walked; values are read from the snapshot after.
    ///
    /// # Errors
    ///
    /// As [`Mvcc::range`]; also [`Error::Compacted`] when a compaction since
    /// this view began removed the revision it reads at.
    pub fn range(&self, range: &KeyRange, opts: RangeOpts) -> Result<RangeResult> {
        let current = self.marks.current;
        let (hits, count) = {
            let st = self.mvcc.state.read();
            if st.generation != self.generation || st.restoring {
                // A snapshot replaced the store under this view: what it
                // read at is gone, as after a compaction.
                return Err(Error::Compacted);
            }
            Mvcc::visit_in(&st, range, opts, current, self.marks.compacted.max(st.published.compacted))?
        };
        Mvcc::answer(hits, count, current, |rev| decode_stored(rev, self.snapshot.get(&self.kv, rev.to_key())?))
    }
}

/// One write transaction: every change gets the same main revision and the
/// next sub revision. Reads inside it see its own earlier writes, as etcd's do.
pub struct WriteTxn<'a> {
    mvcc: &'a Mvcc,
    st: RwLockWriteGuard<'a, State>,
    begin: i64,
    sub: i64,
    lease_moves: Vec<LeaseMove>,
}

/// A key whose lease changed in a write: attached to `to`, detached from
/// `from` (0 is no lease). The lessor keeps its key sets from these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseMove {
    pub key: Vec<u8>,
    pub from: i64,
    pub to: i64,
}

impl WriteTxn<'_> {
    /// The revision a read inside this transaction sees: the transaction's own
    /// revision once it has written something, else the one it began at.
    pub fn rev(&self) -> i64 {
        if self.sub > 0 {
            self.begin + 1
        } else {
            self.begin
        }
    }

    /// The compact revision as of this transaction.
    pub fn compacted(&self) -> i64 {
        self.st.staged.compacted
    }

    /// Reads as of this transaction.
    ///
    /// # Errors
    ///
    /// As [`Mvcc::range`].
    pub fn range(&self, range: &KeyRange, opts: RangeOpts) -> Result<RangeResult> {
        let rev = self.rev();
        let (hits, count) = Mvcc::visit_in(&self.st, range, opts, rev, self.st.staged.compacted)?;
        Mvcc::answer(hits, count, rev, |r| self.mvcc.load(&self.st, r))
    }

    /// Puts `key` = `value` and returns the revision it was written at.
    pub fn put(&mut self, key: &[u8], value: Vec<u8>, lease: i64) -> i64 {
        let from = self.st.index.get(key, self.begin + 1).map_or(0, |v| v.lease);
        if from != lease {
            self.lease_moves.push(LeaseMove { key: key.to_vec(), from, to: lease });
        }
        let rev = self.next_rev();
        let v = self.st.index.put(key, rev, lease);
        let rec = KvRecord {
            key: key.to_vec(),
            main: rev.main,
            sub: rev.sub,
            tombstone: false,
            value,
            create_revision: v.create,
            version: v.version,
            lease,
        };
        self.st.size += rec.encoded_len() as u64;
        self.st.pending.insert(rev, rec);
        rev.main
    }

    /// Deletes every live key in `range`; returns the deleted key-values as
    /// they were just before.
    ///
    /// # Errors
    ///
    /// Storage errors while loading the previous values.
    pub fn delete_range(&mut self, range: &KeyRange) -> Result<Vec<KeyValue>> {
        let prev = self.range(range, RangeOpts::default())?.kvs;
        for kv in &prev {
            if kv.lease != 0 {
                self.lease_moves.push(LeaseMove { key: kv.key.clone(), from: kv.lease, to: 0 });
            }
            let rev = self.next_rev();
            self.st.index.tombstone(&kv.key, rev);
            let rec =
                KvRecord { key: kv.key.clone(), main: rev.main, sub: rev.sub, tombstone: true, ..Default::default() };
            self.st.size += rec.encoded_len() as u64;
            self.st.pending.insert(rev, rec);
        }
        Ok(prev)
    }

    /// The lease changes this transaction made so far.
    pub fn take_lease_moves(&mut self) -> Vec<LeaseMove> {
        std::mem::take(&mut self.lease_moves)
    }

    fn next_rev(&mut self) -> Revision {
        let rev = Revision::new(self.begin + 1, self.sub);
        self.sub += 1;
        rev
    }

    /// Ends the transaction; the store's revision moves on if it wrote
    /// anything. Returns the revision after the transaction.
    pub fn end(mut self) -> i64 {
        let rev = self.rev();
        self.st.staged.current = rev;
        rev
    }
}

/// The record stored at `rev`, as read from storage.
fn decode_stored(rev: Revision, bytes: Option<fjall::Slice>) -> Result<KvRecord> {
    let bytes = bytes.ok_or_else(|| Error::Corrupt(format!("index names revision {rev} but no record is stored")))?;
    KvRecord::decode(bytes.as_ref()).map_err(|e| Error::Corrupt(e.to_string()))
}

/// A stored record with its revision, which the key holds.
fn decode_record(key: &[u8], value: &[u8]) -> Result<KvRecord> {
    let rev = Revision::from_key(key).ok_or_else(|| Error::Corrupt("bad kv key".into()))?;
    let mut rec = KvRecord::decode(value).map_err(|e| Error::Corrupt(e.to_string()))?;
    rec.main = rev.main;
    rec.sub = rev.sub;
    Ok(rec)
}

fn version_of(rev: Revision, rec: &KvRecord) -> Version {
    Version { rev, create: rec.create_revision, version: rec.version, lease: rec.lease, tombstone: rec.tombstone }
}

fn allocated_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

fn decode_u64(v: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = v.try_into().map_err(|_| Error::Corrupt("bad u64 in meta".into()))?;
    Ok(u64::from_be_bytes(arr))
}
