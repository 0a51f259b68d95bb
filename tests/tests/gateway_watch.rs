//! Watches through `meridian gateway` in front of two regions (a primary and a mirrored
//! secondary): a watch moved to another region when its region fails loses nothing, identical
//! watches share one upstream watch, and watch ids are etcd's.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use meridian_proto::etcdserverpb::kv_client::KvClient;
use meridian_proto::etcdserverpb::watch_client::WatchClient;
use meridian_proto::etcdserverpb::watch_request::RequestUnion;
use meridian_proto::etcdserverpb::{PutRequest, WatchCreateRequest, WatchRequest};
use meridian_tests::regions::{regions_started, rtt_of, served_by};
use meridian_tests::{Cluster, ClusterOpts, GatewayProcess, LatencyProxy, MirrorProcess};

fn create(key: &str, range_end: &str) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.into(),
            range_end: range_end.into(),
            ..Default::default()
        })),
    }
}

/// A watch served by the gateway's own region (eu-west) while clients write: that region's only
/// member is killed, and the gateway moves the watch to us-east from the last revision it
/// delivered + 1. The client's stream sees one `created`, no error, and every write exactly once,
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_moves_to_another_region_and_loses_nothing() -> Result<()> {
    const WRITES: usize = 150;
    let (primary, mut secondary) = regions_started()?;
    let _mirror = MirrorProcess::start(&primary.endpoints(), &secondary, &[])?;
    // us-east 10 ms away each way, so the watch starts in eu-west.
    let to_primary = LatencyProxy::start(&primary.endpoint(1), Duration::from_millis(10))?;
    let gateway = GatewayProcess::start(
        "gw-eu",
        "eu-west",
        &[("us-east", vec![to_primary.endpoint()]), ("eu-west", secondary.endpoints())],
        &[],
    )?;
    gateway.wait_regions(Duration::from_secs(20), |doc| {
        doc["regions"].as_array().is_some_and(|rs| rs.iter().all(|r| r["healthy"] == true))
            && rtt_of(doc, "us-east") > 15.0
    })?;
    let url = format!("http://{}", gateway.endpoint());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: "ev/".into(),
            range_end: "ev0".into(),
            ..Default::default()
        })),
    })
    .await?;
    let resp = WatchClient::connect(url.clone()).await?.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await?;
    assert_eq!(served_by(&resp), "eu-west");
    let mut events = resp.into_inner();
    let created = tokio::time::timeout(Duration::from_secs(5), events.message()).await??.context("created")?;
    ensure!(created.created, "first response: {created:?}");

    let writer = tokio::spawn(async move {
        let mut kv = KvClient::connect(url).await?;
        let mut revisions = Vec::new();
        for n in 0..WRITES {
            let put = kv.put(PutRequest { key: format!("ev/{n:04}").into(), value: "x".into(), ..Default::default() });
            revisions.push(put.await?.get_ref().header.as_ref().map_or(0, |h| h.revision));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok::<_, anyhow::Error>(revisions)
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    secondary.kill9(1)?;
    let written = writer.await??;

    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < WRITES {
        let left = deadline.saturating_duration_since(Instant::now());
        let resp = tokio::time::timeout(left, events.message())
            .await
            .with_context(|| format!("{} of {WRITES} events after 20 s", seen.len()))??
            .context("the watch stream ended")?;
        ensure!(!resp.created && !resp.canceled, "a second created or a cancel reached the client: {resp:?}");
        seen.extend(resp.events.iter().filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision)));
    }
    assert_eq!(seen, written, "every write exactly once, in order");
    let (_, page) = meridian_tests::http_get(gateway.addr(), "/metrics")?;
    let failovers: f64 = page
        .lines()
        .find_map(|l| l.strip_prefix("meridian_gateway_watch_failovers_total{region=\"eu-west\"} ")?.parse().ok())
        .unwrap_or(0.0);
    ensure!(failovers >= 1.0, "no watch failover counted:\n{page}");
    drop(tx);
    Ok(())
}

