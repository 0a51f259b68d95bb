//! `meridian gateway` in front of two regions: a primary (us-east) and a read-only secondary
//! (eu-west) fed by a mirror, with the gateway in eu-west. Unchanged etcd clients (etcdctl, the
//! etcd-client crate) work through it; writes reach the primary, reads go where their consistency
//! allows, and every answer says which region served it.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use meridian_proto::etcdserverpb::kv_client::KvClient;
use meridian_proto::etcdserverpb::watch_client::WatchClient;
use meridian_proto::etcdserverpb::watch_request::RequestUnion;
use meridian_proto::etcdserverpb::{PutRequest, RangeRequest, WatchCreateRequest, WatchRequest};
use meridian_tests::history::{self, Op, OpKind};
use meridian_tests::regions::{regions_started, rtt_of, serializable, served_by, two_regions, TwoRegions};
use meridian_tests::{GatewayProcess, LatencyProxy, MirrorProcess};
use tonic::Request;

/// etcdctl through the gateway: KV, Txn, Watch, Lease, Compact, endpoint status and member list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_works_through_a_gateway() -> Result<()> {
    let r = two_regions()?;
    let gw = [r.gateway.endpoint()];
    let ctl = |args: &[&str]| meridian_tests::etcdctl_ok(&gw, args);
    assert_eq!(ctl(&["put", "k", "v1"])?.trim(), "OK");
    // The write reached the primary, read there directly.
    assert_eq!(r.primary.etcdctl_ok(&["get", "k", "--print-value-only"])?.trim(), "v1");
    assert_eq!(ctl(&["get", "k", "--print-value-only"])?.trim(), "v1");
    let txn = meridian_tests::etcdctl_with_input(&gw, &["txn"], "value(\"k\") = \"v1\"\n\nput k v2\n\nput k v3\n\n")?;
    ensure!(txn.success() && txn.stdout.starts_with("SUCCESS"), "txn: {txn:?}");
    assert_eq!(ctl(&["get", "k", "--print-value-only"])?.trim(), "v2");

    // Watch: history from an old revision, through the gateway.
    let watched = meridian_tests::etcdctl_with_timeout(&gw, &["watch", "k", "--rev", "1"], Duration::from_secs(2))?;
    ensure!(watched.contains("v1") && watched.contains("v2"), "watch output: {watched}");

    // Lease: grant, attach, keep-alive once, time-to-live with keys.
    let grant = ctl(&["lease", "grant", "60"])?;
    let id = grant.split_whitespace().nth(1).context("lease id")?.to_string();
    ctl(&["put", "leased", "x", "--lease", &id])?;
    ensure!(ctl(&["lease", "keep-alive", "--once", &id])?.contains("TTL"), "keep-alive");
    let ttl = ctl(&["lease", "timetolive", &id, "--keys"])?;
    ensure!(ttl.contains("leased"), "time-to-live: {ttl}");

    // Compact, then the compacted revision is refused with etcd's message.
    let rev = r.primary.etcdctl_json(&["get", "k"])?["header"]["revision"].as_i64().context("revision")?;
    ctl(&["compact", &(rev - 1).to_string()])?;
    let old = meridian_tests::etcdctl(&gw, &["get", "k", "--rev", "1"])?;
    ensure!(old.stderr.contains("required revision has been compacted"), "compacted read: {old:?}");

    // Status answers for the gateway's region; MemberList lists the gateway itself.
    let status = ctl(&["endpoint", "status", "-w", "json"])?;
    ensure!(status.contains("\"revision\""), "status: {status}");
    let members = ctl(&["member", "list"])?;
    ensure!(members.contains("gw-eu") && members.contains(&r.gateway.endpoint()), "member list: {members}");
    drop(r.secondary);
    Ok(())
}

