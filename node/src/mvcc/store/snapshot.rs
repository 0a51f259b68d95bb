//! Raft snapshots of the store, without the records ever in memory.
//!
//! Leader: a [`StoreImage`] is the published state at one instant (marks,
//! metadata, and a storage snapshot of the records), read record by record
//! while it streams to a follower.
//!
//! Follower: [`Mvcc::ingest`] bulk-loads the incoming records into a
//! keyspace of their own, beside the live one, building the key index as
//! they pass; [`Mvcc::install`] then switches the store to that keyspace in
//! the restore's batch. Until that batch commits the old records stay the
//! store's, so a crash at any point leaves either the old state or the new
//! one; keyspaces nothing refers to are removed at the next start.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch, Readable};
use meridian_proto::meridian::v1::KvRecord;
use prost::Message;

use super::{decode_record, version_of, Marks, Mvcc, META_APP_PREFIX, META_KV_KEYSPACE, RECEIVED_KV_PREFIX};
use crate::error::{Error, Result};
use crate::mvcc::index::KeyIndex;
use crate::mvcc::Revision;

/// The published store at one instant.
pub struct StoreImage {
    pub marks: Marks,
    pub meta: BTreeMap<String, Vec<u8>>,
    kv: Keyspace,
    snapshot: fjall::Snapshot,
}

impl StoreImage {
    /// Hands every retained record to `each`, in revision order; stops
    /// early when `each` returns false. For long scans: call it from a
    /// blocking thread.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn for_each(&self, mut each: impl FnMut(KvRecord) -> bool) -> Result<()> {
        let upper = Revision::new(self.marks.current + 1, 0).to_key();
        for item in self.snapshot.range(&self.kv, ..upper.as_slice()) {
            let (k, v) = item.into_inner()?;
            if !each(decode_record(&k, &v)?) {
                break;
            }
        }
        Ok(())
    }
}

/// A snapshot body stored in a keyspace of its own, with its key index.
/// Dropped without being installed, it deletes its keyspace.
pub struct Received {
    db: Database,
    raft_index: u64,
    name: String,
    kv: Option<Keyspace>,
    index: KeyIndex,
    size: u64,
    /// The snapshot's replicated metadata, which came with the body.
    pub meta: BTreeMap<String, Vec<u8>>,
    /// How long making the body durable took.
    pub fsync: Duration,
}

impl Drop for Received {
    fn drop(&mut self) {
        if let Some(kv) = self.kv.take() {
            tracing::debug!(keyspace = %self.name, "discarding a received snapshot body");
            if let Err(e) = self.db.delete_keyspace(kv) {
                tracing::warn!(keyspace = %self.name, error = %e, "cannot delete a discarded snapshot keyspace");
            }
        }
    }
}

/// Bodies kept for restore at once, at most: raft restores the newest.
const KEPT: usize = 2;

impl Mvcc {
    /// An image of the published state. Cheap: the records are read later,
    /// from the storage snapshot it holds.
    pub fn image(&self) -> StoreImage {
        let st = self.state.read();
        StoreImage { marks: st.published, meta: st.meta.clone(), kv: st.kv.clone(), snapshot: self.db.snapshot() }
    }

    /// An image for export (a copy, Maintenance.Snapshot): refused while a
    /// raft snapshot is being restored, when the store is neither the old
    /// state nor the new one.
    ///
    /// # Errors
    ///
    /// [`Error::Compacted`] during a restore.
    pub fn settled_image(&self) -> Result<StoreImage> {
        if self.state.read().restoring {
            return Err(Error::Compacted);
        }
        Ok(self.image())
    }

    /// Stores the records of the snapshot at raft index `raft_index`, as
    /// they arrive in revision order, into a new keyspace by bulk ingestion
    /// (written straight to table files, which are fsynced before this
    /// returns). Only the key index is kept in memory.
    ///
    /// # Errors
    ///
    /// A record out of order or that does not decode (from the leader's
    /// `records`), or storage errors; the partial keyspace is deleted.
    pub fn ingest(&self, raft_index: u64, records: &mut dyn Iterator<Item = Result<KvRecord>>) -> Result<Received> {
        self.ingest_with(raft_index, &mut |push| {
            for rec in &mut *records {
                push(rec?)?;
            }
            Ok(())
        })
    }

