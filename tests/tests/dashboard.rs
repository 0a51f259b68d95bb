//! The lag dashboard (`/dashboard` on a gateway) in Debian's headless Chromium, over a running
//! two-region setup: the page lists both regions with their roles, and the secondary's lag rises
//! while its mirror is stopped and falls when it restarts, in the table and in the lag chart. The
//! last page is saved as a screenshot (`<target>/tmp/dashboard.png`).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use meridian_proto::etcdserverpb::kv_client::KvClient;
use meridian_proto::etcdserverpb::PutRequest;
use meridian_tests::{chromium, http_get, GatewayProcess, MirrorProcess};

/// The text of the first element that starts with `open` (e.g. `<tr data-region="eu-west"`), up
/// to its `close` tag.
fn element<'a>(dom: &'a str, open: &str, close: &str) -> Result<&'a str> {
    let start = dom.find(open).with_context(|| format!("the page has no {open}"))?;
    let end = dom[start..].find(close).with_context(|| format!("{open} is not closed"))?;
    Ok(&dom[start..start + end])
}

/// The value of `attr="..."` in the first tag of `html` that holds `anchor`.
fn attr(html: &str, anchor: &str, name: &str) -> Result<String> {
    let at = html.find(anchor).with_context(|| format!("no {anchor} in {html}"))?;
    let tag_start = html[..at].rfind('<').unwrap_or(0);
    let tag = &html[tag_start..];
    let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
    let key = format!("{name}=\"");
    let from = tag.find(&key).with_context(|| format!("no {name} in {tag}"))? + key.len();
    Ok(tag[from..].split('"').next().unwrap_or_default().to_string())
}

/// What the page shows of a region: (role, lag in revisions, lag in seconds).
fn row(dom: &str, region: &str) -> Result<(String, f64, f64)> {
    let tr = element(dom, &format!("<tr data-region=\"{region}\""), "</tr>")?;
    let role = attr(tr, "data-role", "data-role")?;
    let lag: f64 = attr(tr, "class=\"lag-revisions\"", "data-value")?.parse()?;
    let secs: f64 = attr(tr, "class=\"lag-seconds\"", "data-value")?.parse()?;
    Ok((role, lag, secs))
}

/// The lag chart's legend entry for `region`: (last value, peak over the window).
fn chart(dom: &str, region: &str) -> Result<(f64, f64)> {
    let fig = element(dom, "id=\"chart-lag-revisions\"", "</figure>")?;
    let anchor = format!("data-region=\"{region}\" data-last");
    Ok((attr(fig, &anchor, "data-last")?.parse()?, attr(fig, &anchor, "data-peak")?.parse()?))
}

/// Polls the gateway's `/v1/dashboard` until its newest sample of `region` passes `check`.
fn wait_sample(
    gw: &GatewayProcess,
    region: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = http_get(gw.addr(), "/v1/dashboard")?;
        let doc: serde_json::Value = serde_json::from_str(&body)?;
        let newest = doc["samples"].as_array().and_then(|s| s.last()).cloned().unwrap_or_default();
        let sample = newest["regions"].as_array().and_then(|rs| rs.iter().find(|r| r["name"] == region)).cloned();
        if sample.as_ref().is_some_and(&check) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the dashboard never showed {what}; newest sample: {newest}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

async fn put_many(kv: &mut KvClient<tonic::transport::Channel>, prefix: &str, n: usize) -> Result<i64> {
    let mut revision = 0;
    for i in 0..n {
        let put = PutRequest { key: format!("{prefix}/{i:04}").into(), value: b"v".to_vec(), ..Default::default() };
        revision = kv.put(put).await?.into_inner().header.map_or(0, |h| h.revision);
    }
    Ok(revision)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_lag_rise_and_fall_in_chromium() -> Result<()> {
    let (primary, secondary) = meridian_tests::regions::regions_started()?;
    let mut mirror = MirrorProcess::start(&primary.endpoints(), &secondary, &[])?;
    let gateway = GatewayProcess::start(
        "gw-eu",
        "eu-west",
        &[("us-east", primary.endpoints()), ("eu-west", secondary.endpoints())],
        &[],
    )?;
    let url = format!("http://{}/dashboard", gateway.endpoint());
    let mut kv = KvClient::connect(primary.client_url(1)).await?;

    // Served as compiled in, with a policy that forbids anything from elsewhere.
    let (code, page) = http_get(gateway.addr(), "/dashboard")?;
    ensure!(code == 200 && page.contains("dashboard.js"), "GET /dashboard: {code}\n{page}");

    let rev = put_many(&mut kv, "calm", 20).await?;
    mirror.wait_applied(rev, Duration::from_secs(20))?;
    wait_sample(&gateway, "eu-west", "eu-west caught up", |r| r["lag_revisions"] == 0)?;
    let dom = chromium::dump_dom(&url)?;
    let (role, lag, _) = row(&dom, "eu-west")?;
    ensure!(role == "secondary" && lag == 0.0, "eu-west before the outage: {role} {lag}");
    ensure!(row(&dom, "us-east")?.0 == "primary", "us-east is not shown as the primary");
    ensure!(dom.contains("writes go to us-east"), "the summary does not name the primary");
    ensure!(element(&dom, "<tr data-from=\"eu-west\"", "</tr>").is_ok(), "no RTT row for the gateway's region");

    // The mirror stops: the secondary falls behind by every write, and its staleness grows.
    mirror.kill9()?;
    put_many(&mut kv, "outage", 300).await?;
    wait_sample(&gateway, "eu-west", "eu-west 300 behind", |r| {
        r["lag_revisions"].as_i64().is_some_and(|l| l >= 300) && r["lag_seconds"].as_f64().is_some_and(|s| s >= 1.0)
    })?;
    let dom = chromium::dump_dom(&url)?;
    let (_, lag, secs) = row(&dom, "eu-west")?;
    ensure!(lag >= 300.0 && secs >= 1.0, "eu-west with its mirror stopped shows lag {lag} revisions, {secs} s");
    let (last, peak) = chart(&dom, "eu-west")?;
    ensure!(last >= 300.0 && peak >= 300.0, "the lag chart shows {last} (peak {peak}) with the mirror stopped");

    // It restarts: the lag falls back to nothing, and the chart still shows the peak it had.
    mirror.spawn()?;
    let rev = put_many(&mut kv, "after", 5).await?;
    mirror.wait_applied(rev, Duration::from_secs(30))?;
    // Caught up in revisions first; the staleness falls once heartbeats flow again (slower on
    // a loaded machine), so wait for both before reading the page.
    wait_sample(&gateway, "eu-west", "eu-west caught up again", |r| {
        r["lag_revisions"] == 0 && r["lag_seconds"].as_f64().is_some_and(|s| s < 1.0)
    })?;
    let dom = chromium::dump_dom(&url)?;
    let (_, lag, secs) = row(&dom, "eu-west")?;
    ensure!(lag == 0.0 && secs < 1.0, "eu-west after the mirror restarted shows {lag} revisions, {secs} s");
    let (last, peak) = chart(&dom, "eu-west")?;
    ensure!(last == 0.0 && peak >= 300.0, "the lag chart shows {last} (peak {peak}) after the restart");

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    chromium::screenshot(&url, &shot, 1400, 1100)?;
    let size = std::fs::metadata(&shot)?.len();
    ensure!(size > 20_000, "the screenshot is only {size} bytes: an empty page?");
    Ok(())
}
