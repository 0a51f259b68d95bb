//! Clusters of member processes: options, start, accessors, logs and cleanup, and [`EtcdCluster`].

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use tempfile::TempDir;

use crate::bins::{etcd_bin, meridian_bin};
use crate::ports::{lease_port, PortLease};

mod client;
mod lifecycle;

/// Poll interval while waiting for a process to exit or a member to become healthy.
const POLL: Duration = Duration::from_millis(50);

/// Which server a [`Cluster`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// `meridian node`, the binary under test.
    Meridian,
    /// The reference etcd 3.4 from `PATH`.
    Etcd,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Meridian => "meridian",
            Server::Etcd => "etcd",
        }
    }
}

/// Extra server flags and harness limits for [`Cluster::start`]; `None` leaves the server default.
///
/// Set fields with struct update syntax:
/// `ClusterOpts { snapshot_count: Some(100), ..ClusterOpts::fast() }`.
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    /// `--heartbeat-interval`, in milliseconds.
    pub heartbeat_interval_ms: Option<u64>,
    /// `--election-timeout`, in milliseconds.
    pub election_timeout_ms: Option<u64>,
    /// `--snapshot-count`: applied entries between snapshots.
    pub snapshot_count: Option<u64>,
    /// `--quota-backend-bytes`.
    pub quota_backend_bytes: Option<u64>,
    /// `--max-request-bytes`.
    pub max_request_bytes: Option<u64>,
    /// `--max-txn-ops`.
    pub max_txn_ops: Option<u64>,
    /// Lease a metrics port per member and pass `--listen-metrics-urls`; see [`Cluster::metrics_url`].
    pub metrics: bool,
    /// Flags appended verbatim, after all others.
    pub extra_args: Vec<String>,
    /// Environment variables of every member.
    pub env: Vec<(String, String)>,
    /// `https://` client URLs (give the certificate flags in `extra_args`). A plain metrics
    /// listener is then leased too, and readiness is asked there.
    pub client_https: bool,
    /// `https://` peer URLs (give the `--peer-*` certificate flags in `extra_args`).
    pub peer_https: bool,
    /// Bound on every readiness wait (start, restart, leader).
    pub ready_timeout: Duration,
    /// An etcd snapshot file that `etcdctl snapshot restore` turns into each member's data
    /// directory (with the member's name, peer URL and the cluster's token) before the first
    /// start: a real etcd boots from it, and `meridian node` imports it.
    pub restore_snapshot: Option<PathBuf>,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: None,
            election_timeout_ms: None,
            snapshot_count: None,
            quota_backend_bytes: None,
            max_request_bytes: None,
            max_txn_ops: None,
            metrics: false,
            extra_args: Vec::new(),
            env: Vec::new(),
            client_https: false,
            peer_https: false,
            ready_timeout: Duration::from_secs(30),
            restore_snapshot: None,
        }
    }
}

impl ClusterOpts {
    /// Heartbeat 50 ms and election timeout 500 ms, so failover tests finish in about a second.
    pub fn fast() -> Self {
        Self { heartbeat_interval_ms: Some(50), election_timeout_ms: Some(500), ..Self::default() }
    }

    fn flags(&self) -> Vec<String> {
        let numeric = [
            ("--heartbeat-interval", self.heartbeat_interval_ms),
            ("--election-timeout", self.election_timeout_ms),
            ("--snapshot-count", self.snapshot_count),
            ("--quota-backend-bytes", self.quota_backend_bytes),
            ("--max-request-bytes", self.max_request_bytes),
            ("--max-txn-ops", self.max_txn_ops),
        ];
        let mut flags = Vec::new();
        for (flag, value) in numeric {
            if let Some(value) = value {
                flags.extend([flag.to_string(), value.to_string()]);
            }
        }
        flags.extend(self.extra_args.iter().cloned());
        flags
    }
}

