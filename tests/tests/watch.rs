//! Watch as clients use it: history replay, live events, filters,
//! prev_kv, progress, cancel, client-chosen ids, fragments, compaction,
//! slow consumers, leader failure, and 10,000 watchers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, WatchFilterType, WatchOptions, WatchResponse, WatchStream};
use meridian_tests::{etcdctl_with_input, Cluster, ClusterOpts, EtcdCluster};

const WAIT: Duration = Duration::from_secs(10);

async fn next(stream: &mut WatchStream) -> anyhow::Result<WatchResponse> {
    match tokio::time::timeout(WAIT, stream.message()).await {
        Ok(r) => r?.ok_or_else(|| anyhow::anyhow!("watch stream ended")),
        Err(_) => anyhow::bail!("no watch response within {WAIT:?}"),
    }
}

/// (type, key, value, mod_revision) of every event, in order.
fn events(resp: &WatchResponse) -> Vec<(EventType, String, String, i64)> {
    resp.events()
        .iter()
        .map(|e| {
            let kv = e.kv().expect("event kv");
            (
                e.event_type(),
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.mod_revision(),
            )
        })
        .collect()
}

/// The same etcdctl watch sessions print the same output on etcd 3.4 and Meridian.
#[test]
fn etcdctl_watch_matches_etcd() -> anyhow::Result<()> {
    fn session(c: &Cluster) -> anyhow::Result<String> {
        let mut out = String::new();
        for args in [["put", "a", "1"], ["put", "a", "2"], ["put", "b", "1"], ["del", "a", ""]] {
            let args: Vec<&str> = args.iter().copied().filter(|a| !a.is_empty()).collect();
            c.etcdctl_ok(&args)?;
        }
        etcdctl_with_input(&c.endpoints(), &["txn"], "\n\nput t1 x\nput t2 y\n\n\n")?;
        let timeout = ["--command-timeout=1s"];
        for args in [
            vec!["watch", "--rev=2", "a"],
            vec!["watch", "--rev=2", "--prev-kv", "a"],
            vec!["watch", "--rev=1", "--prefix", "t"],
            vec!["watch", "--rev=2", "--prefix", "", "-w", "json"],
        ] {
            // etcdctl watch runs until killed; a history-only session ends at its timeout.
            let mut full = args.clone();
            full.extend(timeout);
            let o = meridian_tests::etcdctl_with_timeout(&c.endpoints(), &full, Duration::from_millis(1500))?;
            out.push_str(&meridian_tests::mask_ids(&o));
            out.push('\n');
        }
        c.etcdctl_ok(&["compact", "5"])?;
        let o = meridian_tests::etcdctl_with_timeout(
            &c.endpoints(),
            &["watch", "--rev=2", "a"],
            Duration::from_millis(1500),
        )?;
        out.push_str(&o);
        Ok(out)
    }
    let etcd = EtcdCluster::start(1)?;
    let meridian = Cluster::start(3, ClusterOpts::fast())?;
    let want = session(&etcd)?;
    let got = session(&meridian)?;
    assert_eq!(got, want);
    assert!(want.contains("required revision has been compacted"), "{want}");
    Ok(())
}

#[tokio::test]
async fn history_then_live_without_gap_or_duplicate() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, ClusterOpts::fast())?;
    let mut c = cluster.client().await?;
    for i in 0..5 {
        c.put("k", format!("v{i}"), None).await?; // revisions 2..=6
    }
    let (_w, mut s) = c.watch("k", Some(WatchOptions::new().with_start_revision(3).with_prev_key())).await?;
    let writer = tokio::spawn(async move {
        for i in 5..10 {
            c.put("k", format!("v{i}"), None).await?;
        }
        c.delete("k", None).await?;
        anyhow::Ok(())
    });
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let resp = next(&mut s).await?;
        for e in resp.events() {
            let kv = e.kv().expect("kv");
            let prev = e.prev_kv().map(|p| p.mod_revision());
            seen.push((kv.mod_revision(), e.event_type(), prev));
        }
    }
    writer.await??;
    let revs: Vec<i64> = seen.iter().map(|s| s.0).collect();
    assert_eq!(revs, (3..=12).collect::<Vec<_>>(), "every revision once, in order");
    assert!(seen.iter().all(|s| s.2 == Some(s.0 - 1)), "prev_kv is the version just before: {seen:?}");
    assert_eq!(seen.last().unwrap().1, EventType::Delete);
    Ok(())
}

