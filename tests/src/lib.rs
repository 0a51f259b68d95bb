//! Process harness for end-to-end tests: it runs real `meridian node` processes, or the reference
//! etcd 3.4, on 127.0.0.1 and drives them with `etcdctl` and `etcd_client`.
//!
//! A test starts a [`Cluster`] (Meridian) or an [`EtcdCluster`] (the reference, which derefs to a
//! [`Cluster`], so one test body can run against both), talks to it, and lets Drop clean up:
//!
//! ```no_run
//! use meridian_tests::{Cluster, ClusterOpts, EtcdCluster};
//!
//! # fn main() -> anyhow::Result<()> {
//! let mut meridian = Cluster::start(3, ClusterOpts::fast())?;
//! let etcd = EtcdCluster::start(3)?;
//! for cluster in [&meridian, &*etcd] {
//!     cluster.etcdctl_ok(&["put", "a", "1"])?;
//! }
//! meridian.kill9(1)?;
//! meridian.restart(1)?;
//! # Ok(())
//! # }
//! ```
//!
//! # Members
//!
//! Members are numbered `1..=n` like their names `m1..mn`. Each one gets its own client and peer
//! port, a data dir `<tmp>/m<i>` and a log `<tmp>/m<i>.log` (stdout and stderr, appended across
//! restarts, each start marked by a `=== harness:` line), all under one temp dir per cluster. The
//! flags are etcd's: `--name --data-dir --listen-client-urls --advertise-client-urls
//! --listen-peer-urls --initial-advertise-peer-urls --initial-cluster --initial-cluster-state new
//! --initial-cluster-token <unique>`, then the flags of [`ClusterOpts`]. A restart reuses the exact
//! same flags; `--initial-cluster-state new` is harmless there because the data dir exists.
//!
//! # Binaries
//!
//! Meridian is found by [`meridian_bin`], first match wins:
//! 1. `$MERIDIAN_BIN`;
//! 2. `meridian` in the profile dir of the running test executable (`<target>/<profile>/deps/x`
//!    gives `<target>/<profile>/meridian`), which follows `CARGO_TARGET_DIR` and `--release`;
//! 3. `$CARGO_TARGET_DIR/{debug,release}/meridian`, then `<workspace>/target/{debug,release}/meridian`.
//!
//! A library crate has no `CARGO_BIN_EXE_meridian`, and cargo does not build another package's
//! binary for tests: `cargo build --bins` must run first (`scripts/test.sh` does). etcd and etcdctl
//! come from `$ETCD_BIN` / `$ETCDCTL_BIN`, else from `PATH` (Debian's etcd-server, etcd-client).
//!
//! # Ports
//!
//! Ports come from 15000..32000, below Linux's ephemeral range (32768 and up), so an outgoing
//! connection can never take a port a member is about to bind. Nextest runs every test in its own
//! process, so uniqueness must hold across processes: a leased port holds a POSIX record lock on
//! byte `port` of one shared lock file in the temp dir, which the kernel drops when the process
//! dies, so a crashed test leaks nothing. A process-wide set guards the ports within one process
//! (record locks never conflict inside a process), and a bind probe skips ports that something
//! else already listens on. Each process starts its scan at an offset derived from its pid.
//!
//! # Readiness
//!
//! A member is ready when `GET /health` on its client URL answers 200 with a body containing
//! `true`; etcd 3.4 answers `{"health":"true"}` once it has a leader. Every wait is bounded
//! ([`ClusterOpts::ready_timeout`], 30 s by default) and fails early, with the log tail in the
//! error, if the process exits. There is no fixed sleep anywhere.
//!
//! # Cleanup
//!
//! Drop SIGKILLs every child this cluster started, by pid, and reaps it. When the test is
//! panicking it first prints the tail of every log (`MERIDIAN_TEST_LOG_LINES`, default 40), and
//! with `MERIDIAN_TEST_KEEP=1` it keeps the temp dir and prints its path. If nextest times a test
//! out it signals the test's whole process group, which includes the members.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut, Range};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod mirror;
pub use mirror::MirrorProcess;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use tempfile::TempDir;

