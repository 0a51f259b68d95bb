//! Snapshots in etcd's own backend format, both ways, with the real etcd 3.4 and etcdctl: a
//! Meridian snapshot passes `etcdctl snapshot status` with etcd's figures and boots real etcd
//! after `etcdctl snapshot restore`; a data directory restored from a real etcd's snapshot boots
//! `meridian node`, which serves the same revisions, versions, leases and compaction, and whose
//! watchers resume where etcd's left off.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use etcd_client::{Compare, CompareOp, LeaseGrantOptions, PutOptions, Txn, TxnOp};
use meridian_tests::{
    decode_b64, etcdctl, etcdctl_json, etcdctl_ok, etcdctl_with_timeout, http_post, Cluster, ClusterOpts, EtcdCluster,
};

/// The lease the history grants, with a fixed id so both servers hold the same one.
const LEASE: i64 = 0x5eed;
/// The revision the history compacts at.
const COMPACT_AT: i64 = 5;
/// Keys written in bulk: enough for several leaf pages and a branch page.
const BULK: usize = 400;

/// Writes the same history into any server: puts, a delete, a lease with a key, a txn of three
/// puts in one revision (sub-revisions), keys in bulk, a value larger than a page (overflow), then
/// a compaction. Returns the last revision.
async fn write_history(c: &Cluster) -> Result<i64> {
    let mut client = c.client().await?;
    client.put("a", "1", None).await?; // 2
    client.put("b", "2", None).await?; // 3
    client.delete("a", None).await?; // 4
    client.lease_grant(100, Some(LeaseGrantOptions::new().with_id(LEASE))).await?;
    client.put("c", "3", Some(PutOptions::new().with_lease(LEASE))).await?; // 5
    client.put("b", "4", None).await?; // 6
    let txn = Txn::new().when([Compare::version("b", CompareOp::Equal, 2)]).and_then([
        TxnOp::put("t1", "x", None),
        TxnOp::put("t2", "y", None),
        TxnOp::put("b", "5", None),
    ]);
    ensure!(client.txn(txn).await?.succeeded(), "the history's txn failed");
    for i in 0..BULK {
        client.put(format!("bulk/{i:04}"), format!("{i:0>200}"), None).await?;
    }
    let big = "v".repeat(20_000);
    let last = client.put("big", big, None).await?.header().map(|h| h.revision()).unwrap_or_default();
    client.compact(COMPACT_AT, None).await?;
    Ok(last)
}

/// `etcdctl snapshot save` from member 1 of `c` into `dir`.
fn save(c: &Cluster, dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    let file = path.to_str().context("a UTF-8 temp path")?;
    etcdctl_ok(&[c.endpoint(1)], &["snapshot", "save", file])?;
    Ok(path)
}

/// `etcdctl snapshot status -w json` of a file.
fn status(path: &Path) -> Result<serde_json::Value> {
    let none: [&str; 0] = [];
    etcdctl_json(&none, &["snapshot", "status", path.to_str().context("a UTF-8 temp path")?])
}