/// One member process: its reserved ports, paths, full argument list and, while running, its child.
struct Member {
    client: PortLease,
    metrics: Option<PortLease>,
    data_dir: PathBuf,
    log_path: PathBuf,
    args: Vec<String>,
    /// Environment variables set on every later start (see [`Cluster::set_env`]).
    env: Vec<(String, String)>,
    child: Option<Child>,
    starts: u32,
    /// Held only so the peer port stays reserved for restarts.
    _peer: PortLease,
    peer_url: String,
}

/// A running cluster of `meridian node` or etcd processes; Drop kills them all. See the crate doc.
pub struct Cluster {
    server: Server,
    program: PathBuf,
    /// Arguments before the member flags: `node` for Meridian, none for etcd.
    subcommand: Vec<String>,
    members: Vec<Member>,
    ready_timeout: Duration,
    /// `http` or `https`, for client URLs.
    client_scheme: &'static str,
    /// `None` only after Drop kept the dir.
    dir: Option<TempDir>,
    /// What a member added later starts with: the cluster's token, the flags of
    /// [`ClusterOpts`], and the peer URL scheme.
    token: String,
    flags: Vec<String>,
    peer_scheme: &'static str,
}

impl Cluster {
    /// Starts `n` Meridian members with `opts` and waits until every one is healthy.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use meridian_tests::{Cluster, ClusterOpts};
    /// # fn main() -> anyhow::Result<()> {
    /// let cluster = Cluster::start(3, ClusterOpts { snapshot_count: Some(100), ..ClusterOpts::fast() })?;
    /// assert_eq!(cluster.etcdctl_ok(&["put", "k", "v"])?.trim(), "OK");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// The binary is missing, a process cannot be spawned, or a member exits or is not healthy
    /// within `opts.ready_timeout`; the error carries the tail of the members' logs.
    pub fn start(n: usize, opts: ClusterOpts) -> Result<Cluster> {
        Self::start_server(Server::Meridian, n, opts)
    }

