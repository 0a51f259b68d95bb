//! Cluster membership and alarms: replicated metadata kept in the MVCC
//! store's `app/` metadata, and the etcd Cluster service.

use std::sync::Arc;

use meridian_proto::etcdserverpb::cluster_server::Cluster;
use meridian_proto::etcdserverpb::{
    AlarmMember, AlarmType, Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest,
    MemberUpdateResponse,
};
use meridian_proto::meridian::v1::MemberAttributes;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use super::EtcdServer;
use crate::mvcc::Mvcc;

/// One cluster member as the cluster knows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    /// The newest raft entry version its binary applies; 0 until published.
    #[serde(default)]
    pub apply_version: u32,
}

/// The member list, replicated through raft.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Members(pub Vec<MemberInfo>);

impl Members {
    pub const META_KEY: &'static str = "members";

    pub fn load(mvcc: &Mvcc) -> Self {
        mvcc.meta(Self::META_KEY).and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    pub fn store(&self, mvcc: &Mvcc) {
        mvcc.set_meta(Self::META_KEY, serde_json::to_vec(self).expect("members encode"));
    }

    /// Records a member's name and client URLs, published by the member itself.
    pub fn set_attributes(&mut self, a: &MemberAttributes) {
        if let Some(m) = self.0.iter_mut().find(|m| m.id == a.id) {
            m.name = a.name.clone();
            m.client_urls = a.client_urls.clone();
            m.apply_version = a.apply_version;
        }
    }

    pub fn get(&self, id: u64) -> Option<&MemberInfo> {
        self.0.iter().find(|m| m.id == id)
    }
}

/// Active alarms, replicated through raft.
#[derive(Clone, Debug, Default)]
pub struct Alarms(pub Vec<AlarmMember>);

impl Alarms {
    pub const META_KEY: &'static str = "alarms";

    pub fn decode(b: &[u8]) -> Self {
        let pairs: Vec<(u64, i32)> = serde_json::from_slice(b).unwrap_or_default();
        Self(pairs.into_iter().map(|(member_id, alarm)| AlarmMember { member_id, alarm }).collect())
    }

    pub fn load(mvcc: &Mvcc) -> Self {
        mvcc.meta(Self::META_KEY).map(|b| Self::decode(&b)).unwrap_or_default()
    }

    pub fn store(&self, mvcc: &Mvcc) {
        let pairs: Vec<(u64, i32)> = self.0.iter().map(|a| (a.member_id, a.alarm)).collect();
        mvcc.set_meta(Self::META_KEY, serde_json::to_vec(&pairs).expect("alarms encode"));
    }

    pub fn has(&self, t: AlarmType) -> bool {
        self.0.iter().any(|a| a.alarm == t as i32)
    }

    /// Adds an alarm; false if it was already active.
    pub fn activate(&mut self, a: AlarmMember) -> bool {
        if self.0.contains(&a) {
            return false;
        }
        self.0.push(a);
        true
    }

    /// Removes matching alarms (member 0 or alarm NONE match any) and returns them.
    pub fn deactivate(&mut self, a: &AlarmMember) -> Vec<AlarmMember> {
        let matches = |x: &AlarmMember| {
            (a.member_id == 0 || x.member_id == a.member_id)
                && (a.alarm == AlarmType::None as i32 || x.alarm == a.alarm)
        };
        let (gone, kept) = std::mem::take(&mut self.0).into_iter().partition(matches);
        self.0 = kept;
        gone
    }
}

/// etcd's Cluster service. Membership changes are not supported yet.
pub struct ClusterService {
    pub server: Arc<EtcdServer>,
}

fn to_member(m: &MemberInfo) -> Member {
    Member {
        id: m.id,
        name: m.name.clone(),
        peer_ur_ls: m.peer_urls.clone(),
        client_ur_ls: m.client_urls.clone(),
        is_learner: false,
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(&self, _: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        Err(Status::unimplemented("meridian: membership changes are not supported yet"))
    }
    async fn member_remove(&self, _: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(Status::unimplemented("meridian: membership changes are not supported yet"))
    }
    async fn member_update(&self, _: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(Status::unimplemented("meridian: membership changes are not supported yet"))
    }
    async fn member_list(&self, _: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        let members = Members::load(&self.server.mvcc);
        let rev = self.server.mvcc.marks().current;
        Ok(Response::new(MemberListResponse {
            header: Some(self.server.header(rev)),
            members: members.0.iter().map(to_member).collect(),
        }))
    }
    async fn member_promote(
        &self,
        _: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(Status::unimplemented("meridian: membership changes are not supported yet"))
    }
}
