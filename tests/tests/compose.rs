//! `docker-compose.yml` as a user runs it, with docker-compose 1.29 and with the compose v2
//! plugin: the image built FROM scratch with no registry, the three regions up, a write through
//! eu-west's gateway read through ap-south's, the primary region's containers killed, an
//! automatic failover, a write after it, and everything torn down.
//!
//! Needs a docker daemon and both compose tools (`.ci/run` installs them). Each run uses its own
//! project name, image tag, build context and published ports, so it touches nothing of a
//! user's own `docker compose up`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use meridian_tests::{etcdctl, http_get, lease_port, meridian_bin, PortLease};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One compose project: its tool (`docker-compose`, or `docker compose`), name, environment and
/// ports; `down -v --rmi all` on drop.
struct Project {
    tool: Vec<&'static str>,
    name: String,
    env: Vec<(String, String)>,
    ports: Vec<PortLease>,
    _context: tempfile::TempDir,
}

impl Project {
    fn new(tool: Vec<&'static str>) -> Result<Self> {
        let tag = format!("{}-{}", std::process::id(), tool.len());
        let context = tempfile::tempdir()?;
        let out = Command::new(repo().join("deploy/docker/rootfs.sh"))
            .arg(meridian_bin()?)
            .arg(context.path())
            .output()
            .context("run deploy/docker/rootfs.sh")?;
        ensure!(out.status.success(), "rootfs.sh: {}", String::from_utf8_lossy(&out.stderr));
        let ports = (0..REGIONS.len()).map(|_| lease_port()).collect::<Result<Vec<_>>>()?;
        let mut env = vec![
            ("MERIDIAN_IMAGE".to_string(), format!("meridian-test:{tag}")),
            ("MERIDIAN_DOCKER_CONTEXT".to_string(), context.path().display().to_string()),
        ];
        for (r, p) in REGIONS.iter().zip(&ports) {
            env.push((format!("MERIDIAN_{}_PORT", r.to_ascii_uppercase().replace('-', "_")), p.port().to_string()));
        }
        Ok(Self { tool, name: format!("meridian-test-{tag}"), env, ports, _context: context })
    }

    /// Runs `TOOL -f docker-compose.yml -p NAME ARGS...`; its output, or why it failed.
    fn run(&self, args: &[&str]) -> Result<String> {
        let (program, first) = self.tool.split_first().context("a tool")?;
        let out = Command::new(program)
            .args(first)
            .arg("-f")
            .arg(repo().join("docker-compose.yml"))
            .args(["-p", &self.name])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .with_context(|| format!("run {}", self.tool.join(" ")))?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        ensure!(out.status.success(), "{} {args:?} failed:\n{text}", self.tool.join(" "));
        Ok(text)
    }

    fn gateway(&self, region: &str) -> String {
        let i = REGIONS.iter().position(|r| *r == region).expect("a region");
        format!("127.0.0.1:{}", self.ports[i].port())
    }

    fn logs(&self) -> String {
        self.run(&["logs", "--tail", "30"]).unwrap_or_else(|e| e.to_string())
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if let Err(e) = self.run(&["down", "-v", "--rmi", "all", "--remove-orphans"]) {
            eprintln!("could not tear {} down: {e}", self.name);
        }
    }
}

/// Retries `f` every 250 ms until it passes or `limit` runs out.
fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            bail!("{what} did not happen within {limit:?} {last}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn drive(p: &Project) -> Result<()> {
    p.run(&["build"])?;
    p.run(&["up", "-d"])?;
    let (eu, ap) = (p.gateway("eu-west"), p.gateway("ap-south"));
    eventually("a write through eu-west's gateway", Duration::from_secs(90), || {
        Ok(etcdctl(&[&eu], &["put", "greeting", "hello"])?.success())
    })?;
    eventually("the write, read through ap-south's gateway", Duration::from_secs(30), || {
        Ok(etcdctl(&[&ap], &["get", "greeting", "--print-value-only", "--consistency=s"])?.stdout.trim() == "hello")
    })?;
    // The dashboard is served from the binary inside the container too.
    let (code, page) = http_get(eu.parse()?, "/dashboard")?;
    ensure!(code == 200 && page.contains("dashboard.js"), "/dashboard through the published port: {code}");

    // The primary region is lost: its members, its control member, gateway and mirror.
    let primary: Vec<String> = (1..=3)
        .map(|i| format!("us-east-{i}"))
        .chain(["control-us-east", "gw-us-east", "mirror-us-east"].map(String::from))
        .collect();
    let mut kill = vec!["kill"];
    kill.extend(primary.iter().map(String::as_str));
    p.run(&kill)?;
    let killed = Instant::now();
    eventually("a write after the failover", Duration::from_secs(60), || {
        Ok(etcdctl(&[&eu], &["put", "after", "failover", "--command-timeout=2s"])?.success())
    })?;
    eprintln!(
        "{}: writes resumed {:.1} s after the primary's containers were killed",
        p.name,
        killed.elapsed().as_secs_f64()
    );
    eventually("the new write, read through ap-south's gateway", Duration::from_secs(30), || {
        Ok(etcdctl(&[&ap], &["get", "after", "--print-value-only", "--consistency=s"])?.stdout.trim() == "failover")
    })?;
    let (_, body) = http_get(eu.parse()?, "/v1/regions")?;
    let doc: serde_json::Value = serde_json::from_str(&body)?;
    let takes_writes: Vec<&serde_json::Value> =
        doc["regions"].as_array().into_iter().flatten().filter(|r| r["takes_writes"] == true).collect();
    ensure!(
        takes_writes.len() == 1 && takes_writes[0]["name"] != "us-east" && takes_writes[0]["epoch"].as_u64() >= Some(1),
        "after the failover the gateway sees: {doc}"
    );
    // The old primary's writes from before are still there.
    ensure!(etcdctl(&[&eu], &["get", "greeting", "--print-value-only"])?.stdout.trim() == "hello");
    Ok(())
}

fn available(tool: &[&str]) -> bool {
    Command::new(tool[0]).args(&tool[1..]).arg("version").output().is_ok_and(|o| o.status.success())
}

#[test]
fn the_composition_comes_up_fails_over_and_tears_down_with_both_compose_tools() -> Result<()> {
    let docker = Command::new("docker").arg("info").output();
    ensure!(
        docker.as_ref().is_ok_and(|o| o.status.success()),
        "this test needs a running docker daemon (.ci/run starts one): {docker:?}"
    );
    let tools = [vec!["docker-compose"], vec!["docker", "compose"]];
    let missing: Vec<String> = tools.iter().filter(|t| !available(t)).map(|t| t.join(" ")).collect();
    ensure!(missing.is_empty(), "missing {missing:?}: .ci/run installs docker-compose 1.29 and the compose v2 plugin");
    for tool in tools {
        let p = Project::new(tool)?;
        if let Err(e) = drive(&p) {
            bail!("{}: {e:#}\n{}", p.tool.join(" "), p.logs());
        }
    }
    Ok(())
}
