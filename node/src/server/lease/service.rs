//! etcd's Lease service, the leader-only forwarding service followers use,
//! and the leader's expiry and checkpoint duties.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use meridian_proto::etcdserverpb::lease_server::Lease;
use meridian_proto::etcdserverpb::{
    LeaseCheckpoint, LeaseCheckpointRequest, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseStatus, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use meridian_proto::meridian::v1::internal_request::Request as Internal;
use meridian_proto::meridian::v1::lease_forward_client::LeaseForwardClient;
use meridian_proto::meridian::v1::lease_forward_server::LeaseForward;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::{Lessor, MAX_LEASE_TTL};
use crate::error::{Error, Result};
use crate::server::apply::Applied;
use crate::server::auth::store::AuthInfo;
use crate::server::cluster::Members;
use crate::server::EtcdServer;

/// Expired leases revoked per leader tick, at most (etcd rate-limits too).
const REVOKES_PER_TICK: usize = 500;
const DUTY_TICK: Duration = Duration::from_millis(250);

/// Lease calls that only the leader can answer: served locally on the
/// leader, forwarded to it (over the peer listener) elsewhere.
pub struct LeaderLink {
    server: Arc<EtcdServer>,
    lessor: Arc<Lessor>,
    client: Mutex<Option<(u64, LeaseForwardClient<Channel>)>>,
    /// For the leader's `https://` peer URL.
    tls: meridian_wire::tls::ClientTls,
}

impl LeaderLink {
    pub fn new(server: Arc<EtcdServer>, lessor: Arc<Lessor>, tls: meridian_wire::tls::ClientTls) -> Self {
        Self { server, lessor, client: Mutex::new(None), tls }
    }

    fn leader_client(&self) -> Result<LeaseForwardClient<Channel>> {
        let leader = self.server.raft.status().leader();
        if leader == 0 {
            return Err(Error::NoLeader);
        }
        let mut cached = self.client.lock();
        if let Some((id, c)) = cached.as_ref() {
            if *id == leader {
                return Ok(c.clone());
            }
        }
        let members = Members::load(&self.server.mvcc);
        let url = members.get(leader).and_then(|m| m.peer_urls.first().cloned()).ok_or(Error::NoLeader)?;
        let endpoint = tonic::transport::Endpoint::from_shared(url)
            .map_err(|e| Error::Internal(e.to_string()))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true);
        let channel = self.tls.channel(&endpoint);
        let client = LeaseForwardClient::new(channel);
        *cached = Some((leader, client.clone()));
        Ok(client)
    }

    /// Renews on the leader; returns the TTL (0 for an unknown lease).
    pub async fn renew(&self, id: i64) -> Result<i64> {
        match renew_here(&self.server, &self.lessor, id) {
            Err(Error::NotLeader) => {
                let mut c = self.leader_client()?;
                let resp = c.renew(LeaseKeepAliveRequest { id }).await.map_err(forward_error)?;
                Ok(resp.into_inner().ttl)
            }
            result => result,
        }
    }

    /// Remaining TTL, granted TTL and keys, as the leader sees them; on a
    /// secondary, as the mirror last reported them (no member there keeps
    /// lease clocks, so there is no leader to ask).
    pub async fn time_to_live(&self, id: i64, keys: bool) -> Result<(i64, i64, Vec<Vec<u8>>)> {
        if self.server.role.is_secondary() {
            return Ok(self.lessor.mirrored_time_to_live(id, keys));
        }
        promote_if_leader(&self.server, &self.lessor);
        match self.lessor.time_to_live(id, keys) {
            Err(Error::NotLeader) => {
                let mut c = self.leader_client()?;
                let resp =
                    c.time_to_live(LeaseTimeToLiveRequest { id, keys }).await.map_err(forward_error)?.into_inner();
                Ok((resp.ttl, resp.granted_ttl, resp.keys))
            }
            other => other,
        }
    }
}

