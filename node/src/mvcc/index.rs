//! The in-memory key index: for every user key, the revisions at which it
//! changed. It is rebuilt from the `kv` keyspace when a member starts, and it
//! answers "which revision of key K is visible at revision R" without reading
//! any value from disk.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::Revision;

/// One change of a key, without its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    /// The revision of this change; its `main` is the key's mod_revision.
    pub rev: Revision,
    /// Main revision of the put that created this generation of the key.
    pub create: i64,
    /// Number of puts since creation (1 for the creating put); 0 for a tombstone.
    pub version: i64,
    /// Lease attached by this put (0 for none).
    pub lease: i64,
    /// True when this change deleted the key.
    pub tombstone: bool,
}

/// Which keys a request names, decoded from etcd's `key`/`range_end` pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyRange {
    /// Exactly one key (`range_end` empty).
    Single(Vec<u8>),
    /// `[start, end)`; empty when `end <= start`.
    Span(Vec<u8>, Vec<u8>),
    /// Every key `>= start` (`range_end` is the single byte `\0`).
    From(Vec<u8>),
}

impl KeyRange {
    /// Decodes etcd's convention for `key` and `range_end`.
    pub fn new(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => KeyRange::Single(key.to_vec()),
            [0] => KeyRange::From(key.to_vec()),
            end => KeyRange::Span(key.to_vec(), end.to_vec()),
        }
    }

    /// True if `key` falls inside the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            KeyRange::Single(k) => k.as_slice() == key,
            KeyRange::Span(start, end) => start.as_slice() <= key && key < end.as_slice(),
            KeyRange::From(start) => start.as_slice() <= key,
        }
    }

    /// The start key, inclusive.
    pub fn start(&self) -> &[u8] {
        match self {
            KeyRange::Single(k) | KeyRange::Span(k, _) | KeyRange::From(k) => k,
        }
    }

    /// The end of the range as an optional exclusive bound (`None` is unbounded).
    pub fn end(&self) -> Option<&[u8]> {
        match self {
            KeyRange::Single(_) | KeyRange::From(_) => None,
            KeyRange::Span(_, end) => Some(end),
        }
    }
}

/// Every key's history, ordered by key.
#[derive(Default, Debug)]
pub struct KeyIndex {
    keys: BTreeMap<Vec<u8>, Vec<Version>>,
}

impl KeyIndex {
    /// Number of keys with at least one retained version.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Records a put of `key` at `rev` and returns the version written.
    pub fn put(&mut self, key: &[u8], rev: Revision, lease: i64) -> Version {
        // Look up before inserting: most puts hit an existing key, and
        // `entry` would allocate the key each time.
        if !self.keys.contains_key(key) {
            self.keys.insert(key.to_vec(), Vec::new());
        }
        let history = self.keys.get_mut(key).expect("inserted above");
        let version = match history.last() {
            Some(last) if !last.tombstone => {
                Version { rev, create: last.create, version: last.version + 1, lease, tombstone: false }
            }
            _ => Version { rev, create: rev.main, version: 1, lease, tombstone: false },
        };
        history.push(version);
        version
    }

    /// Records a deletion of `key` at `rev`. Returns false, and records
    /// nothing, if the key is not live.
    pub fn tombstone(&mut self, key: &[u8], rev: Revision) -> bool {
        match self.keys.get_mut(key) {
            Some(history) if history.last().is_some_and(|v| !v.tombstone) => {
                history.push(Version { rev, create: 0, version: 0, lease: 0, tombstone: true });
                true
            }
            _ => false,
        }
    }

    /// Replays one stored change while rebuilding the index at startup.
    pub fn restore(&mut self, key: &[u8], v: Version) {
        self.keys.entry(key.to_vec()).or_default().push(v);
    }

    /// The version of `key` visible at main revision `at`, if the key is live there.
    pub fn get(&self, key: &[u8], at: i64) -> Option<Version> {
        visible(self.keys.get(key)?, at)
    }

    /// Calls `f` for every key in `range` that is live at revision `at`, in key
    /// order, until `f` returns false.
    pub fn visit(&self, range: &KeyRange, at: i64, mut f: impl FnMut(&[u8], Version) -> bool) {
        let mut each = |key: &Vec<u8>, history: &Vec<Version>| match visible(history, at) {
            Some(v) => f(key, v),
            None => true,
        };
        match range {
            KeyRange::Single(key) => {
                if let Some(history) = self.keys.get(key) {
                    each(key, history);
                }
            }
            KeyRange::Span(start, end) => {
                if end <= start {
                    return;
                }
                let bounds = (Bound::Included(start.as_slice()), Bound::Excluded(end.as_slice()));
                for (key, history) in self.keys.range::<[u8], _>(bounds) {
                    if !each(key, history) {
                        return;
                    }
                }
            }
            KeyRange::From(start) => {
                for (key, history) in self.keys.range::<[u8], _>((Bound::Included(start.as_slice()), Bound::Unbounded))
                {
                    if !each(key, history) {
                        return;
                    }
                }
            }
        }
    }