/// Writes go to the primary; serializable reads to the gateway's own
/// region while it is fresh within the bound. With the mirror stopped the secondary's staleness
/// grows past the request's bound and reads move to the primary; they come back once the mirror
/// runs again. On one connection, a read never sees a revision older than that connection's write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_where_their_consistency_allows() -> Result<()> {
    let mut r = two_regions()?;
    let mut kv = KvClient::connect(format!("http://{}", r.gateway.endpoint())).await?;
    let put = kv.put(PutRequest { key: "k".into(), value: "1".into(), ..Default::default() }).await?;
    assert_eq!(served_by(&put), "us-east", "writes go to the primary");
    let written = put.get_ref().header.as_ref().context("header")?.revision;

    // Linearizable: the nearest region (here the gateway's own) serves it once it has applied the
    // primary's committed revision, so it sees the write.
    let lin = kv.range(RangeRequest { key: "k".into(), ..Default::default() }).await?;
    assert_eq!(lin.get_ref().kvs.first().map(|kv| kv.value.clone()), Some(b"1".to_vec()));
    ensure!(lin.get_ref().header.as_ref().context("header")?.revision >= written);

    // Read-your-writes on this connection: served by a region that has the write.
    let read = kv.range(serializable("k", None)).await?;
    let at = read.get_ref().header.as_ref().context("header")?.revision;
    ensure!(at >= written, "a read on the writing connection saw revision {at} < {written}");
    assert_eq!(read.get_ref().kvs.len(), 1);

    // Once the secondary holds the write, serializable reads stay local.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = kv.range(serializable("k", Some("2s"))).await?;
        if served_by(&resp) == "eu-west" {
            break;
        }
        ensure!(Instant::now() < deadline, "serializable reads never went to eu-west");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The mirror stops: within the bound plus a probe or two, reads bounded by 500ms leave eu-west.
    r.mirror.kill9()?;
    let stopped = Instant::now();
    loop {
        let resp = kv.range(serializable("k", Some("500ms"))).await?;
        if served_by(&resp) == "us-east" {
            break;
        }
        ensure!(stopped.elapsed() < Duration::from_secs(3), "a stale secondary kept serving 500ms-bounded reads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A looser bound still takes the local region.
    let loose = kv.range(serializable("k", Some("1h"))).await?;
    assert_eq!(served_by(&loose), "eu-west");

    // The mirror comes back: bounded reads return to eu-west.
    r.mirror.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let resp = kv.range(serializable("k", Some("500ms"))).await?;
        if served_by(&resp) == "eu-west" {
            break;
        }
        ensure!(Instant::now() < deadline, "reads never came back to eu-west after the mirror restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A bad header gets a clear error.
    let bad = kv.range(serializable("k", Some("soon"))).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("x-meridian-max-staleness"), "{}", bad.message());
    Ok(())
}

/// With the primary region down, writes fail fast with `Unavailable` (which clients retry), and
/// serializable reads are still served by the secondary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_down_writes_fail_fast_and_reads_go_on() -> Result<()> {
    let mut r = two_regions()?;
    let mut kv = KvClient::connect(format!("http://{}", r.gateway.endpoint())).await?;
    let put = kv.put(PutRequest { key: "k".into(), value: "1".into(), ..Default::default() }).await?;
    // The secondary has the write before the primary dies (else the read below, which must not go
    // behind this connection's own write, has no region to go to).
    r.mirror.wait_applied(put.get_ref().header.as_ref().map_or(0, |h| h.revision), Duration::from_secs(10))?;
    r.primary.kill9(1)?;
    r.gateway.wait_regions(Duration::from_secs(10), |doc| {
        doc["regions"].as_array().is_some_and(|rs| rs.iter().any(|r| r["name"] == "us-east" && r["healthy"] == false))
    })?;
    let started = Instant::now();
    let err = kv.put(PutRequest { key: "k".into(), value: "2".into(), ..Default::default() }).await.unwrap_err();
    ensure!(started.elapsed() < Duration::from_secs(1), "a write took {:?} to fail", started.elapsed());
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let read = kv.range(serializable("k", Some("1h"))).await?;
    assert_eq!(served_by(&read), "eu-west");
    assert_eq!(read.get_ref().kvs.first().map(|kv| kv.value.clone()), Some(b"1".to_vec()));
    if read.get_ref().kvs.is_empty() {
        bail!("the secondary lost the key");
    }
    Ok(())
}

