//! etcd's Lock and Election services through the gateway. Both write keys
//! (and Lock and Campaign wait on them), so every call goes to the primary
//! region's leader, as a write does; Observe streams from there too.

use meridian_proto::v3electionpb::election_client::ElectionClient;
use meridian_proto::v3electionpb::election_server::Election;
use meridian_proto::v3electionpb::*;
use meridian_proto::v3lockpb::lock_client::LockClient;
use meridian_proto::v3lockpb::lock_server::Lock;
use meridian_proto::v3lockpb::*;
use tonic::{Request, Response, Status};

use std::sync::Arc;
use std::time::Instant;

use super::{forward, rev, BoxStream, Gateway};
use crate::route::Class;

pub struct LockProxy(pub Arc<Gateway>);

#[tonic::async_trait]
impl Lock for LockProxy {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        self.0
            .unary(Class::Write, req, |c, r| async move { LockClient::new(c).lock(r).await }, |r| rev(&r.header))
            .await
    }
    async fn unlock(&self, req: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        self.0
            .unary(Class::Write, req, |c, r| async move { LockClient::new(c).unlock(r).await }, |r| rev(&r.header))
            .await
    }
}

pub struct ElectionProxy(pub Arc<Gateway>);

#[tonic::async_trait]
impl Election for ElectionProxy {
    async fn campaign(&self, req: Request<CampaignRequest>) -> Result<Response<CampaignResponse>, Status> {
        self.0
            .unary(
                Class::Write,
                req,
                |c, r| async move { ElectionClient::new(c).campaign(r).await },
                |r| rev(&r.header),
            )
            .await
    }
    async fn proclaim(&self, req: Request<ProclaimRequest>) -> Result<Response<ProclaimResponse>, Status> {
        self.0
            .unary(
                Class::Write,
                req,
                |c, r| async move { ElectionClient::new(c).proclaim(r).await },
                |r| rev(&r.header),
            )
            .await
    }
    async fn leader(&self, req: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        self.0
            .unary(Class::Write, req, |c, r| async move { ElectionClient::new(c).leader(r).await }, |r| rev(&r.header))
            .await
    }
    type ObserveStream = BoxStream<LeaderResponse>;
    async fn observe(&self, req: Request<LeaderRequest>) -> Result<Response<Self::ObserveStream>, Status> {
        let gw = &self.0;
        let conn = req.remote_addr();
        gw.admit(Class::Write, conn, req.metadata())?;
        let pick = gw.pick(Class::Write, conn)?;
        let started = Instant::now();
        let (meta, _, msg) = req.into_parts();
        let result = ElectionClient::new(pick.region.channel().0).observe(forward(&meta, msg)).await;
        let result = result.map(|r| Response::new(Box::pin(r.into_inner()) as Self::ObserveStream));
        gw.answer(Class::Write, &pick, conn, started, result, |_| pick.state.revision, false)
    }
    async fn resign(&self, req: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        self.0
            .unary(Class::Write, req, |c, r| async move { ElectionClient::new(c).resign(r).await }, |r| rev(&r.header))
            .await
    }
}