    /// Starts `n` members of `server` with `opts` and waits until every one is healthy.
    ///
    /// # Errors
    ///
    /// As [`Cluster::start`].
    pub fn start_server(server: Server, n: usize, opts: ClusterOpts) -> Result<Cluster> {
        if n == 0 {
            bail!("a cluster needs at least one member");
        }
        let (program, subcommand) = match server {
            Server::Meridian => (meridian_bin()?, vec!["node".to_string()]),
            Server::Etcd => (etcd_bin()?, Vec::new()),
        };
        let dir = tempfile::Builder::new().prefix(&format!("{}-test-", server.name())).tempdir()?;
        let mut ports = Vec::with_capacity(n);
        for _ in 0..n {
            let metrics = if opts.metrics || opts.client_https { Some(lease_port()?) } else { None };
            ports.push((lease_port()?, lease_port()?, metrics));
        }
        let client_scheme = if opts.client_https { "https" } else { "http" };
        let peer_scheme = if opts.peer_https { "https" } else { "http" };
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer, _))| format!("m{}={peer_scheme}://127.0.0.1:{}", i + 1, peer.port()))
            .collect::<Vec<_>>()
            .join(",");
        let token = unique_token(server);
        let members = ports
            .into_iter()
            .enumerate()
            .map(|(i, (client, peer, metrics))| {
                let name = format!("m{}", i + 1);
                let data_dir = dir.path().join(&name);
                let client_url = format!("{client_scheme}://127.0.0.1:{}", client.port());
                let peer_url = format!("{peer_scheme}://127.0.0.1:{}", peer.port());
                if let Some(snapshot) = &opts.restore_snapshot {
                    restore_snapshot(snapshot, &name, &data_dir, &peer_url, &initial_cluster, &token)?;
                }
                let urls =
                    MemberUrls { client: client_url, peer: peer_url, metrics: metrics.as_ref().map(PortLease::port) };
                let args = member_args(&name, &data_dir, &urls, &initial_cluster, "new", &token, &opts.flags());
                let urls = MemberUrls { peer: urls.peer.clone(), ..urls };
                Ok(Member {
                    client,
                    metrics,
                    log_path: dir.path().join(format!("{name}.log")),
                    data_dir,
                    args,
                    env: opts.env.clone(),
                    child: None,
                    starts: 0,
                    _peer: peer,
                    peer_url: urls.peer,
                })
            })
            .collect::<Result<_>>()?;
        let mut cluster = Cluster {
            server,
            program,
            subcommand,
            members,
            ready_timeout: opts.ready_timeout,
            client_scheme,
            dir: Some(dir),
            token,
            flags: opts.flags(),
            peer_scheme,
        };
        // Spawn all before waiting for any: a member reports healthy only once a quorum is up.
        for i in 1..=n {
            cluster.spawn(i)?;
        }
        cluster.wait_ready_all()?;
        Ok(cluster)
    }

    /// Member `i`'s peer URL.
    pub fn member_peer_url(&self, i: usize) -> &str {
        &self.member(i).peer_url
    }

    /// Which server the members run.
    pub fn server(&self) -> Server {
        self.server
    }

    /// Number of members, running or not.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a cluster has at least one member. Present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// `127.0.0.1:port` of every member, running or not, in member order; what `etcdctl
    /// --endpoints`, etcd's benchmark tool and `etcd_client::Client::connect` take.
    pub fn endpoints(&self) -> Vec<String> {
        (1..=self.len()).map(|i| self.endpoint(i)).collect()
    }

    /// `127.0.0.1:port` of member `i`. Panics unless `1 <= i <= len()`, as do all per-member accessors.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.member(i).client.port())
    }

    /// `http(s)://127.0.0.1:port` of member `i`, as passed to `--advertise-client-urls`.
    pub fn client_url(&self, i: usize) -> String {
        format!("{}://{}", self.client_scheme, self.endpoint(i))
    }

    /// [`Cluster::client_url`] of every member, in member order.
    pub fn client_urls(&self) -> Vec<String> {
        (1..=self.len()).map(|i| self.client_url(i)).collect()
    }

    /// `http://127.0.0.1:port` of member `i`'s metrics listener, if [`ClusterOpts::metrics`] was set.
    pub fn metrics_url(&self, i: usize) -> Option<String> {
        self.member(i).metrics.as_ref().map(|p| format!("http://127.0.0.1:{}", p.port()))
    }

    /// Data dir of member `i`, for tests that inspect or damage files between a stop and a restart.
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.member(i).data_dir
    }

    /// Log file of member `i`: stdout and stderr of every start.
    pub fn log_path(&self, i: usize) -> &Path {
        &self.member(i).log_path
    }

    /// Pid of member `i`, if the harness believes it is running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.member(i).child.as_ref().map(Child::id)
    }

    /// Whether member `i` has been started and not yet killed or stopped by the harness.
    ///
    /// A member that crashed on its own still counts as running until the next wait notices.
    pub fn is_running(&self, i: usize) -> bool {
        self.member(i).child.is_some()
    }

    /// The last `lines` lines of member `i`'s log, headed by the member name and log path.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let path = self.log_path(i);
        let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned());
        let body = match text {
            Ok(text) => {
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(err) => format!("(cannot read: {err})"),
        };
        format!("----- {} {} ({}) -----\n{body}", self.server.name(), member_name(i), path.display())
    }

    /// Prints the tail of every member's log to stderr (`MERIDIAN_TEST_LOG_LINES`, default 40).
    pub fn dump_logs(&self) {
        for i in 1..=self.len() {
            eprintln!("{}", self.log_tail(i, log_lines()));
        }
    }

    fn member(&self, i: usize) -> &Member {
        assert!((1..=self.members.len()).contains(&i), "no member {i} in a {}-member cluster", self.members.len());
        &self.members[i - 1]
    }

    fn member_mut(&mut self, i: usize) -> &mut Member {
        assert!((1..=self.members.len()).contains(&i), "no member {i} in a {}-member cluster", self.members.len());
        &mut self.members[i - 1]
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            self.dump_logs();
        }
        if std::env::var_os("MERIDIAN_TEST_KEEP").is_some_and(|v| v == "1") {
            if let Some(dir) = self.dir.take() {
                eprintln!("MERIDIAN_TEST_KEEP=1: kept {}", dir.keep().display());
            }
        }
    }
}

