//! The primary lease and automatic failover, with three or more regions.
//!
//! A small cross-region Meridian cluster (one member per region, given to
//! every member as `--topology-endpoints`) holds two kinds of key, as
//! Patroni does with etcd:
//!
//! - `meridian/primary`: which cluster is the primary (JSON: region,
//!   cluster id, epoch), under an etcd lease of `--primary-lease-ttl`. The
//!   primary's raft leader creates it; every member of the primary cluster
//!   keeps that lease alive. A member that has not renewed it itself within
//!   the TTL refuses client writes (`Unavailable`, retryable): a primary cut
//!   off from the majority of regions stops taking writes by itself. A
//!   primary that finds the key naming another cluster refuses writes too,
//!   so an old primary that comes back cannot take writes.
//! - `meridian/candidates/<region>`: each secondary's applied revision and
//!   epoch, under its own lease, refreshed every tick by its leader.
//!
//! With `--auto-failover`, a secondary's leader that has seen no
//! `meridian/primary` for `--failover-after` promotes its own cluster if it
//! is the most up-to-date live candidate (ties: the lowest region name),
//! at an epoch above every candidate's. A new primary takes writes only a
//! clock-drift margin after it created the key, once the old holder's
//! lease has run out everywhere.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use meridian_proto::etcdserverpb::kv_client::KvClient;
use meridian_proto::etcdserverpb::lease_client::LeaseClient;
use meridian_proto::etcdserverpb::request_op::Request as Op;
use meridian_proto::etcdserverpb::{
    Compare, LeaseGrantRequest, LeaseKeepAliveRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use meridian_proto::meridian::v1::internal_request::Request as Internal;
use meridian_proto::meridian::v1::RegionChange;
use meridian_wire::region::RegionClient;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use super::region::Role;
use super::EtcdServer;
use crate::error::{Error, Result};

pub const PRIMARY_KEY: &str = "meridian/primary";
pub const CANDIDATES_PREFIX: &str = "meridian/candidates/";
/// How far two members' clocks may drift apart while one lease runs out:
/// a new primary waits this long after the old lease expired.
pub const DRIFT_MARGIN: Duration = Duration::from_secs(1);

/// The topology settings of a member.
#[derive(Clone, Debug)]
pub struct TopologyConfig {
    pub endpoints: Vec<String>,
    pub ttl: Duration,
    pub auto_failover: bool,
    pub failover_after: Duration,
}

/// Who holds the primary lease, as the key says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub region: String,
    pub cluster_id: String,
    pub epoch: u64,
    /// Let go by a demoted primary (no lease runs): the next primary need
    /// not wait for a lease to run out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
    /// Taken from a holder that let go: its members take writes at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clean: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Candidate {
    region: String,
    cluster_id: String,
    revision: i64,
    epoch: u64,
}

/// Whether this member may take client writes, as far as the primary lease
/// goes. Off (always allowed) without `--topology-endpoints`.
#[derive(Default)]
pub struct PrimaryLease {
    state: Mutex<LeaseState>,
}

#[derive(Default)]
struct LeaseState {
    enabled: bool,
    /// Writes are allowed from `valid_from` until `valid_until`.
    valid_from: Option<Instant>,
    valid_until: Option<Instant>,
    /// Why writes are refused, when they are.
    why: String,
}

impl PrimaryLease {
    /// Refuses a client write on a primary that does not hold the lease now.
    ///
    /// # Errors
    ///
    /// [`Error::NoPrimaryLease`].
    pub fn check(&self) -> Result<()> {
        let st = self.state.lock();
        if !st.enabled {
            return Ok(());
        }
        let now = Instant::now();
        let held = st.valid_from.is_some_and(|f| f <= now) && st.valid_until.is_some_and(|u| now < u);
        if held {
            Ok(())
        } else {
            Err(Error::NoPrimaryLease(st.why.clone()))
        }
    }

    fn enable(&self) {
        let mut st = self.state.lock();
        st.enabled = true;
        st.why = "the primary lease is not confirmed yet".into();
    }

