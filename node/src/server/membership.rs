//! Membership changes: etcd's Cluster service, and what members ask each
//! other about membership on the peer listener (`meridian.v1.Membership`).
//!
//! - MemberAdd, MemberRemove and MemberPromote are raft configuration
//!   changes whose context is the proposal (`MemberChange`); apply checks
//!   them against the replicated member list (`Members::apply`) and raft's
//!   configuration changes only if the list did. MemberUpdate changes no
//!   vote, so it is a plain entry.
//! - Before proposing, a member refuses what etcd's strict reconfiguration
//!   check refuses: a change after which the started voters would not be a
//!   quorum (`etcdserver: re-configuration failed due to not enough started
//!   members`).
//! - Adds, removals and promotions are judged by the leader, which alone
//!   knows how far a learner's log is (within 90% of its own, as etcd asks)
//!   and which members have been reachable (its links reach every one); a
//!   follower hands them to the leader over the peer listener.
//! - A member started with `--initial-cluster-state existing` asks the
//!   members named in `--initial-cluster` for the cluster id and the member
//!   list ([`discover`]), and finds itself there by its peer URLs.

use std::sync::Arc;
use std::time::Duration;

use meridian_proto::etcdserverpb::cluster_server::Cluster;
use meridian_proto::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse, MemberPromoteRequest,
    MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
};
use meridian_proto::meridian::v1::internal_request::Request as Internal;
use meridian_proto::meridian::v1::member_change::Kind;
use meridian_proto::meridian::v1::membership_client::MembershipClient;
use meridian_proto::meridian::v1::membership_server::Membership;
use meridian_proto::meridian::v1::{MemberChange, MembershipRequest, MembershipResponse};
use raft::eraftpb::ConfChangeType;
use tonic::{Request, Response, Status};

use super::apply::Applied;
use super::cluster::{MemberInfo, Members};
use super::EtcdServer;
use crate::error::{Error, Result};
use crate::raft::transport::ActivePeers;
use crate::raft::Input;

/// A learner within this share of the leader's log may be promoted (etcd's).
const READY_SHARE: f64 = 0.9;

/// etcd's Cluster service.
pub struct ClusterService {
    pub server: Arc<EtcdServer>,
    /// For the leader's `https://` peer URL (a promotion handed over).
    pub peer_tls: meridian_wire::tls::ClientTls,
    /// Which peers this member's links reach, and since when.
    pub active: ActivePeers,
}

/// How long a peer must have been reachable to count as active (etcd's
/// `HealthInterval`).
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

fn to_member(m: &MemberInfo) -> Member {
    Member {
        id: m.id,
        name: m.name.clone(),
        peer_ur_ls: m.peer_urls.clone(),
        client_ur_ls: m.client_urls.clone(),
        is_learner: m.is_learner,
    }
}

/// The list as etcd answers it: by member id.
fn to_members(members: &Members) -> Vec<Member> {
    let mut out: Vec<Member> = members.0.iter().map(to_member).collect();
    out.sort_by_key(|m| m.id);
    out
}

/// Peer URLs as etcd takes them: each one a URL with a scheme and a host.
fn check_urls(urls: &[String]) -> Result<()> {
    let valid = |u: &String| meridian_wire::url::Url::parse(u).is_ok();
    if urls.is_empty() || !urls.iter().all(valid) {
        return Err(Error::MemberBadUrls);
    }
    Ok(())
}

impl ClusterService {
    /// Checks `change` against this member's list first (so the common
    /// refusals need no round of raft), and etcd's strict reconfiguration
    /// check; apply checks it again.
    fn precheck(&self, change: &MemberChange) -> Result<()> {
        let mut members = Members::load(&self.server.mvcc);
        if !members.keeps_quorum(change) {
            return Err(Error::NotEnoughStartedMembers);
        }
        members.apply(change)
    }

    async fn change(&self, change: MemberChange, conf: Option<ConfChangeType>) -> Result<Members> {
        self.precheck(&change)?;
        let id = change.member_id;
        let applied = match conf {
            Some(t) => self.server.propose_conf_change(Internal::MemberChange(change), t, id).await?,
            None => self.server.propose(Internal::MemberChange(change)).await?,
        };
        match applied {
            Applied::Members(m) => Ok(m),
            other => Err(Error::Internal(format!("unexpected apply result {other:?}"))),
        }
    }

    fn header(&self) -> meridian_proto::etcdserverpb::ResponseHeader {
        self.server.header(self.server.mvcc.marks().current)
    }