/// A leader whose duty loop has not run yet still answers lease calls.
fn promote_if_leader(server: &EtcdServer, lessor: &Lessor) {
    let status = server.raft.status();
    if status.is_leader() && !server.role.is_secondary() && lessor.promote(status.leader_since()) {
        tracing::info!("lessor promoted on demand");
    }
}

/// Renews a lease on this member, the leader; a lease whose remaining TTL
/// was checkpointed gets the checkpoint cleared, so a later leader does not
/// resume it short. Returns the TTL.
///
/// # Errors
///
/// [`Error::NotLeader`] on a follower; as [`Lessor::renew`].
fn renew_here(server: &Arc<EtcdServer>, lessor: &Lessor, id: i64) -> Result<i64> {
    promote_if_leader(server, lessor);
    let (ttl, clear_checkpoint) = lessor.renew(id)?;
    server.metrics.lease_renewed.inc();
    if clear_checkpoint {
        server.propose_detached(Internal::LeaseCheckpoint(LeaseCheckpointRequest {
            checkpoints: vec![LeaseCheckpoint { id, remaining_ttl: 0 }],
        }));
    }
    Ok(ttl)
}

/// One keep-alive as the stream answers it (also etcd's JSON gateway). A
/// secondary's leases live on its source: refused at once, with a code
/// clients do not retry.
pub async fn keep_alive_once(
    server: &Arc<EtcdServer>,
    leader: &LeaderLink,
    who: &AuthInfo,
    id: i64,
) -> std::result::Result<LeaseKeepAliveResponse, Status> {
    check_lease_user(server, who, id)?;
    server.check_writable()?;
    let ttl = leader.renew(id).await?;
    Ok(LeaseKeepAliveResponse { header: Some(server.header(server.mvcc.marks().current)), id, ttl })
}

/// With auth on, a keep-alive needs a user who may write every key the
/// lease holds (root may always), as etcd 3.4.42 and later ask: a user who
/// could not revoke the lease must not keep it alive either.
fn check_lease_user(server: &EtcdServer, who: &AuthInfo, id: i64) -> Result<()> {
    let state = server.auth.state();
    state.check_fresh(who)?;
    state.check_lease(&who.user, id, &|id| server.lease_keys(id))
}

/// A forwarded call that failed: the leader moved or is unreachable.
fn forward_error(status: Status) -> Error {
    tracing::debug!(code = ?status.code(), message = status.message(), "lease call forwarded to the leader failed");
    Error::LeaderChanged
}

/// etcd's Lease service.
pub struct LeaseService {
    pub server: Arc<EtcdServer>,
    pub lessor: Arc<Lessor>,
    pub leader: Arc<LeaderLink>,
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(&self, req: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        // Any user may grant a lease (etcd 3.4.42 and later ask for one).
        let who = self.server.auth_info(req.metadata()).await?;
        let mut r = req.into_inner();
        self.server.check_writable()?;
        if r.ttl > MAX_LEASE_TTL {
            return Err(Error::LeaseTtlTooLarge.into());
        }
        if r.id == 0 {
            r.id = self.server.next_lease_id();
        }
        match self.server.propose_as(Internal::LeaseGrant(r), &who).await? {
            Applied::LeaseGrant(mut resp) => {
                resp.header = Some(self.server.header(self.server.mvcc.marks().current));
                Ok(Response::new(resp))
            }
            other => Err(Status::internal(format!("unexpected apply result {other:?}"))),
        }
    }

    async fn lease_revoke(&self, req: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
        let who = self.server.auth_info(req.metadata()).await?;
        let r = req.into_inner();
        // WRITE over every key the lease holds.
        self.server.auth.state().check_lease(&who.user, r.id, &|id| self.server.lease_keys(id))?;
        self.server.check_writable()?;
        match self.server.propose_as(Internal::LeaseRevoke(r), &who).await? {
            Applied::LeaseRevoke(rev) => {
                Ok(Response::new(LeaseRevokeResponse { header: Some(self.server.header(rev)) }))
            }
            other => Err(Status::internal(format!("unexpected apply result {other:?}"))),
        }
    }