/// Everything a client can read of the store: every key with its revisions, version, lease and
/// value, an old revision, the compaction and the lease with its keys; printed by etcdctl, with
/// what differs between clusters by nature (ids, terms) left out.
fn observe(c: &Cluster, member: usize) -> Result<Vec<String>> {
    let ep = [c.endpoint(member)];
    // One line per key-value (a long value by its length), so a difference reads as one line.
    let mut seen = Vec::new();
    let mut kvs = |args: &[&str]| -> Result<()> {
        let v = etcdctl_json(&ep, args)?;
        seen.push(format!("{}: count {} more {}", args.join(" "), v["count"], v["more"]));
        for kv in v["kvs"].as_array().into_iter().flatten() {
            let mut kv = kv.clone();
            let value = kv["value"].as_str().unwrap_or_default();
            if value.len() > 64 {
                kv["value"] = format!("{} base64 characters", value.len()).into();
            }
            seen.push(kv.to_string());
        }
        Ok(())
    };
    kvs(&["get", "", "--from-key", "--consistency=s"])?;
    kvs(&["get", "b", "--rev=5", "--consistency=s"])?;
    kvs(&["get", "t", "--prefix", "--rev=7", "--consistency=s"])?;
    seen.push(etcdctl_json(&ep, &["get", "b", "--consistency=s"])?["header"]["revision"].to_string());
    let compacted = etcdctl(&ep, &["get", "a", "--rev=2"])?;
    let error = compacted.stderr.lines().last().unwrap_or_default().to_string();
    seen.push(format!("compacted read: {} {error}", compacted.success()));
    let ttl = etcdctl_json(&ep, &["lease", "timetolive", &format!("{LEASE:x}"), "--keys"])?;
    seen.push(format!("lease {} granted {} keys {}", ttl["id"], ttl["granted-ttl"], ttl["keys"]));
    Ok(seen)
}

/// Asserts two observations are equal, naming the first line that differs.
fn same(got: &[String], expected: &[String], what: &str) {
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert_eq!(g, e, "{what}: line {i} differs");
    }
    assert_eq!(got.len(), expected.len(), "{what}: {got:#?}");
}

/// Meridian → etcd: the snapshot a Meridian cluster streams is etcd's file, figure for figure,
/// and real etcd boots from it with the same store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meridian_snapshot_is_etcds_file_and_boots_etcd() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let meridian = Cluster::start(3, ClusterOpts::fast())?;
    let etcd = EtcdCluster::start(3)?;
    let last = write_history(&meridian).await?;
    ensure!(write_history(&etcd).await? == last, "the two servers gave the history different revisions");
    let ours = save(&meridian, dir.path(), "meridian.db")?;
    let theirs = save(&etcd, dir.path(), "etcd.db")?;

    // etcdctl checks the sha256 on save and runs bbolt's consistency check on status.
    let (s_ours, s_theirs) = (status(&ours)?, status(&theirs)?);
    assert_eq!(s_ours["revision"], last, "{s_ours}");
    assert_eq!(s_ours["revision"], s_theirs["revision"]);
    assert_eq!(s_ours["totalKey"], s_theirs["totalKey"], "ours {s_ours}, etcd's {s_theirs}");

    // The JSON gateway streams the same file, a base64 chunk per line and the sha256 last:
    // `etcdctl snapshot restore` checks that hash, and refuses the file with one byte changed.
    let addr = meridian.endpoint(1).parse()?;
    let (code, body) = http_post(addr, "/v3/maintenance/snapshot", "{}")?;
    assert_eq!(code, 200, "{body}");
    let mut file = Vec::new();
    for line in body.lines() {
        let line: serde_json::Value = serde_json::from_str(line)?;
        file.extend(decode_b64(line["result"]["blob"].as_str().context("a blob")?)?);
    }
    let via_json = dir.path().join("json.db");
    std::fs::write(&via_json, &file)?;
    let none: [&str; 0] = [];
    let restore_into = |name: &str, from: &Path| {
        let into = dir.path().join(name);
        etcdctl(
            &none,
            &[
                "snapshot",
                "restore",
                from.to_str().unwrap_or_default(),
                "--data-dir",
                into.to_str().unwrap_or_default(),
            ],
        )
    };
    let out = restore_into("from-json", &via_json)?;
    assert!(out.success(), "{}", out.stderr);
    file[5000] ^= 1;
    std::fs::write(&via_json, &file)?;
    let out = restore_into("from-damaged", &via_json)?;
    assert!(!out.success() && out.stderr.contains("sha256"), "{}", out.stderr);

    let restored = EtcdCluster::start_with(3, ClusterOpts { restore_snapshot: Some(ours), ..ClusterOpts::default() })?;
    let expected = observe(&meridian, 1)?;
    assert!(expected.iter().any(|l| l.contains("required revision has been compacted")), "{expected:#?}");
    for member in 1..=3 {
        same(
            &observe(&restored, member)?,
            &expected,
            &format!("etcd member {member} restored from Meridian's snapshot"),
        );
    }
    // The restored etcd goes on from the snapshot's revision.
    let put = etcdctl_json(&restored.endpoints(), &["put", "after", "1"])?;
    assert_eq!(put["header"]["revision"], last + 1);
    Ok(())
}