    /// [`Mvcc::ingest`] from a source that pushes its records, in revision
    /// order, into the function `fill` is given (an etcd backend read page
    /// by page).
    ///
    /// # Errors
    ///
    /// As [`Mvcc::ingest`], and `fill`'s own.
    #[allow(clippy::type_complexity)]
    pub fn ingest_with(
        &self,
        raft_index: u64,
        fill: &mut dyn FnMut(&mut dyn FnMut(KvRecord) -> Result<()>) -> Result<()>,
    ) -> Result<Received> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let name = format!("{RECEIVED_KV_PREFIX}{raft_index}-{nanos}");
        let kv = self.db.keyspace(&name, KeyspaceCreateOptions::default)?;
        let mut received = Received {
            db: self.db.clone(),
            raft_index,
            name,
            kv: Some(kv.clone()),
            index: KeyIndex::default(),
            size: 0,
            meta: BTreeMap::new(),
            fsync: Duration::ZERO,
        };
        let mut ingestion = kv.start_ingestion()?;
        let mut last: Option<Vec<u8>> = None;
        let (size, index) = (&mut received.size, &mut received.index);
        fill(&mut |rec: KvRecord| {
            let rev = Revision::new(rec.main, rec.sub);
            let key = rev.to_key().to_vec();
            // Ingestion asserts ascending keys; a leader's stream is checked first.
            if last.as_ref().is_some_and(|l| key <= *l) {
                return Err(Error::Corrupt(format!("snapshot record at revision {rev} is out of order")));
            }
            let bytes = rec.encode_to_vec();
            *size += bytes.len() as u64;
            index.restore(&rec.key, version_of(rev, &rec));
            ingestion.write(key.clone(), bytes)?;
            last = Some(key);
            Ok(())
        })?;
        let started = Instant::now();
        ingestion.finish()?;
        received.fsync = started.elapsed();
        Ok(received)
    }

    /// Keeps a received body until [`Mvcc::install`] takes it. Bodies this
    /// member has applied past are dropped, and past [`KEPT`] the oldest.
    pub fn keep(&self, received: Received) {
        let applied = self.marks().applied;
        let mut incoming = self.incoming.lock();
        incoming.insert(received.raft_index, received);
        incoming.retain(|i, _| *i > applied);
        while incoming.len() > KEPT {
            incoming.pop_first();
        }
    }

    /// Received bodies kept for a restore.
    #[cfg(test)]
    pub(crate) fn kept_bodies(&self) -> usize {
        self.incoming.lock().len()
    }

    /// Switches the store to the body received for raft index
    /// `raft_index`, with the snapshot's marks and the body's metadata,
    /// staged into `batch`: visible after [`Mvcc::publish`], when the
    /// keyspace it replaces is deleted. Until then readers are refused
    /// (as after a compaction) rather than shown a mix of both. False when
    /// no such body was received.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn install(&self, raft_index: u64, marks: Marks, batch: &mut OwnedWriteBatch) -> Result<bool> {
        let (received, older) = {
            let mut incoming = self.incoming.lock();
            let Some(received) = incoming.remove(&raft_index) else { return Ok(false) };
            // Older bodies will never be restored now.
            let newer = incoming.split_off(&raft_index);
            (received, std::mem::replace(&mut *incoming, newer))
        };
        if !older.is_empty() {
            // Deleting a keyspace syncs files: not on the raft thread.
            std::thread::spawn(move || drop(older));
        }
        self.install_received(received, marks, batch)?;
        Ok(true)
    }

    /// Switches the store to `received`, as [`Mvcc::install`] does with a
    /// kept body (an imported etcd backend takes this way at first start).
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn install_received(&self, mut received: Received, marks: Marks, batch: &mut OwnedWriteBatch) -> Result<()> {
        let meta = std::mem::take(&mut received.meta);
        let kv = received.kv.take().expect("a kept body has its keyspace");
        let mut st = self.state.write();
        for item in self.meta.prefix(META_APP_PREFIX) {
            batch.remove(&self.meta, item.key()?);
        }
        batch.insert(&self.meta, META_KV_KEYSPACE, received.name.as_bytes().to_vec());
        let old = std::mem::replace(&mut st.kv, kv);
        st.retired.push(old);
        st.generation += 1;
        st.restoring = true;
        st.replace_store(std::mem::take(&mut received.index), received.size, marks, meta);
        drop(st);
        self.stage(batch);
        Ok(())
    }
}
