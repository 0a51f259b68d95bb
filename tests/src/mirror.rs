//! A `meridian mirror` process for tests: spawned with a log file and a
//! leased metrics port, killed by PID on drop.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::{http_get, lease_port, meridian_bin, Cluster, PortLease};

pub struct MirrorProcess {
    args: Vec<String>,
    child: Option<Child>,
    metrics: PortLease,
    dir: TempDir,
    starts: u32,
}

/// The mirror token every test secondary and test mirror share: one file in the temp dir, the
/// same for every test process (written to a unique name, then renamed into place, so readers
/// never see it half written). Pass `--mirror-token-file <this>` to a secondary (see
/// [`secondary_flags`]); a [`MirrorProcess`] presents it on its own.
pub fn mirror_token_file() -> Result<&'static Path> {
    static FILE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let file = FILE.get_or_init(|| {
        let path = std::env::temp_dir().join("meridian-test-mirror.token");
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&tmp, "meridian-test-token\n").map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &path).map_err(|e| e.to_string())?;
        Ok(path)
    });
    file.as_deref().map_err(|e| anyhow::anyhow!("mirror token file: {e}"))
}

/// Flags of a secondary in region `region` that mirrors `primary_region`, with the test token.
pub fn secondary_flags(region: &str, primary_region: &str) -> Result<Vec<String>> {
    let token = mirror_token_file()?.display().to_string();
    Ok(["--region", region, "--initial-role", "secondary", "--primary-region", primary_region]
        .into_iter()
        .map(String::from)
        .chain(["--mirror-token-file".to_string(), token])
        .collect())
}

impl MirrorProcess {
    /// Starts `meridian mirror --source <source> --target <target> --mirror-token-file <test
    /// token> <extra>`.
    pub fn start(source: &[String], target: &Cluster, extra: &[&str]) -> Result<Self> {
        let metrics = lease_port()?;
        let mut args = vec![
            "mirror".to_string(),
            "--source".into(),
            source.join(","),
            "--target".into(),
            target.client_urls().join(","),
            "--listen-metrics".into(),
            format!("127.0.0.1:{}", metrics.port()),
            "--mirror-token-file".into(),
            mirror_token_file()?.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut m = Self { args, child: None, metrics, dir: tempfile::tempdir()?, starts: 0 };
        m.spawn()?;
        Ok(m)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mirror.log")
    }

    /// (Re)starts the process; its log accumulates across starts.
    pub fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let log = File::options().create(true).append(true).open(self.log_path())?;
        let child = Command::new(meridian_bin()?)
            .args(&self.args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn meridian mirror")?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// The mirror's /status JSON, once its listener is up.
    pub fn status(&self) -> Result<serde_json::Value> {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.metrics.port()).parse()?;
        let (code, body) = http_get(addr, "/status")?;
        if code != 200 {
            bail!("status {code}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Prometheus text from /metrics.
    pub fn metrics(&self) -> Result<String> {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.metrics.port()).parse()?;
        Ok(http_get(addr, "/metrics")?.1)
    }

    /// What `meridian mirror status --target <target> --metrics <this mirror>` prints.
    pub fn status_command(&self, target: &Cluster) -> Result<String> {
        let out = Command::new(meridian_bin()?)
            .args(["mirror", "status", "--target", &target.endpoints().join(",")])
            .args(["--metrics", &format!("127.0.0.1:{}", self.metrics.port())])
            .output()
            .context("run meridian mirror status")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("meridian mirror status failed: {text}{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(text)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Waits (bounded) until the target has applied `revision`.
    pub fn wait_applied(&self, revision: i64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(s) = self.status() {
                if s["applied_revision"].as_i64().unwrap_or(0) >= revision {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("mirror did not reach revision {revision} in {timeout:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for MirrorProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- mirror log -----\n{}", self.log());
        }
        let _ = self.kill9();
    }
}
