//! `meridian gateway` in front of two regions: a primary (us-east) and a read-only secondary
//! (eu-west) fed by a mirror, with the gateway in eu-west. Unchanged etcd clients (etcdctl, the
//! etcd-client crate) work through it; writes reach the primary, reads go where their consistency
//! allows, and every answer says which region served it.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use meridian_proto::etcdserverpb::kv_client::KvClient;
use meridian_proto::etcdserverpb::{PutRequest, RangeRequest};
use meridian_tests::{secondary_flags, Cluster, ClusterOpts, GatewayProcess, MirrorProcess};
use tonic::Request;

struct TwoRegions {
    primary: Cluster,
    secondary: Cluster,
    mirror: MirrorProcess,
    gateway: GatewayProcess,
}

fn two_regions() -> Result<TwoRegions> {
    let primary = Cluster::start(
        1,
        ClusterOpts { extra_args: ["--region", "us-east"].map(String::from).to_vec(), ..ClusterOpts::fast() },
    )?;
    let secondary =
        Cluster::start(1, ClusterOpts { extra_args: secondary_flags("eu-west", "us-east")?, ..ClusterOpts::fast() })?;
    let mirror = MirrorProcess::start(&primary.endpoints(), &secondary, &[])?;
    let gateway = GatewayProcess::start(
        "gw-eu",
        "eu-west",
        &[("us-east", primary.endpoints()), ("eu-west", secondary.endpoints())],
        &[],
    )?;
    // Both regions probed, the secondary's staleness known (the mirror's heartbeats reached it).
    gateway.wait_regions(Duration::from_secs(20), |doc| {
        doc["regions"].as_array().is_some_and(|rs| {
            rs.iter().all(|r| r["healthy"] == true && r["staleness_seconds"].as_f64().is_some_and(|s| s >= 0.0))
        })
    })?;
    Ok(TwoRegions { primary, secondary, mirror, gateway })
}

fn served_by<T>(resp: &tonic::Response<T>) -> String {
    resp.metadata().get("x-meridian-region").and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
}

fn serializable(key: &str, max_staleness: Option<&str>) -> Request<RangeRequest> {
    let mut req = Request::new(RangeRequest { key: key.into(), serializable: true, ..Default::default() });
    if let Some(s) = max_staleness {
        req.metadata_mut().insert("x-meridian-max-staleness", s.parse().expect("ascii"));
    }
    req
}

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

/// Linearizable reads and writes go to the primary; serializable reads to the gateway's own
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

    let lin = kv.range(RangeRequest { key: "k".into(), ..Default::default() }).await?;
    assert_eq!(served_by(&lin), "us-east", "linearizable reads go to the primary");

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
    ensure!(stopped.elapsed() >= Duration::from_millis(400), "reads left eu-west before it could be stale");
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
    kv.put(PutRequest { key: "k".into(), value: "1".into(), ..Default::default() }).await?;
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
