//! `meridian lab` as a newcomer runs it: three regions up in one command, `lab.json` for
//! programs, a write through one region's gateway read through another's, latency between the
//! regions, Ctrl-C stopping every process, and a second run resuming the same data.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use meridian_tests::{etcdctl, meridian_bin};

/// Outside the harness's port range (15000..32000) and bench.sh's (12000..14999).
const BASE_PORT: &str = "10000";

/// The running lab; stopped (SIGINT, then SIGKILL) if a check fails first.
struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            if stop(child).is_err() {
                eprintln!("the lab did not stop cleanly");
            }
        }
    }
}

/// Starts the lab and waits until it printed its table.
fn start(dir: &std::path::Path) -> Result<Running> {
    start_at(dir, BASE_PORT)
}

fn start_at(dir: &std::path::Path, base_port: &str) -> Result<Running> {
    let mut child = Command::new(meridian_bin()?)
        .args(["lab", "--members", "1", "--latency", "20ms", "--base-port", base_port, "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("Ctrl-C stops the lab") => return Ok(Running(Some(child))),
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                anyhow::bail!("the lab did not come up within 90 s");
            }
        }
    }
}

/// SIGINT, as Ctrl-C; the lab must exit cleanly.
fn stop_lab(mut lab: Running) -> Result<()> {
    stop(lab.0.take().context("stopped already")?)
}