/// etcd → Meridian: a data directory `etcdctl snapshot restore` made from a real etcd's snapshot
/// boots a 3-member Meridian cluster that serves the same store, and a watch resumes at the next
/// revision with no relist and no revision bump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_snapshot_restore_boots_meridian() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = EtcdCluster::start(1)?;
    let last = write_history(&etcd).await?;
    let theirs = save(&etcd, dir.path(), "etcd.db")?;

    let opts = ClusterOpts { restore_snapshot: Some(theirs), ..ClusterOpts::fast() };
    let mut meridian = Cluster::start(3, opts)?;
    let expected = observe(&etcd, 1)?;
    for member in 1..=3 {
        same(&observe(&meridian, member)?, &expected, &format!("Meridian member {member} imported etcd's snapshot"));
    }
    // The history before the snapshot replays as etcd replays it.
    let watch_from = format!("--rev={}", last - 2);
    let replay = |c: &Cluster| {
        etcdctl_with_timeout(&[c.endpoint(1)], &["watch", "", "--prefix", &watch_from], Duration::from_secs(2))
    };
    assert_eq!(replay(&meridian)?, replay(&etcd)?);

    // A watcher that had seen etcd up to `last` resumes on Meridian at `last + 1`.
    let mut client = meridian.client().await?;
    let opts = etcd_client::WatchOptions::new().with_prefix().with_start_revision(last + 1);
    let (_watcher, mut events) = client.watch("", Some(opts)).await?;
    let put = client.put("after", "1", None).await?;
    assert_eq!(put.header().map(|h| h.revision()), Some(last + 1), "no revision bump is needed");
    let got = tokio::time::timeout(Duration::from_secs(10), events.message()).await??.context("watch ended")?;
    let revisions: Vec<i64> = got.events().iter().filter_map(|e| e.kv()).map(|kv| kv.mod_revision()).collect();
    assert_eq!(revisions, vec![last + 1]);
    // The imported lease still holds its key and expires as a lease does.
    let ttl = client.lease_time_to_live(LEASE, None).await?;
    assert!(ttl.ttl() > 0 && ttl.ttl() <= 100, "{ttl:?}");
    // The imported store is the member's own from then on: a restart serves the same.
    let before = observe(&meridian, 1)?;
    meridian.restart(1)?;
    same(&observe(&meridian, 1)?, &before, "member 1 after a restart");
    Ok(())
}

/// A file that is not etcd's backend is refused at first start with a message naming it, and
/// nothing is created: the same directory boots once the file is removed.
#[test]
fn a_damaged_backend_is_refused_at_first_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.db");
    std::fs::write(&bad, vec![7u8; 8192])?;
    let opts = ClusterOpts { restore_snapshot: None, ready_timeout: Duration::from_secs(5), ..ClusterOpts::fast() };
    let mut cluster = Cluster::start(1, opts)?;
    cluster.stop(1)?;
    let data = cluster.data_dir(1).to_path_buf();
    std::fs::remove_dir_all(&data)?;
    std::fs::create_dir_all(data.join("member/snap"))?;
    std::fs::copy(&bad, data.join("member/snap/db"))?;
    ensure!(cluster.restart(1).is_err(), "a member started from a damaged backend");
    let log = std::fs::read_to_string(cluster.log_path(1))?;
    assert!(log.contains("cannot import") && log.contains("member/snap/db"), "{log}");
    std::fs::remove_file(data.join("member/snap/db"))?;
    cluster.restart(1)?;
    assert_eq!(cluster.etcdctl_ok(&["put", "k", "v"])?.trim(), "OK");
    Ok(())
}