/// "Nearest" is measured: with 25 ms each way injected in front of the primary, the gateway's RTT
/// figures show it, serializable reads, watches and linearizable reads are served by the near
/// region (the last after a read index from the primary: it still sees a write another client just
/// made), and writes still go to the primary. When the latencies swap, reads follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nearest_region_is_measured_and_follows_latency() -> Result<()> {
    let (primary, secondary) = regions_started()?;
    let _mirror = MirrorProcess::start(&primary.endpoints(), &secondary, &[])?;
    let to_primary = LatencyProxy::start(&primary.endpoint(1), Duration::from_millis(25))?;
    let to_secondary = LatencyProxy::start(&secondary.endpoint(1), Duration::ZERO)?;
    let gateway = GatewayProcess::start(
        "gw-eu",
        "eu-west",
        &[("us-east", vec![to_primary.endpoint()]), ("eu-west", vec![to_secondary.endpoint()])],
        &[],
    )?;
    gateway
        .wait_regions(Duration::from_secs(20), |doc| rtt_of(doc, "us-east") > 40.0 && rtt_of(doc, "eu-west") < 10.0)?;

    let url = format!("http://{}", gateway.endpoint());
    let (mut writer, mut reader) = (KvClient::connect(url.clone()).await?, KvClient::connect(url.clone()).await?);
    let put = writer.put(PutRequest { key: "k".into(), value: "near".into(), ..Default::default() }).await?;
    assert_eq!(served_by(&put), "us-east");
    let lin = reader.range(RangeRequest { key: "k".into(), ..Default::default() }).await?;
    assert_eq!(served_by(&lin), "eu-west", "a linearizable read from the near, caught-up region");
    assert_eq!(lin.get_ref().kvs.first().map(|kv| kv.value.clone()), Some(b"near".to_vec()));
    let ser = reader.range(serializable("k", None)).await?;
    assert_eq!(served_by(&ser), "eu-west");
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest { key: "k".into(), ..Default::default() })),
    };
    let watch = WatchClient::connect(url.clone()).await?.watch(futures::stream::iter([create])).await?;
    assert_eq!(served_by(&watch), "eu-west", "watches go to the nearest region");

    // The latencies swap: within the RTT average's few seconds, reads move to us-east.
    to_primary.set_delay(Duration::ZERO);
    to_secondary.set_delay(Duration::from_millis(40));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resp = reader.range(serializable("k", None)).await?;
        if served_by(&resp) == "us-east" {
            break;
        }
        ensure!(Instant::now() < deadline, "reads stayed in eu-west: {}", gateway.regions()?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// How the readers of a register history read.
#[derive(Clone, Copy)]
enum ReadAs {
    Linearizable,
    /// Serializable, with this `x-meridian-max-staleness`.
    Bounded(&'static str),
}

/// Runs `writers` clients writing unique values to one key through `write_to` and `readers`
/// clients reading it through `read_from`, each on its own connection, for `run_for` (and at most
/// 2,000 operations each); returns the history.
async fn register_history(
    write_to: &str,
    read_from: &str,
    read_as: ReadAs,
    (writers, readers): (usize, usize),
    run_for: Duration,
) -> Result<Vec<Op>> {
    let deadline = Instant::now() + run_for;
    let mut tasks = Vec::new();
    for client in 0..writers + readers {
        let endpoint = if client < writers { write_to } else { read_from };
        let mut kv = KvClient::connect(format!("http://{endpoint}")).await?;
        tasks.push(tokio::spawn(async move {
            let mut ops = Vec::new();
            let mut n = 0;
            // Bounded in time, and in count well past what the time allows: a read is paced, so
            // a fast machine does not finish its reads before the outage the test injects.
            while Instant::now() < deadline && n < 20_000 {
                n += 1;
                let start = Instant::now();
                let kind = if client < writers {
                    let put =
                        PutRequest { key: "reg".into(), value: format!("w{client}-{n}").into(), ..Default::default() };
                    let resp = kv.put(put).await.context("write")?;
                    OpKind::Write { revision: resp.get_ref().header.as_ref().map_or(0, |h| h.revision) }
                } else {
                    let req = match read_as {
                        ReadAs::Linearizable => Request::new(RangeRequest { key: "reg".into(), ..Default::default() }),
                        ReadAs::Bounded(bound) => serializable("reg", Some(bound)),
                    };
                    let resp = kv.range(req).await.context("read")?;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    OpKind::Read { saw: resp.get_ref().kvs.first().map_or(0, |kv| kv.mod_revision) }
                };
                ops.push(Op { client, start, end: Instant::now(), kind });
            }
            Ok::<_, anyhow::Error>(ops)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// Linearizable reads through a secondary region's gateway, while other clients write and the
/// mirror runs 30 ms behind: the recorded history checks out. The same workload through a gateway
/// with a deliberate fault (its linearizable reads skip the read index) fails the same checker,
/// so the check can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_reads_through_a_secondary_check_out_from_the_history() -> Result<()> {
    let (primary, secondary) = regions_started()?;
    let slow_source = LatencyProxy::start(&primary.endpoint(1), Duration::from_millis(30))?;
    let _mirror = MirrorProcess::start(&[slow_source.endpoint()], &secondary, &[])?;
    // The primary 10 ms from the gateways: eu-west is plainly the nearest, so the faulty gateway
    // does serve from it (RTT noise on one machine could otherwise send its reads to the primary).
    let to_primary = LatencyProxy::start(&primary.endpoint(1), Duration::from_millis(10))?;
    let upstreams = [("us-east", vec![to_primary.endpoint()]), ("eu-west", secondary.endpoints())];
    let good = GatewayProcess::start("gw-eu", "eu-west", &upstreams, &[])?;
    let broken = GatewayProcess::start_with_env(
        "gw-broken",
        "eu-west",
        &upstreams,
        &[],
        &[("MERIDIAN_FAILPOINT", "gateway-stale-reads")],
    )?;
    for gw in [&good, &broken] {
        gw.wait_regions(Duration::from_secs(20), |doc| {
            doc["regions"].as_array().is_some_and(|rs| rs.iter().all(|r| r["healthy"] == true))
                && rtt_of(doc, "us-east") > 15.0
        })?;
    }

    let ops =
        register_history(&good.endpoint(), &good.endpoint(), ReadAs::Linearizable, (3, 4), Duration::from_secs(3))
            .await?;
    let (writes, reads) = (history::count(&ops, true), history::count(&ops, false));
    ensure!(writes >= 30 && reads >= 30, "too small a history: {writes} writes, {reads} reads");
    if let Err(problems) = history::check_linearizable(&ops) {
        bail!("{} violations in {reads} reads, e.g. {:?}", problems.len(), &problems[..problems.len().min(5)]);
    }

    let ops =
        register_history(&good.endpoint(), &broken.endpoint(), ReadAs::Linearizable, (3, 4), Duration::from_secs(3))
            .await?;
    let problems = history::check_linearizable(&ops).err().unwrap_or_default();
    ensure!(!problems.is_empty(), "the checker passed a gateway that serves stale linearizable reads");
    Ok(())
}

/// Bounded reads (1 s) through a secondary's gateway while clients write, with the mirror
/// stopped for 2.5 s and restarted: no read in the recorded history is staler than its bound
/// (during the outage they move to the primary). The same workload through a gateway that
/// ignores bounds fails the checker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_reads_stay_within_their_bound_while_the_mirror_is_down() -> Result<()> {
    let (primary, secondary) = regions_started()?;
    let mut mirror = MirrorProcess::start(&primary.endpoints(), &secondary, &[])?;
    // us-east 10 ms away each way: eu-west is plainly the nearest, so the faulty gateway does
    // serve from it (on one machine, RTT noise could otherwise send its reads to the primary).
    let to_primary = LatencyProxy::start(&primary.endpoint(1), Duration::from_millis(10))?;
    let upstreams = [("us-east", vec![to_primary.endpoint()]), ("eu-west", secondary.endpoints())];
    let good = GatewayProcess::start("gw-eu", "eu-west", &upstreams, &[])?;
    let broken = GatewayProcess::start_with_env(
        "gw-broken",
        "eu-west",
        &upstreams,
        &[],
        &[("MERIDIAN_FAILPOINT", "gateway-ignores-bounds")],
    )?;
    for (gw, label) in [(&good, "the gateway"), (&broken, "a gateway that ignores bounds")] {
        gw.wait_regions(Duration::from_secs(20), |doc| {
            doc["regions"].as_array().is_some_and(|rs| {
                rs.iter().all(|r| {
                    r["healthy"] == true && r["staleness_seconds"].as_f64().is_some_and(|s| (0.0..1.0).contains(&s))
                })
            }) && rtt_of(doc, "us-east") > 15.0
        })?;
        let workload = tokio::spawn({
            let (w, r) = (good.endpoint(), gw.endpoint());
            async move { register_history(&w, &r, ReadAs::Bounded("1s"), (2, 3), Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        mirror.kill9()?;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        mirror.spawn()?;
        let ops = workload.await??;
        let reads = history::count(&ops, false);
        ensure!(reads >= 50, "{label}: too few reads ({reads})");
        let checked = history::check_bounded(&ops, Duration::from_secs(1));
        if label == "the gateway" {
            if let Err(problems) = checked {
                bail!(
                    "{label}: {} reads past their bound, e.g. {:?}",
                    problems.len(),
                    &problems[..problems.len().min(5)]
                );
            }
            // Not a trivial pass: reads were served in eu-west, and by the primary in the outage.
            let (_, page) = meridian_tests::http_get(gw.addr(), "/metrics")?;
            for region in ["eu-west", "us-east"] {
                let served: f64 = page
                    .lines()
                    .filter(|l| l.starts_with("meridian_gateway_requests_total{") && l.contains("read_serializable"))
                    .filter(|l| l.contains(&format!(r#"serving_region="{region}""#)))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum();
                ensure!(served > 0.0, "no bounded read was served by {region}:\n{page}");
            }
        } else {
            ensure!(checked.is_err(), "the checker passed {label} with the mirror down for 2.5 s");
        }
    }
    Ok(())
}

fn put_waiting(key: &str, value: &str, regions: Option<&str>) -> Request<PutRequest> {
    let mut req = Request::new(PutRequest { key: key.into(), value: value.into(), ..Default::default() });
    if let Some(n) = regions {
        req.metadata_mut().insert("x-meridian-wait-regions", n.parse().expect("ascii"));
    }
    req
}

/// `x-meridian-wait-regions: 1` acknowledges a write once the secondary has it; asking for more
/// regions than exist is refused; with the mirror down the write times out with a message naming
/// its revision. `--max-write-lag 1s` then refuses writes with etcd's "too many requests" until
/// the mirror is back, with a gauge that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_for_regions_and_the_rpo_guard_holds() -> Result<()> {
    let (primary, secondary) = regions_started()?;
    let mut mirror = MirrorProcess::start(&primary.endpoints(), &secondary, &[])?;
    let gateway = GatewayProcess::start(
        "gw-eu",
        "eu-west",
        &[("us-east", primary.endpoints()), ("eu-west", secondary.endpoints())],
        &["--write-wait-timeout", "500ms", "--max-write-lag", "1s"],
    )?;
    gateway.wait_regions(Duration::from_secs(20), |doc| {
        doc["regions"].as_array().is_some_and(|rs| {
            rs.iter().all(|r| {
                r["healthy"] == true && r["staleness_seconds"].as_f64().is_some_and(|s| (0.0..0.5).contains(&s))
            })
        })
    })?;
    let mut kv = KvClient::connect(format!("http://{}", gateway.endpoint())).await?;
    let mut direct = KvClient::connect(format!("http://{}", secondary.endpoint(1))).await?;

    for n in 0..5 {
        kv.put(put_waiting("w", &n.to_string(), Some("1"))).await?;
        // Acknowledged only once the secondary has it: read there directly, right away.
        let there = direct.range(RangeRequest { key: "w".into(), serializable: true, ..Default::default() }).await?;
        assert_eq!(there.get_ref().kvs.first().map(|kv| kv.value.clone()), Some(n.to_string().into_bytes()));
    }
    let too_many = kv.put(put_waiting("w", "x", Some("2"))).await.unwrap_err();
    assert_eq!(too_many.code(), tonic::Code::InvalidArgument, "{too_many:?}");

    mirror.kill9()?;
    let timed_out = kv.put(put_waiting("w", "lost-confirmation", Some("1"))).await.unwrap_err();
    assert_eq!(timed_out.code(), tonic::Code::DeadlineExceeded, "{timed_out:?}");
    ensure!(timed_out.message().contains("committed on the primary at revision"), "{}", timed_out.message());

    // Every secondary more than 1 s behind: writes refused, the gauge engaged.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match kv.put(put_waiting("w", "guarded", None)).await {
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                assert_eq!(e.message(), "etcdserver: too many requests");
                break;
            }
            other => ensure!(Instant::now() < deadline, "the RPO guard never engaged: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, page) = meridian_tests::http_get(gateway.addr(), "/metrics")?;
    ensure!(page.lines().any(|l| l.starts_with("meridian_gateway_rpo_guard_engaged") && l.ends_with(" 1")), "{page}");

    mirror.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while kv.put(put_waiting("w", "after", None)).await.is_err() {
        ensure!(Instant::now() < deadline, "writes stayed refused after the mirror came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// `[rate_limits]` from the config file: a client past its write budget gets etcd's
/// "etcdserver: too many requests" (RESOURCE_EXHAUSTED), counted by class; its reads and another
/// client's writes are not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_refuse_a_client_over_its_budget() -> Result<()> {
    let (primary, secondary) = regions_started()?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, "[rate_limits]\nwrite = 5\n")?;
    let gateway = GatewayProcess::start(
        "gw-eu",
        "eu-west",
        &[("us-east", primary.endpoints()), ("eu-west", secondary.endpoints())],
        &["--config-file", &file.display().to_string()],
    )?;
    let url = format!("http://{}", gateway.endpoint());
    let mut kv = KvClient::connect(url.clone()).await?;
    let (mut accepted, mut refused) = (0, None);
    for n in 0..20 {
        match kv.put(PutRequest { key: "r".into(), value: n.to_string().into(), ..Default::default() }).await {
            Ok(_) => accepted += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.context("20 writes in a burst were all accepted under a limit of 5/s")?;
    assert_eq!((refused.code(), refused.message()), (tonic::Code::ResourceExhausted, "etcdserver: too many requests"));
    ensure!((5..=7).contains(&accepted), "{accepted} writes accepted before the limit");
    kv.range(RangeRequest { key: "r".into(), ..Default::default() }).await.context("reads have no limit here")?;
    let (_, page) = meridian_tests::http_get(gateway.addr(), "/metrics")?;
    ensure!(page.contains(r#"meridian_gateway_rate_limited_total{class="write",region="eu-west"} 1"#), "{page}");
    Ok(())
}

/// Read-your-writes on one connection while the serving region changes: each serializable read
/// right after a write on the same connection sees that write, before and after the latencies swap
/// and the near region becomes us-east.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_holds_while_the_serving_region_changes() -> Result<()> {
    let (primary, secondary) = regions_started()?;
    let _mirror = MirrorProcess::start(&primary.endpoints(), &secondary, &[])?;
    let to_primary = LatencyProxy::start(&primary.endpoint(1), Duration::from_millis(10))?;
    let to_secondary = LatencyProxy::start(&secondary.endpoint(1), Duration::ZERO)?;
    let gateway = GatewayProcess::start(
        "gw-eu",
        "eu-west",
        &[("us-east", vec![to_primary.endpoint()]), ("eu-west", vec![to_secondary.endpoint()])],
        &[],
    )?;
    gateway
        .wait_regions(Duration::from_secs(20), |doc| rtt_of(doc, "us-east") > 15.0 && rtt_of(doc, "eu-west") < 10.0)?;
    let mut kv = KvClient::connect(format!("http://{}", gateway.endpoint())).await?;
    let mut served = std::collections::BTreeMap::<String, usize>::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in 0..400 {
        if n == 100 {
            to_primary.set_delay(Duration::ZERO);
            to_secondary.set_delay(Duration::from_millis(20));
        }
        let value = format!("v{n}");
        kv.put(PutRequest { key: "ryw".into(), value: value.clone().into(), ..Default::default() }).await?;
        let read = kv.range(serializable("ryw", None)).await?;
        let got = read.get_ref().kvs.first().map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
        ensure!(got.as_deref() == Some(value.as_str()), "read {n} on the writing connection saw {got:?}, not {value}");
        *served.entry(served_by(&read)).or_default() += 1;
        if served.get("us-east").is_some_and(|c| *c >= 20) && n > 150 {
            break;
        }
        ensure!(Instant::now() < deadline, "the loop took too long: {served:?}");
    }
    ensure!(served.get("eu-west").is_some_and(|c| *c > 0), "no read served in eu-west: {served:?}");
    ensure!(served.get("us-east").is_some_and(|c| *c > 0), "no read served in us-east after the swap: {served:?}");
    Ok(())
}

/// A region down: serializable reads that its gateway sent there keep being answered (a failed
/// region hands the read to the primary at once), and within a probe interval or two every read
/// is served elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_move_off_a_region_that_goes_down() -> Result<()> {
    let r = two_regions()?;
    let TwoRegions { primary: _primary, mut secondary, mirror: _mirror, gateway } = r;
    let mut kv = KvClient::connect(format!("http://{}", gateway.endpoint())).await?;
    kv.put(PutRequest { key: "k".into(), value: "1".into(), ..Default::default() }).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_by(&kv.range(serializable("k", None)).await?) != "eu-west" {
        ensure!(Instant::now() < deadline, "reads never went to eu-west");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    secondary.kill9(1)?;
    let killed = Instant::now();
    let mut moved_at = None;
    while killed.elapsed() < Duration::from_secs(2) {
        let resp = kv.range(serializable("k", None)).await.context("a read failed while its region went down")?;
        assert_eq!(resp.get_ref().kvs.len(), 1);
        if served_by(&resp) == "eu-west" {
            moved_at = None;
        } else if moved_at.is_none() {
            moved_at = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let moved = moved_at.context("reads were still served by the dead region")?;
    ensure!(moved < Duration::from_millis(600), "reads moved {moved:?} after the region went down");
    Ok(())
}

/// Many point reads at once through a gateway: those that wait for a free slot leave together in
/// one read-only Txn (`meridian_gateway_reads_gathered_total`), and each client still gets the
/// answer for its own key; reads of a compacted revision among them get etcd's compaction error
/// alone (the Txn fails, and each read is sent again by itself). A range larger than tonic's
/// default 4 MiB message limit comes through whole, as it does from a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_point_reads_are_gathered_and_each_gets_its_own_answer() -> Result<()> {
    let r = two_regions()?;
    let mut primary = KvClient::connect(format!("http://{}", r.primary.endpoint(1))).await?;
    const KEYS: usize = 200;
    let mut last = 0;
    for i in 0..KEYS {
        let put = PutRequest { key: format!("k{i}").into(), value: format!("v{i}").into(), ..Default::default() };
        last = primary.put(put).await?.into_inner().header.map_or(0, |h| h.revision);
    }
    primary.compact(meridian_proto::etcdserverpb::CompactionRequest { revision: last - 10, physical: true }).await?;
    // The mirror repeats the compaction in eu-west, where the gateway sends these reads.
    let mut secondary = KvClient::connect(format!("http://{}", r.secondary.endpoint(1))).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let old = || RangeRequest { key: "k0".into(), revision: 2, serializable: true, ..Default::default() };
    while secondary.range(old()).await.is_ok() {
        ensure!(Instant::now() < deadline, "the compaction never reached eu-west");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let endpoint = format!("http://{}", r.gateway.endpoint());
    let clients: Vec<_> = futures::future::try_join_all((0..4).map(|_| KvClient::connect(endpoint.clone()))).await?;
    // Every key once per round, a compacted-revision read every 25th, all at once.
    for round in 0..3 {
        let reads = (0..KEYS).map(|i| {
            let mut kv = clients[i % clients.len()].clone();
            async move {
                let mut req = serializable(&format!("k{i}"), Some("1m"));
                req.metadata_mut().insert("x-meridian-min-revision", last.to_string().parse().expect("ascii"));
                if i % 25 == 0 {
                    req.get_mut().revision = 2;
                }
                (i, kv.range(req).await)
            }
        });
        for (i, answer) in futures::future::join_all(reads).await {
            if i % 25 == 0 {
                let status =
                    answer.err().with_context(|| format!("round {round}: the compacted read of k{i} passed"))?;
                assert_eq!(status.code(), tonic::Code::OutOfRange);
                assert_eq!(status.message(), "etcdserver: mvcc: required revision has been compacted");
                continue;
            }
            let resp = answer.with_context(|| format!("round {round}: k{i}"))?;
            let got: Vec<_> = resp.get_ref().kvs.iter().map(|kv| (kv.key.clone(), kv.value.clone())).collect();
            assert_eq!(got, vec![(format!("k{i}").into_bytes(), format!("v{i}").into_bytes())], "round {round}");
            ensure!(resp.get_ref().header.as_ref().is_some_and(|h| h.revision >= last), "k{i}: an older revision");
        }
    }
    let (_, page) = meridian_tests::http_get(r.gateway.addr(), "/metrics")?;
    let gathered: f64 = page
        .lines()
        .find_map(|l| {
            l.strip_prefix("meridian_gateway_reads_gathered_total{region=\"eu-west\",upstream_region=\"eu-west\"} ")?
                .parse()
                .ok()
        })
        .unwrap_or(0.0);
    ensure!(gathered > 0.0, "no read was gathered:\n{page}");

    // Four values of 1.2 MB: a 4.8 MB answer.
    let big = vec![b'x'; 1_200_000];
    for i in 0..4 {
        primary.put(PutRequest { key: format!("big/{i}").into(), value: big.clone(), ..Default::default() }).await?;
    }
    let mut kv = KvClient::new(tonic::transport::Channel::from_shared(endpoint)?.connect().await?)
        .max_decoding_message_size(usize::MAX);
    let all = kv
        .range(RangeRequest { key: "big/".into(), range_end: "big0".into(), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(all.kvs.len(), 4);
    ensure!(all.kvs.iter().all(|kv| kv.value == big), "the values came back whole");
    Ok(())
}
