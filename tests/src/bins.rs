//! Locating the binaries: `meridian` under test, and the reference `etcd` and `etcdctl`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};

/// Path of the `meridian` binary; the lookup order is in the crate doc.
///
/// # Errors
///
/// `MERIDIAN_BIN` names a missing file, or no candidate exists; the message lists them and says
/// to run `cargo build --bins`.
pub fn meridian_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("MERIDIAN_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() { Ok(path) } else { Err(anyhow!("MERIDIAN_BIN={} does not exist", path.display())) };
    }
    let mut candidates = Vec::new();
    // <target>/<profile>/deps/<test-binary>
    if let Some(profile_dir) = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.parent()?.to_path_buf()))
    {
        candidates.push(profile_dir.join("meridian"));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent");
    let mut target_dirs = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        target_dirs.push(workspace.join(dir)); // join keeps an absolute dir as is
    }
    target_dirs.push(workspace.join("target"));
    for dir in target_dirs {
        candidates.extend(["debug", "release"].map(|profile| dir.join(profile).join("meridian")));
    }
    candidates.dedup();
    candidates.iter().find(|c| c.is_file()).cloned().ok_or_else(|| {
        anyhow!(
            "meridian binary not found (tried {}): run `cargo build --bins` first (scripts/test.sh does) or set MERIDIAN_BIN",
            candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    })
}

/// Path of the reference `etcd`: `$ETCD_BIN`, else `etcd` on `PATH`.
///
/// # Errors
///
/// Not found; the message says `apt-get install etcd-server etcd-client`.
pub fn etcd_bin() -> Result<PathBuf> {
    find_tool("ETCD_BIN", "etcd")
}

/// Path of `etcdctl`: `$ETCDCTL_BIN`, else `etcdctl` on `PATH`.
///
/// # Errors
///
/// Not found; the message says `apt-get install etcd-server etcd-client`.
pub fn etcdctl_bin() -> Result<PathBuf> {
    find_tool("ETCDCTL_BIN", "etcdctl")
}

fn find_tool(var: &str, name: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(var) {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        .ok_or_else(|| {
            anyhow!(
                "`{name}` not found on PATH: the reference etcd 3.4 is needed; \
                 run `apt-get install etcd-server etcd-client` (.ci/run does), or set {var}"
            )
        })
}
