//! Crashes and restarts of real `meridian node` processes on a 3-member cluster: what a user of an
//! etcd-compatible store relies on when a machine dies.
//!
//! - an acknowledged write survives a kill -9 of the leader and is on every member afterwards;
//! - a member that missed more than the retained log catches up by snapshot, also from a store
//!   larger than the largest peer message, while the leader keeps committing;
//! - a whole-cluster restart keeps every key, version and revision (and the history);
//! - SIGTERM stops a member cleanly;
//! - a failure inside apply (an injected I/O error) ends the member process, and a restart replays
//!   to every acknowledged write.
//!
//! Replicas are compared key by key and by `HashKV` at one revision, as `etcdctl endpoint hashkv`
//! does. Every load loop is bounded in count and in time; every wait polls a readiness signal
//! against a deadline.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use etcd_client::{Client, GetOptions, KeyValue};
use meridian_tests::{Cluster, ClusterOpts};

/// How long a member may take to apply up to a revision another member already reached.
const CATCH_UP: Duration = Duration::from_secs(20);
/// Poll interval while waiting for a member to reach a revision.
const POLL: Duration = Duration::from_millis(50);

/// One key as a client sees it: (key, value, create_revision, mod_revision, version).
type Row = (Vec<u8>, Vec<u8>, i64, i64, i64);

fn rows(kvs: &[KeyValue]) -> Vec<Row> {
    kvs.iter()
        .map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.create_revision(), kv.mod_revision(), kv.version()))
        .collect()
}

fn header_rev(header: Option<&etcd_client::ResponseHeader>) -> Result<i64> {
    Ok(header.context("response without a header")?.revision())
}

/// The cluster's current revision, read linearizably through member `i`.
async fn current_revision(cluster: &Cluster, i: usize) -> Result<i64> {
    let resp = cluster
        .member_client(i)
        .await?
        .get("rev-probe", Some(GetOptions::new().with_count_only()))
        .await
        .with_context(|| format!("linearizable get on m{i}"))?;
    header_rev(resp.header())
}

