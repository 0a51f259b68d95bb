//! One Meridian cluster member: raft-rs replicating a log of etcd requests,
//! an MVCC state machine on fjall, and etcd's v3 gRPC services.
//!
//! Start at [`run`], which wires the pieces together:
//! - [`raft`]: consensus, knows nothing about etcd;
//! - [`mvcc`]: the versioned key-value store;
//! - [`server`]: etcd semantics, the apply state machine and the services;
//! - [`config`]: etcd-compatible flags, file and environment.

pub mod compat;
pub mod config;
pub mod error;
pub mod metrics;
pub mod mvcc;
pub mod raft;
pub mod server;
pub mod snapshot;

use std::future::Future;
use std::sync::{Arc, OnceLock};

use meridian_proto::etcdserverpb::auth_server::AuthServer;
use meridian_proto::etcdserverpb::cluster_server::ClusterServer;
use meridian_proto::etcdserverpb::kv_server::KvServer;
use meridian_proto::etcdserverpb::lease_server::LeaseServer;
use meridian_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use meridian_proto::etcdserverpb::watch_server::WatchServer;
use meridian_proto::etcdserverpb::ResponseHeader;
use meridian_proto::meridian::v1::internal_request::Request as Internal;
use meridian_proto::meridian::v1::lease_forward_server::LeaseForwardServer;
use meridian_proto::meridian::v1::membership_server::MembershipServer;
use meridian_proto::meridian::v1::mirror_server::MirrorServer;
use meridian_proto::meridian::v1::raft_transport_server::RaftTransportServer;
use meridian_proto::meridian::v1::region_server::RegionServer;
use meridian_proto::meridian::v1::MemberAttributes;
use meridian_proto::v3electionpb::election_server::ElectionServer;
use meridian_proto::v3lockpb::lock_server::LockServer;
use meridian_wire::coalesce::Coalesce;
use meridian_wire::tls::{ClientTls, ServerStream, ServerTls};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::service::Routes;

use crate::config::{ClusterState, InitialRole, ListenerTls, NodeConfig};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::mvcc::Mvcc;
use crate::raft::storage::{SnapshotImages, SnapshotSource};
use crate::raft::transport::{GrpcTransport, PeerContext, PeerService};
use crate::raft::{RaftConfig, RaftNode, RaftStatus};
use crate::server::apply::{EtcdStateMachine, MvccSnapshots, Waiters};
use crate::server::authority::{AuthorityFix, MAX_FRAME, MAX_HEADER_LIST};
use crate::server::cluster::{MemberInfo, Members};
use crate::server::kv::KvService;
use crate::server::lease::service::{run_leader_duties, LeaderLink, LeaseForwardService, LeaseService};
use crate::server::lease::Lessor;
use crate::server::maintenance::{MaintenanceService, ETCD_VERSION};
use crate::server::membership::ClusterService;
use crate::server::mirror::MirrorService;
use crate::server::recipes::{ElectionService, LockService};
use crate::server::region::{Lineage, Role, RoleCell, RoleState};
use crate::server::region_service::RegionService;
use crate::server::version::VersionCell;
use crate::server::watch::hub::HeaderFn;
use crate::server::watch::{WatchHub, WatchService};
use crate::server::{EtcdServer, Limits, GRPC_OVERHEAD_BYTES};
use meridian_wire::url::Url;