/// Five clients watching the same prefix from now share one upstream watch (the member counts one
/// watcher); each gets every event once, in order. A progress request sent right after the writes
/// is answered after every one of those events, at a revision that covers them (grpc-proxy drops
/// progress requests). A client that cancels gets its cancel; the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_watches_share_one_upstream_watch() -> Result<()> {
    const CLIENTS: usize = 5;
    const PUTS: usize = 20;
    let primary = Cluster::start(
        1,
        ClusterOpts { extra_args: ["--region", "us-east"].map(String::from).to_vec(), ..ClusterOpts::fast() },
    )?;
    let gateway = GatewayProcess::start("gw", "us-east", &[("us-east", primary.endpoints())], &[])?;
    let url = format!("http://{}", gateway.endpoint());
    let mut streams = Vec::new();
    for _ in 0..CLIENTS {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(create("c/", "c0")).await?;
        let mut events = WatchClient::connect(url.clone())
            .await?
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let created = tokio::time::timeout(Duration::from_secs(5), events.message()).await??.context("created")?;
        ensure!(created.created && !created.canceled, "{created:?}");
        streams.push((tx, events, created.watch_id));
    }
    let (_, member_page) = meridian_tests::http_get(primary.endpoint(1).parse()?, "/metrics")?;
    ensure!(
        member_page.lines().any(|l| l == "etcd_debugging_mvcc_watcher_total 1"),
        "the member has more than one watcher for {CLIENTS} identical watches:\n{}",
        member_page.lines().filter(|l| l.contains("watcher_total")).collect::<Vec<_>>().join("\n")
    );

    let mut kv = KvClient::connect(url.clone()).await?;
    let mut revisions = Vec::new();
    for n in 0..PUTS {
        let put =
            kv.put(PutRequest { key: format!("c/{n:02}").into(), value: "x".into(), ..Default::default() }).await?;
        revisions.push(put.get_ref().header.as_ref().map_or(0, |h| h.revision));
    }
    let last = *revisions.last().context("puts")?;
    // Client 0 asks for progress before reading anything.
    streams[0].0.send(WatchRequest { request_union: Some(RequestUnion::ProgressRequest(Default::default())) }).await?;
    for (i, (_, events, _)) in streams.iter_mut().enumerate() {
        let mut seen = Vec::new();
        while seen.len() < PUTS {
            let resp =
                tokio::time::timeout(Duration::from_secs(5), events.message()).await??.context("stream ended")?;
            ensure!(resp.watch_id != -1 || resp.events.is_empty(), "{resp:?}");
            if resp.events.is_empty() && resp.watch_id == -1 {
                bail!("client {i}: a progress response came before all events ({} of {PUTS})", seen.len());
            }
            seen.extend(resp.events.iter().filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision)));
        }
        assert_eq!(seen, revisions, "client {i}: every event once, in order");
    }
    let progress = tokio::time::timeout(Duration::from_secs(5), streams[0].1.message()).await??.context("progress")?;
    ensure!(progress.watch_id == -1 && progress.events.is_empty(), "not a progress response: {progress:?}");
    let at = progress.header.as_ref().map_or(0, |h| h.revision);
    ensure!(at >= last, "progress at {at}, before the last event {last}");

    // One client cancels; another still gets the next event.
    let id = streams[1].2;
    streams[1]
        .0
        .send(WatchRequest {
            request_union: Some(RequestUnion::CancelRequest(meridian_proto::etcdserverpb::WatchCancelRequest {
                watch_id: id,
            })),
        })
        .await?;
    let canceled = tokio::time::timeout(Duration::from_secs(5), streams[1].1.message()).await??.context("cancel")?;
    ensure!(canceled.canceled && canceled.watch_id == id, "{canceled:?}");
    kv.put(PutRequest { key: "c/after".into(), value: "y".into(), ..Default::default() }).await?;
    let next = tokio::time::timeout(Duration::from_secs(5), streams[2].1.message()).await??.context("next event")?;
    ensure!(next.events.len() == 1, "{next:?}");
    let (_, page) = meridian_tests::http_get(gateway.addr(), "/metrics")?;
    ensure!(page.contains("meridian_gateway_watch_groups{region=\"us-east\"} 1"), "{page}");
    Ok(())
}

/// Watch ids through a gateway behave as etcd's: an auto id freed by a cancel is handed out
/// again and its events arrive under it; an explicit id already in use is refused with etcd's
/// message; a progress request is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ids_are_etcds_through_a_gateway() -> Result<()> {
    let primary = Cluster::start(
        1,
        ClusterOpts { extra_args: ["--region", "us-east"].map(String::from).to_vec(), ..ClusterOpts::fast() },
    )?;
    let gateway = GatewayProcess::start("gw", "us-east", &[("us-east", primary.endpoints())], &[])?;
    let url = format!("http://{}", gateway.endpoint());
    let mut kv = KvClient::connect(url.clone()).await?;
    kv.put(PutRequest { key: "i/a".into(), value: "1".into(), ..Default::default() }).await?;
    let from_history = |key: &str, id: i64| WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.into(),
            start_revision: 1,
            watch_id: id,
            ..Default::default()
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut events =
        WatchClient::connect(url).await?.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    tx.send(from_history("i/a", 0)).await?;
    let created = tokio::time::timeout(Duration::from_secs(5), events.message()).await??.context("created")?;
    ensure!(created.created && created.watch_id == 0, "{created:?}");
    let history = tokio::time::timeout(Duration::from_secs(5), events.message()).await??.context("history")?;
    ensure!(history.watch_id == 0 && history.events.len() == 1, "{history:?}");
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CancelRequest(meridian_proto::etcdserverpb::WatchCancelRequest {
            watch_id: 0,
        })),
    })
    .await?;
    let canceled = tokio::time::timeout(Duration::from_secs(5), events.message()).await??.context("canceled")?;
    ensure!(canceled.canceled && canceled.watch_id == 0, "{canceled:?}");
    // Id 0 is free again: the next auto id.
    tx.send(from_history("i/b", 0)).await?;
    let created = tokio::time::timeout(Duration::from_secs(5), events.message()).await??.context("created again")?;
    ensure!(created.created && created.watch_id == 0, "{created:?}");
    kv.put(PutRequest { key: "i/b".into(), value: "2".into(), ..Default::default() }).await?;
    let event = tokio::time::timeout(Duration::from_secs(5), events.message()).await??.context("event")?;
    ensure!(event.watch_id == 0 && event.events.len() == 1, "the event came under id {}: {event:?}", event.watch_id);
    // An explicit id in use is refused as etcd refuses it.
    tx.send(from_history("i/c", 0)).await?;
    let created = tokio::time::timeout(Duration::from_secs(5), events.message()).await??.context("created 1")?;
    ensure!(created.watch_id == 1, "{created:?}");
    tx.send(from_history("i/d", 1)).await?;
    let refused = tokio::time::timeout(Duration::from_secs(5), events.message()).await??.context("refused")?;
    ensure!(
        refused.canceled && refused.cancel_reason == "mvcc: duplicate watch ID provided on the WatchStream",
        "{refused:?}"
    );
    tx.send(WatchRequest { request_union: Some(RequestUnion::ProgressRequest(Default::default())) }).await?;
    let progress = tokio::time::timeout(Duration::from_secs(5), events.message()).await??.context("progress")?;
    ensure!(progress.watch_id == -1 && progress.events.is_empty(), "{progress:?}");
    Ok(())
}
