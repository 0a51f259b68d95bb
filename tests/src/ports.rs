//! Port leases: 127.0.0.1 ports unique across every process that uses the harness.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, TcpListener};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};

/// Ports handed to members: below the ephemeral range, apart from bench/bench.sh's 12000-14999.
const PORTS: Range<u16> = 15000..32000;

/// A 127.0.0.1 port reserved for this process until dropped; see "Ports" in the crate doc.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
}

impl PortLease {
    /// The reserved port number.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        let mut registry = registry();
        registry.leased.remove(&self.port);
        registry.set_lock(self.port, libc::F_UNLCK);
    }
}

/// Reserves a free 127.0.0.1 port, unique across every process using this harness.
///
/// # Errors
///
/// Every port in 15000..32000 is taken.
pub fn lease_port() -> Result<PortLease> {
    let mut registry = registry();
    let span = PORTS.end - PORTS.start;
    for _ in 0..span {
        let port = registry.next;
        registry.next = PORTS.start + (port - PORTS.start + 1) % span;
        if registry.leased.contains(&port) || !registry.set_lock(port, libc::F_WRLCK) {
            continue;
        }
        // Something outside the harness may listen there.
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
            registry.set_lock(port, libc::F_UNLCK);
            continue;
        }
        registry.leased.insert(port);
        return Ok(PortLease { port });
    }
    bail!("no free port in {PORTS:?}")
}

/// This process's leased ports and its one descriptor of the shared lock file.
struct PortRegistry {
    /// `None` if the file cannot be opened; uniqueness across processes then rests on the bind probe.
    lock_file: Option<File>,
    leased: HashSet<u16>,
    next: u16,
}

impl PortRegistry {
    /// Sets (`F_WRLCK`, without blocking) or clears (`F_UNLCK`) the record lock on byte `port`;
    /// false if another process holds it.
    fn set_lock(&self, port: u16, kind: libc::c_int) -> bool {
        let Some(file) = &self.lock_file else {
            return true;
        };
        // SAFETY: flock is plain old data; zero is a valid value for every field.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = kind as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        lock.l_start = libc::off_t::from(port);
        lock.l_len = 1;
        // SAFETY: the descriptor is open for as long as `file` lives and `lock` outlives the call.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) == 0 }
    }
}

/// The process-wide port registry. Record locks are per process and are all released when any
/// descriptor of the file is closed, so the file is opened exactly once and never closed.
fn registry() -> MutexGuard<'static, PortRegistry> {
    static REGISTRY: OnceLock<Mutex<PortRegistry>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            // SAFETY: getuid has no preconditions.
            let uid = unsafe { libc::getuid() };
            let path = std::env::temp_dir().join(format!("meridian-tests-ports-{uid}.lock"));
            let lock_file =
                OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(&path);
            if let Err(err) = &lock_file {
                eprintln!("meridian-tests: cannot open {}: {err}; ports are only probed", path.display());
            }
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
            let seed = u64::from(std::process::id()) * 7919 + u64::from(nanos % 1000);
            let next = PORTS.start + (seed % u64::from(PORTS.end - PORTS.start)) as u16;
            Mutex::new(PortRegistry { lock_file: lock_file.ok(), leased: HashSet::new(), next })
        })
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leased_ports_are_distinct_and_reusable_after_drop() {
        let leases: Vec<PortLease> = (0..20).map(|_| lease_port().unwrap()).collect();
        let ports: HashSet<u16> = leases.iter().map(PortLease::port).collect();
        assert_eq!(ports.len(), 20);
        assert!(ports.iter().all(|p| PORTS.contains(p)));
        let first = leases[0].port();
        drop(leases);
        assert!(!registry().leased.contains(&first));
    }
}