    /// Drops every version that no read at a revision `>= at` can see, and
    /// returns the revisions dropped so their records can be removed from disk.
    ///
    /// For each key the newest version at or below `at` is kept, unless it is a
    /// tombstone: a read at `at` sees the key as absent either way.
    pub fn compact(&mut self, at: i64) -> Vec<Revision> {
        let mut removed = Vec::new();
        self.keys.retain(|_, history| {
            let seen = history.partition_point(|v| v.rev.main <= at);
            if seen == 0 {
                return true;
            }
            let keep_from = if history[seen - 1].tombstone { seen } else { seen - 1 };
            removed.extend(history.drain(..keep_from).map(|v| v.rev));
            !history.is_empty()
        });
        removed
    }
}

fn visible(history: &[Version], at: i64) -> Option<Version> {
    let seen = history.partition_point(|v| v.rev.main <= at);
    let v = *history.get(seen.checked_sub(1)?)?;
    (!v.tombstone).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(main: i64) -> Revision {
        Revision::new(main, 0)
    }

    fn live(index: &KeyIndex, range: &KeyRange, at: i64) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        index.visit(range, at, |k, v| {
            out.push((String::from_utf8_lossy(k).into_owned(), v.rev.main));
            true
        });
        out
    }

    #[test]
    fn versions_count_per_generation() {
        let mut ix = KeyIndex::default();
        assert_eq!(ix.put(b"a", r(2), 0).version, 1);
        let v = ix.put(b"a", r(3), 7);
        assert_eq!((v.create, v.version, v.lease), (2, 2, 7));
        assert!(ix.tombstone(b"a", r(4)));
        assert!(!ix.tombstone(b"a", r(5)), "deleting a deleted key is a no-op");
        let v = ix.put(b"a", r(6), 0);
        assert_eq!((v.create, v.version), (6, 1), "a new generation starts at version 1");
        assert_eq!(ix.get(b"a", 1), None);
        assert_eq!(ix.get(b"a", 3).map(|v| v.version), Some(2));
        assert_eq!(ix.get(b"a", 4), None);
        assert_eq!(ix.get(b"a", 5), None);
        assert_eq!(ix.get(b"a", 100).map(|v| v.rev.main), Some(6));
    }

    #[test]
    fn key_ranges() {
        let mut ix = KeyIndex::default();
        for (i, k) in ["a", "ab", "b", "c"].iter().enumerate() {
            ix.put(k.as_bytes(), r(i as i64 + 2), 0);
        }
        let table: &[(&[u8], &[u8], &[&str])] = &[
            (b"a", b"", &["a"]),
            (b"a", b"b", &["a", "ab"]),
            (b"ab", b"\0", &["ab", "b", "c"]),
            (b"\0", b"\0", &["a", "ab", "b", "c"]),
            (b"c", b"a", &[]),
            (b"b", b"b", &[]),
            (b"zz", b"", &[]),
        ];
        for (key, end, want) in table {
            let got: Vec<String> = live(&ix, &KeyRange::new(key, end), 100).into_iter().map(|(k, _)| k).collect();
            assert_eq!(&got, want, "key={key:?} end={end:?}");
        }
        assert_eq!(live(&ix, &KeyRange::new(b"\0", b"\0"), 3).len(), 2, "reads see only revisions <= at");
    }

    #[test]
    fn compaction_keeps_what_reads_at_or_after_it_need() {
        let mut ix = KeyIndex::default();
        ix.put(b"a", r(2), 0);
        ix.put(b"a", r(3), 0);
        ix.tombstone(b"a", r(4));
        ix.put(b"a", r(5), 0);
        ix.put(b"b", r(6), 0);
        ix.tombstone(b"b", r(7));

        assert_eq!(ix.compact(3), vec![r(2)]);
        assert_eq!(ix.get(b"a", 3).map(|v| v.rev.main), Some(3));

        let mut removed = ix.compact(4);
        removed.sort();
        assert_eq!(removed, vec![r(3), r(4)], "the tombstone at the compact revision goes too");
        assert_eq!(ix.get(b"a", 4), None);
        assert_eq!(ix.get(b"a", 5).map(|v| (v.create, v.version)), Some((5, 1)));

        assert_eq!(ix.compact(7), vec![r(6), r(7)]);
        assert_eq!(ix.key_count(), 1, "a key whose last change was a compacted delete is gone");
    }
}