    /// A renewal sent at `sent` succeeded with `ttl` left. `first`: this
    /// member holds this lease from now on, and takes writes from `from`.
    fn renewed(&self, sent: Instant, ttl: Duration, first: Option<Instant>) {
        let mut st = self.state.lock();
        if let Some(from) = first {
            st.valid_from = Some(from);
        }
        st.valid_until = Some(sent + ttl);
    }

    fn lost(&self, why: String) {
        let mut st = self.state.lock();
        if st.valid_until.is_some() || st.why != why {
            tracing::warn!("primary lease: {why}; client writes are refused");
        }
        st.valid_from = None;
        st.valid_until = None;
        st.why = why;
    }

    /// How long this member may still take writes under the lease: `None`
    /// without a topology, zero while it may not.
    pub fn remaining(&self) -> Option<Duration> {
        let st = self.state.lock();
        if !st.enabled {
            return None;
        }
        let now = Instant::now();
        let from_ok = st.valid_from.is_some_and(|f| f <= now);
        Some(st.valid_until.filter(|_| from_ok).map_or(Duration::ZERO, |u| u.saturating_duration_since(now)))
    }
}

/// The topology cluster, through its leader.
struct Topology {
    region: RegionClient,
}

impl Topology {
    fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.region.channel().0)
    }

    fn leases(&self) -> LeaseClient<Channel> {
        LeaseClient::new(self.region.channel().0)
    }

    /// The key's holder and its lease id, if the key exists.
    async fn holder(&self) -> anyhow::Result<Option<(Holder, i64)>> {
        let r = self.kv().range(RangeRequest { key: PRIMARY_KEY.into(), ..Default::default() }).await?.into_inner();
        Ok(r.kvs.first().and_then(|kv| serde_json::from_slice(&kv.value).ok().map(|h| (h, kv.lease))))
    }

    /// Creates the key under a new lease unless a live holder has it; the
    /// lease id if this call took it. `released` is the key's value when a
    /// demoted primary let it go.
    async fn acquire(&self, holder: &Holder, ttl: Duration, released: Option<&Holder>) -> anyhow::Result<Option<i64>> {
        let lease = self
            .leases()
            .lease_grant(LeaseGrantRequest { ttl: ttl.as_secs().max(1) as i64, id: 0 })
            .await?
            .into_inner()
            .id;
        let put =
            PutRequest { key: PRIMARY_KEY.into(), value: serde_json::to_vec(holder)?, lease, ..Default::default() };
        let compare = match released {
            Some(r) => Compare {
                key: PRIMARY_KEY.into(),
                target: CompareTarget::Value as i32,
                result: CompareResult::Equal as i32,
                target_union: Some(TargetUnion::Value(serde_json::to_vec(r)?)),
                ..Default::default()
            },
            None => Compare {
                key: PRIMARY_KEY.into(),
                target: CompareTarget::Create as i32,
                result: CompareResult::Equal as i32,
                target_union: Some(TargetUnion::CreateRevision(0)),
                ..Default::default()
            },
        };
        let txn = TxnRequest {
            compare: vec![compare],
            success: vec![RequestOp { request: Some(Op::RequestPut(put)) }],
            failure: vec![],
        };
        Ok(self.kv().txn(txn).await?.into_inner().succeeded.then_some(lease))
    }

    /// Renews `lease` once; its TTL left, 0 if it is gone.
    async fn renew(&self, lease: i64) -> anyhow::Result<i64> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(LeaseKeepAliveRequest { id: lease }).await?;
        let mut answers = self.leases().lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)).await?;
        let answer = answers.get_mut().message().await?.ok_or_else(|| anyhow::anyhow!("keep-alive stream ended"))?;
        Ok(answer.ttl)
    }

    /// Marks the key let go if it still names `holder` (a demoted primary),
    /// with no lease, so the next primary takes it without waiting.
    async fn release(&self, holder: &Holder) -> anyhow::Result<()> {
        let let_go = Holder { released: true, ..holder.clone() };
        let txn = TxnRequest {
            compare: vec![Compare {
                key: PRIMARY_KEY.into(),
                target: CompareTarget::Value as i32,
                result: CompareResult::Equal as i32,
                target_union: Some(TargetUnion::Value(serde_json::to_vec(holder)?)),
                ..Default::default()
            }],
            success: vec![RequestOp {
                request: Some(Op::RequestPut(PutRequest {
                    key: PRIMARY_KEY.into(),
                    value: serde_json::to_vec(&let_go)?,
                    ..Default::default()
                })),
            }],
            failure: vec![],
        };
        self.kv().txn(txn).await?;
        Ok(())
    }

    /// Puts this secondary's candidacy under `lease` (granted once, renewed).
    async fn offer(&self, c: &Candidate, lease: &mut i64, ttl: Duration) -> anyhow::Result<()> {
        if *lease == 0 || self.renew(*lease).await? <= 0 {
            *lease = self
                .leases()
                .lease_grant(LeaseGrantRequest { ttl: ttl.as_secs().max(1) as i64, id: 0 })
                .await?
                .into_inner()
                .id;
        }
        let put = PutRequest {
            key: format!("{CANDIDATES_PREFIX}{}", c.region).into_bytes(),
            value: serde_json::to_vec(c)?,
            lease: *lease,
            ..Default::default()
        };
        self.kv().put(put).await?;
        Ok(())
    }

    async fn candidates(&self) -> anyhow::Result<Vec<Candidate>> {
        let mut end = CANDIDATES_PREFIX.as_bytes().to_vec();
        *end.last_mut().expect("non-empty") += 1;
        let r = self
            .kv()
            .range(RangeRequest { key: CANDIDATES_PREFIX.into(), range_end: end, ..Default::default() })
            .await?
            .into_inner();
        Ok(r.kvs.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect())
    }
}

