//! Failover between regions, through `meridian region` as an operator runs it: a planned
//! switchover under a write load (nothing lost, HashKV equal at the fence, the old primary
//! fenced and then following the new one, the gateway moving writes), and an unplanned
//! promotion of a secondary whose primary was killed (refused without --allow-data-loss while
//! the old primary may still take writes, the RPO bound printed, leases re-armed and expiring,
//! stale-epoch mirror writes refused).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use meridian_proto::meridian::v1::mirror_client::MirrorClient;
use meridian_proto::meridian::v1::MirrorApplyRequest;
use meridian_tests::{meridian_bin, mirror_token_file, Cluster, ClusterOpts, GatewayProcess, MirrorProcess};

fn opts(region: &str, role: &str, primary_region: &str) -> Result<ClusterOpts> {
    let token = mirror_token_file()?.display().to_string();
    let extra = ["--region", region, "--initial-role", role, "--primary-region", primary_region]
        .into_iter()
        .map(String::from)
        .chain(["--mirror-token-file".to_string(), token])
        .collect();
    Ok(ClusterOpts { extra_args: extra, ..ClusterOpts::fast() })
}

/// Runs `meridian region ARGS`; (success, stdout, stderr).
fn region(args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(meridian_bin()?)
        .arg("region")
        .args(args)
        .env("MERIDIAN_MIRROR_TOKEN_FILE", mirror_token_file()?)
        .output()
        .context("run meridian region")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn status_json(c: &Cluster) -> Result<serde_json::Value> {
    let (ok, out, err) = region(&["status", "--endpoints", &c.endpoints().join(","), "-w", "json"])?;
    ensure!(ok, "region status failed: {err}");
    Ok(serde_json::from_str(&out)?)
}

/// Every key with its mod revision and value.
async fn contents(c: &Cluster) -> Result<BTreeMap<String, (i64, String)>> {
    let mut client = c.client().await?;
    let r = client.get("", Some(etcd_client::GetOptions::new().with_from_key())).await?;
    Ok(r.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                (kv.mod_revision(), String::from_utf8_lossy(kv.value()).into_owned()),
            )
        })
        .collect())
}

