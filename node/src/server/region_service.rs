//! `meridian.v1.Region`: the region state of this member's cluster, and the
//! promotion and demotion that `meridian region` drives. Each change is one
//! raft entry (`RegionChange`, see `apply::region_change`), so every member
//! switches role at the same log index and the fence is exact.

use std::sync::Arc;

use meridian_proto::meridian::v1::internal_request::Request as Internal;
use meridian_proto::meridian::v1::region_server::Region;
use meridian_proto::meridian::v1::{
    DemoteRequest, PromoteRequest, RegionChange, RegionStatusRequest, RegionStatusResponse,
};
use tonic::{Request, Response, Status};

use super::mirror::check_token;
use super::EtcdServer;

pub struct RegionService {
    pub server: Arc<EtcdServer>,
    /// What Promote and Demote must present; `None` refuses them.
    token: Option<String>,
}

impl RegionService {
    pub fn new(server: Arc<EtcdServer>, token: Option<String>) -> Self {
        Self { server, token }
    }

    fn status_now(&self) -> RegionStatusResponse {
        let marks = self.server.mvcc.marks();
        let role = self.server.role.get();
        let f = self.server.freshness();
        let ms = |s: f64| if s.is_finite() { (s * 1000.0) as i64 } else { -1 };
        RegionStatusResponse {
            header: Some(self.server.header(marks.current)),
            region: role.region.clone(),
            role: role.role_name().into(),
            epoch: role.epoch,
            fence_revision: role.fence_revision,
            lineage: role.lineage_for(self.server.cluster_id),
            primary_region: role.primary_region.clone(),
            source_cluster_id: role.source_cluster_id,
            revision: marks.current,
            source_revision: f.source_revision,
            heard_ms_ago: ms(f.heartbeat_age_seconds),
            staleness_ms: if role.role_name() == "primary" { 0 } else { ms(f.staleness_seconds) },
            primary_lease_ms: self.server.primary_lease.remaining().map_or(-1, |d| d.as_millis() as i64),
        }
    }

    async fn change(&self, change: RegionChange) -> Result<Response<RegionStatusResponse>, Status> {
        let role = change.role.clone();
        self.server.propose(Internal::RegionChange(change)).await?;
        let st = self.status_now();
        tracing::warn!(role, epoch = st.epoch, fence = st.fence_revision, "region role changed");
        Ok(Response::new(st))
    }
}

#[tonic::async_trait]
impl Region for RegionService {
    async fn status(&self, _: Request<RegionStatusRequest>) -> Result<Response<RegionStatusResponse>, Status> {
        Ok(Response::new(self.status_now()))
    }

    async fn promote(&self, req: Request<PromoteRequest>) -> Result<Response<RegionStatusResponse>, Status> {
        check_token(self.token.as_deref(), req.metadata(), "region changes (Region.Promote, Region.Demote)")?;
        let r = req.into_inner();
        self.change(RegionChange {
            role: "primary".into(),
            epoch: r.epoch,
            expect_revision: r.expect_revision,
            primary_region: String::new(),
            primary_cluster_id: self.server.cluster_id,
            ..Default::default()
        })
        .await
    }

    async fn demote(&self, req: Request<DemoteRequest>) -> Result<Response<RegionStatusResponse>, Status> {
        check_token(self.token.as_deref(), req.metadata(), "region changes (Region.Promote, Region.Demote)")?;
        let r = req.into_inner();
        if r.primary_region.is_empty() {
            return Err(Status::invalid_argument("meridian: a demotion names the region that takes over"));
        }
        self.change(RegionChange {
            role: "secondary".into(),
            epoch: r.epoch,
            expect_revision: 0,
            primary_region: r.primary_region,
            primary_cluster_id: r.primary_cluster_id,
            rewind_to: r.rewind_to,
            wipe: r.wipe,
            lineage: r.lineage,
        })
        .await
    }
}
