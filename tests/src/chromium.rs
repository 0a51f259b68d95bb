//! Debian's headless `chromium`, for the dashboard: the DOM of a page after its scripts ran, and
//! a screenshot. Each call is one browser process with a profile of its own, killed by PID if it
//! outlives its time.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a page may run its scripts (virtual time: network waits do not count against it).
const BUDGET_MS: u32 = 3000;
/// A browser that has not finished by then is killed and the call fails.
const LIMIT: Duration = Duration::from_secs(90);

fn run(url: &str, extra: &[&str]) -> Result<Vec<u8>> {
    let profile = tempfile::tempdir()?;
    let budget = format!("--virtual-time-budget={BUDGET_MS}");
    let data_dir = format!("--user-data-dir={}", profile.path().display());
    let out = tempfile::NamedTempFile::new()?;
    let mut child = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        .args(["--disable-extensions", "--hide-scrollbars", &budget, &data_dir])
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(out.reopen()?)
        .stderr(Stdio::null())
        .spawn()
        .context("spawn chromium (Debian's `chromium` package)")?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("chromium {extra:?} {url} exited with {status}");
            }
            return Ok(std::fs::read(out.path())?);
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("chromium did not finish {url} within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The page's DOM, serialized, after its scripts ran.
pub fn dump_dom(url: &str) -> Result<String> {
    Ok(String::from_utf8_lossy(&run(url, &["--dump-dom"])?).into_owned())
}

/// Saves a PNG of the page at `width`x`height` to `path`.
pub fn screenshot(url: &str, path: &Path, width: u32, height: u32) -> Result<()> {
    let shot = format!("--screenshot={}", path.display());
    let size = format!("--window-size={width},{height}");
    run(url, &[&shot, &size])?;
    let png = std::fs::read(path).with_context(|| format!("chromium wrote no {}", path.display()))?;
    if !png.starts_with(b"\x89PNG") {
        bail!("{} is not a PNG", path.display());
    }
    Ok(())
}
