//! etcd's HashKV over the store, so a member and an etcd cluster with the
//! same history report the same hash.

use fjall::Readable;
use meridian_proto::mvccpb::KeyValue;
use prost::Message;

use super::{decode_record, Mvcc};
use crate::error::{Error, Result};
use crate::mvcc::index::KeyRange;
use crate::mvcc::Revision;

impl Mvcc {
    /// etcd's HashKV: CRC-32C over records as etcd's backend stores them
    /// (key `main ‖ '_' ‖ sub`, plus `t` for a delete; value the encoded
    /// `mvccpb.KeyValue`), after the bucket name `key`. Like etcd it takes
    /// every record in `(compacted, rev]`, and of those at or below the
    /// compact revision only the ones still visible at `rev` (all of them if
    /// none is). Compaction keeps the same records as etcd's, so a member and
    /// an etcd cluster with the same history report the same hash. Returns
    /// the hash, the compact revision and the current revision.
    ///
    /// # Errors
    ///
    /// [`Error::FutureRevision`]; [`Error::Compacted`] for a revision at or
    /// below the compact revision (etcd refuses the compact revision itself
    /// here, unlike for a read; 0, the current revision, is always served);
    /// storage errors.
    pub fn hash_kv(&self, rev: i64) -> Result<(u32, i64, i64)> {
        // Under the lock: the marks, what is visible, and a storage snapshot
        // matching them; the scan itself runs without it, so apply goes on.
        let (marks, rev, visible, any_visible, snapshot) = {
            let st = self.state.read();
            if st.restoring {
                return Err(Error::Compacted);
            }
            let marks = st.published;
            if rev > 0 && rev <= marks.compacted {
                return Err(Error::Compacted);
            }
            if rev > marks.current {
                return Err(Error::FutureRevision);
            }
            let rev = if rev <= 0 { marks.current } else { rev };
            // Visible at `rev` and at or below the compact revision; and whether
            // any key is visible at `rev` at all (if none, etcd filters nothing).
            let (mut visible, mut any_visible) = (std::collections::HashSet::new(), false);
            st.index.visit(&KeyRange::From(Vec::new()), rev, |_, v| {
                any_visible = true;
                if v.rev.main <= marks.compacted {
                    visible.insert(v.rev);
                }
                true
            });
            (marks, rev, visible, any_visible, (st.kv.clone(), self.db.snapshot()))
        };
        let (kv, snapshot) = snapshot;
        let mut crc = crc32c::crc32c(b"key");
        let mut value = Vec::new();
        let upper = Revision::new(rev + 1, 0).to_key();
        for item in snapshot.range(&kv, ..upper.as_slice()) {
            let (k, v) = item.into_inner()?;
            let r = Revision::from_key(&k).ok_or_else(|| Error::Corrupt("bad kv key".into()))?;
            if r.main <= marks.compacted && any_visible && !visible.contains(&r) {
                continue;
            }
            let rec = decode_record(&k, &v)?;
            let mut key = [0u8; 18];
            key[..8].copy_from_slice(&(r.main as u64).to_be_bytes());
            key[8] = b'_';
            key[9..17].copy_from_slice(&(r.sub as u64).to_be_bytes());
            let key_len = if rec.tombstone {
                key[17] = b't';
                18
            } else {
                17
            };
            let kv = if rec.tombstone {
                KeyValue { key: rec.key, ..Default::default() }
            } else {
                KeyValue {
                    key: rec.key,
                    create_revision: rec.create_revision,
                    mod_revision: r.main,
                    version: rec.version,
                    value: rec.value,
                    lease: rec.lease,
                }
            };
            value.clear();
            kv.encode(&mut value).expect("a Vec grows");
            crc = crc32c::crc32c_append(crc, &key[..key_len]);
            crc = crc32c::crc32c_append(crc, &value);
        }
        Ok((crc, marks.compacted, marks.current))
    }
}
