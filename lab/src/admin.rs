//! The lab's admin API, and the verbs a person types at a second terminal
//! (`meridian lab status`, `kill us-east/2`, `partition eu-west`, ...),
//! which find the running lab through its `lab.json` and call it.
//!
//! `GET /v1/status`; `POST /v1/{kill,restart,partition,heal,latency,promote,switchover,rejoin}`
//! with a JSON body `{"target": .., "other": .., "rtt": ..}`; every answer is
//! JSON `{"ok": bool, "output": text}` (status: the state itself).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::extract::{Json, Path as UrlPath, State};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::{host_port, Lab, Layout};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct VerbRequest {
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub other: Option<String>,
    #[serde(default)]
    pub rtt: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VerbAnswer {
    pub ok: bool,
    pub output: String,
}

/// Serves the admin API on `addr` until the returned task is aborted.
///
/// # Errors
///
/// The port is taken.
pub async fn serve(lab: Arc<Lab>, addr: &str) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("admin port {addr}"))?;
    let router = axum::Router::new().route("/v1/status", get(status)).route("/v1/{verb}", post(verb)).with_state(lab);
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    }))
}

async fn status(State(lab): State<Arc<Lab>>) -> Json<serde_json::Value> {
    Json(tokio::task::spawn_blocking(move || lab.status()).await.unwrap_or_default())
}

