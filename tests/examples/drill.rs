//! Disaster-recovery drill figures (not a timed test): real processes, a steady write load
//! through a gateway, and the operator's own commands.
//!
//! - switchover: `meridian region switchover` under load; the window it prints, and the longest
//!   gap the writing client saw between two acknowledged writes;
//! - manual failover: kill -9 of the whole primary region (3 members), `meridian region promote
//!   --allow-data-loss` at once; RTO = kill to the first write acknowledged through the gateway;
//!   RPO = acknowledged writes the new primary lacks, as revisions and as seconds of load;
//! - automatic failover: three regions and a topology cluster with the defaults (5 s lease,
//!   `--failover-after 10s`); kill -9 of the primary; RTO the same way.
//!
//! `MERIDIAN_BIN=target/release/meridian cargo run --release -p meridian-tests --example drill`
//! (DRILL_RUNS, default 3: every figure is the median of that many runs).

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use meridian_tests::{meridian_bin, mirror_token_file, Cluster, ClusterOpts, GatewayProcess, MirrorProcess};
use parking_lot::Mutex;

fn opts(region: &str, role: &str, extra: &[String]) -> Result<ClusterOpts> {
    let token = mirror_token_file()?.display().to_string();
    let mut args: Vec<String> = ["--region", region, "--initial-role", role, "--primary-region", "us-east"]
        .into_iter()
        .map(String::from)
        .chain(["--mirror-token-file".to_string(), token])
        .collect();
    args.extend_from_slice(extra);
    Ok(ClusterOpts { extra_args: args, ready_timeout: Duration::from_secs(30), ..ClusterOpts::default() })
}

fn region(args: &[&str]) -> Result<String> {
    let out = Command::new(meridian_bin()?)
        .arg("region")
        .args(args)
        .env("MERIDIAN_MIRROR_TOKEN_FILE", mirror_token_file()?)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "meridian region {args:?}: {text}{}", String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

/// What a writing client saw: each acknowledged write's revision, when it was acknowledged, and
/// when it was sent.
#[derive(Default)]
struct Log {
    acks: Vec<(i64, Instant, Instant)>,
}

/// Writes through `endpoint` as fast as one client can, retrying failures every 10 ms, until
/// `stop` (bounded to 120 s in any case).
fn load(endpoint: String, stop: Arc<AtomicBool>, log: Arc<Mutex<Log>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut client = None;
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            if client.is_none() {
                let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(2));
                client = etcd_client::Client::connect([endpoint.clone()], Some(opts)).await.ok();
            }
            let Some(c) = client.as_mut() else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            i += 1;
            let sent = Instant::now();
            match c.put(format!("load/{i:08}"), "v", None).await {
                Ok(r) => log.lock().acks.push((r.header().map_or(0, |h| h.revision()), Instant::now(), sent)),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
}

/// When the first write sent after `t` was acknowledged: a write in flight at `t` does not count.
fn first_ack_after(log: &Mutex<Log>, t: Instant) -> Option<Instant> {
    log.lock().acks.iter().find(|a| a.2 > t).map(|a| a.1)
}

async fn wait_first_ack_after(log: &Mutex<Log>, t: Instant, limit: Duration) -> Result<Duration> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(at) = first_ack_after(log, t) {
            return Ok(at - t);
        }
        ensure!(Instant::now() < deadline, "no write acknowledged within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Switchover {
    printed_ms: f64,
    client_gap_ms: f64,
}

async fn switchover() -> Result<Switchover> {
    let a = Cluster::start(3, opts("us-east", "primary", &[])?)?;
    let b = Cluster::start(3, opts("eu-west", "secondary", &[])?)?;
    // A mirror into each region; each idles while its target is the primary.
    let _into_b = MirrorProcess::start(&a.endpoints(), &b, &[])?;
    let _into_a = MirrorProcess::start(&b.endpoints(), &a, &[])?;
    let gw = GatewayProcess::start("gw", "eu-west", &[("us-east", a.endpoints()), ("eu-west", b.endpoints())], &[])?;
    let (stop, log) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Log::default())));
    let writer = load(gw.endpoint(), stop.clone(), log.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = region(&["switchover", "--from", &a.endpoints().join(","), "--to", &b.endpoints().join(",")])?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    let printed_ms = out
        .lines()
        .find_map(|l| l.strip_prefix("write-unavailability window: "))
        .and_then(|s| s.trim_end_matches(" ms").parse().ok())
        .context("no window printed")?;
    let acks = &log.lock().acks;
    let gap = acks.windows(2).map(|w| w[1].1 - w[0].1).max().unwrap_or_default();
    Ok(Switchover { printed_ms, client_gap_ms: gap.as_secs_f64() * 1000.0 })
}

