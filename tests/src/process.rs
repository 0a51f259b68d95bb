//! Child-process helpers shared by the cluster and etcdctl: signals and bounded waits.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::Result;

pub(crate) fn signal(child: &Child, signal: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(child.id())?;
    // SAFETY: kill has no memory preconditions; the pid is our own unreaped child, so it cannot
    // have been reused by another process.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Waits up to `limit` for `child` to exit; `None` if it is still running.
pub(crate) fn wait_timeout(child: &mut Child, limit: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
