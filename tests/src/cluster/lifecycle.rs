//! Member processes of a [`Cluster`]: kill, stop, spawn, restart, and waits for readiness.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::{log_lines, member_args, member_name, Cluster, Member, MemberUrls, POLL};
use crate::http::check_health;
use crate::ports::lease_port;
use crate::process::{signal, wait_timeout};

/// How long [`Cluster::stop`] waits after SIGTERM before it sends SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl Cluster {
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

    /// Sets `key=value` in member `i`'s environment from its next start on (a failpoint, say);
    /// an empty `value` removes the variable again.
    pub fn set_env(&mut self, i: usize, key: &str, value: &str) {
        let env = &mut self.member_mut(i).env;
        env.retain(|(k, _)| k != key);
        if !value.is_empty() {
            env.push((key.to_string(), value.to_string()));
        }
    }

    /// Waits up to `limit` for member `i` to exit by itself and reaps it.
    ///
    /// # Errors
    ///
    /// The member is not running, or is still running after `limit`.
    pub fn wait_exit(&mut self, i: usize, limit: Duration) -> Result<ExitStatus> {
        let name = member_name(i);
        let child = self.member_mut(i).child.as_mut().ok_or_else(|| anyhow!("{name} is not running"))?;
        match wait_timeout(child, limit)? {
            Some(status) => {
                self.member_mut(i).child = None;
                Ok(status)
            }
            None => bail!("{name} still running after {limit:?}\n{}", self.log_tail(i, log_lines())),
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
            .env("NO_COLOR", "1")
            .envs(member.env.iter().map(|(k, v)| (k, v)));
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
        // Under https the plain metrics listener answers /health.
        let member = self.member(i);
        let port = match (&member.metrics, self.client_scheme) {
            (Some(m), "https") => m.port(),
            _ => member.client.port(),
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
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

    /// Adds a member the way an operator does: `etcdctl member add m<n+1> --peer-urls=<new>
    /// [--learner]` against the running members, then starts it with `--initial-cluster-state
    /// existing` and the cluster's flags, and waits until it is healthy. Returns its number and
    /// what `member add` printed.
    ///
    /// # Errors
    ///
    /// `member add` fails, or the new member does not become healthy.
    pub fn add_member(&mut self, learner: bool) -> Result<(usize, String)> {
        let i = self.len() + 1;
        let name = member_name(i);
        let (client, peer) = (lease_port()?, lease_port()?);
        let peer_url = format!("{}://127.0.0.1:{}", self.peer_scheme, peer.port());
        let client_url = format!("{}://127.0.0.1:{}", self.client_scheme, client.port());
        let mut add = vec!["member".to_string(), "add".into(), name.clone(), format!("--peer-urls={peer_url}")];
        if learner {
            add.push("--learner".into());
        }
        let running: Vec<String> = (1..=self.len()).filter(|&m| self.is_running(m)).map(|m| self.endpoint(m)).collect();
        let printed = crate::etcdctl_ok(&running, &add.iter().map(String::as_str).collect::<Vec<_>>())?;
        let mut initial: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .filter(|(m, _)| self.is_running(m + 1))
            .map(|(m, member)| format!("{}={}", member_name(m + 1), member.peer_url))
            .collect();
        initial.push(format!("{name}={peer_url}"));
        let dir = self.dir.as_ref().context("the cluster's dir is gone")?.path().to_path_buf();
        let data_dir = dir.join(&name);
        let urls = MemberUrls { client: client_url, peer: peer_url.clone(), metrics: None };
        let args = member_args(&name, &data_dir, &urls, &initial.join(","), "existing", &self.token, &self.flags);
        self.members.push(Member {
            client,
            metrics: None,
            log_path: dir.join(format!("{name}.log")),
            data_dir,
            args,
            env: Vec::new(),
            child: None,
            starts: 0,
            _peer: peer,
            peer_url,
        });
        self.spawn(i)?;
        self.wait_ready(i)?;
        Ok((i, printed))
    }

    /// Stops every member (SIGTERM), then starts them all again and waits
    /// until each is healthy. All are spawned before any wait: a member is
    /// healthy only once a quorum is up.
    pub fn restart_all(&mut self) -> Result<()> {
        for i in 1..=self.len() {
            self.stop(i)?;
        }
        for i in 1..=self.len() {
            self.spawn(i)?;
        }
        self.wait_ready_all()
    }
}
