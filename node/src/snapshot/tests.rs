use super::bbolt::{Reader, Writer, PAGE_SIZE};
use super::*;

fn written(buckets: &[(&str, Vec<(Vec<u8>, Vec<u8>)>)]) -> (tempfile::TempDir, std::path::PathBuf, u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let mut w = Writer::new(File::create(&path).unwrap()).unwrap();
    for (name, kvs) in buckets {
        w.bucket(name.as_bytes()).unwrap();
        for (k, v) in kvs {
            w.put(k, v).unwrap();
        }
    }
    let size = w.finish().unwrap();
    (dir, path, size)
}

fn read_all(r: &Reader, name: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    assert!(r
        .for_each(name.as_bytes(), |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap());
    out
}

/// Enough keys for two branch levels, values past a page (overflow), and
/// empty buckets, all read back as written.
#[test]
fn written_files_read_back_whole() {
    let many: Vec<(Vec<u8>, Vec<u8>)> =
        (0..40_000u32).map(|i| (revision_key(i64::from(i), 0, i % 7 == 0), format!("v{i}").into_bytes())).collect();
    let big: Vec<(Vec<u8>, Vec<u8>)> = (0..5u8).map(|i| (vec![i], vec![i; 3 * PAGE_SIZE + 17])).collect();
    let buckets = [("a", Vec::new()), ("big", big.clone()), ("key", many.clone()), ("z", Vec::new())];
    let (_dir, path, size) = written(&buckets);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
    assert_eq!(size % PAGE_SIZE as u64, 0);
    let r = Reader::open(&path).unwrap();
    assert_eq!(r.buckets().unwrap(), vec![b"a".to_vec(), b"big".to_vec(), b"key".to_vec(), b"z".to_vec()]);
    assert_eq!(read_all(&r, "key"), many);
    assert_eq!(read_all(&r, "big"), big);
    assert!(read_all(&r, "a").is_empty());
    assert!(!r.for_each(b"missing", |_, _| Ok(())).unwrap());
    assert_eq!(r.txid(), 1);
}

#[test]
fn out_of_order_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Writer::new(File::create(dir.path().join("db")).unwrap()).unwrap();
    w.bucket(b"m").unwrap();
    w.put(b"b", b"").unwrap();
    assert!(w.put(b"a", b"").is_err());
    assert!(w.bucket(b"a").is_err());
}

/// Damaged files give errors, never a panic: every byte of a small file
/// overwritten in turn, and truncations.
#[test]
fn damaged_files_are_errors() {
    let kvs: Vec<(Vec<u8>, Vec<u8>)> = (0..300u32).map(|i| (i.to_be_bytes().to_vec(), vec![1; 40])).collect();
    let (_dir, path, _) = written(&[("key", kvs)]);
    let good = std::fs::read(&path).unwrap();
    let bad = path.with_extension("bad");
    for at in (0..good.len()).step_by(97) {
        let mut b = good.clone();
        b[at] ^= 0xA5;
        std::fs::write(&bad, &b).unwrap();
        if let Ok(r) = Reader::open(&bad) {
            let _ = r.for_each(b"key", |_, _| Ok(()));
            let _ = r.buckets();
        }
    }
    for len in [0, 100, PAGE_SIZE, 3 * PAGE_SIZE + 5] {
        std::fs::write(&bad, &good[..len.min(good.len())]).unwrap();
        if let Ok(r) = Reader::open(&bad) {
            assert!(r.for_each(b"key", |_, _| Ok(())).is_err() || len >= good.len());
        }
    }
    // Both metas ruined: named as not a bbolt file.
    let mut b = good.clone();
    b[16] ^= 1;
    b[PAGE_SIZE + 16] ^= 1;
    std::fs::write(&bad, &b).unwrap();
    assert!(Reader::open(&bad).err().unwrap().to_string().contains("bad magic"));
}

#[test]
fn revision_keys_round_trip() {
    for (main, sub, t) in [(1, 0, false), (9_000_000_000, 3, true), (i64::MAX, 0, false)] {
        assert_eq!(parse_revision_key(&revision_key(main, sub, t)).unwrap(), (main, sub, t));
    }
    assert!(parse_revision_key(b"short").is_err());
    assert!(parse_revision_key(&[0u8; 18]).is_err());
}
