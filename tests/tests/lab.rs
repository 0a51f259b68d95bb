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

fn repo_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// `promtool ARGS...` (Debian's `prometheus` package), run in `deploy/prometheus`.
fn promtool(args: &[&str]) -> Result<String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo_file("deploy/prometheus"))
        .output()
        .context("run promtool (apt-get install prometheus)")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

/// Every PromQL expression of the alert rules (`alert` → `expr`).
fn rule_exprs() -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(repo_file("deploy/prometheus/alerts.yml"))?;
    let docs = yaml_rust2::YamlLoader::load_from_str(&text)?;
    let mut out = Vec::new();
    for group in docs[0]["groups"].as_vec().context("groups")? {
        for rule in group["rules"].as_vec().context("rules")? {
            let name = rule["alert"].as_str().or(rule["record"].as_str()).context("a rule without a name")?;
            out.push((name.to_string(), rule["expr"].as_str().context("a rule without expr")?.to_string()));
        }
    }
    Ok(out)
}

/// Every PromQL expression of the Grafana dashboard (panel targets and annotations), with
/// Grafana's variables given values; and the metrics its template variables query.
fn dashboard_exprs() -> Result<(Vec<(String, String)>, Vec<String>)> {
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_file("deploy/grafana/meridian.json"))?)?;
    let grafana = |e: &str| e.replace("$__rate_interval", "1m").replace("$region", ".*");
    let mut exprs = Vec::new();
    for panel in doc["panels"].as_array().context("panels")? {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            exprs.push((title.to_string(), grafana(t["expr"].as_str().context("a target without expr")?)));
        }
    }
    for a in doc["annotations"]["list"].as_array().into_iter().flatten() {
        exprs.push((a["name"].as_str().unwrap_or("?").to_string(), grafana(a["expr"].as_str().context("expr")?)));
    }
    let mut queried = Vec::new();
    for v in doc["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["query"]["query"].as_str() {
            let inner = q.strip_prefix("label_values(").context("a variable query that is not label_values")?;
            queried.push(inner.split([',', '{', ')']).next().unwrap_or_default().trim().to_string());
        }
    }
    Ok((exprs, queried))
}

/// The metric names a PromQL expression selects: label matchers, ranges, strings and the label
/// lists of `by`/`without`/`on`/`ignoring`/`group_*` are dropped, then every identifier that is
/// not a function call, a keyword or a number is a metric.
fn metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "by",
        "without",
        "on",
        "ignoring",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
    ];
    const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    let chars: Vec<char> = expr.chars().collect();
    let mut plain = String::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => {
                let q = chars[i];
                i += 1;
                while i < chars.len() && chars[i] != q {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if chars[i] == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    i += 1;
                }
                i += 1;
                plain.push(' ');
            }
            c => {
                plain.push(c);
                i += 1;
            }
        }
    }
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let chars: Vec<char> = plain.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = (chars[i].is_ascii_alphabetic() || chars[i] == '_')
            && (i == 0 || !is_ident(chars[i - 1]) && chars[i - 1] != '.');
        if !starts {
            i += 1;
            continue;
        }
        let begin = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        let word: String = chars[begin..i].iter().collect();
        let mut j = i;
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        let call = j < chars.len() && chars[j] == '(';
        if call && LABEL_LISTS.contains(&word.as_str()) {
            // Skip the label list itself.
            while j < chars.len() && chars[j] != ')' {
                j += 1;
            }
            i = j + 1;
            continue;
        }
        if !call && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
            names.push(word);
        }
    }
    names
}

#[test]
fn metric_names_are_read_from_promql() {
    let e = r#"min by (region) (a_total{job="x", b="y"} unless on (region, c) (b_gauge == 1)) > 5 and rate(c_bucket[5m]) or 1e9 * d:rec offset 5m"#;
    assert_eq!(metric_names(e), ["a_total", "b_gauge", "c_bucket", "d:rec"]);
    assert_eq!(metric_names("histogram_quantile(0.99, sum by (le) (rate(x_bucket[1m])))"), ["x_bucket"]);
}

