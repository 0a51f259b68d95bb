//! Talking to a [`Cluster`]: `etcd_client` connections, the leader, and `etcdctl` over all members.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::{Cluster, POLL};
use crate::etcdctl::{etcdctl, etcdctl_json, etcdctl_ok, CtlOutput};

impl Cluster {
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
}

async fn connect(endpoints: Vec<String>) -> Result<etcd_client::Client> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    etcd_client::Client::connect(&endpoints, Some(options))
        .await
        .with_context(|| format!("connect etcd_client to {}", endpoints.join(",")))
}
