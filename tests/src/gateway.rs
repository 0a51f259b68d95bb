//! A `meridian gateway` process for tests: spawned with a leased client port and a log file,
//! killed by PID on drop.

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::{http_get, lease_port, meridian_bin, PortLease};

pub struct GatewayProcess {
    child: Option<Child>,
    port: PortLease,
    /// Under https: the plain HTTP listener that answers /readyz, /health and /v1/regions.
    metrics: Option<PortLease>,
    dir: TempDir,
}

impl GatewayProcess {
    /// Starts `meridian gateway --name <name> --region <region> --listen-client-urls <leased>
    /// --upstream R=EPS ... <extra>` and waits until `/readyz` says every region was probed.
    /// `upstreams` are `(region, endpoints)`.
    pub fn start(name: &str, region: &str, upstreams: &[(&str, Vec<String>)], extra: &[&str]) -> Result<Self> {
        Self::start_with_env(name, region, upstreams, extra, &[])
    }

    /// [`GatewayProcess::start`] with extra environment variables (failpoints).
    pub fn start_with_env(
        name: &str,
        region: &str,
        upstreams: &[(&str, Vec<String>)],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::spawn(name, region, upstreams, extra, env, false)
    }

    /// [`GatewayProcess::start`] on an `https://` client URL (give `--cert-file` and
    /// `--key-file` in `extra`), with a plain `--listen-metrics-urls` for the harness's checks.
    pub fn start_https(name: &str, region: &str, upstreams: &[(&str, Vec<String>)], extra: &[&str]) -> Result<Self> {
        Self::spawn(name, region, upstreams, extra, &[], true)
    }

    fn spawn(
        name: &str,
        region: &str,
        upstreams: &[(&str, Vec<String>)],
        extra: &[&str],
        env: &[(&str, &str)],
        https: bool,
    ) -> Result<Self> {
        let port = lease_port()?;
        let metrics = if https { Some(lease_port()?) } else { None };
        let dir = tempfile::tempdir()?;
        let log = File::create(dir.path().join("gateway.log"))?;
        let mut args = vec![
            "gateway".to_string(),
            "--name".into(),
            name.into(),
            "--region".into(),
            region.into(),
            "--listen-client-urls".into(),
            format!("{}://127.0.0.1:{}", if https { "https" } else { "http" }, port.port()),
        ];
        if let Some(m) = &metrics {
            args.extend(["--listen-metrics-urls".into(), format!("http://127.0.0.1:{}", m.port())]);
        }
        for (r, eps) in upstreams {
            args.push("--upstream".into());
            args.push(format!("{r}={}", eps.join(",")));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(meridian_bin()?)
            .args(&args)
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn meridian gateway")?;
        let gw = Self { child: Some(child), port, metrics, dir };
        gw.wait_ready(Duration::from_secs(20))?;
        Ok(gw)
    }

    /// `127.0.0.1:port`, for etcdctl `--endpoints` and clients.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port.port())
    }

    /// Where the harness asks plain HTTP questions: the client port, or under https the
    /// metrics port.
    pub fn addr(&self) -> SocketAddr {
        let port = self.metrics.as_ref().unwrap_or(&self.port).port();
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("gateway.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `GET /v1/regions`.
    pub fn regions(&self) -> Result<serde_json::Value> {
        let (code, body) = http_get(self.addr(), "/v1/regions")?;
        if code != 200 {
            bail!("/v1/regions answered {code}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Waits until `/readyz` is 200 and one region takes writes.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ready = matches!(http_get(self.addr(), "/readyz"), Ok((200, _)))
                && matches!(http_get(self.addr(), "/health"), Ok((200, _)));
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("gateway not ready within {timeout:?}; its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every region is healthy and each one's staleness is known (a secondary's
    /// once the mirror's heartbeats reached it).
    pub fn wait_every_region_known(&self, timeout: Duration) -> Result<()> {
        self.wait_regions(timeout, |doc| {
            doc["regions"].as_array().is_some_and(|rs| {
                rs.iter().all(|r| r["healthy"] == true && r["staleness_seconds"].as_f64().is_some_and(|s| s >= 0.0))
            })
        })
    }

    /// Waits until `check` holds for the `/v1/regions` document.
    pub fn wait_regions(&self, timeout: Duration, check: impl Fn(&serde_json::Value) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(doc) = self.regions() {
                if check(&doc) {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("regions never matched within {timeout:?}: {doc}");
                }
            } else if Instant::now() > deadline {
                bail!("no /v1/regions within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
