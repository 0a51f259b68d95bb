//! Store-level tests: revision arithmetic, reads in history, compaction, and
//! recovery after reopening the database.

use fjall::Database;

use super::*;
use crate::error::Error;

fn open(dir: &std::path::Path) -> Mvcc {
    Mvcc::open(Database::builder(dir).open().unwrap(), Some(dir)).unwrap()
}

/// Stages, commits and publishes everything applied so far, as the raft loop does.
fn commit(store: &Mvcc, db_applied: u64) {
    store.set_applied(db_applied);
    let mut batch = store_db(store).batch();
    store.stage(&mut batch);
    batch.commit().unwrap();
    store.publish().unwrap();
}

#[test]
fn publish_returns_the_change_feed_and_history_replays_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    put(&store, "a", "1"); // 2
    let mut txn = store.write();
    txn.put(b"b", b"1".to_vec(), 0);
    txn.delete_range(&KeyRange::new(b"a", b"")).unwrap();
    txn.end(); // 3
    store.set_applied(1);
    let mut batch = store.db_handle().batch();
    store.stage(&mut batch);
    batch.commit().unwrap();
    let feed = store.publish().unwrap();
    let seen: Vec<(i64, i64, bool)> = feed.iter().map(|r| (r.main, r.sub, r.tombstone)).collect();
    assert_eq!(seen, [(2, 0, false), (3, 0, false), (3, 1, true)]);
    let hist = store.history(2, 3, 100).unwrap();
    assert_eq!(hist, feed, "history equals what was published");
    assert_eq!(store.history(2, 3, 1).unwrap().len(), 1, "limit counts whole revisions");
    assert_eq!(store.history(3, 10, 100).unwrap().len(), 2, "a revision is never split");
    store.compact(3).unwrap();
    commit(&store, 2);
    assert!(matches!(store.history(2, 3, 100), Err(Error::Compacted)));
}

fn store_db(store: &Mvcc) -> Database {
    store.db_handle()
}

fn put(store: &Mvcc, key: &str, value: &str) -> i64 {
    let mut txn = store.write();
    txn.put(key.as_bytes(), value.as_bytes().to_vec(), 0);
    txn.end()
}

fn get(store: &Mvcc, key: &str, rev: i64) -> Result<Option<(String, i64, i64, i64)>, Error> {
    let r = store.range(&KeyRange::new(key.as_bytes(), b""), RangeOpts { rev, ..Default::default() })?;
    Ok(r.kvs
        .first()
        .map(|kv| (String::from_utf8_lossy(&kv.value).into_owned(), kv.create_revision, kv.mod_revision, kv.version)))
}

#[test]
fn revisions_advance_once_per_writing_txn() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.marks().current, 1, "an empty store is at revision 1, as etcd");
    assert_eq!(put(&store, "a", "1"), 2);
    let mut txn = store.write();
    txn.put(b"b", b"1".to_vec(), 0);
    txn.delete_range(&KeyRange::new(b"a", b"")).unwrap();
    assert_eq!(txn.rev(), 3, "reads inside a txn see its own revision once it wrote");
    assert_eq!(txn.end(), 3);
    let mut txn = store.write();
    assert!(txn.delete_range(&KeyRange::new(b"zz", b"")).unwrap().is_empty());
    assert_eq!(txn.end(), 3, "deleting nothing writes no revision");
    commit(&store, 10);
    assert_eq!(store.marks(), Marks { current: 3, compacted: 0, applied: 10 });
    assert_eq!(get(&store, "a", 2).unwrap(), Some(("1".into(), 2, 2, 1)));
    assert_eq!(get(&store, "a", 0).unwrap(), None);
    assert!(matches!(get(&store, "a", 4), Err(Error::FutureRevision)));
}

#[test]
fn readers_see_nothing_before_publish() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    put(&store, "a", "1");
    assert_eq!(get(&store, "a", 0).unwrap(), None);
    assert_eq!(store.marks().current, 1);
    commit(&store, 1);
    assert_eq!(get(&store, "a", 0).unwrap().map(|v| v.0), Some("1".into()));
}

#[test]
fn limit_and_count() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for k in ["a", "b", "c", "d"] {
        put(&store, k, "v");
    }
    commit(&store, 1);
    let r = store.range(&KeyRange::new(b"a", b"\0"), RangeOpts { limit: 2, ..Default::default() }).unwrap();
    assert_eq!((r.kvs.len(), r.count, r.rev), (2, 4, 5));
    let r = store.range(&KeyRange::new(b"b", b"d"), RangeOpts { count_only: true, ..Default::default() }).unwrap();
    assert_eq!((r.kvs.len(), r.count), (0, 2));
}