/// Waits until member `i` has applied revision `rev` (serializable reads, so it is this member's
/// own state) and returns the revision it reached.
async fn wait_revision(cluster: &Cluster, i: usize, rev: i64) -> Result<i64> {
    let deadline = Instant::now() + CATCH_UP;
    let mut client = cluster.member_client(i).await?;
    loop {
        let last = client.get("rev-probe", Some(GetOptions::new().with_serializable().with_count_only())).await;
        let seen = match &last {
            Ok(resp) => header_rev(resp.header())?,
            Err(_) => 0,
        };
        if seen >= rev {
            return Ok(seen);
        }
        if Instant::now() >= deadline {
            bail!("m{i} did not reach revision {rev} within {CATCH_UP:?}: at {seen}, last {last:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Every key under `prefix` (ASCII, not ending in 0xff) in member `i`'s own state (serializable
/// reads, in pages of 1000 at one revision), with the header revision of the first page.
async fn local_rows(cluster: &Cluster, i: usize, prefix: &str) -> Result<(i64, Vec<Row>)> {
    let mut client = cluster.member_client(i).await?;
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().context("empty prefix")? += 1;
    let mut from = prefix.as_bytes().to_vec();
    let mut at = 0;
    let mut all = Vec::new();
    loop {
        let resp = client
            .get(
                from.clone(),
                Some(GetOptions::new().with_range(end.clone()).with_serializable().with_limit(1000).with_revision(at)),
            )
            .await
            .with_context(|| format!("serializable get {prefix:?} on m{i}"))?;
        if at == 0 {
            at = header_rev(resp.header())?;
        }
        all.extend(rows(resp.kvs()));
        match (resp.more(), all.last()) {
            (true, Some(last)) => {
                from = last.0.clone();
                from.push(0);
            }
            _ => return Ok((at, all)),
        }
    }
}

/// Asserts every member holds exactly the same keys as member 1 at revision `rev`, and the same
/// `HashKV(rev)`, once each has applied `rev`. Returns member 1's keys under `prefix`.
async fn assert_replicas_identical(cluster: &Cluster, rev: i64, prefix: &str) -> Result<Vec<Row>> {
    let mut first: Option<(Vec<Row>, u32)> = None;
    for i in 1..=cluster.len() {
        let reached = wait_revision(cluster, i, rev).await?;
        ensure!(reached == rev, "m{i} is at revision {reached}, past {rev}, though nothing was written");
        let (at, rows) = local_rows(cluster, i, prefix).await?;
        ensure!(at == rev, "m{i} answered at revision {at}, expected {rev}");
        let hash =
            cluster.member_client(i).await?.hash_kv(rev).await.with_context(|| format!("HashKV({rev}) on m{i}"))?;
        ensure!(
            header_rev(hash.header())? == rev,
            "m{i}: HashKV header revision {} != {rev}",
            header_rev(hash.header())?
        );
        match &first {
            None => first = Some((rows, hash.hash())),
            Some((rows1, hash1)) => {
                if rows != *rows1 {
                    let only_here: Vec<_> = rows.iter().filter(|r| !rows1.contains(r)).collect();
                    let only_m1: Vec<_> = rows1.iter().filter(|r| !rows.contains(r)).collect();
                    bail!(
                        "m{i} differs from m1 under {prefix:?} at revision {rev}: {} keys vs {}; \
                         only on m{i}: {:?}; only on m1: {:?}",
                        rows.len(),
                        rows1.len(),
                        &only_here[..only_here.len().min(5)],
                        &only_m1[..only_m1.len().min(5)]
                    );
                }
                ensure!(hash.hash() == *hash1, "HashKV({rev}) of m{i} is {:#x}, of m1 {:#x}", hash.hash(), hash1);
            }
        }
    }
    Ok(first.map(|(rows, _)| rows).unwrap_or_default())
}

/// Puts `w{id}-{n}` = `v{id}-{n}` until `stop`, the deadline, or `max` attempts; returns the puts
/// that were acknowledged. A failed put is not retried (it may or may not have been applied).
async fn writer(
    id: usize,
    mut client: Client,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    deadline: Instant,
    max: usize,
) -> Vec<(String, String)> {
    let mut acks = Vec::new();
    for n in 0..max {
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        let (key, value) = (format!("w{id}-{n:05}"), format!("v{id}-{n}"));
        match client.put(key.clone(), value.clone(), None).await {
            Ok(_) => {
                acks.push((key, value));
                acked.fetch_add(1, Ordering::Relaxed);
            }
            // The member is down or between leaders: back off a little rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    acks
}

/// Waits until `counter` reaches `target`, within `limit`.
async fn wait_count(counter: &AtomicUsize, target: usize, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while counter.load(Ordering::Relaxed) < target {
        if Instant::now() >= deadline {
            bail!("only {} of {target} acknowledged within {limit:?}", counter.load(Ordering::Relaxed));
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// kill -9 of the leader under a concurrent write load: a new leader within a few election
/// timeouts, writes go on, and after the old leader restarts every acknowledged put is on every
/// member, which agree on HashKV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_leader_under_load_loses_no_acknowledged_write() -> Result<()> {
    let mut cluster = Cluster::start(3, ClusterOpts::fast())?;
    let old = cluster.leader().await?;

    // Writers 0..3 are bound to members 1..3 (one of them to the leader about to die); writers
    // 3..6 go through a client balanced over every endpoint.
    const WRITERS: usize = 6;
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut counters = Vec::new();
    let mut tasks = Vec::new();
    let mut bound = Vec::new();
    for id in 0..WRITERS {
        let (client, member) =
            if id < 3 { (cluster.member_client(id + 1).await?, Some(id + 1)) } else { (cluster.client().await?, None) };
        let acked = Arc::new(AtomicUsize::new(0));
        counters.push(acked.clone());
        bound.push(member);
        tasks.push(tokio::spawn(writer(id, client, stop.clone(), acked, deadline, 20_000)));
    }

    // Load is flowing through every writer before the crash.
    for acked in &counters {
        wait_count(acked, 20, Duration::from_secs(10)).await.context("load before the crash")?;
    }

    let killed_at = Instant::now();
    cluster.kill9(old)?;
    let new = cluster.leader().await?;
    let failover = killed_at.elapsed();
    assert_ne!(new, old, "the killed member cannot be leader");
    assert!(
        failover < Duration::from_secs(5),
        "new leader m{new} took {failover:?} after the kill (election timeout 500 ms)"
    );

    // Every writer that can still reach a live member gets acknowledgements after the failover.
    for (id, acked) in counters.iter().enumerate() {
        if bound[id] == Some(old) {
            continue;
        }
        let now = acked.load(Ordering::Relaxed);
        wait_count(acked, now + 10, Duration::from_secs(10))
            .await
            .with_context(|| format!("writer {id} after the failover to m{new}"))?;
    }
    let resumed = killed_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    for task in tasks {
        acked.extend(task.await?);
    }
    eprintln!(
        "{} puts acknowledged; m{old} killed, m{new} leader after {failover:?}, every writer \
         resumed after {resumed:?}, writers joined after {:?}",
        acked.len(),
        killed_at.elapsed()
    );

    cluster.restart(old)?;
    let rev = current_revision(&cluster, new).await?;
    let rows = assert_replicas_identical(&cluster, rev, "w").await?;

    let stored: BTreeMap<Vec<u8>, Vec<u8>> = rows.into_iter().map(|r| (r.0, r.1)).collect();
    let missing: Vec<&String> = acked.keys().filter(|k| !stored.contains_key(k.as_bytes())).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged puts are lost after the leader crash, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
    for (key, value) in &acked {
        assert_eq!(stored[key.as_bytes()], value.as_bytes(), "value of acknowledged key {key}");
    }
    // Unacknowledged puts may or may not have applied, but never with another value.
    for (key, value) in &stored {
        let key = String::from_utf8_lossy(key);
        let (id, n) = key[1..].split_once('-').expect("writer keys are w{id}-{n}");
        let n: usize = n.parse()?;
        assert_eq!(String::from_utf8_lossy(value), format!("v{id}-{n}"), "value of {key}");
    }
    Ok(())
}

/// A follower that was down while the others wrote far past the retained log (snapshot count
/// 100) is brought up to date by a snapshot, then keeps replicating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_behind_compacted_log_catches_up_by_snapshot() -> Result<()> {
    const KEYS: usize = 1000;
    const TASKS: usize = 8;
    let mut cluster = Cluster::start(3, ClusterOpts { snapshot_count: Some(100), ..ClusterOpts::fast() })?;
    let leader = cluster.leader().await?;
    let follower = (1..=3).find(|&i| i != leader).expect("3 members");
    cluster.member_client(leader).await?.put("s-first", "0", None).await?;
    cluster.kill9(follower)?;

    // KEYS separate puts (so KEYS raft entries), from TASKS concurrent writers on the leader.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let mut client = cluster.member_client(leader).await?;
        tasks.push(tokio::spawn(async move {
            for n in (t..KEYS).step_by(TASKS) {
                if Instant::now() >= deadline {
                    bail!("writing {KEYS} keys took longer than 40 s");
                }
                client
                    .put(format!("s-{n:04}"), format!("value-{n}"), None)
                    .await
                    .with_context(|| format!("put s-{n:04}"))?;
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }

    cluster.restart(follower)?;
    let rev = current_revision(&cluster, leader).await?;
    let rows = assert_replicas_identical(&cluster, rev, "s-").await?;
    assert_eq!(rows.len(), KEYS + 1, "keys under s- on every member");
    for n in 0..KEYS {
        let key = format!("s-{n:04}");
        let row = rows.iter().find(|r| r.0 == key.as_bytes()).with_context(|| format!("{key} is missing"))?;
        assert_eq!(row.1, format!("value-{n}").as_bytes(), "value of {key}");
    }

    // The snapshot path was taken, in the restarted run of the follower.
    let log = std::fs::read_to_string(cluster.log_path(follower))?;
    let last_run = log
        .rsplit_once("=== harness: start #2")
        .map(|(_, run)| run)
        .context("no second start in the follower's log")?;
    assert!(
        last_run.contains("restoring from snapshot"),
        "m{follower} caught up without a snapshot; its log:\n{}",
        cluster.log_tail(follower, 30)
    );

    // And it keeps following after the snapshot.
    let put = cluster.client().await?.put("s-after", "1", None).await?;
    let after = header_rev(put.header())?;
    assert_eq!(after, rev + 1);
    let resp = cluster.member_client(follower).await?.get("s-after", None).await?;
    assert_eq!(resp.kvs().first().map(KeyValue::value), Some(&b"1"[..]));
    assert_replicas_identical(&cluster, after, "s-").await?;
    Ok(())
}

/// Sums a counter over all its label sets in a Prometheus text page.
fn counter_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A follower that fell behind the compacted log is re-seeded from a store several times larger
/// than the largest message members exchange (`--max-peer-message-bytes`, 4 MiB here; before
/// this, a snapshot was one message, and a store past the limit could never re-seed anyone). The
/// snapshot streams in chunks off the raft thread, slowed down as over a slow link: meanwhile
/// the leader keeps leading (same term) and keeps committing with latencies under the election
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_larger_than_the_peer_message_limit_reseeds_a_follower_while_the_leader_commits() -> Result<()> {
    const LIMIT: usize = 4 << 20;
    const BIG: usize = 240; // × 100 KiB: 24 MiB, six times the limit
    const SMALL: usize = 300;
    let opts = ClusterOpts {
        snapshot_count: Some(100),
        extra_args: vec!["--max-peer-message-bytes".into(), LIMIT.to_string()],
        // 100 ms per 1 MiB chunk, as over a slow link: the transfer takes about 2.5 s, five
        // election timeouts.
        env: vec![("MERIDIAN_FAILPOINT".into(), "slow-snapshot@100".into())],
        ..ClusterOpts::fast()
    };
    let mut cluster = Cluster::start(3, opts)?;
    let leader = cluster.leader().await?;
    let follower = (1..=3).find(|&i| i != leader).expect("3 members");
    cluster.kill9(follower)?;

    let value = "x".repeat(100 << 10);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mut client = cluster.member_client(leader).await?;
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            for n in (t..BIG + SMALL).step_by(4) {
                ensure!(Instant::now() < deadline, "loading the store took longer than 60 s");
                let v = if n < BIG { value.clone() } else { format!("small-{n}") };
                client.put(format!("big-{n:04}"), v, None).await.with_context(|| format!("put big-{n:04}"))?;
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let leader_addr = cluster.endpoint(leader).parse()?;
    let leader_metrics = || -> Result<String> { Ok(meridian_tests::http_get(leader_addr, "/metrics")?.1) };
    let sent_before = counter_sum(&leader_metrics()?, "etcd_network_snapshot_send_success");
    let mut client = cluster.member_client(leader).await?;
    let term = client.status().await?.raft_term();
    let loaded = current_revision(&cluster, leader).await?;

    // Re-seed, with a writer on the leader the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (mut client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut slowest, mut writes) = (Duration::ZERO, 0u32);
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let started = Instant::now();
                client.put("during", writes.to_string(), None).await.context("put while re-seeding")?;
                slowest = slowest.max(started.elapsed());
                writes += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, anyhow::Error>((slowest, writes))
        })
    };
    cluster.restart(follower)?;
    let mut probe = cluster.member_client(follower).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = probe
            .get("rev-probe", Some(GetOptions::new().with_serializable().with_count_only()))
            .await
            .ok()
            .and_then(|r| r.header().map(|h| h.revision()));
        if seen.is_some_and(|r| r >= loaded) {
            break;
        }
        ensure!(Instant::now() < deadline, "m{follower} was not re-seeded within 60 s: at {seen:?} of {loaded}");
        tokio::time::sleep(POLL).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (slowest, writes) = writer.await??;
    ensure!(writes >= 20, "only {writes} puts while the snapshot streamed: it was not slow enough to tell");
    ensure!(
        slowest < Duration::from_millis(500),
        "a put on the leader took {slowest:?} while it sent the snapshot ({writes} puts): the raft thread stalled"
    );
    ensure!(client.status().await?.raft_term() == term, "the leader changed while it sent the snapshot");

    let rev = current_revision(&cluster, leader).await?;
    // HashKV covers every record; rows are compared under a prefix of small values only (the
    // whole store is larger than a client's largest response).
    let rows = assert_replicas_identical(&cluster, rev, "big-05").await?;
    ensure!(rows.len() == 40, "{} keys under big-05 on every member", rows.len());
    for n in [0, 123, BIG - 1] {
        let got = probe.get(format!("big-{n:04}"), Some(GetOptions::new().with_serializable())).await?;
        let len = got.kvs().first().map(|kv| kv.value().len());
        ensure!(len == Some(100 << 10), "big-{n:04} on m{follower}: {len:?} bytes");
    }

    // It went by a snapshot, sent in more bytes than one peer message may hold.
    ensure!(
        counter_sum(&leader_metrics()?, "etcd_network_snapshot_send_success") > sent_before,
        "the leader sent no snapshot"
    );
    let leader_log = std::fs::read_to_string(cluster.log_path(leader))?;
    let sent_bytes: u64 = leader_log
        .lines()
        .filter(|l| l.contains("snapshot sent"))
        .filter_map(|l| l.split("bytes=").nth(1)?.split_whitespace().next()?.parse().ok())
        .max()
        .context("no 'snapshot sent' line in the leader's log")?;
    ensure!(sent_bytes > 4 * LIMIT as u64, "the snapshot body was {sent_bytes} bytes, not past the limit");
    let log = std::fs::read_to_string(cluster.log_path(follower))?;
    let last_run = log.rsplit_once("=== harness: start #2").map(|(_, run)| run).context("no second start")?;
    ensure!(last_run.contains("restoring from snapshot"), "m{follower} caught up without a snapshot");
    // The replicated metadata came with the body: the re-seeded member lists every member, as
    // the leader does (MemberList is answered from the member's own state).
    let names = |resp: etcd_client::MemberListResponse| {
        let mut names: Vec<String> = resp.members().iter().map(|m| m.name().to_string()).collect();
        names.sort();
        names
    };
    let here = names(probe.member_list().await?);
    ensure!(here == names(client.member_list().await?) && here.len() == 3, "members on m{follower}: {here:?}");

    // A restart of the re-seeded member keeps it all, and it follows new writes.
    cluster.kill9(follower)?;
    cluster.restart(follower)?;
    let put = cluster.client().await?.put("big-after", "1", None).await?;
    let after = header_rev(put.header())?;
    assert_replicas_identical(&cluster, after, "big-05").await?;
    Ok(())
}

/// Stopping all three members and starting them again keeps every key with its create/mod
/// revision and version, the history at an older revision, the compaction, and the revision
/// counter: the next write is revision + 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restart_keeps_keys_history_and_revision() -> Result<()> {
    let mut cluster = Cluster::start(3, ClusterOpts::fast())?;
    let mut client = cluster.client().await?;
    for (k, v) in [("r/a", "1"), ("r/b", "1"), ("r/c", "1"), ("r/a", "2")] {
        client.put(k, v, None).await?;
    }
    client.delete("r/b", None).await?;
    let compacted = header_rev(client.put("r/d", "1", None).await?.header())?;
    client.put("r/a", "3", None).await?;
    client.put("r/b", "again", None).await?;
    let older = header_rev(client.put("r/c", "2", None).await?.header())?;
    client.delete("r/d", None).await?;
    client.put("r/e", "1", None).await?;
    client.put("r/a", "4", None).await?;
    client.compact(compacted, None).await?;

    let latest = client.get("r/", Some(GetOptions::new().with_prefix())).await?;
    let rev = header_rev(latest.header())?;
    let before = rows(latest.kvs());
    let history = rows(client.get("r/", Some(GetOptions::new().with_prefix().with_revision(older))).await?.kvs());
    assert_eq!(before.len(), 4, "{before:?}");
    assert_eq!(history.len(), 4, "{history:?}");
    assert_replicas_identical(&cluster, rev, "r/").await?;
    drop(client);

    cluster.restart_all()?;

    for i in 1..=3 {
        let mut member = cluster.member_client(i).await?;
        let latest = member
            .get("r/", Some(GetOptions::new().with_prefix()))
            .await
            .with_context(|| format!("get r/ on m{i} after the restart"))?;
        assert_eq!(header_rev(latest.header())?, rev, "m{i}: revision after restart");
        assert_eq!(rows(latest.kvs()), before, "m{i}: keys after restart");
        let old = member.get("r/", Some(GetOptions::new().with_prefix().with_revision(older))).await?;
        assert_eq!(rows(old.kvs()), history, "m{i}: get --rev={older} after restart");
        let err = member
            .get("r/a", Some(GetOptions::new().with_revision(compacted - 1)))
            .await
            .expect_err("a revision below the compaction is gone after a restart too");
        assert_eq!(grpc_message(&err), Some("etcdserver: mvcc: required revision has been compacted"), "m{i}: {err}");
    }
    assert_replicas_identical(&cluster, rev, "r/").await?;

    let mut client = cluster.client().await?;
    let put = client.put("r/f", "1", None).await?;
    assert_eq!(header_rev(put.header())?, rev + 1, "first write after the restart");
    let resp = client.get("r/f", None).await?;
    let kv = resp.kvs().first().context("r/f after put")?;
    assert_eq!((kv.create_revision(), kv.mod_revision(), kv.version()), (rev + 1, rev + 1, 1));
    assert_replicas_identical(&cluster, rev + 1, "r/").await?;
    Ok(())
}

fn grpc_message(err: &etcd_client::Error) -> Option<&str> {
    match err {
        etcd_client::Error::GRpcStatus(status) => Some(status.message()),
        _ => None,
    }
}

/// SIGTERM makes a member exit with status 0: the leader, a follower, and the last member,
/// which has no quorum left. Each comes back afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly() -> Result<()> {
    let mut cluster = Cluster::start(3, ClusterOpts::fast())?;
    cluster.client().await?.put("t", "1", None).await?;
    let leader = cluster.leader().await?;
    let mut order = vec![leader];
    order.extend((1..=3).filter(|&i| i != leader));
    for (n, &i) in order.iter().enumerate() {
        let started = Instant::now();
        let status = cluster.stop(i)?;
        assert!(
            status.success(),
            "m{i} (stop #{n}, leader was m{leader}) exited with {status} after SIGTERM\n{}",
            cluster.log_tail(i, 20)
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    for i in 1..=3 {
        cluster.spawn(i)?;
    }
    cluster.wait_ready_all()?;
    let resp = cluster.client().await?.get("t", None).await?;
    assert_eq!(resp.kvs().first().map(KeyValue::value), Some(&b"1"[..]));
    Ok(())
}

/// An I/O error inside apply (injected on one follower with `MERIDIAN_FAILPOINT`) ends that
/// member's process with a non-zero status and a fatal log line, instead of leaving it serving a
/// frozen state; the other two go on. Restarted without the failpoint, it replays from its
/// applied index to every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_failure_stops_the_member_and_a_restart_recovers() -> Result<()> {
    const FAIL_AT: i64 = 20;
    const PUTS: usize = 60;
    let mut cluster = Cluster::start(3, ClusterOpts::fast())?;
    let leader = cluster.leader().await?;
    let faulty = (1..=3).find(|&i| i != leader).expect("3 members");
    cluster.stop(faulty)?;
    cluster.set_env(faulty, "MERIDIAN_FAILPOINT", &format!("apply-io-error@{FAIL_AT}"));
    cluster.restart(faulty)?;

    let mut client = cluster.member_client(leader).await?;
    let mut last = 0;
    for n in 0..PUTS {
        let put = client.put(format!("f-{n:03}"), format!("v{n}"), None).await.with_context(|| format!("put {n}"))?;
        last = header_rev(put.header())?;
    }
    ensure!(last > FAIL_AT, "the writes must pass the failpoint's revision");

    let status = cluster.wait_exit(faulty, Duration::from_secs(20)).context("the faulty member must stop")?;
    assert!(!status.success(), "m{faulty} exited with {status}");
    let log = std::fs::read_to_string(cluster.log_path(faulty))?;
    assert!(
        log.contains("fatal:") && log.contains("injected by MERIDIAN_FAILPOINT"),
        "m{faulty} stopped without saying why:\n{}",
        cluster.log_tail(faulty, 20)
    );

    cluster.set_env(faulty, "MERIDIAN_FAILPOINT", "");
    cluster.restart(faulty)?;
    let rows = assert_replicas_identical(&cluster, last, "f-").await?;
    assert_eq!(rows.len(), PUTS, "acknowledged keys on every member after the restart");
    for (n, row) in rows.iter().enumerate() {
        assert_eq!(row.1, format!("v{n}").as_bytes(), "value of f-{n:03}");
    }
    Ok(())
}