pub(crate) const META_CLUSTER_ID: &str = "cluster_id";
/// How long a stopping member lets in-flight requests finish.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs a member until `shutdown` resolves, then stops cleanly: listeners
/// close, the raft thread finishes its cycle, and the database is flushed.
///
/// # Errors
///
/// Invalid configuration, a port that cannot be bound, or storage errors.
pub async fn run(cfg: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let data_dir = cfg.data_dir.clone();
    std::fs::create_dir_all(&data_dir)?;
    let db_dir = data_dir.join("db");
    let db = fjall::Database::builder(&db_dir).open()?;
    let metrics = Arc::new(Metrics::new(&cfg.region));
    let mvcc = Arc::new(Mvcc::open(db.clone(), Some(&db_dir))?);

    // Membership: from --initial-cluster on first start, from the store after.
    let mut members = Members::load(&mvcc);
    let cluster_id = match mvcc.meta(META_CLUSTER_ID) {
        Some(b) if !members.0.is_empty() => {
            u64::from_be_bytes(b.as_slice().try_into().map_err(|_| Error::Corrupt("cluster id".into()))?)
        }
        _ => {
            let joining = cfg.initial_cluster_state == ClusterState::Existing;
            // A data directory `etcdctl snapshot restore` made: its history
            // becomes this store's, staged in the batch that makes the member.
            let mut batch = db.batch();
            let restored = data_dir.join(snapshot::RESTORED_DB);
            if restored.exists() && joining {
                return Err(Error::Config(format!(
                    "{} holds an etcd backend to import, but a member joining a cluster takes its data from the cluster: use --initial-cluster-state new, or remove the file",
                    restored.display()
                )));
            }
            if restored.exists() {
                if cfg.initial_role == InitialRole::Secondary {
                    return Err(Error::Config(format!(
                        "{} holds an etcd backend to import, but a secondary takes its history from its primary: start it as a primary, or remove the file",
                        restored.display()
                    )));
                }
                let imported = snapshot::import_etcd_db(&restored, &mvcc, &mut batch)
                    .map_err(|e| Error::Config(format!("cannot import {}: {e}", restored.display())))?;
                tracing::info!(path = %restored.display(), revision = imported.marks.current,
                    compacted = imported.marks.compacted, revisions = imported.revisions,
                    leases = imported.leases, "imported an etcd backend");
            }
            let cid = if joining {
                // The member list and the cluster id come from the cluster
                // (until the leader's snapshot brings the whole state).
                let peers: Vec<String> = cfg.initial_members.values().flatten().cloned().collect();
                let mine = cfg.initial_members.get(&cfg.name).cloned().unwrap_or_default();
                let tls = ClientTls::load(&cfg.peer_client).map_err(|e| Error::Config(format!("peer TLS: {e}")))?;
                let (cid, list) = server::membership::discover(&peers, &mine, &cfg.name, &tls).await?;
                tracing::info!(cluster_id = format!("{cid:x}"), members = list.0.len(), "joining an existing cluster");
                members = list;
                cid
            } else {
                members = Members(
                    cfg.initial_members
                        .clone()
                        .into_iter()
                        .map(|(name, peer_urls)| MemberInfo {
                            id: config::member_id(&peer_urls, &cfg.initial_cluster_token),
                            name,
                            peer_urls,
                            client_urls: Vec::new(),
                            apply_version: 0,
                            is_learner: false,
                        })
                        .collect(),
                );
                let ids: Vec<u64> = members.0.iter().map(|m| m.id).collect();
                config::cluster_id(&ids)
            };
            members.store(&mvcc);
            mvcc.set_meta(META_CLUSTER_ID, cid.to_be_bytes().to_vec());
            let role = match cfg.initial_role {
                InitialRole::Primary => Role::Primary,
                InitialRole::Secondary => Role::Secondary,
            };
            // A primary's history starts here; a secondary takes its source's.
            let lineage = match role {
                Role::Primary => {
                    vec![Lineage { epoch: 0, first_revision: 1, primary_cluster_id: cid, region: cfg.region.clone() }]
                }
                Role::Secondary => Vec::new(),
            };
            RoleState {
                role,
                region: cfg.region.clone(),
                primary_region: cfg.primary_region.clone(),
                source_cluster_id: 0,
                epoch: 0,
                fence_revision: 0,
                lineage,
            }
            .store(&mvcc);
            mvcc.stage(&mut batch);
            batch.commit()?;
            mvcc.publish()?;
            cid
        }
    };
    // By name; a member added by MemberAdd has one only once it published
    // it, so by its peer URLs before that.
    let sorted = |urls: &[String]| {
        let mut urls = urls.to_vec();
        urls.sort();
        urls
    };
    let my_urls = sorted(&cfg.initial_members.get(&cfg.name).cloned().unwrap_or_default());
    let me = members
        .0
        .iter()
        .find(|m| m.name == cfg.name)
        .or_else(|| {
            members.0.iter().find(|m| m.name.is_empty() && !my_urls.is_empty() && sorted(&m.peer_urls) == my_urls)
        })
        .cloned()
        .ok_or_else(|| Error::Config(format!("member {:?} is not in the stored cluster", cfg.name)))?;
    tracing::info!(name = %cfg.name, member_id = format!("{:x}", me.id), cluster_id = format!("{cluster_id:x}"),
        data_dir = %data_dir.display(), "starting member");
    metrics.server_id.with_label_values(&[&format!("{:x}", me.id)]).set(1);
    metrics.server_version.with_label_values(&[ETCD_VERSION]).set(1);
    metrics.cluster_version.with_label_values(&[server::maintenance::ETCD_CLUSTER_VERSION]).set(1);
    let quota = cfg.quota.unwrap_or(u64::MAX);
    metrics.quota_backend_bytes.set(i64::try_from(quota).unwrap_or(i64::MAX));

    let role = RoleCell::new(RoleState::load(&mvcc).ok_or_else(|| Error::Corrupt("no role record".into()))?);
    let version = VersionCell::new(&members);
    tracing::info!(role = ?role.get().role, region = %role.get().region, "region role");

    // Raft.
    let waiters = Arc::new(Waiters::default());
    // The watch hub reads the store's revision now, before apply can move it.
    let raft_status: Arc<OnceLock<Arc<RaftStatus>>> = Arc::default();
    let header: HeaderFn = {
        let (member_id, status) = (me.id, raft_status.clone());
        Arc::new(move |revision| ResponseHeader {
            cluster_id,
            member_id,
            revision,
            raft_term: status.get().map_or(0, |s| s.term()),
        })
    };
    let hub = WatchHub::start(
        mvcc.clone(),
        header.clone(),
        cfg.max_request_bytes,
        cfg.progress_notify_interval,
        metrics.clone(),
    );
    let lessor = Arc::new(Lessor::new(cfg.election));
    let auth = Arc::new(server::auth::store::AuthStore::load(&mvcc, cfg.auth.clone()));
    let sm = EtcdStateMachine::new(
        mvcc.clone(),
        waiters.clone(),
        metrics.clone(),
        hub.clone(),
        lessor.clone(),
        role.clone(),
        version.clone(),
        auth.clone(),
    );
    let ticks = (cfg.election.as_millis() / cfg.heartbeat.as_millis()) as usize;
    let raft_cfg = RaftConfig {
        id: me.id,
        voters: members.0.iter().filter(|m| !m.is_learner).map(|m| m.id).collect(),
        learners: members.0.iter().filter(|m| m.is_learner).map(|m| m.id).collect(),
        election_ticks: ticks,
        heartbeat_ticks: 1,
        snapshot_count: cfg.snapshot_count,
        catchup_entries: cfg.snapshot_count.min(5000),
    };
    let snapshots: Arc<dyn SnapshotSource> = Arc::new(MvccSnapshots { mvcc: mvcc.clone(), metrics: metrics.clone() });
    let images = Arc::new(SnapshotImages::default());
    let node = RaftNode::open(
        raft_cfg,
        db.clone(),
        sm,
        snapshots.clone(),
        images.clone(),
        metrics.clone(),
        &raft::logger::logger(),
    )?;
    let _ = raft_status.set(node.status());
    let chan = raft::driver::channel();
    let raft_tx = chan.0.clone();
    let peers = members.peers();
    let reports = Arc::new(raft::SnapshotReports::default());
    let client_tls = listener_tls(
        &cfg.client_tls,
        &cfg.data_dir.join("fixtures/client"),
        &cfg.listen_client_urls,
        &cfg.cipher_suites,
    )?;
    let peer_tls =
        listener_tls(&cfg.peer_tls, &cfg.data_dir.join("fixtures/peer"), &cfg.listen_peer_urls, &cfg.cipher_suites)?;
    let mut peer_client = cfg.peer_client.clone();
    if cfg.peer_tls == ListenerTls::Auto {
        // Under --peer-auto-tls a member presents its own self-signed pair.
        let fixtures = cfg.data_dir.join("fixtures/peer");
        (peer_client.cert, peer_client.key) = (Some(fixtures.join("cert.pem")), Some(fixtures.join("key.pem")));
    }
    let peer_client = ClientTls::load(&peer_client).map_err(|e| Error::Config(format!("peer TLS: {e}")))?;
    let active_peers = raft::transport::ActivePeers::default();
    let peer_ctx = Arc::new(PeerContext {
        tls: peer_client.clone(),
        active: active_peers.clone(),
        status: node.status(),
        self_url: me.peer_urls.first().cloned().unwrap_or_default(),
        cluster_id,
        self_id: me.id,
        raft_tx: raft_tx.clone(),
        images,
        max_message: cfg.max_peer_message_bytes,
        reports: reports.clone(),
        metrics: metrics.clone(),
    });
    let peer_set: raft::transport::PeerSet = Default::default();
    let transport = GrpcTransport::start(peer_ctx, peers, Members::load_removed(&mvcc), peer_set.clone());
    let (handle, raft_thread) = raft::driver::spawn(node, chan, Arc::new(transport), reports, cfg.heartbeat)?;

    let limits = Limits {
        max_request_bytes: cfg.max_request_bytes,
        max_txn_ops: cfg.max_txn_ops,
        quota_backend_bytes: quota,
        election_timeout: cfg.election,
    };
    let server = Arc::new(EtcdServer::new(
        me.id,
        cluster_id,
        cfg.name.clone(),
        handle,
        mvcc.clone(),
        waiters,
        metrics.clone(),
        limits,
        role.clone(),
        version,
        auth,
        lessor.clone(),
    ));

    let cluster =
        Arc::new(ClusterService { server: server.clone(), peer_tls: peer_client.clone(), active: active_peers });

    // Listeners.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let peer_service = PeerService {
        cluster_id,
        members: peer_set,
        raft_tx: raft_tx.clone(),
        source: snapshots,
        metrics: metrics.clone(),
        receiving: Default::default(),
    };
    let peer_routes = Routes::new(
        RaftTransportServer::new(peer_service)
            .max_decoding_message_size(cfg.max_peer_message_bytes)
            .max_encoding_message_size(cfg.max_peer_message_bytes),
    )
    .add_service(LeaseForwardServer::new(LeaseForwardService { server: server.clone(), lessor: lessor.clone() }))
    .add_service(MembershipServer::new(server::membership::MembershipService(cluster.clone())));
    for url in &cfg.listen_peer_urls {
        tasks.push(serve(url, peer_routes.clone(), stop_rx.clone(), None, peer_tls.clone()).await?);
    }
    let watch = WatchService::new(hub.clone(), header.clone(), server.auth.clone());
    let leases = LeaseService {
        server: server.clone(),
        lessor: lessor.clone(),
        leader: Arc::new(LeaderLink::new(server.clone(), lessor.clone(), peer_client.clone())),
    };
    if role.is_secondary() && cfg.mirror_token.is_none() {
        tracing::warn!("this secondary has no --mirror-token-file: every mirror write (Mirror.Apply) is refused");
    }
    let leases = Arc::new(leases);
    let recipes = server::recipes::Recipes::new(KvService { server: server.clone() }, leases.clone(), hub.clone());
    let api = Arc::new(server::json::JsonApi {
        kv: Arc::new(KvService { server: server.clone() }),
        lease: leases,
        maintenance: Arc::new(MaintenanceService { server: server.clone(), scratch_dir: data_dir.clone() }),
        cluster,
        auth: Arc::new(server::auth::service::AuthService { server: server.clone() }),
        lock: Arc::new(LockService(recipes.clone())),
        election: Arc::new(ElectionService(recipes)),
        hub,
        header,
    });
    let client_routes = client_routes(&server, watch, api, cfg.max_request_bytes, cfg.mirror_token.clone());
    for url in &cfg.listen_client_urls {
        let listener = ClientListener {
            metrics: metrics.clone(),
            max_concurrent_streams: cfg.max_concurrent_streams,
            keepalive_interval: cfg.grpc_keepalive_interval,
            keepalive_timeout: cfg.grpc_keepalive_timeout,
        };
        tasks.push(serve(url, client_routes.clone(), stop_rx.clone(), Some(listener), client_tls.clone()).await?);
    }
    let metrics_routes = Routes::from(server::http::routes(axum::Router::new(), server.clone()));
    for url in &cfg.listen_metrics_urls {
        tasks.push(serve(url, metrics_routes.clone(), stop_rx.clone(), None, client_tls.clone()).await?);
    }
    tokio::spawn(run_leader_duties(server.clone(), lessor.clone(), cfg.lease_checkpoint_interval));
    if let Some(retention) = cfg.auto_compaction {
        tokio::spawn(server::compactor::run(server.clone(), retention));
    }
    if let Some(topology) = cfg.topology.clone() {
        tokio::spawn(server::primary_lease::run(server.clone(), topology, peer_client.clone()));
    }
    tokio::spawn(publish_attributes(
        server.clone(),
        MemberAttributes {
            id: me.id,
            name: cfg.name.clone(),
            client_urls: cfg.advertise_client_urls.iter().map(Url::to_string).collect(),
            apply_version: server::version::APPLY_VERSION,
        },
    ));
    tracing::info!(urls = ?cfg.listen_client_urls.iter().map(Url::to_string).collect::<Vec<_>>(),
        "ready to serve client requests");
    notify_systemd_ready();

    let mut removed = server.raft.status().watch_removed();
    tokio::select! {
        () = shutdown => tracing::info!("shutting down"),
        seen = removed.wait_for(|r| *r) => {
            // The borrow must go before the wait: it blocks every later send.
            drop(seen);
            tracing::warn!("the member has been permanently removed from the cluster; shutting down");
            // As etcd: a removed leader keeps going a little, so the
            // others learn that its removal committed.
            tokio::time::sleep((10 * cfg.heartbeat).max(std::time::Duration::from_secs(1))).await;
        }
    }
    let _ = stop_tx.send(true);
    // Graceful shutdown waits for open connections, and clients keep theirs
    // open: give in-flight calls a moment, then cut the rest.
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    for t in &mut tasks {
        if tokio::time::timeout_at(deadline, &mut *t).await.is_err() {
            break;
        }
    }
    for t in tasks {
        t.abort();
    }
    server.raft.shutdown();
    let _ = tokio::task::spawn_blocking(move || raft_thread.join()).await;
    db.persist(fjall::PersistMode::SyncAll)?;
    tracing::info!("stopped");
    Ok(())
}