#[test]
fn compaction_removes_history_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        put(&store, "a", "1"); // 2
        put(&store, "a", "2"); // 3
        put(&store, "b", "1"); // 4
        let mut txn = store.write();
        txn.delete_range(&KeyRange::new(b"b", b"")).unwrap(); // 5
        txn.end();
        put(&store, "a", "3"); // 6
        commit(&store, 5);
        let before = store.size_in_use();
        let (hash_before, _, _) = store.hash_kv(6).unwrap();

        assert!(matches!(store.compact(7), Err(Error::FutureRevision)));
        store.compact(5).unwrap();
        assert!(matches!(store.compact(5), Err(Error::Compacted)));
        commit(&store, 6);
        assert!(store.size_in_use() < before, "compaction frees space");
        assert!(matches!(get(&store, "a", 4), Err(Error::Compacted)));
        assert_eq!(get(&store, "a", 5).unwrap().map(|v| v.0), Some("2".into()));
        assert_eq!(get(&store, "b", 5).unwrap(), None);
        assert_ne!(store.hash_kv(6).unwrap().0, hash_before);
    }
    // Reopen: nothing compacted comes back, and history after C is intact.
    for _ in 0..3 {
        let store = open(dir.path());
        assert_eq!(store.marks(), Marks { current: 6, compacted: 5, applied: 6 });
        assert!(matches!(get(&store, "a", 4), Err(Error::Compacted)));
        assert_eq!(get(&store, "a", 5).unwrap().map(|v| v.0), Some("2".into()));
        assert_eq!(get(&store, "a", 6).unwrap(), Some(("3".into(), 2, 6, 3)));
        assert_eq!(store.export().unwrap().1.len(), 2, "only a@3 and a@6 remain on disk");
    }
}

#[test]
fn export_import_round_trip_gives_equal_hash() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let a = open(a_dir.path());
    for i in 0..50 {
        put(&a, &format!("k{}", i % 7), &format!("v{i}"));
    }
    a.set_meta("members", b"m1".to_vec());
    commit(&a, 60);
    a.compact(20).unwrap();
    commit(&a, 61);

    let b = open(b_dir.path());
    put(&b, "junk", "x");
    commit(&b, 1);
    let (marks, records, meta) = a.export().unwrap();
    let mut batch = b.db_handle().batch();
    b.import(marks, records, meta, &mut batch).unwrap();
    batch.commit().unwrap();
    b.publish().unwrap();
    assert_eq!(b.marks(), a.marks());
    assert_eq!(b.hash_kv(0).unwrap(), a.hash_kv(0).unwrap());
    assert_eq!(get(&b, "junk", 0).unwrap(), None);
    assert_eq!(b.meta("members"), Some(b"m1".to_vec()));
    drop(b);
    let b = open(b_dir.path());
    assert_eq!(b.hash_kv(0).unwrap(), a.hash_kv(0).unwrap());
    assert_eq!(b.key_count(), 7);
}

/// A raft snapshot's path: the leader's image, record by record into a
/// keyspace of the follower's own, then switched to in one batch. A body
/// that is dropped, or never installed before a restart, leaves nothing.
#[test]
fn received_snapshot_installs_beside_the_live_store_and_survives_restart() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let a = open(a_dir.path());
    for i in 0..50 {
        put(&a, &format!("k{}", i % 7), &format!("v{i}"));
    }
    a.set_meta("members", b"m1".to_vec());
    commit(&a, 60);
    a.compact(20).unwrap();
    commit(&a, 61);

    let b = open(b_dir.path());
    put(&b, "junk", "x");
    commit(&b, 1);
    let image = a.image();
    let records = || {
        let mut out = Vec::new();
        image
            .for_each(|r| {
                out.push(Ok(r));
                true
            })
            .unwrap();
        out.into_iter()
    };
    // Out of order: refused, and its keyspace is gone.
    let mut shuffled: Vec<_> = records().collect();
    shuffled.swap(0, 1);
    assert!(b.ingest(61, &mut shuffled.into_iter()).is_err());
    // Dropped without keep: discarded.
    drop(b.ingest(61, &mut records()).unwrap());
    let mut received = b.ingest(61, &mut records()).unwrap();
    received.meta = image.meta.clone();
    b.keep(received);
    assert_eq!(get(&b, "junk", 0).unwrap().map(|v| v.0), Some("x".into()), "the live store is untouched");
    let mut batch = b.db_handle().batch();
    assert!(!b.install(60, image.marks, &mut batch).unwrap(), "no body for another index");
    assert!(b.install(61, image.marks, &mut batch).unwrap());
    assert!(
        matches!(b.range(&KeyRange::Single(b"k1".to_vec()), RangeOpts::default()), Err(Error::Compacted)),
        "between install and publish a reader would see the new store with the old marks: refused"
    );
    batch.commit().unwrap();
    b.publish().unwrap();
    assert_eq!(b.marks(), a.marks());
    assert_eq!(b.hash_kv(0).unwrap(), a.hash_kv(0).unwrap());
    assert_eq!(get(&b, "junk", 0).unwrap(), None);
    assert_eq!(b.meta("members"), Some(b"m1".to_vec()));
    // A body for an index already applied is dropped at once; one received and never
    // installed is removed at the next start.
    b.keep(b.ingest(61, &mut records()).unwrap());
    assert_eq!(b.kept_bodies(), 0, "a body at or below the applied index is not kept");
    b.keep(b.ingest(62, &mut records()).unwrap());
    let db = b.db_handle();
    drop(b);
    drop(db);
    let b = open(b_dir.path());
    assert_eq!(b.hash_kv(0).unwrap(), a.hash_kv(0).unwrap());
    assert_eq!(b.key_count(), 7);
    let names: Vec<String> = b.db_handle().list_keyspace_names().iter().map(|n| n.to_string()).collect();
    assert_eq!(names.iter().filter(|n| n.starts_with("kv")).count(), 1, "one records keyspace: {names:?}");
    // Writes after the restore land in the new keyspace and survive.
    put(&b, "after", "1");
    commit(&b, 62);
    drop(b);
    let b = open(b_dir.path());
    assert_eq!(get(&b, "after", 0).unwrap().map(|v| v.0), Some("1".into()));
}

