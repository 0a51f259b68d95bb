//! The lab's child processes (members, gateways, mirrors, the control cluster): started with
//! their logs, stopped by PID, frozen by a partition, and waited on until healthy.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A child process of the lab: how to start it, and the running child.
pub struct Proc {
    pub what: String,
    args: Vec<String>,
    pub(crate) log: PathBuf,
    pub(crate) child: Option<Child>,
    /// SIGSTOPped by a partition.
    pub frozen: bool,
}

impl Proc {
    pub(crate) fn new(what: &str, args: Vec<String>, log: PathBuf) -> Self {
        Self { what: what.to_string(), args, log, child: None, frozen: false }
    }

    pub(crate) fn start(&mut self, bin: &Path) -> Result<()> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(bin)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {}", self.what))?;
        self.child = Some(child);
        self.frozen = false;
        Ok(())
    }

    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub(crate) fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").arg(format!("-{sig}")).arg(c.id().to_string()).status();
        }
    }

    /// SIGKILL: a real crash.
    pub(crate) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, a bounded wait, then SIGKILL.
    pub(crate) fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        if self.frozen {
            self.signal("CONT");
        }
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        tracing::warn!(what = %self.what, "did not stop on SIGTERM; killed");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// GET `path` on `addr` (host:port); the status code.
pub(crate) async fn http_status(addr: &str, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s =
        tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(addr)).await.ok()?.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = vec![0; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await.ok()?.ok()?;
    std::str::from_utf8(&buf[..n]).ok()?.split(' ').nth(1)?.parse().ok()
}

pub fn host_port(url: &str) -> &str {
    url.trim_start_matches("http://")
}

pub(crate) async fn wait_healthy(what: &str, addr: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while http_status(addr, "/health").await != Some(200) {
        if Instant::now() >= deadline {
            bail!("{what} ({addr}) is not healthy after {limit:?}; see its log under the lab directory");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
