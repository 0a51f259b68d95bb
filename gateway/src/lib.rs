//! `meridian gateway`: one etcd v3 endpoint per region. It sends writes and
//! lease calls to the primary region's leader, linearizable reads to the
//! primary, serializable reads to the nearest region fresh enough for them,
//! and watches to the nearest healthy region. It learns every region's role,
//! epoch, leader, revision and staleness by probing (`regions`), routes by
//! RPC class and consistency (`route`), and proxies etcd's services with
//! their codes and messages unchanged (`proxy`).
//!
//! ```text
//!  etcd client ──▶ gateway (AuthorityFix, tonic) ──▶ proxy::Gateway::pick
//!                                                     │ class + metadata
//!                      regions::Regions (probes) ─────┤
//!                                                     ▼
//!                              the chosen region's leader (tonic Channel)
//! ```

pub mod batch;
pub mod config;
pub mod dashboard;
pub mod http;
pub mod json;
pub mod keepalive;
pub mod limits;
pub mod linear;
pub mod metrics;
pub mod proxy;
pub mod regions;
pub mod route;
pub mod watches;

use std::future::Future;
use std::sync::Arc;

use anyhow::{Context, Result};
use meridian_proto::etcdserverpb::auth_server::AuthServer;
use meridian_proto::etcdserverpb::cluster_server::ClusterServer;
use meridian_proto::etcdserverpb::kv_server::KvServer;
use meridian_proto::etcdserverpb::lease_server::LeaseServer;
use meridian_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use meridian_proto::etcdserverpb::watch_server::WatchServer;
use meridian_wire::authority::{AuthorityFix, MAX_FRAME, MAX_HEADER_LIST};
use meridian_wire::coalesce::Coalesce;
use meridian_wire::tls::ServerTls;
use meridian_wire::url::Url;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::service::Routes;

pub use config::{GatewayConfig, GatewayFlags};
use meridian_proto::v3electionpb::election_server::ElectionServer;
use meridian_proto::v3lockpb::lock_server::LockServer;
use proxy::{
    AuthProxy, ClusterProxy, ElectionProxy, Gateway, KvProxy, LeaseProxy, LockProxy, MaintenanceProxy, WatchProxy,
};

/// Largest message the gateway takes from a client or an upstream; the
/// regions refuse oversized requests themselves, with etcd's messages.
const MAX_MESSAGE: usize = 128 << 20;

/// Runs the gateway until `shutdown` resolves.
///
/// # Errors
///
/// A listener that cannot bind, or a bad upstream URL.
pub async fn run(cfg: GatewayConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let metrics = Arc::new(metrics::Metrics::new(&cfg.region));
    let regions = Arc::new(regions::Regions::new(&cfg.region, &cfg.upstreams, &cfg.upstream_tls, &metrics)?);
    let history = Arc::new(dashboard::History::new());
    tokio::spawn(regions::run_probes(regions.clone(), cfg.probe_interval, metrics.clone(), history.clone()));
    tokio::spawn(dashboard::run_peers(history.clone(), cfg.peer_gateways.clone()));
    let gw = Arc::new(Gateway::new(cfg.clone(), regions, metrics));
    tokio::spawn(gw.limiter.clone().run_cleanup());

    let grpc = Routes::builder()
        .add_service(KvServer::new(KvProxy(gw.clone())).max_decoding_message_size(MAX_MESSAGE))
        .add_service(WatchServer::new(WatchProxy(gw.clone())).max_decoding_message_size(MAX_MESSAGE))
        .add_service(LeaseServer::new(LeaseProxy(gw.clone())).max_decoding_message_size(MAX_MESSAGE))
        .add_service(ClusterServer::new(ClusterProxy(gw.clone())).max_decoding_message_size(MAX_MESSAGE))
        .add_service(AuthServer::new(AuthProxy(gw.clone())).max_decoding_message_size(MAX_MESSAGE))
        .add_service(LockServer::new(LockProxy(gw.clone())).max_decoding_message_size(MAX_MESSAGE))
        .add_service(ElectionServer::new(ElectionProxy(gw.clone())).max_decoding_message_size(MAX_MESSAGE))
        .add_service(
            MaintenanceServer::new(MaintenanceProxy(gw.clone()))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(usize::MAX),
        )
        .clone()
        .routes();
    let client_routes = Routes::from(http::routes(grpc.into_axum_router(), gw.clone(), history.clone()));
    let http_routes = Routes::from(http::routes(axum::Router::new(), gw.clone(), history));

    let tls = match &cfg.server_tls {
        Some(files) => Some(ServerTls::load(files.clone()).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for url in &cfg.listen_client_urls {
        tasks.push(serve(url, client_routes.clone(), stop_rx.clone(), cfg.max_concurrent_streams, &tls).await?);
    }
    for url in &cfg.listen_metrics_urls {
        tasks.push(serve(url, http_routes.clone(), stop_rx.clone(), cfg.max_concurrent_streams, &tls).await?);
    }
    tracing::info!(
        name = %cfg.name,
        region = %cfg.region,
        urls = ?cfg.listen_client_urls.iter().map(Url::to_string).collect::<Vec<_>>(),
        regions = ?cfg.upstreams.iter().map(|u| u.region.clone()).collect::<Vec<_>>(),
        "gateway serving"
    );
    shutdown.await;
    tracing::info!("gateway stopping");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

/// Serves `routes` on `url` until `stop` (under `tls` for `https://`),
/// with the `:authority` fix for etcd Go clients (etcdctl) on every
/// connection.
async fn serve(
    url: &Url,
    routes: Routes,
    mut stop: watch::Receiver<bool>,
    max_concurrent_streams: u32,
    tls: &Option<Arc<ServerTls>>,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = meridian_wire::tls::Listener::bind(url).await.with_context(|| format!("listen on {url}"))?;
    tracing::info!(%url, "listening");
    let tls = tls.clone().filter(|_| url.is_tls());
    let incoming =
        meridian_wire::tls::incoming(listener, tls).map(|conn| conn.map(|s| AuthorityFix::new(Coalesce::new(s))));
    Ok(tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .accept_http1(true)
            .max_frame_size(MAX_FRAME as u32)
            .http2_max_header_list_size(MAX_HEADER_LIST as u32)
            .max_concurrent_streams(max_concurrent_streams)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "listener failed");
        }
    }))
}