fn client_routes(
    server: &Arc<EtcdServer>,
    watch: WatchService,
    api: Arc<server::json::JsonApi>,
    max_request_bytes: usize,
    mirror_token: Option<String>,
) -> Routes {
    // The transport admits far more than the limit so that the services can
    // refuse oversized requests with etcd's own codes and messages.
    let max = (max_request_bytes + GRPC_OVERHEAD_BYTES).max(64 << 20) * 2;
    let routes = Routes::builder()
        .add_service(WatchServer::new(watch).max_decoding_message_size(max))
        .add_service(LeaseServer::from_arc(api.lease.clone()).max_decoding_message_size(max))
        .add_service(LockServer::from_arc(api.lock.clone()).max_decoding_message_size(max))
        .add_service(ElectionServer::from_arc(api.election.clone()).max_decoding_message_size(max))
        .add_service(
            MirrorServer::new(MirrorService::new(server.clone(), mirror_token.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(RegionServer::new(RegionService::new(server.clone(), mirror_token)))
        .add_service(KvServer::from_arc(api.kv.clone()).max_decoding_message_size(max))
        .add_service(MaintenanceServer::from_arc(api.maintenance.clone()).max_decoding_message_size(max))
        .add_service(ClusterServer::from_arc(api.cluster.clone()).max_decoding_message_size(max))
        .add_service(AuthServer::from_arc(api.auth.clone()).max_decoding_message_size(max))
        .clone()
        .routes();
    let metrics = server.metrics.clone();
    let status = server.raft.status().clone();
    let router = routes
        .into_axum_router()
        .layer(axum::middleware::from_fn(move |req, next| learner_guard(status.clone(), req, next)))
        .layer(axum::middleware::from_fn(client_cn));
    let router = router.layer(tower::util::MapRequestLayer::new(move |req: http::Request<axum::body::Body>| {
        count_client_request(&metrics, &req);
        req
    }));
    let router = server::json::routes(router, api);
    Routes::from(server::http::routes(router, server.clone()))
}

/// On a learner, etcd's API serves only Status and serializable Ranges (the
/// KV service refuses a linearizable one): every other etcd call is refused
/// with `etcdserver: rpc not supported for learner`, as etcd refuses it.
async fn learner_guard(
    status: Arc<raft::RaftStatus>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    const SERVED: &[&str] = &["/etcdserverpb.Maintenance/Status", "/etcdserverpb.KV/Range"];
    let path = req.uri().path();
    let etcd = ["/etcdserverpb.", "/v3lockpb.", "/v3electionpb."].iter().any(|p| path.starts_with(p));
    if status.is_learner() && etcd && !SERVED.contains(&path) {
        let refused = tonic::Status::from(Error::NotSupportedForLearner).into_http::<axum::body::Body>();
        return refused.map(axum::body::Body::new);
    }
    next.run(req).await
}

/// etcd's `etcd_server_client_requests_total{type, client_api_version}`: every
/// gRPC call, unary or stream, by the `client-api-version` its client sends.
fn count_client_request<B>(metrics: &Metrics, req: &http::Request<B>) {
    const STREAMS: &[&str] =
        &["/etcdserverpb.Watch/Watch", "/etcdserverpb.Lease/LeaseKeepAlive", "/etcdserverpb.Maintenance/Snapshot"];
    let path = req.uri().path();
    if !path.starts_with("/etcdserverpb.") {
        return;
    }
    let kind = if STREAMS.contains(&path) { "stream" } else { "unary" };
    let version = req.headers().get("client-api-version").and_then(|v| v.to_str().ok()).unwrap_or("unknown");
    // A client names its version; only `M.mm` shapes count as one, which
    // bounds the label set against a client sending a new one per call.
    let shaped = matches!(version.split_once('.'), Some((major, minor))
        if major.len() == 1 && (1..=2).contains(&minor.len())
            && major.bytes().chain(minor.bytes()).all(|b| b.is_ascii_digit()));
    let version = if shaped { version } else { "unknown" };
    metrics.client_requests.with_label_values(&[kind, version]).inc();
}

/// What a client listener adds to a plain one: etcd's HTTP/2 settings for
/// clients, and byte counts.
#[derive(Clone)]
struct ClientListener {
    metrics: Arc<Metrics>,
    max_concurrent_streams: u32,
    keepalive_interval: Option<std::time::Duration>,
    keepalive_timeout: std::time::Duration,
}

/// A listener kind's TLS: the files given, or with `--auto-tls` a
/// self-signed pair for the hosts of `urls`, made once in `fixtures`.
fn listener_tls(
    tls: &ListenerTls,
    fixtures: &std::path::Path,
    urls: &[Url],
    cipher_suites: &[String],
) -> Result<Option<Arc<ServerTls>>> {
    let files = match tls {
        ListenerTls::Off => return Ok(None),
        ListenerTls::Files(files) => files.clone(),
        ListenerTls::Auto => {
            let hosts: Vec<String> = urls.iter().map(|u| u.host().to_string()).collect();
            let (cert, key) = meridian_wire::tls::auto_tls(fixtures, &hosts).map_err(Error::Config)?;
            let policy = meridian_wire::tls::Policy { cipher_suites: cipher_suites.to_vec(), ..Default::default() };
            meridian_wire::tls::ServerFiles { cert, key, trusted_ca: None, client_cert_auth: false, crl: None, policy }
        }
    };
    tracing::info!(cert = %files.cert.display(), key = %files.key.display(),
        trusted_ca = %files.trusted_ca.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
        client_cert_auth = files.client_cert_auth, "TLS");
    Ok(Some(ServerTls::load(files).map_err(Error::Config)?))
}

/// Serves `routes` on `url` until `stop` (under `tls` for an `https://`
/// URL). Client listeners accept etcd Go clients' schemed `:authority` (see
/// `server::authority`), take etcd's `--max-concurrent-streams` and
/// `--grpc-keepalive-*`, and count their bytes.
async fn serve(
    url: &Url,
    routes: Routes,
    mut stop: watch::Receiver<bool>,
    client: Option<ClientListener>,
    tls: Option<Arc<ServerTls>>,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener =
        meridian_wire::tls::Listener::bind(url).await.map_err(|e| Error::Config(format!("listen on {url}: {e}")))?;
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|| url.host_port().to_string());
    tracing::info!(%url, %local, "listening");
    let metrics = client.as_ref().map(|c| c.metrics.clone());
    let tls = tls.filter(|_| url.is_tls());
    let incoming = meridian_wire::tls::incoming(listener, tls).map(move |conn| {
        conn.map(|s| match &metrics {
            Some(m) => Either::Fixed(AuthorityFix::new(Coalesce::new(s)), m.clone()),
            None => Either::Plain(Coalesce::new(s)),
        })
    });
    let mut builder = tonic::transport::Server::builder()
        .accept_http1(true)
        // The limits `AuthorityFix` enforces before h2 sees the bytes.
        .max_frame_size(MAX_FRAME as u32)
        .http2_max_header_list_size(MAX_HEADER_LIST as u32);
    if let Some(c) = &client {
        builder = builder
            .max_concurrent_streams(c.max_concurrent_streams)
            .http2_keepalive_interval(c.keepalive_interval)
            .http2_keepalive_timeout(Some(c.keepalive_timeout));
    }
    Ok(tokio::spawn(async move {
        let result = builder
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

/// An accepted connection, its writes coalesced: a peer's or a metrics
/// client's as it is, or an etcd client's with the `:authority` fix and its
/// bytes counted.
enum Either {
    Plain(Coalesce<ServerStream>),
    Fixed(AuthorityFix<Coalesce<ServerStream>>, Arc<Metrics>),
}

macro_rules! either {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Either::Plain($s) => $e,
            Either::Fixed($s, _) => $e,
        }
    };
}

/// Counts what a write reports done on a client connection.
fn count_sent(
    written: std::task::Poll<std::io::Result<usize>>,
    metrics: &Metrics,
) -> std::task::Poll<std::io::Result<usize>> {
    if let std::task::Poll::Ready(Ok(n)) = &written {
        metrics.client_sent_bytes.inc_by(*n as u64);
    }
    written
}

impl tokio::io::AsyncRead for Either {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Either::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Either::Fixed(s, metrics) => {
                let before = buf.filled().len();
                let read = std::pin::Pin::new(s).poll_read(cx, buf);
                metrics.client_received_bytes.inc_by((buf.filled().len() - before) as u64);
                read
            }
        }
    }
}

impl tokio::io::AsyncWrite for Either {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Either::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Either::Fixed(s, metrics) => count_sent(std::pin::Pin::new(s).poll_write(cx, buf), metrics),
        }
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        either!(self, s => std::pin::Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        either!(self, s => std::pin::Pin::new(s).poll_shutdown(cx))
    }
    // HTTP/2 writes a frame header and its payload together when the stream
    // takes vectored writes: forward them, or every frame costs a copy.
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Either::Plain(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            Either::Fixed(s, metrics) => count_sent(std::pin::Pin::new(s).poll_write_vectored(cx, bufs), metrics),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Either::Plain(s) => s.is_write_vectored(),
            Either::Fixed(s, _) => s.is_write_vectored(),
        }
    }
}