async fn wait_revision(c: &Cluster, rev: i64, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut client = c.client().await?;
    loop {
        let at = client.get("\0", None).await?.header().map_or(0, |h| h.revision());
        if at >= rev {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "revision {at}, not {rev}, within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A planned switchover while a client writes to the primary: every acknowledged write is on the
/// new primary at its revision, HashKV is equal at the fence, the old primary refuses writes and
/// follows the new one, a stale-epoch mirror write is refused, and a gateway sends writes to the
/// new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_switchover_under_a_write_load_loses_nothing() -> Result<()> {
    let old = Cluster::start(3, opts("us-east", "primary", "us-east")?)?;
    let new = Cluster::start(1, opts("eu-west", "secondary", "us-east")?)?;
    let mirror = MirrorProcess::start(&old.endpoints(), &new, &[])?;
    let gateway = GatewayProcess::start(
        "gw",
        "eu-west",
        &[("us-east", old.endpoints()), ("eu-west", new.endpoints())],
        &["--probe-interval", "50ms"],
    )?;

    // A writer on the old primary, bounded in count and time, until its writes are refused.
    let mut writer = old.client().await?;
    let load = tokio::spawn(async move {
        let mut acked = BTreeMap::new();
        let mut refusal = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..20_000 {
            if Instant::now() >= deadline {
                break;
            }
            let (k, v) = (format!("load/{i:05}"), format!("v{i}"));
            match writer.put(k.clone(), v.clone(), None).await {
                Ok(r) => {
                    acked.insert(k, (r.header().map_or(0, |h| h.revision()), v));
                }
                Err(e) => {
                    refusal = Some(e.to_string());
                    break;
                }
            }
        }
        (acked, refusal)
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (ok, printed, err) =
        region(&["switchover", "--from", &old.endpoints().join(","), "--to", &new.endpoints().join(",")])?;
    ensure!(ok, "switchover failed: {printed}{err}");
    eprintln!("{printed}");
    let (acked, refusal) = load.await?;
    ensure!(acked.len() > 20, "the load wrote only {} keys before the switchover", acked.len());
    let refusal = refusal.context("the old primary took writes after the switchover")?;
    ensure!(refusal.contains("read-only secondary of region") && refusal.contains("eu-west"), "{refusal}");
    let fence: i64 = printed
        .lines()
        .find_map(|l| l.split("its last revision is ").nth(1))
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("no fence in {printed}"))?;
    ensure!(printed.contains("write-unavailability window: "), "{printed}");
    let last_acked = acked.values().map(|(r, _)| *r).max().unwrap_or(0);
    ensure!(last_acked <= fence, "a write acknowledged at {last_acked}, after the fence {fence}");

    // Nothing lost: every acknowledged write is on the new primary, at its revision.
    let on_new = contents(&new).await?;
    for (k, want) in &acked {
        ensure!(on_new.get(k) == Some(want), "{k}: acknowledged {want:?}, on the new primary {:?}", on_new.get(k));
    }
    let old_hash = old.member_client(1).await?.hash_kv(fence).await?.hash();
    let new_hash = new.member_client(1).await?.hash_kv(fence).await?.hash();
    ensure!(old_hash == new_hash, "HashKV differs at the fence {fence}");

    // The state, for a program: same epoch, roles swapped, the lineage names the new epoch.
    let (o, n) = (status_json(&old)?, status_json(&new)?);
    ensure!(o["role"] == "secondary" && n["role"] == "primary", "{o} {n}");
    ensure!(o["epoch"] == 1 && n["epoch"] == 1, "{o} {n}");
    ensure!(o["fence_revision"] == fence && n["fence_revision"] == fence, "{o} {n}");
    ensure!(o["primary_region"] == "eu-west", "{o}");
    let lineage = n["lineage"].as_array().context("lineage")?;
    ensure!(lineage.len() == 2, "{n}");
    ensure!(lineage[0]["region"] == "us-east" && lineage[0]["first_revision"] == 1, "{n}");
    ensure!(lineage[1]["region"] == "eu-west" && lineage[1]["first_revision"] == fence + 1, "{n}");
    ensure!(lineage[1]["epoch"] == 1 && lineage[1]["primary_cluster_id"] == n["cluster_id"], "{n}");
    // For a person.
    let (_, simple, _) = region(&["status", "--endpoints", &new.endpoints().join(",")])?;
    ensure!(simple.contains("role:            primary"), "{simple}");
    ensure!(simple.contains(&format!("epoch 1 from revision {}", fence + 1)), "{simple}");

    // New writes go on at fence + 1 on the new primary.
    let mut c = new.client().await?;
    let r = c.put("after", "1", None).await?;
    ensure!(r.header().map(|h| h.revision()) == Some(fence + 1), "{r:?}");

    // A mirror write of the old epoch into the fenced old primary is refused.
    let mut apply = MirrorClient::connect(old.client_url(1)).await?;
    let mut req = tonic::Request::new(MirrorApplyRequest {
        source_cluster_id: u64::from_str_radix(n["cluster_id"].as_str().unwrap_or("0"), 16)?,
        epoch: 0,
        ..Default::default()
    });
    let token = std::fs::read_to_string(mirror_token_file()?)?;
    req.metadata_mut().insert(meridian_wire::token::TOKEN_METADATA, token.trim().parse()?);
    let stale = apply.apply(req).await.expect_err("a stale epoch was applied");
    ensure!(stale.code() == tonic::Code::FailedPrecondition, "{stale:?}");
    ensure!(stale.message().contains("stale mirror epoch 0 (current 1)"), "{stale:?}");

    // The gateway now sends writes to the new primary (the highest epoch).
    let gw = format!("http://{}", gateway.endpoint());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut kv = meridian_proto::etcdserverpb::kv_client::KvClient::connect(gw.clone()).await?;
        let put =
            meridian_proto::etcdserverpb::PutRequest { key: "via-gw".into(), value: "1".into(), ..Default::default() };
        match kv.put(put).await {
            Ok(r) if r.metadata().get("x-meridian-region").is_some_and(|v| v == "eu-west") => break,
            other => ensure!(Instant::now() < deadline, "writes through the gateway: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The old primary follows the new one, from the fence on.
    drop(mirror);
    let back = MirrorProcess::start(&new.endpoints(), &old, &[])?;
    let rev = c.put("after", "2", None).await?.header().map_or(0, |h| h.revision());
    wait_revision(&old, rev, Duration::from_secs(20)).await?;
    ensure!(contents(&old).await? == contents(&new).await?, "the old primary differs from the new one");
    ensure!(status_json(&old)?["lineage"] == n["lineage"], "the old primary keeps the new lineage");
    drop(back);
    Ok(())
}

/// The primary region is killed: a promotion is refused while the old primary may still take
/// writes, then goes ahead with --allow-data-loss, printing the RPO bound; the fence is the
/// applied revision, writes go on after it, a lease nobody keeps alive expires, and the killed
/// primary's mirror writes are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplanned_promotion_fences_and_rearms_leases() -> Result<()> {
    let mut old = Cluster::start(1, opts("us-east", "primary", "us-east")?)?;
    let new = Cluster::start(1, opts("eu-west", "secondary", "us-east")?)?;
    let mut mirror = MirrorProcess::start(&old.endpoints(), &new, &[])?;
    let mut c = old.client().await?;
    let lease = c.lease_grant(4, None).await?.id();
    c.put("leased", "1", Some(etcd_client::PutOptions::new().with_lease(lease))).await?;
    let mut last = 0;
    for i in 0..50 {
        last = c.put(format!("k{i}"), "v", None).await?.header().map_or(0, |h| h.revision());
    }
    mirror.wait_applied(last, Duration::from_secs(20))?;
    // Heartbeats carry the source revision; give one time to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    old.kill9(1)?;
    mirror.kill9()?;

    let eps = new.endpoints().join(",");
    let (ok, out, err) = region(&["promote", "--endpoints", &eps])?;
    ensure!(!ok, "promoted while the old primary was heard from just now: {out}");
    ensure!(err.contains("the old primary may still be taking writes"), "{err}");
    ensure!(out.contains("RPO bound: 0 revisions"), "{out}");

    let started = Instant::now();
    let (ok, out, err) = region(&["promote", "--endpoints", &eps, "--allow-data-loss"])?;
    ensure!(ok, "promote failed: {out}{err}");
    ensure!(out.contains(&format!("fence revision {last}")), "{out}");
    let mut n = new.client().await?;
    let r = n.put("after", "1", None).await?;
    ensure!(r.header().map(|h| h.revision()) == Some(last + 1), "{r:?}");
    let promoted_in = started.elapsed();
    let st = status_json(&new)?;
    ensure!(st["role"] == "primary" && st["epoch"] == 1 && st["fence_revision"] == last, "{st}");

    // A second promotion of a primary is refused.
    let (ok, _, err) = region(&["promote", "--endpoints", &eps, "--allow-data-loss"])?;
    ensure!(!ok && err.contains("already the primary"), "{err}");

    // The lease lives on with its id and full TTL, then expires: nobody keeps it alive.
    let ttl = n.lease_time_to_live(lease, None).await?;
    ensure!(ttl.ttl() > 2, "lease {lease:x} after promotion: {ttl:?}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while n.get("leased", None).await?.count() == 1 {
        ensure!(Instant::now() < deadline, "the leased key outlived its TTL on the new primary");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The killed primary comes back: a mirror from it into the new primary idles, saying why,
    // and a mirror write of the old epoch is refused.
    old.restart(1)?;
    let stale = MirrorProcess::start(&old.endpoints(), &new, &[])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stale.log().contains("idle: the target region \"eu-west\" is the primary (epoch 1)") {
        ensure!(Instant::now() < deadline, "{}", stale.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut apply = MirrorClient::connect(new.client_url(1)).await?;
    let mut req = tonic::Request::new(MirrorApplyRequest { epoch: 0, ..Default::default() });
    let token = std::fs::read_to_string(mirror_token_file()?)?;
    req.metadata_mut().insert(meridian_wire::token::TOKEN_METADATA, token.trim().parse()?);
    let refused = apply.apply(req).await.expect_err("the new primary took a mirror write");
    ensure!(refused.message().contains("mirror writes go to a secondary"), "{refused:?}");
    ensure!(n.get("k0", None).await?.count() == 1);
    eprintln!("promote to first write: {promoted_in:?}");
    Ok(())
}

/// Runs `meridian region rejoin` of `old` onto `new` with its report at `report`; what it printed.
fn rejoin(old: &Cluster, new: &Cluster, report: &std::path::Path) -> Result<String> {
    let (ok, out, err) = region(&[
        "rejoin",
        "--endpoints",
        &old.endpoints().join(","),
        "--primary",
        &new.endpoints().join(","),
        "--report",
        report.to_str().context("path")?,
    ])?;
    ensure!(ok, "rejoin failed: {out}{err}");
    Ok(out)
}

/// The lines of a rejoin report: the changes, then the summary.
fn read_report(path: &std::path::Path) -> Result<(Vec<serde_json::Value>, serde_json::Value)> {
    let text = std::fs::read_to_string(path)?;
    let mut lines: Vec<serde_json::Value> =
        text.lines().map(serde_json::from_str).collect::<Result<_, _>>().context("report line")?;
    let summary = lines.pop().context("empty report")?;
    ensure!(summary["summary"] == true, "the last line is not the summary: {summary}");
    Ok((lines, summary))
}

/// The whole primary region is killed under a write load after its mirror stopped, so writes are
/// lost; the secondary is promoted and takes new writes; the old primary comes back and rejoins:
/// the report names every acknowledged write missing on the new primary and only writes the
/// client made, exactly the revisions after the fence; the old store is rewound (older revisions
/// still readable) and follows the new primary with no full copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_rejoins_with_a_report_of_every_lost_write() -> Result<()> {
    let mut old = Cluster::start(3, opts("us-east", "primary", "us-east")?)?;
    let new = Cluster::start(1, opts("eu-west", "secondary", "us-east")?)?;
    let mut mirror = MirrorProcess::start(&old.endpoints(), &new, &[])?;

    let mut writer = old.client().await?;
    let load = tokio::spawn(async move {
        let mut acked: BTreeMap<String, (i64, String)> = BTreeMap::new();
        let mut attempted = std::collections::BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..50_000 {
            if Instant::now() >= deadline {
                break;
            }
            let (k, v) = (format!("load/{i:05}"), format!("v{i}"));
            attempted.insert(k.clone());
            match writer.put(k.clone(), v.clone(), None).await {
                Ok(r) => {
                    acked.insert(k, (r.header().map_or(0, |h| h.revision()), v));
                }
                Err(_) => break,
            }
        }
        (acked, attempted)
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    mirror.kill9()?;
    // Writes go on with nobody mirroring them: these are the ones a failover loses.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 1..=3 {
        old.kill9(i)?;
    }
    let (acked, attempted) = load.await?;
    let last_acked = acked.values().map(|(r, _)| *r).max().context("no write acknowledged")?;

    let (ok, out, err) = region(&["promote", "--endpoints", &new.endpoints().join(","), "--allow-data-loss"])?;
    ensure!(ok, "promote failed: {out}{err}");
    let fence: i64 = out
        .split("fence revision ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("no fence in {out}"))?;
    ensure!(fence < last_acked, "nothing was lost (fence {fence}, last acknowledged {last_acked})");
    // The new primary takes writes at the revisions the old one also used.
    let mut n = new.client().await?;
    for i in 0..5 {
        n.put(format!("new/{i}"), "n", None).await?;
    }
    let on_new = contents(&new).await?;

    for i in 1..=3 {
        old.spawn(i)?;
    }
    old.wait_ready_all()?;
    let old_revision = status_json(&old)?["revision"].as_i64().context("revision")?;
    let dir = tempfile::tempdir()?;
    let report = dir.path().join("lost.jsonl");
    let out = rejoin(&old, &new, &report)?;
    ensure!(out.contains("rewound:"), "{out}");
    let (lines, summary) = read_report(&report)?;
    ensure!(summary["fence"] == fence && summary["epoch"] == 1 && summary["count"] == lines.len(), "{summary}");
    ensure!(summary["hash_equal"] == true && summary["recopied"] == false, "{summary}");

    // Exactly the revisions after the fence, each a put of the load.
    let revisions: Vec<i64> = lines.iter().filter_map(|l| l["revision"].as_i64()).collect();
    ensure!(revisions == (fence + 1..=old_revision).collect::<Vec<_>>(), "report revisions {revisions:?}");
    let mut reported = BTreeMap::new();
    for l in &lines {
        let key = l["key"].as_str().context("key")?.to_string();
        ensure!(l["op"] == "put" && attempted.contains(&key), "a write the client never made: {l}");
        ensure!(l["prev_kv"].is_null(), "the load writes each key once: {l}");
        reported.insert(key, (l["revision"].as_i64().unwrap_or(0), l["value"].as_str().unwrap_or("").to_string()));
    }
    // Every acknowledged write is on the new primary or in the report, never both.
    for (k, want) in &acked {
        let kept = on_new.get(k) == Some(want);
        let listed = reported.get(k) == Some(want);
        ensure!(kept != listed, "{k} {want:?}: on the new primary {kept}, in the report {listed}");
        ensure!(kept == (want.0 <= fence), "{k} at {}: fence {fence}", want.0);
    }

    // Rewound, not copied: older revisions stay readable, and the mirror copies nothing.
    let st = status_json(&old)?;
    ensure!(st["role"] == "secondary" && st["revision"] == fence && st["fence_revision"] == fence, "{st}");
    let mut o = old.client().await?;
    let early = o.get("load/00000", Some(etcd_client::GetOptions::new().with_revision(fence))).await?;
    ensure!(early.count() == 1, "revision {fence} is not readable on the rewound store");
    let back = MirrorProcess::start(&new.endpoints(), &old, &[])?;
    let rev = n.put("after-rejoin", "1", None).await?.header().map_or(0, |h| h.revision());
    back.wait_applied(rev, Duration::from_secs(20))?;
    ensure!(contents(&old).await? == contents(&new).await?, "the rejoined region differs from the primary");
    let m = back.status()?;
    ensure!(m["copies_total"] == 0, "the rejoin needed a full copy: {m}");
    ensure!(status_json(&old)?["lineage"] == status_json(&new)?["lineage"]);
    Ok(())
}

/// A rejoin where the histories differ before the fence (the promoted region mirrored only a
/// prefix) empties the old primary after writing its report, and the mirror copies the new
/// primary's history into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoin_with_different_histories_recopies() -> Result<()> {
    let mut old = Cluster::start(1, opts("us-east", "primary", "us-east")?)?;
    let new = Cluster::start(1, opts("eu-west", "secondary", "us-east")?)?;
    let mut c = old.client().await?;
    // y/1 is never mirrored: the two histories differ from revision 2 on.
    c.put("y/1", "b", None).await?;
    c.put("x/1", "a", None).await?;
    let mut mirror = MirrorProcess::start(&old.endpoints(), &new, &["--prefix", "x/"])?;
    let mut n = new.client().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while n.get("x/1", None).await?.count() == 0 {
        ensure!(Instant::now() < deadline, "x/1 never reached the secondary");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mirror.kill9()?;
    c.put("x/2", "lost", None).await?;
    old.kill9(1)?;
    let (ok, out, err) = region(&["promote", "--endpoints", &new.endpoints().join(","), "--allow-data-loss"])?;
    ensure!(ok, "promote failed: {out}{err}");
    n.put("x/3", "new", None).await?;

    old.restart(1)?;
    let dir = tempfile::tempdir()?;
    let report = dir.path().join("lost.jsonl");
    let out = rejoin(&old, &new, &report)?;
    ensure!(out.contains("emptied:"), "{out}");
    let (lines, summary) = read_report(&report)?;
    ensure!(summary["hash_equal"] == false && summary["recopied"] == true, "{summary}");
    ensure!(lines.iter().any(|l| l["key"] == "x/2" && l["value"] == "lost"), "{lines:?}");

    let back = MirrorProcess::start(&new.endpoints(), &old, &[])?;
    let rev = n.put("after", "1", None).await?.header().map_or(0, |h| h.revision());
    back.wait_applied(rev, Duration::from_secs(20))?;
    ensure!(contents(&old).await? == contents(&new).await?, "the re-copied region differs from the primary");
    ensure!(back.status()?["copies_total"] == 1, "{}", back.status()?);
    Ok(())
}

/// Three regions, a mirror into each listing the other two: after a switchover and then an
/// unplanned failover, every live secondary converges on the new primary with no command re-run,
/// and the mirror into the primary idles, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_follow_the_topology_through_a_switchover_and_a_failover() -> Result<()> {
    let a = Cluster::start(1, opts("us-east", "primary", "us-east")?)?;
    let mut b = Cluster::start(1, opts("eu-west", "secondary", "us-east")?)?;
    let c = Cluster::start(1, opts("ap-south", "secondary", "us-east")?)?;
    let eps = |x: &Cluster| x.endpoints().join(",");
    let into = |target: &Cluster, others: [&Cluster; 2]| {
        MirrorProcess::start(&others[0].endpoints(), target, &["--source", &eps(others[1])])
    };
    let ma = into(&a, [&b, &c])?;
    let mb = into(&b, [&a, &c])?;
    let mc = into(&c, [&a, &b])?;
    let mut ca = a.client().await?;
    let rev = ca.put("k", "from-a", None).await?.header().map_or(0, |h| h.revision());
    mb.wait_applied(rev, Duration::from_secs(20))?;
    mc.wait_applied(rev, Duration::from_secs(20))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ma.status()?["state"]
        .as_str()
        .unwrap_or("")
        .starts_with("idle: the target region \"us-east\" is the primary")
    {
        ensure!(Instant::now() < deadline, "the mirror into the primary does not idle: {}", ma.status()?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The first copy into the empty secondary; no other comes after.
    let first_copies = mc.status()?["copies_total"].clone();

    // Planned: b takes over; a and c follow it.
    let (ok, out, err) = region(&["switchover", "--from", &eps(&a), "--to", &eps(&b)])?;
    ensure!(ok, "switchover failed: {out}{err}");
    let mut cb = b.client().await?;
    let rev = cb.put("k", "from-b", None).await?.header().map_or(0, |h| h.revision());
    for (name, target) in [("us-east", &a), ("ap-south", &c)] {
        wait_revision(target, rev, Duration::from_secs(20)).await.with_context(|| format!("{name}"))?;
        ensure!(contents(target).await? == contents(&b).await?, "{name} differs from the primary");
    }

    // Unplanned: b is killed once both have its last write; a is promoted; c follows a.
    let rev = cb.put("k", "last-from-b", None).await?.header().map_or(0, |h| h.revision());
    wait_revision(&a, rev, Duration::from_secs(20)).await?;
    if let Err(e) = wait_revision(&c, rev, Duration::from_secs(5)).await {
        eprintln!("DEBUG mc log:\n{}", mc.log());
        return Err(e);
    }
    b.kill9(1)?;
    let (ok, out, err) = region(&["promote", "--endpoints", &eps(&a), "--allow-data-loss"])?;
    ensure!(ok, "promote failed: {out}{err}");
    let rev = ca.put("k", "from-a-again", None).await?.header().map_or(0, |h| h.revision());
    wait_revision(&c, rev, Duration::from_secs(20)).await?;
    ensure!(contents(&c).await? == contents(&a).await?, "ap-south differs from the new primary");
    // The new epoch comes with the mirror's next look at its source (every 250 ms), which may
    // be after the write above came through the session it had before.
    let deadline = Instant::now() + Duration::from_secs(5);
    let st = loop {
        let st = status_json(&c)?;
        if st["epoch"] == 2 || Instant::now() >= deadline {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(st["epoch"] == 2 && st["primary_region"] == "us-east", "{st}\nmc log:\n{}", mc.log());
    ensure!(mc.status()?["copies_total"] == first_copies, "a secondary was copied again: {}", mc.status()?);
    drop((ma, mb));
    Ok(())
}

/// A client of a gateway keeps a lease alive and watches a key across a switchover: its
/// keep-alive stream moves to the new primary with no error, the lease outlives several TTLs
/// there, and its watch (served in the gateway's region, which now follows the new primary) sees
/// the writes made after the switchover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_and_watches_through_a_gateway_go_on_after_a_switchover() -> Result<()> {
    let old = Cluster::start(1, opts("us-east", "primary", "us-east")?)?;
    let new = Cluster::start(1, opts("eu-west", "secondary", "us-east")?)?;
    // A mirror into each region; each idles while its target is the primary.
    let _into_new = MirrorProcess::start(&old.endpoints(), &new, &[])?;
    let _into_old = MirrorProcess::start(&new.endpoints(), &old, &[])?;
    let gateway = GatewayProcess::start(
        "gw",
        "us-east",
        &[("us-east", old.endpoints()), ("eu-west", new.endpoints())],
        &["--probe-interval", "50ms"],
    )?;
    let mut c = etcd_client::Client::connect([gateway.endpoint()], None).await?;
    let lease = c.lease_grant(3, None).await?.id();
    let rev = c.put("leased", "1", Some(etcd_client::PutOptions::new().with_lease(lease))).await?;
    let rev = rev.header().map_or(0, |h| h.revision());
    wait_revision(&new, rev, Duration::from_secs(20)).await?;
    let (mut keeper, mut answers) = c.lease_keep_alive(lease).await?;
    let (_watcher, mut watch) = c.watch("w", None).await?;

    let (ok, out, err) =
        region(&["switchover", "--from", &old.endpoints().join(","), "--to", &new.endpoints().join(",")])?;
    ensure!(ok, "switchover failed: {out}{err}");
    // Eight seconds of keep-alives, well past the 3 s TTL and its re-arm on promotion.
    for i in 0..8 {
        keeper.keep_alive().await?;
        let answer = tokio::time::timeout(Duration::from_secs(5), answers.message()).await?;
        let answer = answer?.with_context(|| format!("keep-alive {i}: the stream ended"))?;
        ensure!(answer.ttl() > 0, "keep-alive {i}: the lease is gone: {answer:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut n = new.client().await?;
    ensure!(n.get("leased", None).await?.count() == 1, "the kept-alive lease expired on the new primary");

    let put = c.put("w", "after", None).await?;
    let at = put.header().map_or(0, |h| h.revision());
    let event = tokio::time::timeout(Duration::from_secs(10), watch.message()).await??.context("watch ended")?;
    let kv = event.events().first().and_then(|e| e.kv()).context("no event")?;
    ensure!(kv.value() == b"after" && kv.mod_revision() == at, "{event:?}");
    let (_, page) = meridian_tests::http_get(gateway.endpoint().parse()?, "/metrics")?;
    let moved = page
        .lines()
        .find(|l| l.starts_with("meridian_gateway_keepalive_failovers_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    ensure!(moved.is_some_and(|n| n >= 1.0), "{page}");
    Ok(())
}

/// Three regions and a topology cluster: the primary holds the primary lease; cut off from the
/// topology cluster, it stops taking writes within its lease (a retryable error), and the most
/// up-to-date secondary promotes itself (--auto-failover) and takes writes; the old primary, back
/// in touch, still refuses them, since another region holds the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_stops_taking_writes_and_a_secondary_takes_over() -> Result<()> {
    use meridian_tests::LatencyProxy;
    let topology = Cluster::start(3, ClusterOpts::fast())?;
    // The primary reaches the topology cluster through relays that the test can cut.
    let relays: Vec<LatencyProxy> =
        topology.endpoints().iter().map(|e| LatencyProxy::start(e, Duration::ZERO)).collect::<Result<_>>()?;
    let through: Vec<String> = relays.iter().map(LatencyProxy::endpoint).collect();
    let with_topology = |mut o: ClusterOpts, eps: &[String], auto: bool| {
        o.extra_args.extend([
            "--topology-endpoints".to_string(),
            eps.join(","),
            "--primary-lease-ttl".into(),
            "2s".into(),
        ]);
        if auto {
            o.extra_args.extend(["--auto-failover".to_string(), "--failover-after".into(), "2s".into()]);
        }
        o
    };
    let direct = topology.endpoints();
    let a = Cluster::start(1, with_topology(opts("us-east", "primary", "us-east")?, &through, false))?;
    let b = Cluster::start(1, with_topology(opts("eu-west", "secondary", "us-east")?, &direct, true))?;
    let c = Cluster::start(1, with_topology(opts("ap-south", "secondary", "us-east")?, &direct, true))?;
    let eps = |x: &Cluster| x.endpoints().join(",");
    let _into_b = MirrorProcess::start(&a.endpoints(), &b, &["--source", &eps(&c)])?;
    let _into_c = MirrorProcess::start(&a.endpoints(), &c, &["--source", &eps(&b)])?;

    // The primary takes writes once it holds the lease.
    let mut ca = a.client().await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let rev = loop {
        match ca.put("k", "from-a", None).await {
            Ok(r) => break r.header().map_or(0, |h| h.revision()),
            Err(e) => ensure!(Instant::now() < deadline, "the primary never took a write: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    wait_revision(&b, rev, Duration::from_secs(20)).await?;
    wait_revision(&c, rev, Duration::from_secs(20)).await?;
    let st = status_json(&a)?;
    ensure!(st["primary_lease_ms"].as_i64().is_some_and(|ms| ms > 0), "{st}");
    ensure!(status_json(&b)?["primary_lease_ms"] == 0, "a secondary holds no lease");

    // Cut off: no renewal gets through.
    let cut = Instant::now();
    for r in &relays {
        r.set_delay(Duration::from_secs(3600));
    }
    let refusal = loop {
        match ca.put("k", "while-cut-off", None).await {
            Err(e) => break e.to_string(),
            Ok(_) => {
                ensure!(cut.elapsed() < Duration::from_secs(6), "still taking writes {:?} after the cut", cut.elapsed())
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let fenced_in = cut.elapsed();
    ensure!(fenced_in <= Duration::from_millis(2000 + 1500), "writes stopped only after {fenced_in:?}");
    ensure!(refusal.contains("does not hold the primary lease"), "{refusal}");
    ensure!(refusal.contains("Unavailable") || refusal.contains("unavailable"), "{refusal}");

    // A secondary takes over by itself: the lease ran out (2 s) and none held it for 2 s more.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (winner, mut cw) = loop {
        let mut found = None;
        for x in [&b, &c] {
            let mut client = x.client().await?;
            if client.put("k", "after-failover", None).await.is_ok() {
                found = Some((status_json(x)?["region"].as_str().unwrap_or("").to_string(), client));
                break;
            }
        }
        if let Some(f) = found {
            break f;
        }
        ensure!(Instant::now() < deadline, "no secondary took over within 20 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let rto = cut.elapsed();
    ensure!(winner == "ap-south" || winner == "eu-west", "{winner}");
    let rev = cw.get("k", None).await?.header().map_or(0, |h| h.revision());
    ensure!(rev > 0);

    // Back in touch, the old primary still refuses writes: another region holds the lease.
    for r in &relays {
        r.set_delay(Duration::ZERO);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let err = ca.put("k", "old-primary-again", None).await.expect_err("the old primary took a write").to_string();
    ensure!(err.contains("holds the primary lease") || err.contains("does not hold the primary lease"), "{err}");
    eprintln!("writes stopped {fenced_in:?} after the cut; {winner} took a write {rto:?} after it");
    Ok(())
}
