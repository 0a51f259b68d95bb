//! Multi-region: read-only secondaries and the mirror into them.

use meridian_tests::{Cluster, ClusterOpts};

fn secondary_opts() -> ClusterOpts {
    ClusterOpts {
        extra_args: meridian_tests::secondary_flags("eu-west", "us-east").expect("test token"),
        ..ClusterOpts::fast()
    }
}

const READ_ONLY: &str = "meridian: read-only secondary of region \"us-east\"; send writes to the primary or a gateway";

/// A secondary refuses every client write with FAILED_PRECONDITION and a
/// message naming its primary, and still serves reads, watches and status.
#[tokio::test]
async fn a_secondary_refuses_client_writes() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, secondary_opts())?;
    let mut c = cluster.client().await?;
    let refused = |e: etcd_client::Error| match e {
        etcd_client::Error::GRpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("not a gRPC status: {other}"),
    };
    let want = (tonic::Code::FailedPrecondition, READ_ONLY.to_string());
    assert_eq!(refused(c.put("k", "v", None).await.unwrap_err()), want);
    assert_eq!(refused(c.delete("k", None).await.unwrap_err()), want);
    let txn = etcd_client::Txn::new().and_then([etcd_client::TxnOp::put("k", "v", None)]);
    assert_eq!(refused(c.txn(txn).await.unwrap_err()), want);
    assert_eq!(refused(c.lease_grant(10, None).await.unwrap_err()), want);
    assert_eq!(refused(c.lease_revoke(7).await.unwrap_err()), want);
    assert_eq!(refused(c.compact(1, None).await.unwrap_err()), want);

    // Reads, read-only txns, watches and status work.
    assert_eq!(c.get("k", None).await?.count(), 0);
    let ro = etcd_client::Txn::new().and_then([etcd_client::TxnOp::get("k", None)]);
    assert!(c.txn(ro).await?.succeeded());
    let (_w, _s) = c.watch("k", None).await?;
    assert_eq!(c.status().await?.header().unwrap().revision(), 1);
    c.hash_kv(0).await?;

    // etcdctl shows the same refusal.
    let out = cluster.etcdctl(&["put", "k", "v"])?;
    assert!(!out.success());
    assert!(out.stderr.contains(READ_ONLY), "{}", out.stderr);
    Ok(())
}

use std::time::Duration;

use etcd_client::{PutOptions, Txn, TxnOp};
use meridian_tests::{EtcdCluster, MirrorProcess};

fn primary_opts() -> ClusterOpts {
    ClusterOpts { extra_args: ["--region", "us-east"].map(String::from).to_vec(), ..ClusterOpts::fast() }
}

/// What a user compares: every key with its revisions, version, lease and value.
fn dump(c: &Cluster) -> anyhow::Result<String> {
    Ok(meridian_tests::mask_ids(&c.etcdctl_ok(&["get", "", "--from-key", "-w", "json"])?))
}

/// The events `etcdctl watch --prefix "" --rev=2 --prev-kv` prints, as JSON.
fn watch_replay(c: &Cluster) -> anyhow::Result<String> {
    let args = ["watch", "--prefix", "", "--rev=2", "--prev-kv", "-w", "json"];
    let out = meridian_tests::etcdctl_with_timeout(&c.endpoints(), &args, Duration::from_millis(1500))?;
    let events: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["Events"].clone())
        .collect();
    Ok(serde_json::to_string(&events)?)
}

async fn revision(c: &Cluster) -> anyhow::Result<i64> {
    Ok(c.client().await?.get("\0", None).await?.header().expect("header").revision())
}

async fn hash_at(c: &Cluster, rev: i64) -> anyhow::Result<u32> {
    Ok(c.member_client(1).await?.hash_kv(rev).await?.hash())
}