#[tokio::test]
async fn filters_progress_cancel_and_ids() -> anyhow::Result<()> {
    let opts = ClusterOpts {
        extra_args: vec!["--experimental-watch-progress-notify-interval".into(), "300ms".into()],
        ..ClusterOpts::fast()
    };
    let cluster = Cluster::start(1, opts)?;
    let mut c = cluster.client().await?;

    // NOPUT sees only deletes; NODELETE only puts.
    let (mut w, mut s) =
        c.watch("f", Some(WatchOptions::new().with_prefix().with_filters([WatchFilterType::NoPut]))).await?;
    assert_eq!(w.watch_id(), 0, "automatic ids start at 0, as etcd's");
    w.watch("f", Some(WatchOptions::new().with_prefix().with_filters([WatchFilterType::NoDelete]).with_watch_id(7)))
        .await?;
    let created = next(&mut s).await?;
    assert!(created.created() && created.watch_id() == 7, "{created:?}");
    // A duplicate client-chosen id is refused.
    w.watch("x", Some(WatchOptions::new().with_watch_id(7))).await?;
    let dup = next(&mut s).await?;
    assert!(dup.created() && dup.canceled(), "{dup:?}");
    assert_eq!(dup.cancel_reason(), "mvcc: duplicate watch ID provided on the WatchStream");

    c.put("f1", "v", None).await?;
    c.delete("f1", None).await?;
    let mut by_id: HashMap<i64, Vec<EventType>> = HashMap::new();
    while by_id.values().map(Vec::len).sum::<usize>() < 2 {
        let r = next(&mut s).await?;
        by_id.entry(r.watch_id()).or_default().extend(r.events().iter().map(|e| e.event_type()));
    }
    assert_eq!(by_id[&0], [EventType::Delete]);
    assert_eq!(by_id[&7], [EventType::Put]);

    // A progress request is answered for the whole stream, with watch id -1.
    w.request_progress().await?;
    loop {
        let r = next(&mut s).await?;
        if r.watch_id() == -1 {
            assert!(r.events().is_empty());
            assert_eq!(r.header().unwrap().revision(), 3);
            break;
        }
    }

    // Cancel: the server confirms, and nothing more arrives for that id.
    w.cancel_by_id(7).await?;
    loop {
        let r = next(&mut s).await?;
        if r.canceled() && r.watch_id() == 7 {
            break;
        }
    }

    // progress_notify: an idle watcher hears the current revision periodically.
    let (_p, mut ps) = c.watch("idle", Some(WatchOptions::new().with_progress_notify())).await?;
    let started = Instant::now();
    let r = next(&mut ps).await?;
    assert!(r.events().is_empty() && !r.created() && r.watch_id() == 0, "{r:?}");
    assert_eq!(r.header().unwrap().revision(), 3);
    assert!(started.elapsed() < Duration::from_secs(3));
    Ok(())
}

/// A progress request made while a watcher still replays history is answered once the replay is
/// queued, after its last event: never dropped (etcd 3.4 drops it, and a client waiting on the
/// answer waits forever), never ahead of events not sent yet.
#[tokio::test]
async fn progress_asked_during_a_replay_comes_after_it() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, ClusterOpts::fast())?;
    let mut c = cluster.client().await?;
    // More revisions than one catch-up round reads.
    const PUTS: usize = 1500;
    let mut last = 0;
    for i in 0..PUTS {
        last = c.put(format!("r/{i}"), "v", None).await?.header().unwrap().revision();
    }
    let (mut w, mut s) = c.watch("r/", Some(WatchOptions::new().with_prefix().with_start_revision(1))).await?;
    w.request_progress().await?;
    let mut seen = 0;
    loop {
        let r = next(&mut s).await?;
        if r.watch_id() == -1 && r.events().is_empty() {
            assert_eq!(seen, PUTS, "the progress answer came before the replay ended");
            assert!(r.header().unwrap().revision() >= last);
            break;
        }
        seen += r.events().len();
    }
    Ok(())
}

#[tokio::test]
async fn large_responses_fragment_when_asked() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, ClusterOpts { max_request_bytes: Some(4096), ..ClusterOpts::fast() })?;
    let mut c = cluster.client().await?;
    for i in 0..4 {
        c.put(format!("big{i}"), vec![b'x'; 900], None).await?;
    }
    // With prev_kv each event carries two 900-byte values: one revision of
    // four such events is over the 4 KiB limit, while its request was not.
    let opts = WatchOptions::new().with_prefix().with_fragment().with_prev_key().with_start_revision(6);
    let (_w, mut s) = c.watch("big", Some(opts)).await?;
    let ops: Vec<etcd_client::TxnOp> =
        (0..4).map(|i| etcd_client::TxnOp::put(format!("big{i}"), vec![b'y'; 900], None)).collect();
    c.txn(etcd_client::Txn::new().and_then(ops)).await?;
    let mut parts = Vec::new();
    loop {
        let r = next(&mut s).await?;
        parts.push((r.events().len(), r.0.fragment));
        if !r.0.fragment {
            break;
        }
    }
    assert!(parts.len() > 1, "a 7 KB revision is split under a 4 KB limit: {parts:?}");
    assert_eq!(parts.iter().map(|p| p.0).sum::<usize>(), 4);
    Ok(())
}