/// Runs the primary lease (and, with `auto_failover`, the candidacy) for
/// this member, forever. `https://` topology endpoints are dialed with
/// `tls` (the member's peer TLS settings).
pub async fn run(server: Arc<EtcdServer>, cfg: TopologyConfig, tls: meridian_wire::tls::ClientTls) {
    server.primary_lease.enable();
    let region = match RegionClient::new(&cfg.endpoints, 1, &tls) {
        Ok(r) => r,
        Err(e) => {
            server.primary_lease.lost(format!("bad --topology-endpoints: {e}"));
            return;
        }
    };
    let topo = Topology { region };
    // Renewals well inside the TTL; quick to notice a change of role.
    let tick = (cfg.ttl / 10).clamp(Duration::from_millis(50), Duration::from_millis(500));
    let call_timeout = (cfg.ttl / 2).max(Duration::from_millis(200));
    let mut held: Option<i64> = None;
    let mut absent_since: Option<Instant> = None;
    let mut candidacy = 0;
    let mut last_epoch = 0;
    loop {
        // Quick while the lease changes hands (a switchover waits on it);
        // steady renewals while it is held, or while another region holds it.
        let settled = held.is_some() || absent_since.is_none();
        tokio::time::sleep(if settled { tick } else { tick.min(Duration::from_millis(100)) }).await;
        let _ = topo.region.probe(call_timeout).await;
        let step = tokio::time::timeout(
            call_timeout,
            step(&server, &cfg, &topo, &mut held, &mut absent_since, &mut candidacy, &mut last_epoch),
        );
        match step.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => server.primary_lease.lost(format!("the topology cluster: {e:#}")),
            Err(_) => server.primary_lease.lost(format!("the topology cluster did not answer within {call_timeout:?}")),
        }
    }
}