/// What a connection's requests carry in their extensions: its addresses,
/// and the CN of the client certificate the listener verified.
#[derive(Clone, Debug)]
pub struct ClientConn {
    pub tcp: tonic::transport::server::TcpConnectInfo,
    pub common_name: Option<String>,
}

impl tonic::transport::server::Connected for Either {
    type ConnectInfo = ClientConn;
    fn connect_info(&self) -> Self::ConnectInfo {
        let s = match self {
            Either::Plain(s) => s.get_ref(),
            Either::Fixed(s, _) => s.get_ref().get_ref(),
        };
        ClientConn { tcp: s.connect_info(), common_name: s.peer_common_name() }
    }
}

/// With `--client-cert-auth`, the verified certificate's CN is the user of
/// a request that carries no token, as in etcd. It travels as metadata
/// ([`server::auth::store::CLIENT_CN`]), so calls made on a client's behalf
/// (Lock, Election) carry it too; whatever a client sent under that name is
/// dropped first. The JSON gateway builds its own requests, without it, as
/// etcd ignores the CN of requests through its gateway.
async fn client_cn(mut req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    req.headers_mut().remove(server::auth::store::CLIENT_CN);
    let cn = req.extensions().get::<ClientConn>().and_then(|c| c.common_name.clone());
    if let Some(value) = cn.and_then(|cn| http::HeaderValue::from_str(&cn).ok()) {
        req.headers_mut().insert(server::auth::store::CLIENT_CN, value);
    }
    next.run(req).await
}