/// Ports handed to members: below the ephemeral range, apart from bench/bench.sh's 12000-14999.
const PORTS: Range<u16> = 15000..32000;
/// How long [`Cluster::stop`] waits after SIGTERM before it sends SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// etcdctl's own `--command-timeout`; the process is killed 10 s after it.
const ETCDCTL_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// Bound on every readiness wait (start, restart, leader).
    pub ready_timeout: Duration,
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
            ready_timeout: Duration::from_secs(30),
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
    child: Option<Child>,
    starts: u32,
    /// Held only so the peer port stays reserved for restarts.
    _peer: PortLease,
}

/// A running cluster of `meridian node` or etcd processes; Drop kills them all. See the module doc.
pub struct Cluster {
    server: Server,
    program: PathBuf,
    /// Arguments before the member flags: `node` for Meridian, none for etcd.
    subcommand: Vec<String>,
    members: Vec<Member>,
    ready_timeout: Duration,
    /// `None` only after Drop kept the dir.
    dir: Option<TempDir>,
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
            let metrics = if opts.metrics { Some(lease_port()?) } else { None };
            ports.push((lease_port()?, lease_port()?, metrics));
        }
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer, _))| format!("m{}=http://127.0.0.1:{}", i + 1, peer.port()))
            .collect::<Vec<_>>()
            .join(",");
        let token = unique_token(server);
        let members = ports
            .into_iter()
            .enumerate()
            .map(|(i, (client, peer, metrics))| {
                let name = format!("m{}", i + 1);
                let data_dir = dir.path().join(&name);
                let client_url = format!("http://127.0.0.1:{}", client.port());
                let peer_url = format!("http://127.0.0.1:{}", peer.port());
                let mut args = vec![
                    "--name".into(),
                    name.clone(),
                    "--data-dir".into(),
                    data_dir.display().to_string(),
                    "--listen-client-urls".into(),
                    client_url.clone(),
                    "--advertise-client-urls".into(),
                    client_url,
                    "--listen-peer-urls".into(),
                    peer_url.clone(),
                    "--initial-advertise-peer-urls".into(),
                    peer_url,
                    "--initial-cluster".into(),
                    initial_cluster.clone(),
                    "--initial-cluster-state".into(),
                    "new".into(),
                    "--initial-cluster-token".into(),
                    token.clone(),
                ];
                if let Some(metrics) = &metrics {
                    args.extend(["--listen-metrics-urls".into(), format!("http://127.0.0.1:{}", metrics.port())]);
                }
                args.extend(opts.flags());
                Member {
                    client,
                    metrics,
                    log_path: dir.path().join(format!("{name}.log")),
                    data_dir,
                    args,
                    child: None,
                    starts: 0,
                    _peer: peer,
                }
            })
            .collect();
        let mut cluster =
            Cluster { server, program, subcommand, members, ready_timeout: opts.ready_timeout, dir: Some(dir) };
        // Spawn all before waiting for any: a member reports healthy only once a quorum is up.
        for i in 1..=n {
            cluster.spawn(i)?;
        }
        cluster.wait_ready_all()?;
        Ok(cluster)
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

    /// `http://127.0.0.1:port` of member `i`, as passed to `--advertise-client-urls`.
    pub fn client_url(&self, i: usize) -> String {
        format!("http://{}", self.endpoint(i))
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

    /// SIGKILLs member `i` and reaps it: a crash with no chance to flush or shut down.
    ///
    /// # Errors
    ///
    /// The member is not running, or the signal or the wait fails.
    pub fn kill9(&mut self, i: usize) -> Result<()> {
        let name = member_name(i);
        let mut child = self.member_mut(i).child.take().ok_or_else(|| anyhow!("{name} is not running"))?;
        // Child::kill sends SIGKILL to this child's pid.
        child.kill().with_context(|| format!("SIGKILL {name}"))?;
        child.wait().with_context(|| format!("reap {name}"))?;
        Ok(())
    }

    /// Sends SIGTERM to member `i` and waits for it to exit: a graceful shutdown.
    ///
    /// # Errors
    ///
    /// The member is not running, or it has not exited 10 s after SIGTERM (it is then SIGKILLed,
    /// so a test that expects a clean shutdown fails).
    pub fn stop(&mut self, i: usize) -> Result<ExitStatus> {
        let name = member_name(i);
        let mut child = self.member_mut(i).child.take().ok_or_else(|| anyhow!("{name} is not running"))?;
        signal(&child, libc::SIGTERM).with_context(|| format!("SIGTERM {name}"))?;
        match wait_timeout(&mut child, STOP_TIMEOUT)? {
            Some(status) => Ok(status),
            None => {
                child.kill()?;
                child.wait()?;
                bail!("{name} did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed it");
            }
        }
    }

    /// Spawns member `i` with its flags and data dir, without waiting for it to be healthy.
    ///
    /// Use it to bring back several members of a cluster that lost quorum, then
    /// [`Cluster::wait_ready_all`].
    ///
    /// # Errors
    ///
    /// The member is already running, or the log cannot be opened, or the spawn fails.
    pub fn spawn(&mut self, i: usize) -> Result<()> {
        let name = member_name(i);
        let (program, subcommand, server) = (self.program.clone(), self.subcommand.clone(), self.server);
        let member = self.member_mut(i);
        if member.child.is_some() {
            bail!("{name} is already running");
        }
        member.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log_path)
            .with_context(|| format!("open {}", member.log_path.display()))?;
        writeln!(
            log,
            "=== harness: start #{} of {name}: {} {} {}",
            member.starts,
            program.display(),
            subcommand.join(" "),
            member.args.join(" ")
        )?;
        let mut cmd = Command::new(&program);
        cmd.args(&subcommand)
            .args(&member.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("RUST_BACKTRACE", "1")
            // The log is a file: no colour codes (tracing-subscriber honours NO_COLOR).
            .env("NO_COLOR", "1");
        // etcd reads any ETCD_* variable as a flag and refuses to start when it duplicates one.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd.spawn().with_context(|| format!("spawn {} {name}", server.name()))?;
        member.child = Some(child);
        Ok(())
    }

    /// Restarts member `i` with the same flags and data dir and waits until it is healthy;
    /// a running member is first stopped with [`Cluster::stop`].
    ///
    /// # Errors
    ///
    /// The stop or spawn fails, or the member is not healthy within the ready timeout (which is
    /// what happens when no quorum is up: use [`Cluster::spawn`] then).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        if self.is_running(i) {
            self.stop(i)?;
        }
        self.spawn(i)?;
        self.wait_ready(i)
    }

    /// Waits until member `i` answers `GET /health` with 200 and `true`.
    ///
    /// # Errors
    ///
    /// The member is not running, exits, or is not healthy within the ready timeout; the
    /// error carries the last health failure and the tail of its log.
    pub fn wait_ready(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + self.ready_timeout;
        self.wait_ready_until(i, deadline)
    }

    /// Waits until every running member is healthy, within one ready timeout overall.
    ///
    /// # Errors
    ///
    /// As [`Cluster::wait_ready`], for the first member that fails.
    pub fn wait_ready_all(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.ready_timeout;
        for i in 1..=self.len() {
            if self.is_running(i) {
                self.wait_ready_until(i, deadline)?;
            }
        }
        Ok(())
    }

    fn wait_ready_until(&mut self, i: usize, deadline: Instant) -> Result<()> {
        let name = member_name(i);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.member(i).client.port()));
        loop {
            let child = self.member_mut(i).child.as_mut().ok_or_else(|| anyhow!("{name} is not running"))?;
            if let Some(status) = child.try_wait()? {
                self.member_mut(i).child = None;
                bail!("{name} exited with {status} before it was healthy\n{}", self.log_tail(i, log_lines()));
            }
            let err = match check_health(addr) {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            if Instant::now() >= deadline {
                bail!(
                    "{name} not healthy within {:?}: last GET /health: {err:#}\n{}",
                    self.ready_timeout,
                    self.log_tail(i, log_lines())
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// An `etcd_client::Client` over every member's endpoint (5 s connect, 10 s request timeout).
    ///
    /// # Errors
    ///
    /// The client cannot be built or connect.
    pub async fn client(&self) -> Result<etcd_client::Client> {
        connect(self.endpoints()).await
    }

    /// An `etcd_client::Client` bound to member `i` alone, for per-member reads and status.
    ///
    /// # Errors
    ///
    /// As [`Cluster::client`].
    pub async fn member_client(&self, i: usize) -> Result<etcd_client::Client> {
        connect(vec![self.endpoint(i)]).await
    }

    /// Number of the member that is leader, as every running member reports it through
    /// Maintenance.Status; retried until the running members agree, within the ready timeout.
    ///
    /// # Errors
    ///
    /// No running member, or no agreed leader among the running members within the ready timeout.
    pub async fn leader(&self) -> Result<usize> {
        let deadline = Instant::now() + self.ready_timeout;
        let running: Vec<usize> = (1..=self.len()).filter(|&i| self.is_running(i)).collect();
        if running.is_empty() {
            bail!("no member is running");
        }
        loop {
            let last = match self.leader_once(&running).await {
                Ok(i) => return Ok(i),
                Err(err) => err,
            };
            if Instant::now() >= deadline {
                bail!("no agreed leader within {:?}: {last:#}", self.ready_timeout);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn leader_once(&self, running: &[usize]) -> Result<usize> {
        let mut ids = Vec::new();
        let mut leaders = HashSet::new();
        for &i in running {
            let status = self.member_client(i).await?.status().await?;
            let id = status.header().map(|h| h.member_id()).ok_or_else(|| anyhow!("m{i}: no header"))?;
            ids.push((i, id));
            leaders.insert(status.leader());
        }
        match leaders.into_iter().collect::<Vec<_>>()[..] {
            [0] => bail!("no leader elected"),
            [leader] => ids
                .iter()
                .find(|(_, id)| *id == leader)
                .map(|(i, _)| *i)
                .ok_or_else(|| anyhow!("leader {leader:x} is not a running member")),
            ref several => bail!("members disagree on the leader: {several:x?}"),
        }
    }

    /// Runs `etcdctl` against every member's endpoint; see [`etcdctl`].
    ///
    /// # Errors
    ///
    /// As [`etcdctl`].
    pub fn etcdctl(&self, args: &[&str]) -> Result<CtlOutput> {
        etcdctl(&self.endpoints(), args)
    }

    /// Runs `etcdctl` against every member and returns its stdout; see [`etcdctl_ok`].
    ///
    /// # Errors
    ///
    /// As [`etcdctl_ok`].
    pub fn etcdctl_ok(&self, args: &[&str]) -> Result<String> {
        etcdctl_ok(&self.endpoints(), args)
    }

    /// Runs `etcdctl ... -w json` against every member and parses stdout; see [`etcdctl_json`].
    ///
    /// # Errors
    ///
    /// As [`etcdctl_json`].
    pub fn etcdctl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        etcdctl_json(&self.endpoints(), args)
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

/// Output of one `etcdctl` run.
#[derive(Debug)]
pub struct CtlOutput {
    /// Exit status; a run killed at the harness's deadline never produces one (it is an error).
    pub status: ExitStatus,
    /// Stdout, lossily decoded.
    pub stdout: String,
    /// Stderr, lossily decoded.
    pub stderr: String,
}

impl CtlOutput {
    /// Whether etcdctl exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// Runs the real `etcdctl` (v3 API) with `--endpoints`, a 3 s dial and a 10 s command timeout.
///
/// The process is killed if it has not exited 10 s after its own command timeout, so a hung
/// etcdctl cannot hang the test. `ETCDCTL_*` variables of the caller are removed.
///
/// # Errors
///
/// etcdctl is missing or cannot be spawned, or it overran its deadline. A non-zero exit is not
/// an error here: check [`CtlOutput::success`], or use [`etcdctl_ok`].
pub fn etcdctl(endpoints: &[impl AsRef<str>], args: &[&str]) -> Result<CtlOutput> {
    etcdctl_with_input(endpoints, args, "")
}

/// As [`etcdctl`], with `input` on stdin (`etcdctl txn`, `etcdctl put` without a value).
///
/// # Errors
///
/// As [`etcdctl`].
pub fn etcdctl_with_input(endpoints: &[impl AsRef<str>], args: &[&str], input: &str) -> Result<CtlOutput> {
    let endpoints = endpoints.iter().map(|e| e.as_ref()).collect::<Vec<_>>().join(",");
    let mut cmd = Command::new(etcdctl_bin()?);
    cmd.arg(format!("--endpoints={endpoints}"))
        .arg("--dial-timeout=3s")
        .arg(format!("--command-timeout={}s", ETCDCTL_COMMAND_TIMEOUT.as_secs()))
        .args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCDCTL_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("ETCDCTL_API", "3");
    run_bounded(cmd, input, ETCDCTL_COMMAND_TIMEOUT + Duration::from_secs(10))
        .with_context(|| format!("etcdctl {}", args.join(" ")))
}

/// Runs [`etcdctl`] and returns its stdout.
///
/// # Errors
///
/// As [`etcdctl`], and when etcdctl exits non-zero; the error carries its stderr.
pub fn etcdctl_ok(endpoints: &[impl AsRef<str>], args: &[&str]) -> Result<String> {
    let out = etcdctl(endpoints, args)?;
    if !out.success() {
        bail!("etcdctl {} failed with {}: {}{}", args.join(" "), out.status, out.stderr, out.stdout);
    }
    Ok(out.stdout)
}

/// Runs [`etcdctl`] with `-w json` appended and parses its stdout.
///
/// Keys and values in the JSON are base64, as etcdctl prints them; see [`decode_b64`].
///
/// # Examples
///
/// ```no_run
/// # fn main() -> anyhow::Result<()> {
/// use meridian_tests::{decode_b64, etcdctl_json, EtcdCluster};
///
/// let etcd = EtcdCluster::start(1)?;
/// etcd.etcdctl_ok(&["put", "a", "1"])?;
/// let resp = etcdctl_json(&etcd.endpoints(), &["get", "a"])?;
/// assert_eq!(decode_b64(resp["kvs"][0]["value"].as_str().unwrap())?, b"1");
/// # Ok(())
/// # }
/// ```
///
/// # Errors
///
/// As [`etcdctl_ok`], and when stdout is not JSON.
pub fn etcdctl_json(endpoints: &[impl AsRef<str>], args: &[&str]) -> Result<serde_json::Value> {
    let mut args = args.to_vec();
    args.extend(["-w", "json"]);
    let stdout = etcdctl_ok(endpoints, &args)?;
    serde_json::from_str(&stdout).with_context(|| format!("etcdctl {} printed no JSON: {stdout}", args.join(" ")))
}

/// Decodes standard base64, the encoding of keys and values in `etcdctl -w json`.
///
/// # Errors
///
/// `s` is not valid base64.
pub fn decode_b64(s: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).with_context(|| format!("not base64: {s:?}"))
}

/// Path of the `meridian` binary; the lookup order is in the module doc.
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

/// Checks one member: `GET /health` over a plain HTTP/1.1 connection must answer 200 with a body
/// containing `true`.
///
/// # Errors
///
/// Connection failure, timeout (2 s), another status, or a body without `true`.
pub fn check_health(addr: SocketAddr) -> Result<()> {
    let (status, body) = http_get(addr, "/health")?;
    if status != 200 {
        bail!("status {status}, body {body:?}");
    }
    if !body.contains("true") {
        bail!("unhealthy: {body:?}");
    }
    Ok(())
}

/// Replaces the values of `cluster_id`, `member_id` and `raft_term` in JSON
/// output with `N`: they differ between any two clusters by nature.
pub fn mask_ids(s: &str) -> String {
    let mut s = s.to_string();
    for field in ["cluster_id", "member_id", "raft_term"] {
        let pat = format!("\"{field}\":");
        let mut at = 0;
        while let Some(i) = s[at..].find(&pat) {
            let start = at + i + pat.len();
            let end = s[start..].find(|c: char| !c.is_ascii_digit()).map_or(s.len(), |e| start + e);
            s.replace_range(start..end, "N");
            at = start;
        }
    }
    s
}

/// A plain HTTP/1.1 GET of `path` on `addr`: the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    // One write: `write!` would issue one syscall per piece.
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    // The server closes after the response (Connection: close); a timeout keeps what arrived.
    if let Err(err) = stream.take(4 * 1024 * 1024).read_to_end(&mut response) {
        if response.is_empty() {
            return Err(err.into());
        }
    }
    let response = String::from_utf8_lossy(&response);
    let status_line = response.lines().next().unwrap_or_default();
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default().to_string();
    if !status_line.starts_with("HTTP/1.") {
        bail!("not an HTTP response: {status_line:?}");
    }
    let status = status_line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, body))
}

/// A 127.0.0.1 port reserved for this process until dropped; see "Ports" in the module doc.
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

async fn connect(endpoints: Vec<String>) -> Result<etcd_client::Client> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    etcd_client::Client::connect(&endpoints, Some(options))
        .await
        .with_context(|| format!("connect etcd_client to {}", endpoints.join(",")))
}

fn signal(child: &Child, signal: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(child.id())?;
    // SAFETY: kill has no memory preconditions; the pid is our own unreaped child, so it cannot
    // have been reused by another process.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Waits up to `limit` for `child` to exit; `None` if it is still running.
fn wait_timeout(child: &mut Child, limit: Duration) -> Result<Option<ExitStatus>> {
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

/// Runs `cmd` with `input` on stdin, collecting stdout and stderr; kills it after `limit`.
/// Runs a long-lived etcdctl command (such as `watch`) for `run_for`, then
/// stops it, and returns what it printed: stdout, then stderr without
/// etcdctl's own timestamped log lines.
pub fn etcdctl_with_timeout(endpoints: &[impl AsRef<str>], args: &[&str], run_for: Duration) -> Result<String> {
    let endpoints = endpoints.iter().map(|e| e.as_ref()).collect::<Vec<_>>().join(",");
    let mut cmd = Command::new(etcdctl_bin()?);
    cmd.arg(format!("--endpoints={endpoints}")).arg("--dial-timeout=3s").args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCDCTL_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("ETCDCTL_API", "3").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawn {:?}", cmd.get_program()))?;
    let stdout = read_pipe(child.stdout.take());
    let stderr = read_pipe(child.stderr.take());
    if wait_timeout(&mut child, run_for)?.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut out = join_pipe(stdout);
    for line in join_pipe(stderr).lines().filter(|l| !l.starts_with("{\"level\"")) {
        out.push_str(line);
        out.push('\n');
    }
    Ok(out)
}

fn run_bounded(mut cmd: Command, input: &str, limit: Duration) -> Result<CtlOutput> {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawn {:?}", cmd.get_program()))?;
    // Readers run on threads so a full pipe cannot block the child while we wait for it.
    let stdout = read_pipe(child.stdout.take());
    let stderr = read_pipe(child.stderr.take());
    if let Some(mut stdin) = child.stdin.take() {
        // A child that exits without reading its stdin closes the pipe; that is not our error.
        let _ = stdin.write_all(input.as_bytes());
    }
    let Some(status) = wait_timeout(&mut child, limit)? else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("still running after {limit:?}; killed");
    };
    Ok(CtlOutput { status, stdout: join_pipe(stdout), stderr: join_pipe(stderr) })
}

fn read_pipe(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

fn join_pipe(handle: JoinHandle<Vec<u8>>) -> String {
    String::from_utf8_lossy(&handle.join().unwrap_or_default()).into_owned()
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

    #[test]
    fn health_check_accepts_only_200_with_true() {
        for (response, healthy) in [
            ("HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n{\"health\":\"true\"}", true),
            ("HTTP/1.1 200 OK\r\n\r\n{\"health\":\"false\",\"reason\":\"\"}", false),
            ("HTTP/1.1 503 Service Unavailable\r\n\r\n{\"health\":\"true\"}", false),
            ("HTTP/1.0 200 OK\r\n\r\n{\"health\":\"true\",\"reason\":\"\"}", true),
        ] {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let addr = listener.local_addr().unwrap();
            let server = std::thread::spawn(move || {
                let (mut conn, _) = listener.accept().unwrap();
                // Read the whole request: closing with unread input would reset the connection.
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.ends_with(b"\r\n\r\n") {
                    let n = conn.read(&mut buf).unwrap();
                    assert!(n > 0, "request ended early: {request:?}");
                    request.extend_from_slice(&buf[..n]);
                }
                assert!(request.starts_with(b"GET /health HTTP/1.1\r\n"), "{request:?}");
                conn.write_all(response.as_bytes()).unwrap();
            });
            let result = check_health(addr);
            assert_eq!(result.is_ok(), healthy, "{response}: {result:?}");
            server.join().unwrap();
        }
    }

    #[test]
    fn opts_render_etcd_flags() {
        let opts = ClusterOpts { snapshot_count: Some(100), extra_args: vec!["--x".into()], ..ClusterOpts::fast() };
        assert_eq!(
            opts.flags(),
            ["--heartbeat-interval", "50", "--election-timeout", "500", "--snapshot-count", "100", "--x"]
        );
    }
}
