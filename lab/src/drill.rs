//! `meridian lab drill`: a disaster-recovery drill against the running lab,
//! run and reported.
//!
//! 1. A write load through a gateway of a region the drill does not fail,
//!    keeping its own log of acknowledged writes (key, value, revision).
//! 2. The failure: the primary region killed (`region-loss`), cut off
//!    (`partition`), or a planned `switchover` to the next region.
//! 3. The failover: automatic in the lab (primary lease and
//!    `--auto-failover`), or the switchover itself. RTO = from the failure
//!    to the first write sent after it and acknowledged.
//! 4. The failback: the old primary restarted or healed, then `rejoin`
//!    (its report names every write it drops).
//! 5. HashKV equal in every region at the same revision.
//!
//! The report (Markdown, and beside it JSON and an HTML page with a
//! timeline) gives the RTO, the exact RPO (acknowledged writes the new
//! primary lacks, by revision and key, matched against the rejoin report),
//! lag before and after, and every step with its time. The exit status is
//! non-zero when a budget is exceeded or the regions disagree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use meridian_proto::etcdserverpb::kv_client::KvClient;
use meridian_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use meridian_proto::etcdserverpb::{HashKvRequest, PutRequest, RangeRequest};
use meridian_wire::progress::{Lines, Progress};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::admin::{call, VerbAnswer, VerbRequest};
use crate::{host_port, Layout, REGIONS};

#[derive(clap::Args, Debug, Clone)]
pub struct DrillFlags {
    /// What fails: region-loss (the primary region is killed), partition (it is cut off), or
    /// switchover (a planned hand-over to the next region).
    #[arg(long, default_value = "region-loss")]
    pub scenario: String,
    /// Writes per second through the gateway.
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// How long the write load runs (the failure comes at a third of it). Until a write sent after
    /// the failure is acknowledged, it runs on past this, up to the RTO budget after the failure.
    #[arg(long, default_value = "30s")]
    pub duration: String,
    /// Exit non-zero if the RTO is longer.
    #[arg(long, default_value = "10s")]
    pub rto_budget: String,
    /// Exit non-zero if more acknowledged writes are lost.
    #[arg(long, default_value_t = 0)]
    pub rpo_budget: usize,
    /// The Markdown report; `.json` and `.html` beside it.
    #[arg(long, default_value = "drill.md")]
    pub report: PathBuf,
}

/// One acknowledged write.
#[derive(Clone, Debug, Serialize)]
struct Ack {
    key: String,
    value: String,
    revision: i64,
    /// The region that took the write (the gateway's `x-meridian-region`).
    region: String,
    sent_s: f64,
    acked_s: f64,
}

#[derive(Debug, Serialize)]
struct Step {
    at_s: f64,
    what: String,
}

#[derive(Debug, Serialize)]
struct Lost {
    revision: i64,
    key: String,
    value: String,
    in_rejoin_report: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: String,
    rate: u32,
    duration_s: f64,
    old_primary: String,
    new_primary: String,
    rto_s: Option<f64>,
    rto_budget_s: f64,
    rpo_writes: usize,
    rpo_budget: usize,
    lost: Vec<Lost>,
    acknowledged: usize,
    failed_writes: usize,
    lag_before: BTreeMap<String, serde_json::Value>,
    lag_after: BTreeMap<String, serde_json::Value>,
    hash_revision: i64,
    hashes: BTreeMap<String, Option<u32>>,
    hashes_equal: bool,
    rejoin_report: Option<PathBuf>,
    steps: Vec<Step>,
    /// Acknowledged writes per 100 ms, for the timeline.
    acks_per_100ms: Vec<usize>,
    passed: bool,
}

async fn admin(addr: &str, verb: &str, target: &str) -> Result<String> {
    let req = VerbRequest { target: target.into(), ..Default::default() };
    let body = call(addr, "POST", &format!("/v1/{verb}"), &serde_json::to_string(&req)?).await?;
    let answer: VerbAnswer = serde_json::from_str(&body)?;
    if !answer.ok {
        bail!("lab {verb} {target}: {}", answer.output);
    }
    Ok(answer.output)
}

async fn status(addr: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&call(addr, "GET", "/v1/status", "").await?)?)
}

/// The region that is the primary with the highest epoch, as the lab sees it.
fn primary_in(status: &serde_json::Value) -> Option<String> {
    crate::primary_of(status["regions"].as_object()?.iter())
}

