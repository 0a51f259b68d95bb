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

mod bins;
mod certs;
pub mod chromium;
mod cluster;
mod etcdctl;
mod gateway;
pub mod history;
mod http;
mod latency;
mod mirror;
mod ports;
mod process;
pub mod regions;

pub use bins::{etcd_bin, etcdctl_bin, meridian_bin};
pub use certs::{Pair, TestCa};
pub use cluster::{Cluster, ClusterOpts, EtcdCluster, Server};
pub use etcdctl::{
    assert_same_steps, decode_b64, etcdctl, etcdctl_json, etcdctl_ok, etcdctl_with_input, etcdctl_with_timeout,
    mask_hex_ids, mask_ids, CtlOutput,
};
pub use gateway::GatewayProcess;
pub use http::{check_health, http_get, http_post, http_post_with};
pub use latency::LatencyProxy;
pub use mirror::{mirror_token_file, secondary_flags, MirrorProcess};
pub use ports::{lease_port, PortLease};