/// Puts, overwrites, deletes, 100-key txns, leased keys and a lease revoke.
async fn mixed_workload(c: &mut etcd_client::Client, round: usize) -> anyhow::Result<i64> {
    for i in 0..100 {
        c.put(format!("r{round}/k{i:03}"), format!("v{i}"), None).await?;
    }
    for i in (0..100).step_by(3) {
        c.put(format!("r{round}/k{i:03}"), "again", None).await?;
    }
    c.delete(format!("r{round}/k05"), Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
    for t in 0..3 {
        let ops: Vec<TxnOp> = (0..100).map(|i| TxnOp::put(format!("r{round}/txn{t}/{i:03}"), "t", None)).collect();
        c.txn(Txn::new().and_then(ops)).await?;
    }
    let keep = c.lease_grant(600, None).await?.id();
    let gone = c.lease_grant(600, None).await?.id();
    c.put(format!("r{round}/leased/keep"), "1", Some(PutOptions::new().with_lease(keep))).await?;
    c.put(format!("r{round}/leased/gone"), "1", Some(PutOptions::new().with_lease(gone))).await?;
    let r = c.lease_revoke(gone).await?;
    let _ = keep;
    Ok(r.header().expect("header").revision())
}

#[tokio::test]
async fn mixed_workload_is_identical_on_the_secondary() -> anyhow::Result<()> {
    let primary = Cluster::start(3, primary_opts())?;
    let secondary = Cluster::start(3, secondary_opts())?;
    let mut c = primary.client().await?;
    let half = mixed_workload(&mut c, 0).await?;
    let mirror = MirrorProcess::start(&primary.endpoints(), &secondary, &[])?;
    let rev = mixed_workload(&mut c, 1).await?;
    mirror.wait_applied(rev, Duration::from_secs(60))?;
    assert_eq!(dump(&secondary)?, dump(&primary)?);
    assert_eq!(revision(&secondary).await?, rev, "the secondary's revision is the primary's");
    for at in [half, rev] {
        assert_eq!(hash_at(&secondary, at).await?, hash_at(&primary, at).await?, "HashKV at {at}");
    }
    let (on_secondary, on_primary) = (watch_replay(&secondary)?, watch_replay(&primary)?);
    assert!(on_primary.len() > 1000, "{on_primary}");
    assert_eq!(on_secondary, on_primary, "a watch from revision 2 gives the same events");
    // Leases keep their ids; the revoked ones are gone.
    let want: Vec<i64> = c.leases().await?.leases().iter().map(|l| l.id()).collect();
    let mut s = secondary.client().await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut got: Vec<i64> = s.leases().await?.leases().iter().map(|l| l.id()).collect();
        got.sort_unstable();
        let mut w = want.clone();
        w.sort_unstable();
        if got == w {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "leases differ: primary {w:?}, secondary {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = mirror.status()?;
    assert_eq!(status["lag_revisions"], 0, "{status}");
    let labels = r#"{region="eu-west",source_region="us-east"}"#;
    assert!(mirror.metrics()?.contains(&format!("meridian_mirror_lag_seconds{labels} 0")));
    // A person sees the lag at zero, from the secondary and from the mirror.
    let printed = mirror.status_command(&secondary)?;
    assert!(printed.contains(&format!("applied revision:  {rev}")), "{printed}");
    assert!(printed.contains("lag:               0 revisions"), "{printed}");
    assert!(printed.contains("lag:              0 revisions, 0.000 s"), "{printed}");
    // So does a dashboard scraping any secondary member: every one hears the heartbeats.
    for i in 1..=3 {
        let (_, node_metrics) = meridian_tests::http_get(secondary.endpoint(i).parse()?, "/metrics")?;
        let gauge = |name: &str| metric(&node_metrics, &format!("{name}{{region=\"eu-west\"}}"));
        assert_eq!(gauge("meridian_secondary_source_revision"), Some(rev as f64), "member {i}");
        assert_eq!(gauge("meridian_secondary_lag_revisions"), Some(0.0), "member {i}");
        let staleness = gauge("meridian_secondary_staleness_seconds").expect("staleness");
        assert!(staleness < 1.0, "member {i}: staleness {staleness}");
    }
    Ok(())
}

/// The value of the sample `name` (with its labels) in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Staleness on a secondary means "time since it last held everything the source had": an idle
/// source keeps it near zero (heartbeats every 100 ms), it grows while the mirror is dead instead
/// of freezing at its last value, and falls back once the mirror returns.
#[tokio::test]
async fn staleness_grows_while_the_mirror_is_down() -> anyhow::Result<()> {
    let primary = Cluster::start(1, primary_opts())?;
    let secondary = Cluster::start(1, secondary_opts())?;
    let rev = primary.client().await?.put("k", "v", None).await?.header().expect("header").revision();
    let mut mirror = MirrorProcess::start(&primary.endpoints(), &secondary, &[])?;
    mirror.wait_applied(rev, Duration::from_secs(30))?;
    let staleness = || -> anyhow::Result<f64> {
        let (_, text) = meridian_tests::http_get(secondary.endpoint(1).parse()?, "/metrics")?;
        metric(&text, "meridian_secondary_staleness_seconds{region=\"eu-west\"}")
            .ok_or_else(|| anyhow::anyhow!("{text}"))
    };
    // Idle, yet fresh: the source is asked for progress and heartbeats keep coming.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle = staleness()?;
    assert!(idle < 0.5, "an idle, mirrored secondary is {idle} s stale");

    mirror.kill9()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = staleness()?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = staleness()?;
    assert!(later >= first + 1.2, "with the mirror dead staleness must grow: {first} then {later}");

    mirror.spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while staleness()? > 0.5 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "staleness did not recover: {}", staleness()?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test]
async fn killed_mirror_resumes_from_its_checkpoint() -> anyhow::Result<()> {
    let primary = Cluster::start(1, primary_opts())?;
    let secondary = Cluster::start(1, secondary_opts())?;
    let mut mirror = MirrorProcess::start(&primary.endpoints(), &secondary, &[])?;
    let mut c = primary.client().await?;
    let mut last = 0;
    for i in 0..600 {
        last = c.put(format!("k{i:04}"), format!("v{i}"), None).await?.header().expect("header").revision();
        if i == 200 {
            mirror.kill9()?;
        }
        if i == 400 {
            mirror.spawn()?;
        }
    }
    mirror.wait_applied(last, Duration::from_secs(60))?;
    assert_eq!(dump(&secondary)?, dump(&primary)?);
    // The first start copies the (empty-target) history once; the restart resumes instead.
    let copies = mirror.log().matches("copying history to the target").count();
    assert_eq!(copies, 1, "the restart must not copy everything again:\n{}", mirror.log());
    // The copy said how far along it was, how fast, and what was left (a bar on a terminal).
    let log = mirror.log();
    assert!(
        log.lines().any(|l| l.contains("copying to the target: ") && l.contains("revisions") && l.contains("ETA")),
        "no progress line for the copy:\n{log}"
    );
    // Old revisions stayed readable: the history was never replaced.
    let old = secondary.client().await?.get("k0001", Some(etcd_client::GetOptions::new().with_revision(3))).await?;
    assert_eq!(old.kvs()[0].value(), b"v1");
    Ok(())
}

#[tokio::test]
async fn compaction_past_the_checkpoint_resyncs() -> anyhow::Result<()> {
    let primary = Cluster::start(1, primary_opts())?;
    let secondary = Cluster::start(1, secondary_opts())?;
    let mut mirror = MirrorProcess::start(&primary.endpoints(), &secondary, &[])?;
    let mut c = primary.client().await?;
    for i in 0..50 {
        c.put(format!("k{i:02}"), "1", None).await?;
    }
    mirror.wait_applied(51, Duration::from_secs(30))?;
    mirror.kill9()?;
    for i in 0..20 {
        c.delete(format!("k{i:02}"), None).await?;
    }
    let rev = c.put("late", "1", None).await?.header().expect("header").revision();
    // Past the checkpoint, and below rev so that HashKV (refused at the compact revision) can compare at rev.
    c.compact(rev - 1, None).await?;
    mirror.spawn()?;
    mirror.wait_applied(rev, Duration::from_secs(30))?;
    assert_eq!(dump(&secondary)?, dump(&primary)?, "stale keys are gone");
    assert_eq!(hash_at(&secondary, rev).await?, hash_at(&primary, rev).await?);
    assert!(mirror.log().contains("copying history"));
    assert!(mirror.status()?["resyncs_total"].as_u64().unwrap_or(0) >= 1);
    Ok(())
}

#[tokio::test]
async fn a_real_etcd_source_is_mirrored_exactly() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let secondary = Cluster::start(1, secondary_opts())?;
    let mut c = etcd.client().await?;
    let rev = mixed_workload(&mut c, 0).await?;
    let mirror = MirrorProcess::start(&etcd.endpoints(), &secondary, &[])?;
    mirror.wait_applied(rev, Duration::from_secs(60))?;
    // Keys, values, create/mod revisions, versions and lease ids.
    assert_eq!(dump(&secondary)?, dump(&etcd)?);
    // And the same history: Meridian's HashKV is etcd's, and a watch from an
    // old revision replays the same events (puts, deletes, prev_kv) on both.
    for at in [2, rev / 2, rev] {
        assert_eq!(hash_at(&secondary, at).await?, hash_at(&etcd, at).await?, "HashKV at {at}");
    }
    let (on_secondary, on_etcd) = (watch_replay(&secondary)?, watch_replay(&etcd)?);
    assert!(on_etcd.len() > 1000, "{on_etcd}");
    assert_eq!(on_secondary, on_etcd);
    let more = c.put("after", "1", None).await?.header().expect("header").revision();
    mirror.wait_applied(more, Duration::from_secs(30))?;
    assert_eq!(dump(&secondary)?, dump(&etcd)?);
    Ok(())
}

#[tokio::test]
async fn killing_the_secondary_leader_loses_nothing() -> anyhow::Result<()> {
    let primary = Cluster::start(1, primary_opts())?;
    let mut secondary = Cluster::start(3, secondary_opts())?;
    let mirror = MirrorProcess::start(&primary.endpoints(), &secondary, &[])?;
    let mut c = primary.client().await?;
    let mut last = 0;
    for i in 0..400 {
        last = c.put(format!("k{i:04}"), "v", None).await?.header().expect("header").revision();
        if i == 150 {
            let leader = secondary.leader().await?;
            secondary.kill9(leader)?;
        }
    }
    mirror.wait_applied(last, Duration::from_secs(60))?;
    assert_eq!(dump(&secondary)?, dump(&primary)?);
    Ok(())
}

/// Writes `n` puts (`k0000`..) with 32 in flight, overwriting each key
/// every 1,000 revisions; returns the last revision.
async fn many_revisions(c: &etcd_client::Client, n: usize) -> anyhow::Result<i64> {
    let mut last = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(32) {
        let puts = chunk.iter().map(|i| {
            let mut c = c.clone();
            async move { c.put(format!("k{:04}", i % 1000), format!("v{i}"), None).await }
        });
        for r in futures::future::join_all(puts).await {
            last = last.max(r?.header().expect("header").revision());
        }
    }
    Ok(last)
}

/// A secondary far behind an etcd source fetches the history with many
/// watches at once, and ends with the same history, not just the same state.
#[tokio::test]
async fn a_long_etcd_history_is_fetched_in_parallel() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let secondary = Cluster::start(1, secondary_opts())?;
    let mut c = etcd.client().await?;
    let mid = many_revisions(&c, 3000).await?;
    c.delete("k01", Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
    let rev = many_revisions(&c, 3000).await?;
    let mirror = MirrorProcess::start(&etcd.endpoints(), &secondary, &[])?;
    // A second secondary takes only the keys under k00.
    let subtree = Cluster::start(1, secondary_opts())?;
    let sub_mirror = MirrorProcess::start(&etcd.endpoints(), &subtree, &["--prefix", "k00"])?;
    mirror.wait_applied(rev, Duration::from_secs(60))?;
    assert!(mirror.log().contains("parallel watches"), "{}", mirror.log());
    let progress = mirror.log().lines().filter(|l| l.contains("fetching the source's history: ")).count();
    assert!(
        progress >= 2,
        "no progress for the catch-up (a line at the first batch, one at the end):\n{}",
        mirror.log()
    );
    assert_eq!(dump(&secondary)?, dump(&etcd)?);
    // The keys under a prefix at an old revision (the header's revision is
    // the store's current one, which differs with --prefix).
    let history = |c: &Cluster, prefix: &str, at: i64| -> anyhow::Result<String> {
        let out = c.etcdctl_ok(&["get", prefix, "--prefix", &format!("--rev={at}"), "-w", "json"])?;
        Ok(serde_json::from_str::<serde_json::Value>(&out)?["kvs"].to_string())
    };
    for at in [mid - 500, mid, mid + 1, rev - 1] {
        assert_eq!(history(&secondary, "k", at)?, history(&etcd, "k", at)?, "history at {at}");
    }
    let k00 = c.get("k00", Some(etcd_client::GetOptions::new().with_prefix())).await?;
    let newest = k00.kvs().iter().map(|kv| kv.mod_revision()).max().expect("k00 keys");
    sub_mirror.wait_applied(newest, Duration::from_secs(60))?;
    assert!(sub_mirror.log().contains("parallel watches"), "{}", sub_mirror.log());
    for at in [mid, newest] {
        assert_eq!(history(&subtree, "k00", at)?, history(&etcd, "k00", at)?, "subtree at {at}");
    }
    assert_eq!(subtree.etcdctl_ok(&["get", "k01", "--prefix", "--keys-only"])?.trim(), "", "only k00 is mirrored");
    Ok(())
}

/// An etcd source never sends compactions: a secondary compacts by its own
/// `--auto-compaction-retention`, and mirroring goes on past it.
#[tokio::test]
async fn a_secondary_of_etcd_compacts_by_its_own_retention() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let mut opts = secondary_opts();
    opts.extra_args.extend(["--auto-compaction-retention", "1s"].map(String::from));
    let secondary = Cluster::start(1, opts)?;
    let mut c = etcd.client().await?;
    let mirror = MirrorProcess::start(&etcd.endpoints(), &secondary, &[])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    let compacted = loop {
        i += 1;
        let rev = c.put("k", i.to_string(), None).await?.header().expect("header").revision();
        mirror.wait_applied(rev, Duration::from_secs(30))?;
        let out = secondary.etcdctl(&["get", "k", "--rev=2"])?;
        if out.stderr.contains("required revision has been compacted") {
            break rev;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "the secondary never compacted: {}", out.stdout);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The source keeps its history; the secondary still follows it.
    assert_eq!(etcd.etcdctl_ok(&["get", "k", "--rev=2", "--print-value-only"])?.trim(), "1");
    let after = c.put("after", "1", None).await?.header().expect("header").revision();
    mirror.wait_applied(after, Duration::from_secs(30))?;
    assert!(after > compacted);
    assert_eq!(dump(&secondary)?, dump(&etcd)?);
    Ok(())
}

/// On a secondary, `etcdctl lease timetolive` answers from the mirrored lease (granted TTL, the
/// remaining TTL the source reported, the attached keys) instead of retrying on "leader
/// changed"; keep-alive, grant and revoke are refused at once with the read-only error.
#[tokio::test]
async fn leases_on_a_secondary_answer_or_are_refused_at_once() -> anyhow::Result<()> {
    let primary = Cluster::start(1, primary_opts())?;
    let secondary = Cluster::start(3, secondary_opts())?;
    let mut c = primary.client().await?;
    let id = c.lease_grant(600, None).await?.id();
    let rev = c.put("l/key", "v", Some(PutOptions::new().with_lease(id))).await?.header().expect("header").revision();
    let mirror = MirrorProcess::start(&primary.endpoints(), &secondary, &[])?;
    mirror.wait_applied(rev, Duration::from_secs(30))?;

    let hex = format!("{id:x}");
    for i in 1..=3 {
        let started = std::time::Instant::now();
        let out = meridian_tests::etcdctl(&[secondary.endpoint(i)], &["lease", "timetolive", &hex, "--keys"])?;
        assert!(out.success(), "timetolive on secondary member {i}: {}", out.stderr);
        assert!(started.elapsed() < Duration::from_secs(3), "timetolive took {:?}", started.elapsed());
        let line = out.stdout.trim();
        assert!(line.starts_with(&format!("lease {id:016x} granted with TTL(600s), remaining(")), "{line}");
        assert!(line.ends_with("attached keys([l/key])"), "{line}");
        let remaining: i64 = line.split("remaining(").nth(1).and_then(|r| r.split('s').next()).unwrap().parse()?;
        assert!((590..=600).contains(&remaining), "remaining {remaining}s as the source reported it: {line}");
    }
    let unknown = secondary.etcdctl_ok(&["lease", "timetolive", "1234"])?;
    assert_eq!(unknown.trim(), "lease 0000000000001234 already expired");

    // Writes to leases are refused with the read-only error, a code clients do not retry.
    for args in [["lease", "grant", "10"], ["lease", "revoke", hex.as_str()]] {
        let out = secondary.etcdctl(&args)?;
        assert!(!out.success() && out.stderr.contains(READ_ONLY), "{args:?}: {}", out.stderr);
    }
    let mut s = secondary.client().await?;
    let keep_alive = async {
        let (mut keeper, mut responses) = s.lease_keep_alive(id).await?;
        keeper.keep_alive().await?;
        responses.message().await
    };
    match tokio::time::timeout(Duration::from_secs(3), keep_alive).await? {
        Err(etcd_client::Error::GRpcStatus(st)) => {
            assert_eq!((st.code(), st.message()), (tonic::Code::FailedPrecondition, READ_ONLY));
        }
        other => panic!("keep-alive on a secondary must be refused, got {other:?}"),
    }
    // The lease is untouched on the primary.
    assert_eq!(c.lease_time_to_live(id, None).await?.granted_ttl(), 600);
    Ok(())
}

/// `Mirror.Apply` is no open door: without the token configured on the secondary (or with a
/// wrong one) it is refused, so a client cannot replace a secondary's store with `reset`; a
/// secondary with no token refuses every Apply; a primary refuses mirror writes even with a token.
#[tokio::test]
async fn mirror_apply_needs_the_token_and_a_secondary() -> anyhow::Result<()> {
    use meridian_proto::meridian::v1::mirror_client::MirrorClient;
    use meridian_proto::meridian::v1::{MirrorApplyRequest, MirrorRevision};

    let mut with_token = primary_opts();
    with_token
        .extra_args
        .extend(["--mirror-token-file".into(), meridian_tests::mirror_token_file()?.display().to_string()]);
    let primary = Cluster::start(1, with_token)?;
    let secondary = Cluster::start(1, secondary_opts())?;
    let mut no_token_opts = secondary_opts();
    no_token_opts.extra_args.truncate(6);
    let tokenless = Cluster::start(1, no_token_opts)?;
    let rev = primary.client().await?.put("k", "v", None).await?.header().expect("header").revision();
    let mirror = MirrorProcess::start(&primary.endpoints(), &secondary, &[])?;
    mirror.wait_applied(rev, Duration::from_secs(30))?;

    let wipe = || MirrorApplyRequest {
        reset: true,
        revisions: vec![MirrorRevision { revision: 100, changes: vec![] }],
        ..Default::default()
    };
    let token = std::fs::read_to_string(meridian_tests::mirror_token_file()?)?.trim().to_string();
    let call = |endpoint: String, token: Option<String>| {
        let req = wipe();
        async move {
            let mut c = MirrorClient::connect(format!("http://{endpoint}")).await?;
            let mut req = tonic::Request::new(req);
            if let Some(t) = token {
                req.metadata_mut().insert("x-meridian-mirror-token", t.parse()?);
            }
            anyhow::Ok(c.apply(req).await.map(|_| ()))
        }
    };
    let code = |r: Result<(), tonic::Status>| r.map_err(|s| s.code()).err();
    let unauth = Some(tonic::Code::Unauthenticated);
    assert_eq!(code(call(secondary.endpoint(1), None).await?), unauth, "no token");
    assert_eq!(code(call(secondary.endpoint(1), Some("guess".into())).await?), unauth, "a wrong token");
    let denied = Some(tonic::Code::PermissionDenied);
    assert_eq!(code(call(tokenless.endpoint(1), Some(token.clone())).await?), denied, "no token configured");
    let fenced = Some(tonic::Code::FailedPrecondition);
    assert_eq!(code(call(primary.endpoint(1), Some(token)).await?), fenced, "a primary");
    // The secondary kept its store.
    assert_eq!(dump(&secondary)?, dump(&primary)?);
    assert_eq!(revision(&secondary).await?, rev);
    Ok(())
}

/// A mirror from another source cluster is refused by a secondary that already follows one (its
/// revisions would mean nothing there), until the operator passes `--allow-source-change`: then
/// the secondary's store is replaced by the new source's history.
#[tokio::test]
async fn a_new_source_replaces_a_secondary_only_when_allowed() -> anyhow::Result<()> {
    let first = Cluster::start(1, primary_opts())?;
    let second = Cluster::start(1, primary_opts())?;
    let secondary = Cluster::start(1, secondary_opts())?;
    let rev = first.client().await?.put("from", "first", None).await?.header().expect("header").revision();
    let mirror = MirrorProcess::start(&first.endpoints(), &secondary, &[])?;
    mirror.wait_applied(rev, Duration::from_secs(30))?;
    drop(mirror);
    let mut c = second.client().await?;
    c.put("from", "second", None).await?;
    let rev2 = c.put("only", "second", None).await?.header().expect("header").revision();

    let refused = MirrorProcess::start(&second.endpoints(), &secondary, &[])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !refused.log().contains("--allow-source-change") {
        anyhow::ensure!(std::time::Instant::now() < deadline, "no refusal logged:\n{}", refused.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(secondary.etcdctl_ok(&["get", "from", "--print-value-only"])?.trim(), "first");
    drop(refused);

    let allowed = MirrorProcess::start(&second.endpoints(), &secondary, &["--allow-source-change"])?;
    allowed.wait_applied(rev2, Duration::from_secs(30))?;
    assert_eq!(dump(&secondary)?, dump(&second)?);
    Ok(())
}

/// The region client that the mirror and the gateway share finds a region's leader among its
/// members, goes on with the members that answer when one is down (naming it), and refuses to
/// connect when none answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_region_client_finds_the_leader_and_the_members_that_answer() -> anyhow::Result<()> {
    use meridian_wire::region::RegionClient;
    use std::time::Duration;
    let mut cluster = Cluster::start(3, ClusterOpts::fast())?;
    let urls: Vec<String> = cluster.endpoints().iter().map(|e| format!("http://{e}")).collect();
    let client =
        RegionClient::connect(&urls, Duration::from_secs(2), &Default::default()).await.map_err(anyhow::Error::msg)?;
    // Members count from 1, the client's indices from 0.
    let leader = cluster.leader().await? - 1;
    let view = client.view();
    assert_eq!(view.leader_index, Some(leader), "{view:?}");
    assert_eq!(view.answering, vec![0, 1, 2]);
    assert_eq!(client.channel().1, urls[leader]);

    let follower = (leader + 1) % 3;
    cluster.kill9(follower + 1)?;
    let view = client.probe(Duration::from_secs(1)).await;
    assert_eq!(view.answering.len(), 2, "{view:?}");
    assert!(!view.answering.contains(&follower));
    assert!(view.error.as_deref().is_some_and(|e| e.starts_with(&urls[follower])), "{view:?}");
    assert_eq!(client.channel().1, urls[leader], "still the leader");

    for i in 0..3 {
        if i != follower {
            cluster.kill9(i + 1)?;
        }
    }
    let refused = RegionClient::connect(&urls, Duration::from_millis(500), &Default::default()).await.err();
    assert!(refused.is_some(), "connected to a region with no member up");
    Ok(())
}