/// Tells systemd the member is serving (`sd_notify(READY=1)`), so a
/// `Type=notify` unit, as etcd's own, starts its dependents only now. Does
/// nothing outside systemd (no `NOTIFY_SOCKET`). A name starting with `@` is
/// in Linux's abstract socket namespace.
fn notify_systemd_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = (|| -> std::io::Result<()> {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(b"READY=1", &addr)?;
        } else {
            socket.send_to(b"READY=1", &path)?;
        }
        Ok(())
    })();
    match sent {
        Ok(()) => tracing::info!("told systemd the member is ready"),
        Err(e) => tracing::warn!(error = %e, "could not notify systemd (NOTIFY_SOCKET)"),
    }
}

/// Publishes this member's name and client URLs through raft once a leader
/// exists, as etcd does, so every member lists them.
async fn publish_attributes(server: Arc<EtcdServer>, attrs: MemberAttributes) {
    for attempt in 0..600u32 {
        let current = Members::load(&server.mvcc);
        if current.get(attrs.id).is_some_and(|m| {
            m.client_urls == attrs.client_urls && m.name == attrs.name && m.apply_version == attrs.apply_version
        }) {
            return;
        }
        match server.propose(Internal::MemberAttributes(attrs.clone())).await {
            Ok(_) => return,
            Err(e) if attempt % 10 == 9 => {
                tracing::warn!(error = %e, "still publishing member attributes")
            }
            Err(_) => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