    /// etcd's guard on removing a voter: on the leader (whose links reach
    /// every member, so it knows who is up), the voters that stay and have
    /// been reachable for [`HEALTH_INTERVAL`] must still be a quorum. A
    /// member that is unreachable now may always go (it is not part of the
    /// active quorum).
    fn check_active_quorum(&self, id: u64) -> Result<()> {
        let me = self.server.member_id;
        let members = Members::load(&self.server.mvcc);
        let voters: Vec<u64> = members.0.iter().filter(|m| !m.is_learner).map(|m| m.id).collect();
        if !voters.contains(&id) {
            return Ok(());
        }
        if id != me && !self.active.is_active(id) {
            return Ok(());
        }
        let active = 1 + voters.iter().filter(|v| **v != me && self.active.active_for(**v, HEALTH_INTERVAL)).count();
        if active - 1 < 1 + (voters.len() - 1) / 2 {
            tracing::warn!(
                member = format!("{id:x}"),
                active,
                voters = voters.len(),
                "rejecting member remove: it would break the active quorum"
            );
            return Err(Error::Unhealthy);
        }
        Ok(())
    }

    /// etcd's guard on adding a member: on the leader, every other voter
    /// must have been reachable for [`HEALTH_INTERVAL`].
    fn check_fully_connected(&self) -> Result<()> {
        let me = self.server.member_id;
        let members = Members::load(&self.server.mvcc);
        let down = members.0.iter().filter(|m| !m.is_learner && m.id != me);
        if down.clone().any(|m| !self.active.active_for(m.id, HEALTH_INTERVAL)) {
            tracing::warn!("rejecting member add: not every voter has been reachable for 5 s");
            return Err(Error::Unhealthy);
        }
        Ok(())
    }

    /// On the leader: whether the learner's log is close enough to promote.
    async fn learner_ready(&self, id: u64) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.server.raft.send(Input::Progress(tx))?;
        let progress = rx.await.map_err(|_| Error::Stopped)?.ok_or(Error::NotLeader)?;
        let matched = progress.matched.get(&id).copied().ok_or(Error::MemberNotFound)?;
        if (matched as f64) < progress.leader_match as f64 * READY_SHARE {
            return Err(Error::LearnerNotReady);
        }
        Ok(())
    }

    /// A promotion, on the leader.
    async fn promote_here(&self, id: u64) -> Result<MemberPromoteResponse> {
        let members = Members::load(&self.server.mvcc);
        let m = members.get(id).ok_or(Error::MemberNotFound)?;
        if !m.is_learner {
            return Err(Error::MemberNotLearner);
        }
        self.learner_ready(id).await?;
        let change = MemberChange { kind: Kind::Promote as i32, member_id: id, ..Default::default() };
        let members = self.change(change, Some(ConfChangeType::AddNode)).await?;
        self.server.metrics.learner_promotions.inc();
        Ok(MemberPromoteResponse { header: Some(self.header()), members: to_members(&members) })
    }

    /// A client of the leader's peer listener, for a change only it judges.
    fn leader(&self) -> Result<MembershipClient<tonic::transport::Channel>> {
        let leader = self.server.raft.status().leader();
        let members = Members::load(&self.server.mvcc);
        let url = members.get(leader).and_then(|m| m.peer_urls.first().cloned()).ok_or(Error::NoLeader)?;
        let endpoint = tonic::transport::Endpoint::from_shared(url)
            .map_err(|e| Error::Internal(e.to_string()))?
            .connect_timeout(Duration::from_secs(1));
        Ok(MembershipClient::new(self.peer_tls.channel(&endpoint)))
    }

    async fn add_here(&self, r: MemberAddRequest) -> Result<MemberAddResponse> {
        check_urls(&r.peer_ur_ls)?;
        self.check_fully_connected()?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let id = crate::config::member_id(&r.peer_ur_ls, &format!("{:x}{}", self.server.cluster_id, now.as_nanos()));
        let kind = Kind::Add as i32;
        let change = MemberChange { kind, member_id: id, peer_urls: r.peer_ur_ls.clone(), is_learner: r.is_learner };
        let t = if r.is_learner { ConfChangeType::AddLearnerNode } else { ConfChangeType::AddNode };
        let members = self.change(change, Some(t)).await?;
        let member = members.get(id).map(to_member);
        Ok(MemberAddResponse { header: Some(self.header()), member, members: to_members(&members) })
    }

    async fn remove_here(&self, id: u64) -> Result<MemberRemoveResponse> {
        self.check_active_quorum(id)?;
        let change = MemberChange { kind: Kind::Remove as i32, member_id: id, ..Default::default() };
        let members = self.change(change, Some(ConfChangeType::RemoveNode)).await?;
        Ok(MemberRemoveResponse { header: Some(self.header()), members: to_members(&members) })
    }
}