/// A stalled consumer does not hold up other watchers or writes, and when it
/// reads again it gets every event, in order, from the store.
#[tokio::test]
async fn a_stalled_watcher_blocks_nobody_and_loses_nothing() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, ClusterOpts::fast())?;
    let mut c = cluster.client().await?;
    let (_slow_w, mut slow) = c.watch("s", Some(WatchOptions::new().with_prefix())).await?;
    let (_fast_w, mut fast) = c.watch("s", Some(WatchOptions::new().with_prefix())).await?;
    let value = vec![b'v'; 2048];
    let total = 1500;
    let started = Instant::now();
    let mut fast_seen = 0;
    for i in 0..total {
        c.put(format!("s{i:05}"), value.clone(), None).await?;
        while let Ok(Some(r)) = tokio::time::timeout(Duration::ZERO, fast.message()).await.map(|r| r.ok().flatten()) {
            fast_seen += r.events().len();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "writes stalled");
    }
    while fast_seen < total {
        fast_seen += next(&mut fast).await?.events().len();
    }
    // Now drain the stalled one: everything, in order, exactly once.
    let mut revs = Vec::new();
    while revs.len() < total {
        revs.extend(next(&mut slow).await?.events().iter().map(|e| e.kv().unwrap().mod_revision()));
    }
    assert_eq!(revs, (2..2 + total as i64).collect::<Vec<_>>());
    Ok(())
}

/// A client whose member dies reconnects elsewhere from the next revision
/// and sees every event exactly once; watches on survivors keep going.
#[tokio::test]
async fn watch_survives_leader_failure() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, ClusterOpts::fast())?;
    let leader = cluster.leader().await?;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let mut on_leader = cluster.member_client(leader).await?;
    let (_a, mut sa) = on_leader.watch("w", Some(WatchOptions::new().with_prefix())).await?;
    let mut on_follower = cluster.member_client(follower).await?;
    let (_b, mut sb) = on_follower.watch("w", Some(WatchOptions::new().with_prefix())).await?;

    let mut writer = cluster.member_client(follower).await?;
    for i in 0..10 {
        writer.put(format!("w{i:02}"), "x", None).await?;
    }
    let mut got_a: Vec<i64> = Vec::new();
    while got_a.len() < 5 {
        got_a.extend(events(&next(&mut sa).await?).iter().map(|e| e.3));
    }
    cluster.kill9(leader)?;
    // Resume on the follower from the revision after the last one seen.
    let resume = got_a.last().unwrap() + 1;
    let (_c, mut sc) =
        on_follower.watch("w", Some(WatchOptions::new().with_prefix().with_start_revision(resume))).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut written = 10;
    while written < 20 {
        match writer.put(format!("w{written:02}"), "x", None).await {
            Ok(_) => written += 1,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => return Err(e.into()),
        }
    }
    while got_a.len() < 20 {
        got_a.extend(events(&next(&mut sc).await?).iter().map(|e| e.3));
    }
    let mut got_b: Vec<i64> = Vec::new();
    while got_b.len() < 20 {
        got_b.extend(events(&next(&mut sb).await?).iter().map(|e| e.3));
    }
    let want: Vec<i64> = (2..22).collect();
    assert_eq!(got_a, want, "resumed watch: every event exactly once");
    assert_eq!(got_b, want, "watch on a surviving follower never broke");
    Ok(())
}

/// 10,000 watchers over 100 streams on one member all get their events.
#[tokio::test]
async fn ten_thousand_watchers() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, ClusterOpts::fast())?;
    let mut streams = Vec::new();
    for s in 0..100 {
        let mut client: Client = cluster.client().await?;
        let (mut w, mut st) = client.watch(format!("k{s:03}-000"), None).await?;
        for i in 1..100 {
            w.watch(format!("k{s:03}-{i:03}"), None).await?;
        }
        let mut created = 1;
        while created < 100 {
            if next(&mut st).await?.created() {
                created += 1;
            }
        }
        streams.push((client, w, st));
    }
    let mut c = cluster.client().await?;
    // One txn per stream's keys: 100 revisions, 10,000 events.
    for s in 0..100 {
        let ops: Vec<etcd_client::TxnOp> =
            (0..100).map(|i| etcd_client::TxnOp::put(format!("k{s:03}-{i:03}"), "v", None)).collect();
        c.txn(etcd_client::Txn::new().and_then(ops)).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (s, (_, _, st)) in streams.iter_mut().enumerate() {
        let mut ids = std::collections::HashSet::new();
        while ids.len() < 100 {
            anyhow::ensure!(Instant::now() < deadline, "stream {s} got {} of 100 watchers' events", ids.len());
            let r = next(st).await?;
            assert_eq!(r.events().len(), 1, "a single-key watcher gets its own event only");
            ids.insert(r.watch_id());
        }
    }
    Ok(())
}