    type LeaseKeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        // The stream's user, from the token it came with.
        let who = self.server.auth_info(req.metadata()).await?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let (server, leader) = (self.server.clone(), self.leader.clone());
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                let reply = keep_alive_once(&server, &leader, &who, r.id).await;
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        // A user; with the keys asked for, one who may read each (root may always).
        let who = self.server.auth_info(req.metadata()).await?;
        let r = req.into_inner();
        let state = self.server.auth.state();
        state.check_fresh(&who)?;
        if r.keys {
            for key in self.server.lease_keys(r.id) {
                state.check_range(&who.user, &key, &[])?;
            }
        }
        let (ttl, granted_ttl, keys) = self.leader.time_to_live(r.id, r.keys).await?;
        Ok(Response::new(LeaseTimeToLiveResponse {
            header: Some(self.server.header(self.server.mvcc.marks().current)),
            id: r.id,
            ttl,
            granted_ttl,
            keys,
        }))
    }

    async fn lease_leases(&self, req: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        // A user (the ids alone say nothing of the keys).
        let who = self.server.auth_info(req.metadata()).await?;
        self.server.auth.state().check_fresh(&who)?;
        Ok(Response::new(LeaseLeasesResponse {
            header: Some(self.server.header(self.server.mvcc.marks().current)),
            leases: self.lessor.leases().into_iter().map(|id| LeaseStatus { id }).collect(),
        }))
    }
}

/// The leader's side of forwarded lease calls (peer listener).
pub struct LeaseForwardService {
    pub server: Arc<EtcdServer>,
    pub lessor: Arc<Lessor>,
}

#[tonic::async_trait]
impl LeaseForward for LeaseForwardService {
    async fn renew(&self, req: Request<LeaseKeepAliveRequest>) -> Result<Response<LeaseKeepAliveResponse>, Status> {
        let id = req.into_inner().id;
        let ttl = renew_here(&self.server, &self.lessor, id)?;
        Ok(Response::new(LeaseKeepAliveResponse { header: None, id, ttl }))
    }

    async fn time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let r = req.into_inner();
        promote_if_leader(&self.server, &self.lessor);
        let (ttl, granted_ttl, keys) = self.lessor.time_to_live(r.id, r.keys)?;
        Ok(Response::new(LeaseTimeToLiveResponse { header: None, id: r.id, ttl, granted_ttl, keys }))
    }
}

/// The leader's lease duties, every tick while this member leads: start the
/// clocks on promotion, propose revokes of expired leases, and checkpoint
/// remaining TTLs every `checkpoint_interval`.
pub async fn run_leader_duties(server: Arc<EtcdServer>, lessor: Arc<Lessor>, checkpoint_interval: Duration) {
    let mut tick = tokio::time::interval(DUTY_TICK);
    let mut last_checkpoint = Instant::now();
    loop {
        tick.tick().await;
        // A secondary's leases expire on its source; their revokes arrive by mirror.
        if !server.raft.status().is_leader() || server.role.is_secondary() {
            lessor.demote();
            continue;
        }
        if lessor.promote(server.raft.status().leader_since()) {
            tracing::info!(leases = lessor.leases().len(), "lessor promoted: lease clocks started");
            last_checkpoint = Instant::now();
        }
        for id in lessor.expired(REVOKES_PER_TICK) {
            tracing::debug!(lease = format!("{id:x}"), "lease expired; revoking");
            server.metrics.lease_expired.inc();
            server.propose_detached(Internal::LeaseRevoke(LeaseRevokeRequest { id }));
        }
        if last_checkpoint.elapsed() >= checkpoint_interval {
            last_checkpoint = Instant::now();
            let checkpoints = lessor.checkpoints();
            if !checkpoints.is_empty() {
                server.propose_detached(Internal::LeaseCheckpoint(LeaseCheckpointRequest { checkpoints }));
            }
        }
    }
}