/// The alert rules pass `promtool check rules` and their unit tests (`alerts_test.yml`), the
/// Prometheus config is valid, and every expression of the Grafana dashboard parses as PromQL
/// (checked by promtool as recording rules).
#[test]
fn the_alert_rules_and_the_dashboard_pass_promtool() -> Result<()> {
    let checked = promtool(&["check", "rules", "alerts.yml"])?;
    ensure!(checked.contains("SUCCESS"), "{checked}");
    promtool(&["test", "rules", "alerts_test.yml"])?;
    promtool(&["check", "config", "prometheus.yml"])?;
    let rules = rule_exprs()?;
    for wanted in [
        "etcdNoLeader",
        "MeridianMirrorLagHigh",
        "MeridianMirrorStalled",
        "MeridianCheckpointCompactedBehind",
        "MeridianSemiSyncDegraded",
        "MeridianRpoBudgetExceeded",
    ] {
        ensure!(rules.iter().any(|(n, _)| n == wanted), "no {wanted} rule");
    }
    let (exprs, _) = dashboard_exprs()?;
    ensure!(exprs.len() >= 20, "only {} dashboard expressions", exprs.len());
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, e)) in exprs.iter().enumerate() {
        file.push_str(&format!("      - record: dashboard:expr_{i}\n        expr: {}\n", serde_json::json!(e)));
    }
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("dashboard-rules.yml");
    std::fs::write(&path, file)?;
    promtool(&["check", "rules", path.to_str().context("path")?])?;
    Ok(())
}

/// Every metric that the alert rules and the Grafana dashboard name is exported by a running
/// lab: every target of `prometheus-targets.json` (members, gateways, mirrors, the control
/// cluster) is scraped after a write has crossed regions.
#[test]
fn the_rules_and_the_dashboard_name_only_metrics_a_lab_exports() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("lab.meridian");
    let lab = start_at(&dir, "10800")?;
    let layout: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("lab.json"))?)?;
    let (eu, ap) = (gateway(&layout, "eu-west")?, gateway(&layout, "ap-south")?);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !etcdctl(&[&eu], &["put", "k", "v"])?.success() {
        ensure!(Instant::now() < deadline, "no write through eu-west's gateway");
        std::thread::sleep(Duration::from_millis(200));
    }
    while etcdctl(&[&ap], &["get", "k", "--print-value-only", "--consistency=s"])?.stdout.trim() != "v" {
        ensure!(Instant::now() < deadline, "the write never reached ap-south");
        std::thread::sleep(Duration::from_millis(100));
    }
    let targets: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("prometheus-targets.json"))?)?;
    let mut exported = std::collections::BTreeSet::from(["up".to_string()]);
    let mut jobs = std::collections::BTreeSet::new();
    for group in targets.as_array().context("target groups")? {
        jobs.insert(group["labels"]["job"].as_str().unwrap_or_default().to_string());
        for t in group["targets"].as_array().into_iter().flatten() {
            let addr = t.as_str().context("target")?;
            let (code, page) = meridian_tests::http_get(addr.parse()?, "/metrics")?;
            ensure!(code == 200, "{addr}/metrics answered {code}");
            for line in page.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
                exported.insert(line.split(['{', ' ']).next().unwrap_or_default().to_string());
            }
        }
    }
    ensure!(
        jobs == ["meridian-control", "meridian-gateway", "meridian-mirror", "meridian-node"].map(String::from).into(),
        "{jobs:?}"
    );
    let (dash, queried) = dashboard_exprs()?;
    let mut missing = Vec::new();
    for (what, expr) in rule_exprs()?.into_iter().chain(dash) {
        for name in metric_names(&expr) {
            if !exported.contains(&name) {
                missing.push(format!("{what}: {name}"));
            }
        }
    }
    for name in queried {
        if !exported.contains(&name) {
            missing.push(format!("a dashboard variable: {name}"));
        }
    }
    ensure!(missing.is_empty(), "not exported by the lab: {missing:?}");
    stop_lab(lab)
}