fn lag_of(status: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    status["regions"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(r, s)| {
            let lag = (s["source_revision"].as_i64().unwrap_or(0) - s["revision"].as_i64().unwrap_or(0)).max(0);
            (r.clone(), serde_json::json!({ "role": s["role"], "revision": s["revision"], "lag_revisions": lag, "staleness_ms": s["staleness_ms"] }))
        })
        .collect()
}

fn channel(url: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(url.to_string())?.connect_timeout(Duration::from_secs(1)).connect_lazy())
}

/// Runs the drill against the lab in `dir`.
///
/// # Errors
///
/// No lab, bad flags, or a step that could not be carried out; a drill that
/// ran but missed a budget returns an error after writing its report.
pub async fn run(dir: &Path, flags: &DrillFlags) -> Result<()> {
    let duration = meridian_wire::duration::parse_duration(&flags.duration)
        .ok_or_else(|| anyhow::anyhow!("--duration {:?}: want a duration like 30s", flags.duration))?;
    let budget = meridian_wire::duration::parse_duration(&flags.rto_budget)
        .ok_or_else(|| anyhow::anyhow!("--rto-budget {:?}: want a duration like 10s", flags.rto_budget))?;
    if !matches!(flags.scenario.as_str(), "region-loss" | "partition" | "switchover") {
        bail!("--scenario {:?}: region-loss, partition or switchover", flags.scenario);
    }
    if flags.rate == 0 || flags.rate > 5000 {
        bail!("--rate {}: between 1 and 5000 writes per second", flags.rate);
    }
    let layout: Layout = serde_json::from_slice(
        &std::fs::read(dir.join("lab.json"))
            .with_context(|| format!("no lab in {} (start it with `meridian lab`)", dir.display()))?,
    )?;
    let addr = host_port(&layout.admin_url).to_string();
    let t0 = Instant::now();
    let since = move || t0.elapsed().as_secs_f64();
    let steps = Arc::new(Mutex::new(Vec::<Step>::new()));
    // A bar over the load's duration on a terminal (lines every 2 s otherwise); the steps above it.
    let progress = Arc::new(Mutex::new(Progress::new("drill", "s", duration.as_secs().max(1), Lines::Stderr)));
    let step = |what: String| {
        progress.lock().expect("lock").note(&format!("[{:>6.2}s] {what}", since()));
        steps.lock().expect("lock").push(Step { at_s: since(), what });
    };

    let before = status(&addr).await?;
    let old = primary_in(&before).context("no region is the primary now")?;
    let others: Vec<&str> = REGIONS.iter().copied().filter(|r| *r != old).collect();
    // The switchover goes to the first other region; the client writes in the last.
    let (target, client_region) = (others[0], others[others.len() - 1]);
    let gateway = &layout.region(client_region).gateway_url;
    step(format!(
        "{} drill: primary {old}, client at the {client_region} gateway, {} writes/s",
        flags.scenario, flags.rate
    ));

    // The load, with its own log.
    let acks = Arc::new(Mutex::new(Vec::<Ack>::new()));
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Set at the failure to its time plus the RTO budget, cleared once the RTO is measured: the
    // load runs on past its duration while the RTO is still open, so a slow failover is measured
    // against its budget rather than cut off by the end of the load.
    let overtime = Arc::new(Mutex::new(None::<Instant>));
    let kv = KvClient::new(channel(gateway)?);
    let inflight = Arc::new(tokio::sync::Semaphore::new(512));
    let load = {
        let (acks, failed, inflight, overtime) = (acks.clone(), failed.clone(), inflight.clone(), overtime.clone());
        let rate = flags.rate;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut n = 0u64;
            let end = t0 + duration;
            let mut tasks = tokio::task::JoinSet::new();
            let running = || {
                let now = Instant::now();
                now < end || overtime.lock().expect("lock").is_some_and(|until| now < until)
            };
            while running() {
                tick.tick().await;
                let Ok(permit) = inflight.clone().try_acquire_owned() else {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                };
                n += 1;
                let (mut kv, acks, failed) = (kv.clone(), acks.clone(), failed.clone());
                tasks.spawn(async move {
                    let _permit = permit;
                    let (key, value) = (format!("drill/{n:08}"), format!("v{n}"));
                    let sent_s = t0.elapsed().as_secs_f64();
                    let mut req = tonic::Request::new(PutRequest {
                        key: key.clone().into_bytes(),
                        value: value.clone().into_bytes(),
                        ..Default::default()
                    });
                    req.set_timeout(Duration::from_secs(5));
                    match kv.put(req).await {
                        Ok(r) => {
                            let region = r
                                .metadata()
                                .get("x-meridian-region")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let revision = r.into_inner().header.map_or(0, |h| h.revision);
                            let acked_s = t0.elapsed().as_secs_f64();
                            acks.lock().expect("lock").push(Ack { key, value, revision, region, sent_s, acked_s });
                        }
                        Err(_) => {
                            failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        })
    };

    let ticker = {
        let (progress, acks, failed) = (progress.clone(), acks.clone(), failed.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let (acked, failed) =
                    (acks.lock().expect("lock").len(), failed.load(std::sync::atomic::Ordering::Relaxed));
                let mut p = progress.lock().expect("lock");
                p.message(format!("drill: {acked} writes acknowledged, {failed} failed"));
                p.set(t0.elapsed().as_secs().min(duration.as_secs()));
            }
        })
    };

    tokio::time::sleep(duration / 3).await;
    let injected = since();
    *overtime.lock().expect("lock") = Some(Instant::now() + budget);
    let rejoin_needed = match flags.scenario.as_str() {
        "region-loss" => {
            admin(&addr, "kill", &old).await?;
            step(format!("killed region {old} (SIGKILL: members, gateway, mirror, control member)"));
            true
        }
        "partition" => {
            admin(&addr, "partition", &old).await?;
            step(format!("cut region {old} off from every other region"));
            true
        }
        _ => {
            let out = admin(&addr, "switchover", target).await?;
            step(format!("switchover to {target}: {}", out.lines().last().unwrap_or("")));
            false
        }
    };
    // The RTO: until the first write sent after the failure is acknowledged
    // by another region than the old primary.
    let rto_deadline = Instant::now() + Duration::from_secs(60);
    let rto = loop {
        let first = acks
            .lock()
            .expect("lock")
            .iter()
            .filter(|a| a.sent_s > injected && a.region != old)
            .map(|a| a.acked_s)
            .reduce(f64::min);
        if let Some(at) = first {
            break Some(at - injected);
        }
        if Instant::now() >= rto_deadline || load.is_finished() {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    *overtime.lock().expect("lock") = None;
    match rto {
        Some(rto) => step(format!("first write acknowledged by the new primary: RTO {rto:.2} s")),
        None => step("no other region acknowledged a write after the failure".into()),
    }
    load.await?;
    step(format!(
        "load done: {} writes acknowledged, {} failed",
        acks.lock().expect("lock").len(),
        failed.load(std::sync::atomic::Ordering::Relaxed)
    ));

    // Who took over, and what it lacks.
    let after = status(&addr).await?;
    let new = primary_in(&after).unwrap_or_default();
    step(format!("new primary: {new}"));
    let acked = acks.lock().expect("lock").clone();
    let mut lost = Vec::new();
    if !new.is_empty() {
        let mut kv = KvClient::new(channel(&layout.region(&new).members[0].client_url)?);
        for a in &acked {
            let r = kv
                .range(RangeRequest { key: a.key.clone().into_bytes(), serializable: true, ..Default::default() })
                .await?;
            let kept = r
                .into_inner()
                .kvs
                .first()
                .is_some_and(|kv| kv.mod_revision == a.revision && kv.value == a.value.as_bytes());
            if !kept {
                lost.push(Lost {
                    revision: a.revision,
                    key: a.key.clone(),
                    value: a.value.clone(),
                    in_rejoin_report: false,
                });
            }
        }
    }
    step(format!("{} acknowledged writes are not on the new primary", lost.len()));

    // Failback.
    let mut rejoin_report = None;
    if rejoin_needed && !new.is_empty() {
        if flags.scenario == "region-loss" {
            admin(&addr, "restart", &old).await?;
            step(format!("restarted region {old}"));
        } else {
            admin(&addr, "heal", "").await?;
            step("healed the partition".into());
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let out = loop {
            match admin(&addr, "rejoin", &old).await {
                Ok(out) => break out,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "rejoin not possible yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        };
        step(format!("rejoined {old}: {}", out.lines().nth(1).unwrap_or("")));
        rejoin_report = out.lines().find_map(|l| l.split(" written to ").nth(1)).map(|p| PathBuf::from(p.trim()));
        if let Some(path) = &rejoin_report {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let reported: BTreeSet<(i64, String)> = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["op"] == "put")
                .filter_map(|v| Some((v["revision"].as_i64()?, v["key"].as_str()?.to_string())))
                .collect();
            for l in &mut lost {
                l.in_rejoin_report = reported.contains(&(l.revision, l.key.clone()));
            }
        }
    }

    // Every region at the same revision, with the same HashKV.
    let mut hashes = BTreeMap::new();
    let mut hash_revision = 0;
    if !new.is_empty() {
        let mut kv = KvClient::new(channel(&layout.region(&new).members[0].client_url)?);
        hash_revision = kv
            .range(RangeRequest { key: vec![0], count_only: true, ..Default::default() })
            .await?
            .into_inner()
            .header
            .map_or(0, |h| h.revision);
        let deadline = Instant::now() + Duration::from_secs(60);
        for r in REGIONS {
            let mut m = MaintenanceClient::new(channel(&layout.region(r).members[0].client_url)?);
            let mut kv = KvClient::new(channel(&layout.region(r).members[0].client_url)?);
            let hash = loop {
                let at = kv
                    .range(RangeRequest { key: vec![0], count_only: true, serializable: true, ..Default::default() })
                    .await
                    .ok()
                    .and_then(|r| r.into_inner().header)
                    .map_or(0, |h| h.revision);
                if at >= hash_revision {
                    break m.hash_kv(HashKvRequest { revision: hash_revision }).await.ok().map(|h| h.into_inner().hash);
                }
                if Instant::now() >= deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            hashes.insert(r.to_string(), hash);
        }
    }
    let values: BTreeSet<Option<u32>> = hashes.values().copied().collect();
    let hashes_equal = values.len() == 1 && !values.contains(&None);
    step(format!(
        "HashKV at revision {hash_revision}: {}",
        if hashes_equal { "equal in every region" } else { "NOT equal" }
    ));
    let lag_after = lag_of(&status(&addr).await?);

    let end_s = since();
    let mut acks_per_100ms = vec![0; (end_s * 10.0) as usize + 1];
    for a in &acked {
        if let Some(b) = acks_per_100ms.get_mut((a.acked_s * 10.0) as usize) {
            *b += 1;
        }
    }
    let rto_ok = rto.is_some_and(|r| r <= budget.as_secs_f64());
    let rpo_ok = lost.len() <= flags.rpo_budget && lost.iter().all(|l| l.in_rejoin_report || !rejoin_needed);
    let report = Report {
        scenario: flags.scenario.clone(),
        rate: flags.rate,
        duration_s: duration.as_secs_f64(),
        old_primary: old,
        new_primary: new,
        rto_s: rto,
        rto_budget_s: budget.as_secs_f64(),
        rpo_writes: lost.len(),
        rpo_budget: flags.rpo_budget,
        lost,
        acknowledged: acked.len(),
        failed_writes: failed.load(std::sync::atomic::Ordering::Relaxed),
        lag_before: lag_of(&before),
        lag_after,
        hash_revision,
        hashes,
        hashes_equal,
        rejoin_report,
        steps: std::mem::take(&mut *steps.lock().expect("lock")),
        acks_per_100ms,
        passed: rto_ok && rpo_ok && hashes_equal,
    };
    ticker.abort();
    progress.lock().expect("lock").finish();
    write_reports(&flags.report, &report)?;
    eprintln!("report: {} (and .json, .html)", flags.report.display());
    if !report.passed {
        bail!(
            "the drill missed its budget: RTO {} (budget {:.1} s), {} writes lost (budget {}), HashKV {}",
            rto.map_or("none".to_string(), |r| format!("{r:.2} s")),
            budget.as_secs_f64(),
            report.rpo_writes,
            flags.rpo_budget,
            if hashes_equal { "equal" } else { "not equal" }
        );
    }
    Ok(())
}

fn write_reports(md: &Path, r: &Report) -> Result<()> {
    std::fs::write(md.with_extension("json"), serde_json::to_vec_pretty(r)?)?;
    let mut m = String::new();
    m.push_str(&format!("# Meridian DR drill: {}\n\n", r.scenario));
    m.push_str(&format!("**{}**\n\n", if r.passed { "PASSED" } else { "FAILED" }));
    m.push_str("| | |\n|---|---|\n");
    m.push_str(&format!("| old primary → new primary | {} → {} |\n", r.old_primary, r.new_primary));
    m.push_str(&format!(
        "| RTO | {} (budget {:.1} s) |\n",
        r.rto_s.map_or("none".to_string(), |s| format!("{s:.2} s")),
        r.rto_budget_s
    ));
    m.push_str(&format!("| RPO | {} acknowledged writes lost (budget {}) |\n", r.rpo_writes, r.rpo_budget));
    m.push_str(&format!(
        "| load | {} writes/s for {:.0} s: {} acknowledged, {} failed |\n",
        r.rate, r.duration_s, r.acknowledged, r.failed_writes
    ));
    m.push_str(&format!(
        "| HashKV at revision {} | {} |\n",
        r.hash_revision,
        if r.hashes_equal { "equal in every region" } else { "not equal" }
    ));
    if let Some(p) = &r.rejoin_report {
        m.push_str(&format!("| rejoin report | `{}` |\n", p.display()));
    }
    m.push_str("\n## Lost writes\n\n");
    if r.lost.is_empty() {
        m.push_str("None.\n");
    } else {
        m.push_str("| revision | key | value | in the rejoin report |\n|---:|---|---|---|\n");
        for l in &r.lost {
            m.push_str(&format!(
                "| {} | `{}` | `{}` | {} |\n",
                l.revision,
                l.key,
                l.value,
                if l.in_rejoin_report { "yes" } else { "no" }
            ));
        }
    }
    m.push_str("\n## Lag\n\n| region | before (role, revisions, staleness ms) | after |\n|---|---|---|\n");
    for (region, b) in &r.lag_before {
        let a = &r.lag_after[region];
        let cell = |v: &serde_json::Value| {
            format!("{} {} {}", v["role"].as_str().unwrap_or("?"), v["lag_revisions"], v["staleness_ms"])
        };
        m.push_str(&format!("| {region} | {} | {} |\n", cell(b), cell(a)));
    }
    m.push_str("\n## Steps\n\n| t (s) | step |\n|---:|---|\n");
    for s in &r.steps {
        m.push_str(&format!("| {:.2} | {} |\n", s.at_s, s.what));
    }
    std::fs::write(md, m)?;
    std::fs::write(md.with_extension("html"), html(r))?;
    Ok(())
}

/// A page with the timeline: acknowledged writes per 100 ms, and the steps.
fn html(r: &Report) -> String {
    let (w, h) = (900.0, 220.0);
    let n = r.acks_per_100ms.len().max(1) as f64;
    let max = r.acks_per_100ms.iter().copied().max().unwrap_or(1).max(1) as f64;
    let mut bars = String::new();
    for (i, c) in r.acks_per_100ms.iter().enumerate() {
        let bh = (*c as f64 / max) * (h - 40.0);
        bars.push_str(&format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#3b82f6\"/>",
            i as f64 * w / n,
            h - 20.0 - bh,
            (w / n).max(1.0)
        ));
    }
    let mut marks = String::new();
    for (i, s) in r.steps.iter().enumerate() {
        let x = s.at_s * 10.0 * w / n;
        marks.push_str(&format!(
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"0\" y2=\"{}\" stroke=\"#dc2626\"/><text x=\"{:.1}\" y=\"{}\" font-size=\"10\">{}</text>",
            h - 20.0,
            x + 2.0,
            12 + (i % 4) * 11,
            i + 1
        ));
    }
    let steps: String = r
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| format!("<li>{} — {:.2} s: {}</li>", i + 1, s.at_s, escape(&s.what)))
        .collect();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Meridian DR drill: {sc}</title></head>\
         <body style=\"font-family:sans-serif\"><h1>DR drill: {sc} — {verdict}</h1>\
         <p>RTO {rto}; {lost} acknowledged writes lost; HashKV {hash}.</p>\
         <svg width=\"{w}\" height=\"{h}\" style=\"border:1px solid #ccc\">{bars}{marks}</svg>\
         <p>Acknowledged writes per 100 ms; red lines are the steps.</p><ol>{steps}</ol></body></html>",
        sc = escape(&r.scenario),
        verdict = if r.passed { "passed" } else { "FAILED" },
        rto = r.rto_s.map_or("none".to_string(), |s| format!("{s:.2} s")),
        lost = r.rpo_writes,
        hash = if r.hashes_equal { "equal in every region" } else { "not equal" },
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