async fn step(
    server: &Arc<EtcdServer>,
    cfg: &TopologyConfig,
    topo: &Topology,
    held: &mut Option<i64>,
    absent_since: &mut Option<Instant>,
    candidacy: &mut i64,
    last_epoch: &mut u64,
) -> anyhow::Result<()> {
    let role = server.role.get();
    let me = Holder {
        region: role.region.clone(),
        cluster_id: format!("{:x}", server.cluster_id),
        epoch: role.epoch,
        released: false,
        clean: false,
    };
    let current = topo.holder().await?;
    if let Some((h, _)) = &current {
        *last_epoch = (*last_epoch).max(h.epoch);
    }
    match role.role {
        Role::Primary => {
            *absent_since = None;
            match current {
                Some((h, lease)) if h.cluster_id == me.cluster_id && !h.released => {
                    let sent = Instant::now();
                    let ttl = topo.renew(lease).await?;
                    if ttl > 0 {
                        // A member takes writes under a lease new to it a
                        // drift margin on (unless it took the lease from a
                        // holder that let go), so the old holder's last
                        // renewal has run out on every clock.
                        let first = (*held != Some(lease)).then(|| {
                            if h.clean {
                                Instant::now()
                            } else {
                                Instant::now() + DRIFT_MARGIN
                            }
                        });
                        server.primary_lease.renewed(sent, Duration::from_secs(ttl as u64), first);
                        if held.replace(lease) != Some(lease) {
                            tracing::info!(ttl, "primary lease held");
                        }
                    } else {
                        *held = None;
                        server.primary_lease.lost("the primary lease expired".into());
                    }
                }
                Some((h, _)) if !h.released => {
                    *held = None;
                    server.primary_lease.lost(format!(
                        "region {:?} (cluster {}, epoch {}) holds the primary lease",
                        h.region, h.cluster_id, h.epoch
                    ));
                }
                free => {
                    *held = None;
                    server.primary_lease.lost("no cluster holds the primary lease".into());
                    // One member creates it: the raft leader.
                    if server.raft.status().is_leader() {
                        let released = free.as_ref().map(|(h, _)| h);
                        let mine = Holder { clean: released.is_some(), ..me.clone() };
                        if let Some(lease) = topo.acquire(&mine, cfg.ttl, released).await? {
                            tracing::info!(lease = format!("{lease:x}"), "primary lease acquired");
                        }
                    }
                }
            }
        }
        Role::Secondary => {
            *held = None;
            if let Some((h, _)) = &current {
                if h.cluster_id == me.cluster_id && !h.released {
                    // Demoted: let go at once, so the new primary need not
                    // wait for the lease to run out.
                    topo.release(h).await?;
                }
            }
            if !cfg.auto_failover || !server.raft.status().is_leader() {
                return Ok(());
            }
            let revision = server.mvcc.marks().current;
            let c = Candidate {
                region: role.region.clone(),
                cluster_id: me.cluster_id.clone(),
                revision,
                epoch: role.epoch,
            };
            topo.offer(&c, candidacy, cfg.ttl).await?;
            // A key let go by a demoted primary is a switchover under way,
            // not a lost primary.
            if current.is_some() {
                *absent_since = None;
                return Ok(());
            }
            let since = *absent_since.get_or_insert_with(Instant::now);
            if since.elapsed() < cfg.failover_after {
                return Ok(());
            }
            let all = topo.candidates().await?;
            let best = all.iter().max_by(|a, b| a.revision.cmp(&b.revision).then_with(|| b.region.cmp(&a.region)));
            if best.is_some_and(|b| b.cluster_id == c.cluster_id) {
                // Above every epoch seen: the candidates' and the last holder's.
                let epoch = all.iter().map(|c| c.epoch).max().unwrap_or(0).max(role.epoch).max(*last_epoch) + 1;
                tracing::warn!(
                    revision,
                    epoch,
                    unreachable_for = ?since.elapsed(),
                    "auto-failover: no primary holds the lease; promoting this region, the most up to date"
                );
                server
                    .propose(Internal::RegionChange(RegionChange {
                        role: "primary".into(),
                        epoch,
                        primary_cluster_id: server.cluster_id,
                        ..Default::default()
                    }))
                    .await?;
                *absent_since = None;
            }
        }
    }
    Ok(())
}