/// Users, roles and grants go with a snapshot both ways, auth on: Meridian's snapshot (taken as
/// root) boots etcd, and etcd's boots Meridian, and each then enforces the other's users: the
/// same answers to the same calls, and `snapshot status` counts the same keys.
#[test]
fn users_and_roles_go_with_a_snapshot_both_ways() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let setup = |c: &Cluster| -> Result<()> {
        for args in [
            vec!["user", "add", "root:rootpw"],
            vec!["user", "add", "alice:apw"],
            vec!["user", "add", "nopw", "--no-password"],
            vec!["role", "add", "reader"],
            vec!["role", "grant-permission", "reader", "read", "app/", "--prefix"],
            vec!["role", "grant-permission", "reader", "readwrite", "k"],
            vec!["user", "grant-role", "alice", "reader"],
            vec!["put", "app/x", "1"],
            vec!["put", "other", "1"],
            vec!["auth", "enable"],
        ] {
            etcdctl_ok(&[c.endpoint(1)], &args)?;
        }
        Ok(())
    };
    // What a client sees of the users: each answer, success or error line.
    let probe = |c: &Cluster| -> Result<Vec<String>> {
        let mut seen = Vec::new();
        for args in [
            vec!["--user=alice:apw", "get", "app/x", "--print-value-only"],
            vec!["--user=alice:apw", "put", "k", "2"],
            vec!["--user=alice:apw", "get", "other"],
            vec!["--user=alice:wrong", "get", "app/x"],
            vec!["get", "app/x"],
            vec!["--user=nopw:x", "get", "app/x"],
            vec!["--user=root:rootpw", "user", "list"],
            vec!["--user=root:rootpw", "user", "get", "alice"],
            vec!["--user=root:rootpw", "role", "get", "reader"],
        ] {
            let out = etcdctl(&[c.endpoint(1)], &args)?;
            let error = out.stderr.lines().filter(|l| l.starts_with("Error:")).collect::<Vec<_>>().join(" ");
            seen.push(format!("{args:?}: {}{error}", out.stdout));
        }
        Ok(seen)
    };
    let save_as_root = |c: &Cluster, name: &str| -> Result<PathBuf> {
        let path = dir.path().join(name);
        etcdctl_ok(&[c.endpoint(1)], &["--user=root:rootpw", "snapshot", "save", path.to_str().context("path")?])?;
        Ok(path)
    };
    let meridian = Cluster::start(1, ClusterOpts::fast())?;
    let etcd = EtcdCluster::start(1)?;
    setup(&meridian)?;
    setup(&etcd)?;
    let expected = probe(&etcd)?;
    ensure!(
        expected[0].starts_with("[\"--user=alice:apw\", \"get\", \"app/x\", \"--print-value-only\"]: 1"),
        "{expected:#?}"
    );
    same(&probe(&meridian)?, &expected, "Meridian beside etcd");
    let (ours, theirs) = (save_as_root(&meridian, "meridian.db")?, save_as_root(&etcd, "etcd.db")?);
    let (s_ours, s_theirs) = (status(&ours)?, status(&theirs)?);
    assert_eq!(s_ours["totalKey"], s_theirs["totalKey"], "ours {s_ours}, etcd's {s_theirs}");

    let from_ours = EtcdCluster::start_with(1, ClusterOpts { restore_snapshot: Some(ours), ..ClusterOpts::default() })?;
    same(&probe(&from_ours)?, &expected, "etcd restored from Meridian's snapshot");
    let from_theirs = Cluster::start(1, ClusterOpts { restore_snapshot: Some(theirs), ..ClusterOpts::fast() })?;
    same(&probe(&from_theirs)?, &expected, "Meridian restored from etcd's snapshot");
    Ok(())
}