struct Failover {
    rto_ms: f64,
    lost_revisions: i64,
    lost_seconds: f64,
}

async fn manual_failover() -> Result<Failover> {
    let mut a = Cluster::start(3, opts("us-east", "primary", &[])?)?;
    let b = Cluster::start(3, opts("eu-west", "secondary", &[])?)?;
    let mut mirror = MirrorProcess::start(&a.endpoints(), &b, &[])?;
    let gw = GatewayProcess::start("gw", "eu-west", &[("us-east", a.endpoints()), ("eu-west", b.endpoints())], &[])?;
    let (stop, log) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Log::default())));
    let writer = load(gw.endpoint(), stop.clone(), log.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed = Instant::now();
    for i in 1..=3 {
        a.kill9(i)?;
    }
    mirror.kill9()?;
    let out = region(&["promote", "--endpoints", &b.endpoints().join(","), "--allow-data-loss"])?;
    let rto = wait_first_ack_after(&log, killed, Duration::from_secs(60)).await?;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    let fence: i64 = out
        .split("fence revision ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .and_then(|s| s.trim().parse().ok())
        .context("no fence printed")?;
    let acks = &log.lock().acks;
    let lost: Vec<_> = acks.iter().filter(|(r, _, sent)| *r > fence && *sent < killed).collect();
    let lost_seconds = match (acks.iter().find(|(r, _, _)| *r == fence), lost.last()) {
        (Some(f), Some(l)) => (l.1 - f.1).as_secs_f64(),
        _ => 0.0,
    };
    Ok(Failover { rto_ms: rto.as_secs_f64() * 1000.0, lost_revisions: lost.len() as i64, lost_seconds })
}

async fn automatic_failover() -> Result<f64> {
    let topology = Cluster::start(3, ClusterOpts::default())?;
    let topo = vec!["--topology-endpoints".to_string(), topology.endpoints().join(",")];
    let auto: Vec<String> = topo.iter().cloned().chain(["--auto-failover".to_string()]).collect();
    let mut a = Cluster::start(1, opts("us-east", "primary", &topo)?)?;
    let b = Cluster::start(1, opts("eu-west", "secondary", &auto)?)?;
    let c = Cluster::start(1, opts("ap-south", "secondary", &auto)?)?;
    let eps = |x: &Cluster| x.endpoints().join(",");
    let _into_b = MirrorProcess::start(&a.endpoints(), &b, &["--source", &eps(&c)])?;
    let _into_c = MirrorProcess::start(&a.endpoints(), &c, &["--source", &eps(&b)])?;
    let ups = [("us-east", a.endpoints()), ("eu-west", b.endpoints()), ("ap-south", c.endpoints())];
    let gw = GatewayProcess::start("gw", "eu-west", &ups, &[])?;
    let (stop, log) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Log::default())));
    let writer = load(gw.endpoint(), stop.clone(), log.clone());
    wait_first_ack_after(&log, Instant::now(), Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    a.kill9(1)?;
    let rto = wait_first_ack_after(&log, killed, Duration::from_secs(90)).await?;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    Ok(rto.as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let runs: usize = std::env::var("DRILL_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let (mut printed, mut gap, mut manual, mut lost_r, mut lost_s, mut auto) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for run in 1..=runs {
        let s = switchover().await?;
        let m = manual_failover().await?;
        let a = automatic_failover().await?;
        eprintln!(
            "run {run}: switchover {:.0} ms (client gap {:.0} ms); manual RTO {:.0} ms, RPO {} revisions / {:.2} s; \
             automatic RTO {a:.0} ms",
            s.printed_ms, s.client_gap_ms, m.rto_ms, m.lost_revisions, m.lost_seconds
        );
        printed.push(s.printed_ms);
        gap.push(s.client_gap_ms);
        manual.push(m.rto_ms);
        lost_r.push(m.lost_revisions as f64);
        lost_s.push(m.lost_seconds);
        auto.push(a);
    }
    println!("| drill (median of {runs}) | figure | goal |");
    println!("|---|---:|---:|");
    println!("| switchover: window `region switchover` prints | {:.0} ms | ≤ 1 s |", median(printed));
    println!("| switchover: longest gap between a client's acknowledged writes | {:.0} ms | ≤ 1 s |", median(gap));
    println!("| manual failover: kill to first write through the gateway | {:.0} ms | ≤ 2 s |", median(manual));
    println!(
        "| manual failover: RPO (acknowledged writes lost) | {:.0} revisions, {:.2} s | |",
        median(lost_r),
        median(lost_s)
    );
    println!(
        "| automatic failover (5 s lease, 10 s `--failover-after`): kill to first write | {:.0} ms | ≤ 20 s |",
        median(auto)
    );
    Ok(())
}