/// An error the leader answered, as this member's own.
fn forwarded(status: &Status) -> Error {
    let known = [
        Error::MemberNotFound,
        Error::MemberExists,
        Error::PeerUrlExists,
        Error::MemberBadUrls,
        Error::TooManyLearners,
        Error::MemberNotLearner,
        Error::LearnerNotReady,
        Error::NotEnoughStartedMembers,
        Error::Unhealthy,
        Error::NotLeader,
    ];
    known.into_iter().find(|e| e.to_string() == status.message()).unwrap_or(Error::NoLeader)
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(&self, req: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        // Membership changes are root's, as in etcd.
        self.server.check_admin(req.metadata()).await?;
        let r = req.into_inner();
        check_urls(&r.peer_ur_ls)?;
        let resp = if self.server.raft.status().is_leader() {
            self.add_here(r).await?
        } else {
            self.leader()?.add(r).await.map_err(|s| forwarded(&s))?.into_inner()
        };
        Ok(Response::new(resp))
    }

    async fn member_remove(&self, req: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        // Membership changes are root's, as in etcd.
        self.server.check_admin(req.metadata()).await?;
        let r = req.into_inner();
        let resp = if self.server.raft.status().is_leader() {
            self.remove_here(r.id).await?
        } else {
            self.leader()?.remove(r).await.map_err(|s| forwarded(&s))?.into_inner()
        };
        Ok(Response::new(resp))
    }

    async fn member_update(&self, req: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        // Membership changes are root's, as in etcd.
        self.server.check_admin(req.metadata()).await?;
        let r = req.into_inner();
        check_urls(&r.peer_ur_ls)?;
        let change =
            MemberChange { kind: Kind::Update as i32, member_id: r.id, peer_urls: r.peer_ur_ls, ..Default::default() };
        let members = self.change(change, None).await?;
        Ok(Response::new(MemberUpdateResponse { header: Some(self.header()), members: to_members(&members) }))
    }

    async fn member_list(&self, _: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        let members = Members::load(&self.server.mvcc);
        Ok(Response::new(MemberListResponse { header: Some(self.header()), members: to_members(&members) }))
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        // Membership changes are root's, as in etcd.
        self.server.check_admin(req.metadata()).await?;
        let r = req.into_inner();
        let status = self.server.raft.status();
        let resp = if status.is_leader() {
            self.promote_here(r.id).await?
        } else {
            self.leader()?.promote(r).await.map_err(|s| forwarded(&s))?.into_inner()
        };
        Ok(Response::new(resp))
    }
}

/// The peer side: the member list for a joining member, and the changes a
/// follower hands to the leader.
pub struct MembershipService(pub Arc<ClusterService>);

impl MembershipService {
    fn on_leader(&self) -> Result<(), Status> {
        if !self.0.server.raft.status().is_leader() {
            return Err(Error::NotLeader.into());
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Membership for MembershipService {
    async fn list(&self, _: Request<MembershipRequest>) -> Result<Response<MembershipResponse>, Status> {
        let server = &self.0.server;
        let members = Members::load(&server.mvcc);
        let members = serde_json::to_vec(&members).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(MembershipResponse { cluster_id: server.cluster_id, members }))
    }

    async fn promote(&self, req: Request<MemberPromoteRequest>) -> Result<Response<MemberPromoteResponse>, Status> {
        self.on_leader()?;
        Ok(Response::new(self.0.promote_here(req.into_inner().id).await?))
    }

    async fn add(&self, req: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        self.on_leader()?;
        Ok(Response::new(self.0.add_here(req.into_inner()).await?))
    }

    async fn remove(&self, req: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        self.on_leader()?;
        Ok(Response::new(self.0.remove_here(req.into_inner().id).await?))
    }
}

/// For `--initial-cluster-state existing`: the cluster id and the member
/// list, from the first member of `peers` (their peer URLs) that answers,
/// with `me` (this member's advertised peer URLs) named `name` in it.
///
/// # Errors
///
/// [`Error::Config`] when no peer answers, or when the cluster has no
/// member with these peer URLs (it was not added with MemberAdd).
pub async fn discover(
    peers: &[String],
    me: &[String],
    name: &str,
    tls: &meridian_wire::tls::ClientTls,
) -> Result<(u64, Members)> {
    let mut last = String::from("no peer URL in --initial-cluster besides this member's");
    for url in peers.iter().filter(|u| !me.contains(u)) {
        let endpoint = match tonic::transport::Endpoint::from_shared(url.clone()) {
            Ok(e) => e.connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(5)),
            Err(e) => {
                last = format!("{url}: {e}");
                continue;
            }
        };
        let mut client = MembershipClient::new(tls.channel(&endpoint));
        match client.list(MembershipRequest {}).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                let mut members: Members = serde_json::from_slice(&resp.members)
                    .map_err(|e| Error::Corrupt(format!("member list from {url}: {e}")))?;
                let mut sorted_me = me.to_vec();
                sorted_me.sort();
                let mine = members.0.iter_mut().find(|m| {
                    let mut urls = m.peer_urls.clone();
                    urls.sort();
                    urls == sorted_me
                });
                let Some(mine) = mine else {
                    return Err(Error::Config(format!(
                        "the cluster at {url} has no member with peer URLs {}: add this member first \
                         (etcdctl member add {name} --peer-urls={})",
                        me.join(","),
                        me.join(",")
                    )));
                };
                mine.name = name.to_string();
                return Ok((resp.cluster_id, members));
            }
            Err(status) => last = format!("{url}: {}", status.message()),
        }
    }
    Err(Error::Config(format!("cannot join the cluster: no member answered ({last})")))
}