async fn verb(
    State(lab): State<Arc<Lab>>,
    UrlPath(verb): UrlPath<String>,
    Json(req): Json<VerbRequest>,
) -> Json<VerbAnswer> {
    // The verbs wait on processes and commands: off the runtime's workers.
    let answer = tokio::task::spawn_blocking(move || {
        let t = req.target.as_str();
        match verb.as_str() {
            "kill" => lab.kill(t),
            "restart" => lab.restart(t),
            "partition" => lab.partition(t, req.other.as_deref()),
            "heal" => lab.heal(),
            "latency" => match (&req.other, &req.rtt) {
                (Some(b), Some(rtt)) => lab.latency(t, b, rtt),
                _ => Err(anyhow::anyhow!("latency needs two regions and a round trip")),
            },
            "promote" => lab.promote(t),
            "switchover" => lab.switchover(t),
            "rejoin" => lab.rejoin(t),
            other => Err(anyhow::anyhow!("unknown verb {other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| Err(anyhow::anyhow!("{e}")));
    Json(match answer {
        Ok(output) => VerbAnswer { ok: true, output },
        Err(e) => VerbAnswer { ok: false, output: format!("{e:#}") },
    })
}

/// The verbs, as `meridian lab VERB` parses them.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Verb {
    /// Regions, roles, epochs, lag, round trips and processes of the running lab.
    Status {
        /// Output format: simple or json.
        #[arg(long, short = 'w', default_value = "simple")]
        write_out: String,
    },
    /// SIGKILL a region (its members, gateway, mirror and control member) or one member (REGION/N).
    Kill { target: String },
    /// Start again what `kill` stopped, for a region or one member.
    Restart { target: String },
    /// Cut a region off from every other one, or the link between two regions.
    Partition { region: String, other: Option<String> },
    /// Restore every link that `partition` cut.
    Heal,
    /// Set the round trip between two regions (a duration: 120ms).
    Latency { a: String, b: String, rtt: String },
    /// Promote a region's secondary (unplanned failover, --allow-data-loss).
    Promote { region: String },
    /// Hand the primary role to this region, losing nothing.
    Switchover { region: String },
    /// Make a failed old primary follow the current one (report under the lab directory).
    Rejoin { region: String },
    /// Run a disaster-recovery drill against the lab and write its report.
    Drill(crate::drill::DrillFlags),
    /// Print the lab as a docker compose file (the repository's docker-compose.yml).
    Compose {
        /// Members per region: 1, 3 or 5.
        #[arg(long, default_value_t = 3)]
        members: usize,
    },
}

/// One HTTP/1.1 exchange with the lab's admin port; the body of the answer.
pub(crate) async fn call(addr: &str, method: &str, path: &str, body: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .context("the lab's admin port does not answer")?
        .with_context(|| format!("no lab is running at {addr} (start it with `meridian lab`)"))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), s.read_to_end(&mut out))
        .await
        .context("the lab did not answer")??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("a malformed answer")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("the lab answered {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// Runs one verb against the lab in `dir`.
///
/// # Errors
///
/// No lab there, or the verb failed (its message says why).
pub async fn run_verb(dir: &Path, verb: &Verb) -> Result<()> {
    if let Verb::Compose { members } = verb {
        if ![1, 3, 5].contains(members) {
            bail!("--members {members}: 1, 3 or 5");
        }
        print!("{}", crate::compose::render(*members));
        return Ok(());
    }
    let layout: Layout = serde_json::from_slice(
        &std::fs::read(dir.join("lab.json"))
            .with_context(|| format!("no lab in {} (start it with `meridian lab`)", dir.display()))?,
    )?;
    let addr = host_port(&layout.admin_url).to_string();
    let post = |verb: &str, req: VerbRequest| {
        let (addr, verb) = (addr.clone(), verb.to_string());
        async move {
            let body = call(&addr, "POST", &format!("/v1/{verb}"), &serde_json::to_string(&req)?).await?;
            let answer: VerbAnswer = serde_json::from_str(&body)?;
            if !answer.ok {
                bail!("{}", answer.output);
            }
            println!("{}", answer.output);
            Ok(())
        }
    };
    let req = |target: &str| VerbRequest { target: target.into(), ..Default::default() };
    match verb {
        Verb::Status { write_out } => {
            let body = call(&addr, "GET", "/v1/status", "").await?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            match write_out.as_str() {
                "json" => println!("{v}"),
                "simple" => print_status(&v),
                other => bail!("unsupported output format {other:?}: use simple or json"),
            }
            Ok(())
        }
        Verb::Kill { target } => post("kill", req(target)).await,
        Verb::Restart { target } => post("restart", req(target)).await,
        Verb::Partition { region, other } => {
            post("partition", VerbRequest { target: region.clone(), other: other.clone(), rtt: None }).await
        }
        Verb::Heal => post("heal", VerbRequest::default()).await,
        Verb::Latency { a, b, rtt } => {
            post("latency", VerbRequest { target: a.clone(), other: Some(b.clone()), rtt: Some(rtt.clone()) }).await
        }
        Verb::Promote { region } => post("promote", req(region)).await,
        Verb::Switchover { region } => post("switchover", req(region)).await,
        Verb::Rejoin { region } => post("rejoin", req(region)).await,
        Verb::Drill(flags) => crate::drill::run(dir, flags).await,
        Verb::Compose { .. } => unreachable!("printed above"),
    }
}

fn print_status(v: &serde_json::Value) {
    println!(
        "{:<10} {:<10} {:>5} {:>9} {:>8} {:>10}  processes",
        "region", "role", "epoch", "revision", "lag", "staleness"
    );
    let procs = v["processes"].as_object().cloned().unwrap_or_default();
    for (name, s) in v["regions"].as_object().into_iter().flatten() {
        let down: Vec<&String> = procs
            .iter()
            .filter(|(k, up)| {
                (k.starts_with(&format!("{name}/")) || **k == format!("control/{name}"))
                    && up != &&serde_json::Value::Bool(true)
            })
            .map(|(k, _)| k)
            .collect();
        let processes = if down.is_empty() {
            "all up".to_string()
        } else {
            format!("down: {}", down.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))
        };
        if let Some(e) = s["error"].as_str() {
            println!(
                "{name:<10} {:<10} {:>5} {:>9} {:>8} {:>10}  {processes} ({})",
                "?",
                "",
                "",
                "",
                "",
                e.lines().next().unwrap_or("")
            );
            continue;
        }
        let lag = (s["source_revision"].as_i64().unwrap_or(0) - s["revision"].as_i64().unwrap_or(0)).max(0);
        let staleness = match s["staleness_ms"].as_i64() {
            Some(ms) if ms >= 0 => format!("{:.3}s", ms as f64 / 1000.0),
            _ => "unknown".into(),
        };
        let lag = if s["role"] == "primary" { "-".to_string() } else { lag.to_string() };
        println!(
            "{name:<10} {:<10} {:>5} {:>9} {:>8} {:>10}  {processes}",
            s["role"].as_str().unwrap_or("?"),
            s["epoch"],
            s["revision"],
            lag,
            if s["role"] == "primary" { "-".to_string() } else { staleness }
        );
    }
    let rtts: Vec<String> =
        v["rtt_ms"].as_object().into_iter().flatten().map(|(k, ms)| format!("{k} {ms} ms")).collect();
    println!("round trips: {}", rtts.join(", "));
    if let Some(cut) = v["cut"].as_array().filter(|c| !c.is_empty()) {
        let links: Vec<&str> = cut.iter().filter_map(|c| c.as_str()).collect();
        println!("cut: {}", links.join(", "));
    }
}