/// HashKV is etcd's: the values below are what etcd 3.4.23 answered for the
/// same history, before and after compactions.
#[test]
fn hash_kv_equals_etcds() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let hash = |rev| store.hash_kv(rev).map(|(h, _, _)| h);
    assert_eq!(hash(1).unwrap(), 1_084_519_789);
    put(&store, "a", "1"); // 2
    put(&store, "a", "2"); // 3
    put(&store, "b", "1"); // 4
    commit(&store, 4);
    assert_eq!([hash(2).unwrap(), hash(3).unwrap(), hash(4).unwrap()], [2_587_454_935, 535_221_974, 1_662_700_350]);
    let mut txn = store.write();
    txn.delete_range(&KeyRange::new(b"b", b"")).unwrap();
    txn.end(); // 5
    commit(&store, 5);
    put(&store, "c", "1"); // 6
    commit(&store, 6);
    assert_eq!(hash(5).unwrap(), 252_186_706);
    store.compact(3).unwrap();
    commit(&store, 7);
    assert!(matches!(hash(3), Err(Error::Compacted)), "refused at the compact revision itself");
    assert_eq!([hash(4).unwrap(), hash(5).unwrap()], [1_514_356_665, 2_946_905_645]);
    store.compact(4).unwrap();
    commit(&store, 8);
    assert_eq!(hash(5).unwrap(), 1_702_593_555);
    put(&store, "a", "3"); // 7
    commit(&store, 9);
    assert_eq!(hash(6).unwrap(), 3_861_387_746);
    assert_eq!(hash(0).unwrap(), hash(7).unwrap());
}

/// A rewind drops every revision after its target, stored or still pending in the same batch;
/// the store reads as it did at the target, survives a reopen, and goes on from there.
#[test]
fn rewind_drops_the_revisions_after_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    put(&store, "k", "a"); // 2
    put(&store, "k", "b"); // 3
    put(&store, "gone", "x"); // 4
    commit(&store, 1);
    put(&store, "k", "c"); // 5, pending in the rewind's batch
    let mut batch = store.db_handle().batch();
    store.rewind(3, &mut batch).unwrap();
    assert!(matches!(store.range(&KeyRange::new(b"k", b""), RangeOpts::default()), Err(Error::Compacted)));
    store.set_applied(2);
    store.stage(&mut batch);
    batch.commit().unwrap();
    store.publish().unwrap();
    let check = |store: &Mvcc| {
        assert_eq!(store.marks().current, 3);
        assert_eq!(get(store, "k", 0).unwrap().map(|v| v.0), Some("b".into()));
        assert_eq!(get(store, "k", 2).unwrap().map(|v| v.0), Some("a".into()), "history before stays");
        assert_eq!(get(store, "gone", 0).unwrap(), None);
        assert_eq!(store.history(4, 10, 100).unwrap(), vec![]);
    };
    check(&store);
    drop(store);
    let store = open(dir.path());
    check(&store);
    assert_eq!(put(&store, "k", "d"), 4, "the next write takes the next revision");
    store.compact(3).unwrap();
    commit(&store, 3);
    let mut batch = store.db_handle().batch();
    assert!(matches!(store.rewind(2, &mut batch), Err(Error::Compacted)), "history before 3 is gone");
    assert_eq!(store.staged_marks().current, 4, "a refused rewind changes nothing");
}