fn stop(mut child: Child) -> Result<()> {
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status()?;
    ensure!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            ensure!(status.success(), "the lab exited with {status}");
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            anyhow::bail!("the lab did not stop within 30 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `meridian lab VERB... --dir DIR`; its output, or why it failed.
fn verb(dir: &std::path::Path, args: &[&str]) -> Result<String> {
    let out = Command::new(meridian_bin()?).arg("lab").args(args).arg("--dir").arg(dir).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "meridian lab {args:?}: {text}{}", String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

fn gateway(layout: &serde_json::Value, region: &str) -> Result<String> {
    let r = layout["regions"].as_array().context("regions")?.iter().find(|r| r["name"] == region).context("region")?;
    Ok(r["gateway_url"].as_str().context("gateway_url")?.trim_start_matches("http://").to_string())
}

#[test]
fn the_lab_comes_up_serves_stops_and_resumes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("lab.meridian");
    let lab = start(&dir)?;
    let layout: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("lab.json"))?)?;
    let names: Vec<&str> =
        layout["regions"].as_array().context("regions")?.iter().filter_map(|r| r["name"].as_str()).collect();
    ensure!(names == ["us-east", "eu-west", "ap-south"], "{names:?}");
    ensure!(layout["regions"][0]["role"] == "primary", "{layout}");

    // A write through eu-west's gateway reaches the primary; ap-south's gateway serves it.
    let (eu, ap) = (gateway(&layout, "eu-west")?, gateway(&layout, "ap-south")?);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let put = etcdctl(&[&eu], &["put", "greeting", "hello"])?;
        if put.success() {
            break;
        }
        ensure!(Instant::now() < deadline, "no write through the eu-west gateway: {}", put.stderr);
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = etcdctl(&[&ap], &["get", "greeting", "--print-value-only", "--consistency=s"])?;
        if got.stdout.trim() == "hello" {
            break;
        }
        ensure!(Instant::now() < deadline, "ap-south's gateway never served the write: {got:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The regions are 20 ms apart, as asked (a lower bound: load only adds to it).
    let (_, body) = meridian_tests::http_get(ap.parse()?, "/v1/regions")?;
    let regions: serde_json::Value = serde_json::from_str(&body)?;
    let rtt = |name: &str| -> f64 {
        let list = regions.get("regions").unwrap_or(&regions);
        list.as_array()
            .into_iter()
            .flatten()
            .find(|r| r["name"] == name)
            .and_then(|r| r["rtt_ms"].as_f64())
            .unwrap_or(0.0)
    };
    ensure!(rtt("us-east") >= 18.0, "{regions}");

    // The verbs, from a second terminal.
    let status = verb(&dir, &["status", "-w", "json"])?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    ensure!(status["regions"]["us-east"]["role"] == "primary", "{status}");
    ensure!(status["processes"]["ap-south/1"] == true, "{status}");
    verb(&dir, &["kill", "ap-south/1"])?;
    let status: serde_json::Value = serde_json::from_str(&verb(&dir, &["status", "-w", "json"])?)?;
    ensure!(status["processes"]["ap-south/1"] == false, "{status}");
    verb(&dir, &["restart", "ap-south/1"])?;
    verb(&dir, &["latency", "us-east", "ap-south", "30ms"])?;
    verb(&dir, &["partition", "eu-west", "ap-south"])?;
    let status: serde_json::Value = serde_json::from_str(&verb(&dir, &["status", "-w", "json"])?)?;
    ensure!(status["rtt_ms"]["us-east:ap-south"] == 30, "{status}");
    ensure!(status["cut"].as_array().is_some_and(|c| c.len() == 2), "{status}");
    verb(&dir, &["heal"])?;
    let out = verb(&dir, &["switchover", "eu-west"])?;
    ensure!(out.contains("write-unavailability window"), "{out}");
    let printed = verb(&dir, &["status"])?;
    ensure!(printed.lines().any(|l| l.starts_with("eu-west") && l.contains("primary")), "{printed}");
    // Each gateway's dashboard marks the switchover and has every region's row of the RTT matrix.
    let dash = layout["regions"][2]["dashboard_url"].as_str().context("dashboard_url")?;
    let dash_addr = dash.trim_start_matches("http://").trim_end_matches("/dashboard").parse()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = meridian_tests::http_get(dash_addr, "/v1/dashboard")?;
        let doc: serde_json::Value = serde_json::from_str(&body)?;
        let rows = doc["rtt_ms"].as_object().map_or(0, |m| m.len());
        let marked =
            doc["events"].as_array().into_iter().flatten().any(|e| e["kind"] == "failover" && e["region"] == "eu-west");
        if rows == 3 && marked {
            break;
        }
        ensure!(Instant::now() < deadline, "ap-south's dashboard: {rows} RTT rows, failover marked: {marked}\n{doc}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let put = etcdctl(&[&ap], &["put", "greeting", "hola"])?;
        if put.success() {
            break;
        }
        ensure!(Instant::now() < deadline, "no write through ap-south after the switchover: {}", put.stderr);
        std::thread::sleep(Duration::from_millis(200));
    }
    stop_lab(lab)?;

    // Stopped means stopped: nothing answers on the members' ports.
    for r in layout["regions"].as_array().into_iter().flatten() {
        for m in r["members"].as_array().into_iter().flatten() {
            let addr = m["client_url"].as_str().unwrap_or("").trim_start_matches("http://");
            ensure!(std::net::TcpStream::connect(addr).is_err(), "{addr} still answers after the lab stopped");
        }
    }

    // A second run resumes the same lab (eu-west is the primary now).
    let lab = start(&dir)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = etcdctl(&[&eu], &["get", "greeting", "--print-value-only"])?;
        if got.stdout.trim() == "hola" {
            break;
        }
        ensure!(Instant::now() < deadline, "the resumed lab lost the write: {got:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    stop_lab(lab)
}

/// `meridian lab drill`: a region loss under load fails over by itself within its RTO budget,
/// every acknowledged write the new primary lacks is in the rejoin report, and HashKV agrees in
/// every region afterwards; a switchover loses nothing. Both write Markdown, JSON and HTML.
#[test]
fn drills_run_and_report() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("lab.meridian");
    let lab = start_at(&dir, "10400")?;
    let report = tmp.path().join("loss.md");
    let loss = verb(
        &dir,
        &[
            "drill",
            "--scenario",
            "region-loss",
            "--rate",
            "100",
            "--duration",
            "15s",
            "--rto-budget",
            "20s",
            "--rpo-budget",
            "100000",
            "--report",
            report.to_str().context("path")?,
        ],
    );
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(report.with_extension("json"))?)?;
    loss.with_context(|| format!("{json}"))?;
    ensure!(json["passed"] == true && json["hashes_equal"] == true, "{json}");
    ensure!(json["old_primary"] == "us-east" && json["new_primary"] != "us-east", "{json}");
    ensure!(json["rto_s"].as_f64().is_some_and(|s| s > 0.0 && s <= 20.0), "{json}");
    let lost = json["lost"].as_array().context("lost")?;
    ensure!(lost.iter().all(|l| l["in_rejoin_report"] == true), "a lost write the rejoin report does not name: {json}");
    ensure!(json["rejoin_report"].as_str().is_some_and(|p| std::path::Path::new(p).exists()), "{json}");
    let md = std::fs::read_to_string(&report)?;
    ensure!(md.contains("**PASSED**") && md.contains("## Lost writes"), "{md}");
    ensure!(std::fs::read_to_string(report.with_extension("html"))?.contains("<svg"));

    let report = tmp.path().join("switch.md");
    verb(
        &dir,
        &["drill", "--scenario", "switchover", "--duration", "6s", "--report", report.to_str().context("path")?],
    )?;
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(report.with_extension("json"))?)?;
    ensure!(json["passed"] == true && json["rpo_writes"] == 0 && json["hashes_equal"] == true, "{json}");
    stop_lab(lab)
}