/// A cluster of the reference etcd 3.4, to run the same test or benchmark side by side; it
/// derefs to [`Cluster`] for every accessor and member operation.
pub struct EtcdCluster(Cluster);

impl EtcdCluster {
    /// Starts `n` etcd members with the server defaults and waits until every one is healthy.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> anyhow::Result<()> {
    /// let etcd = meridian_tests::EtcdCluster::start(1)?;
    /// etcd.etcdctl_ok(&["put", "a", "1"])?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// etcd is not installed (the message says how to install it), or as [`Cluster::start`].
    pub fn start(n: usize) -> Result<EtcdCluster> {
        Self::start_with(n, ClusterOpts::default())
    }

    /// Starts `n` etcd members with `opts`; see [`EtcdCluster::start`].
    ///
    /// # Errors
    ///
    /// As [`EtcdCluster::start`].
    pub fn start_with(n: usize, opts: ClusterOpts) -> Result<EtcdCluster> {
        Cluster::start_server(Server::Etcd, n, opts).map(EtcdCluster)
    }
}

impl Deref for EtcdCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.0
    }
}

impl DerefMut for EtcdCluster {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.0
    }
}

/// A member's own URLs, for [`member_args`].
struct MemberUrls {
    client: String,
    peer: String,
    metrics: Option<u16>,
}

/// etcd's flags for one member, then `extra`.
fn member_args(
    name: &str,
    data_dir: &Path,
    urls: &MemberUrls,
    initial_cluster: &str,
    state: &str,
    token: &str,
    extra: &[String],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--name",
        name,
        "--data-dir",
        &data_dir.display().to_string(),
        "--listen-client-urls",
        &urls.client,
        "--advertise-client-urls",
        &urls.client,
        "--listen-peer-urls",
        &urls.peer,
        "--initial-advertise-peer-urls",
        &urls.peer,
        "--initial-cluster",
        initial_cluster,
        "--initial-cluster-state",
        state,
        "--initial-cluster-token",
        token,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(port) = urls.metrics {
        args.extend(["--listen-metrics-urls".into(), format!("http://127.0.0.1:{port}")]);
    }
    args.extend(extra.iter().cloned());
    args
}

/// `etcdctl snapshot restore` of `snapshot` into `data_dir`, for the member `name`.
fn restore_snapshot(
    snapshot: &Path,
    name: &str,
    data_dir: &Path,
    peer_url: &str,
    initial_cluster: &str,
    token: &str,
) -> Result<()> {
    let out = std::process::Command::new(crate::bins::etcdctl_bin()?)
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "restore"])
        .arg(snapshot)
        .args(["--name", name, "--data-dir"])
        .arg(data_dir)
        .args(["--initial-advertise-peer-urls", peer_url, "--initial-cluster", initial_cluster])
        .args(["--initial-cluster-token", token])
        .output()?;
    if !out.status.success() {
        bail!(
            "etcdctl snapshot restore {} for {name} failed: {}",
            snapshot.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A `--initial-cluster-token` no other cluster on this machine uses.
fn unique_token(server: Server) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-test-{}-{}-{nanos}", server.name(), std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn member_name(i: usize) -> String {
    format!("m{i}")
}

fn log_lines() -> usize {
    std::env::var("MERIDIAN_TEST_LOG_LINES").ok().and_then(|v| v.parse().ok()).unwrap_or(40)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opts_render_etcd_flags() {
        let opts = ClusterOpts { snapshot_count: Some(100), extra_args: vec!["--x".into()], ..ClusterOpts::fast() };
        assert_eq!(
            opts.flags(),
            ["--heartbeat-interval", "50", "--election-timeout", "500", "--snapshot-count", "100", "--x"]
        );
    }
}
