//! etcd's JSON gateway on the client port: `POST /v3/<service>/<method>`
//! (and the same under `/v3beta`) with a JSON body, answered in JSON, so
//! `curl` recipes written for etcd work unchanged.
//!
//! The JSON is grpc-gateway's, as etcd 3.4 speaks it: the proto field names
//! as written (`create_revision`, `dbSize`, `ID`), 64-bit integers as
//! strings, bytes in base64, enums by name, default values left out; a
//! request may also use the camelCase names. (The serde code is generated
//! by pbjson in `meridian-proto`.) Each call goes to the member's own
//! service, so checks, errors and headers are the gRPC API's. An error is
//! `{"error": msg, "message": msg, "code": N}` with grpc-gateway's HTTP
//! status for the code. Streams answer one `{"result": ...}` per line (an
//! error: `{"error": {"grpc_code", "http_code", "message", "http_status"}}`):
//! `/v3/watch`, whose body holds one or more `WatchRequest`s with a
//! `create_request`, and `/v3/election/observe`, as long as the client
//! stays; `/v3/lease/keepalive`, one line per `{"ID": ...}` of the body.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use meridian_proto::etcdserverpb::auth_server::Auth;
use meridian_proto::etcdserverpb::cluster_server::Cluster;
use meridian_proto::etcdserverpb::kv_server::Kv;
use meridian_proto::etcdserverpb::lease_server::Lease;
use meridian_proto::etcdserverpb::maintenance_server::Maintenance;
use meridian_proto::etcdserverpb::watch_request::RequestUnion;
use meridian_proto::etcdserverpb::{LeaseKeepAliveRequest, SnapshotRequest, WatchRequest};
use meridian_proto::v3electionpb::election_server::Election;
use meridian_proto::v3electionpb::LeaderRequest;
use meridian_proto::v3lockpb::lock_server::Lock;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::Status;

use super::auth::service::AuthService;
use super::kv::KvService;
use super::lease::service::{keep_alive_once, LeaseService};
use super::maintenance::MaintenanceService;
use super::membership::ClusterService;
use super::recipes::{ElectionService, LockService};
use super::watch::hub::HeaderFn;
use super::watch::service::{created_response, permitted, spec_of};
use super::watch::WatchHub;

/// The largest JSON body taken (a request is at most `--max-request-bytes`
/// as protobuf; base64 and names make JSON about twice that).
const MAX_BODY: usize = 8 << 20;
/// Watch streams of JSON clients, numbered apart from gRPC clients' streams.
static NEXT_STREAM: AtomicU64 = AtomicU64::new(3 << 61);

/// The services the gateway calls.
pub struct JsonApi {
    pub kv: Arc<KvService>,
    pub lease: Arc<LeaseService>,
    pub maintenance: Arc<MaintenanceService>,
    pub cluster: Arc<ClusterService>,
    pub auth: Arc<AuthService>,
    pub lock: Arc<LockService>,
    pub election: Arc<ElectionService>,
    pub hub: WatchHub,
    pub header: HeaderFn,
}

/// grpc-gateway's HTTP status for a gRPC code.
fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        Ok => StatusCode::OK,
        Cancelled => StatusCode::REQUEST_TIMEOUT,
        InvalidArgument | OutOfRange => StatusCode::BAD_REQUEST,
        DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        NotFound => StatusCode::NOT_FOUND,
        AlreadyExists | Aborted => StatusCode::CONFLICT,
        PermissionDenied => StatusCode::FORBIDDEN,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Unknown | Internal | DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// etcd's CORS headers, on every answer of the gateway.
fn cors(headers: &mut HeaderMap) {
    headers.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    headers.insert("access-control-allow-methods", HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"));
    headers.insert("access-control-allow-headers", HeaderValue::from_static("accept, content-type, authorization"));
}

fn json(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    cors(resp.headers_mut());
    resp
}

fn error(status: &Status) -> Response {
    // In grpc-gateway's order: error, message, code.
    let message = serde_json::Value::from(status.message()).to_string();
    let body = format!(r#"{{"error":{message},"message":{message},"code":{}}}"#, status.code() as i32);
    json(http_status(status.code()), body.into_bytes())
}

/// The request a body holds: empty is the default message.
fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Status> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// A gRPC request carrying the caller's credentials as metadata.
fn request<T>(msg: T, headers: &HeaderMap) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        if let Ok(v) = v.parse() {
            req.metadata_mut().insert("authorization", v);
        }
    }
    req
}

async fn unary<Req, Resp, F, Fut>(headers: HeaderMap, body: Bytes, call: F) -> Response
where
    Req: DeserializeOwned + Default,
    Resp: Serialize,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let req = match parse::<Req>(&body) {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    match call(request(req, &headers)).await {
        Ok(resp) => match serde_json::to_vec(resp.get_ref()) {
            Ok(body) => json(StatusCode::OK, body),
            Err(e) => error(&Status::internal(e.to_string())),
        },
        Err(status) => error(&status),
    }
}

/// One route: `POST <prefix><path>` for both prefixes, calling `$svc.$method`.
macro_rules! route {
    ($router:ident, $api:ident, $path:literal, $svc:ident, $trait:ident :: $method:ident) => {{
        for prefix in ["/v3", "/v3beta"] {
            let api = $api.clone();
            $router = $router.route(
                &format!("{prefix}{}", $path),
                post(move |headers: HeaderMap, body: Bytes| {
                    let api = api.clone();
                    async move { unary(headers, body, |r| async move { $trait::$method(&*api.$svc, r).await }).await }
                }),
            );
        }
    }};
}

/// Adds etcd's JSON gateway to `router`.
pub fn routes(into: Router, api: Arc<JsonApi>) -> Router {
    let mut router = Router::new();
    route!(router, api, "/kv/range", kv, Kv::range);
    route!(router, api, "/kv/put", kv, Kv::put);
    route!(router, api, "/kv/deleterange", kv, Kv::delete_range);
    route!(router, api, "/kv/txn", kv, Kv::txn);
    route!(router, api, "/kv/compaction", kv, Kv::compact);
    route!(router, api, "/lease/grant", lease, Lease::lease_grant);
    route!(router, api, "/lease/revoke", lease, Lease::lease_revoke);
    route!(router, api, "/kv/lease/revoke", lease, Lease::lease_revoke);
    route!(router, api, "/lease/timetolive", lease, Lease::lease_time_to_live);
    route!(router, api, "/kv/lease/timetolive", lease, Lease::lease_time_to_live);
    route!(router, api, "/lease/leases", lease, Lease::lease_leases);
    route!(router, api, "/kv/lease/leases", lease, Lease::lease_leases);
    route!(router, api, "/cluster/member/add", cluster, Cluster::member_add);
    route!(router, api, "/cluster/member/remove", cluster, Cluster::member_remove);
    route!(router, api, "/cluster/member/update", cluster, Cluster::member_update);
    route!(router, api, "/cluster/member/list", cluster, Cluster::member_list);
    route!(router, api, "/cluster/member/promote", cluster, Cluster::member_promote);
    route!(router, api, "/maintenance/alarm", maintenance, Maintenance::alarm);
    route!(router, api, "/maintenance/status", maintenance, Maintenance::status);
    route!(router, api, "/maintenance/defragment", maintenance, Maintenance::defragment);
    route!(router, api, "/maintenance/hash", maintenance, Maintenance::hash_kv);
    route!(router, api, "/maintenance/transfer-leadership", maintenance, Maintenance::move_leader);
    route!(router, api, "/auth/enable", auth, Auth::auth_enable);
    route!(router, api, "/auth/disable", auth, Auth::auth_disable);
    route!(router, api, "/auth/authenticate", auth, Auth::authenticate);
    route!(router, api, "/auth/user/add", auth, Auth::user_add);
    route!(router, api, "/auth/user/get", auth, Auth::user_get);
    route!(router, api, "/auth/user/list", auth, Auth::user_list);
    route!(router, api, "/auth/user/delete", auth, Auth::user_delete);
    route!(router, api, "/auth/user/changepw", auth, Auth::user_change_password);
    route!(router, api, "/auth/user/grant", auth, Auth::user_grant_role);
    route!(router, api, "/auth/user/revoke", auth, Auth::user_revoke_role);
    route!(router, api, "/auth/role/add", auth, Auth::role_add);
    route!(router, api, "/auth/role/get", auth, Auth::role_get);
    route!(router, api, "/auth/role/list", auth, Auth::role_list);
    route!(router, api, "/auth/role/delete", auth, Auth::role_delete);
    route!(router, api, "/auth/role/grant", auth, Auth::role_grant_permission);
    route!(router, api, "/auth/role/revoke", auth, Auth::role_revoke_permission);
    route!(router, api, "/lock/lock", lock, Lock::lock);
    route!(router, api, "/lock/unlock", lock, Lock::unlock);
    route!(router, api, "/election/campaign", election, Election::campaign);
    route!(router, api, "/election/proclaim", election, Election::proclaim);
    route!(router, api, "/election/leader", election, Election::leader);
    route!(router, api, "/election/resign", election, Election::resign);
    for prefix in ["/v3", "/v3beta"] {
        let (api2, api3, api4, api5) = (api.clone(), api.clone(), api.clone(), api.clone());
        router = router
            .route(
                &format!("{prefix}/watch"),
                post(move |headers: HeaderMap, body: Bytes| watch(api2.clone(), headers, body)),
            )
            .route(
                &format!("{prefix}/lease/keepalive"),
                post(move |headers: HeaderMap, body: Bytes| keep_alive(api3.clone(), headers, body)),
            )
            .route(
                &format!("{prefix}/election/observe"),
                post(move |headers: HeaderMap, body: Bytes| observe(api4.clone(), headers, body)),
            )
            .route(
                &format!("{prefix}/maintenance/snapshot"),
                post(move |headers: HeaderMap, body: Bytes| snapshot(api5.clone(), headers, body)),
            )
            // An unknown path is 404, as etcd's gateway answers it (not a gRPC status).
            .route(&format!("{prefix}/{{*rest}}"), axum::routing::any(not_found));
    }
    // A learner serves status and ranges only (a linearizable range is
    // refused by the KV service), as through gRPC.
    let status = api.kv.server.raft.status().clone();
    let router =
        router.layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            let learner = status.is_learner();
            async move {
                let path = req.uri().path();
                let served = ["/maintenance/status", "/kv/range"].iter().any(|p| path.ends_with(p));
                if learner && !served {
                    return error(&Status::from(crate::error::Error::NotSupportedForLearner));
                }
                next.run(req).await
            }
        }));
    // Bodies up to MAX_BODY (axum's default limit, 2 MiB, is below a
    // largest request in base64).
    into.merge(router.layer(axum::extract::DefaultBodyLimit::max(MAX_BODY)))
}

async fn not_found() -> Response {
    let mut resp = (StatusCode::NOT_FOUND, "Not Found\n").into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    cors(resp.headers_mut());
    resp
}

/// grpc-gateway's line for an error in a stream.
fn stream_error(status: &Status) -> Bytes {
    let message = serde_json::Value::from(status.message()).to_string();
    let http = http_status(status.code());
    Bytes::from(format!(
        "{{\"error\":{{\"grpc_code\":{},\"http_code\":{},\"message\":{message},\"http_status\":{:?}}}}}\n",
        status.code() as i32,
        http.as_u16(),
        http.canonical_reason().unwrap_or_default(),
    ))
}

/// An answer that streams `lines` as they come.
fn streamed(lines: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Response {
    let mut resp = Response::new(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(lines)));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    cors(resp.headers_mut());
    resp
}

/// `/v3/lease/keepalive`: one answer line per `{"ID": ...}` in the body,
/// as the gRPC stream answers them; the first error ends it.
async fn keep_alive(api: Arc<JsonApi>, headers: HeaderMap, body: Bytes) -> Response {
    let who = match api.lease.server.auth_info(request((), &headers).metadata()).await {
        Ok(who) => who,
        Err(e) => return error(&Status::from(e)),
    };
    let mut ids = Vec::new();
    for msg in serde_json::Deserializer::from_slice(&body).into_iter::<LeaseKeepAliveRequest>() {
        match msg {
            Ok(r) => ids.push(r.id),
            Err(e) => return error(&Status::invalid_argument(e.to_string())),
        }
    }
    let mut out = Vec::new();
    for id in ids {
        match keep_alive_once(&api.lease.server, &api.lease.leader, &who, id).await {
            Ok(r) => out.extend_from_slice(&stream_line(&r)),
            Err(status) => {
                out.extend_from_slice(&stream_error(&status));
                break;
            }
        }
    }
    json(StatusCode::OK, out)
}

/// `/v3/election/observe`: the leader and each value it proclaims, one
/// line each, while the client stays.
async fn observe(api: Arc<JsonApi>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse::<LeaderRequest>(&body) {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    match Election::observe(&*api.election, request(req, &headers)).await {
        Ok(s) => lines(s.into_inner()),
        Err(status) => error(&status),
    }
}

/// `/v3/maintenance/snapshot`: the backend file, a `{"result": ...}` line
/// per chunk as the gRPC stream sends them (blobs in base64).
async fn snapshot(api: Arc<JsonApi>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse::<SnapshotRequest>(&body) {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    match Maintenance::snapshot(&*api.maintenance, request(req, &headers)).await {
        Ok(s) => lines(s.into_inner()),
        Err(status) => error(&status),
    }
}

/// A server stream as grpc-gateway answers it: one line per message while
/// the client stays; an error is the last line.
fn lines<T, S>(mut stream: S) -> Response
where
    T: Serialize + Send + 'static,
    S: futures::Stream<Item = Result<T, Status>> + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some(next) = tokio::select! { n = stream.next() => n, _ = tx.closed() => None } {
            let (line, last) = match next {
                Ok(msg) => (stream_line(&msg), false),
                Err(status) => (stream_error(&status), true),
            };
            if tx.send(Ok(line)).await.is_err() || last {
                return;
            }
        }
    });
    streamed(rx)
}

/// `{"result": ...}` and a newline: one message of a stream.
fn stream_line<T: Serialize>(msg: &T) -> Bytes {
    #[derive(Serialize)]
    struct Line<'a, T> {
        result: &'a T,
    }
    let mut line = serde_json::to_vec(&Line { result: msg }).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// `/v3/watch`: every `create_request` in the body becomes a watcher; the
/// answer streams until the client leaves.
async fn watch(api: Arc<JsonApi>, headers: HeaderMap, body: Bytes) -> Response {
    if body.len() > MAX_BODY {
        return error(&Status::invalid_argument("request too large"));
    }
    let mut creates = Vec::new();
    for msg in serde_json::Deserializer::from_slice(&body).into_iter::<WatchRequest>() {
        match msg {
            Ok(WatchRequest { request_union: Some(RequestUnion::CreateRequest(c)) }) => creates.push(c),
            Ok(_) => {}
            Err(e) => return error(&Status::invalid_argument(e.to_string())),
        }
    }
    let stream = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
    let (out, mut events) = mpsc::channel(64);
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let (hub, header) = (api.hub.clone(), api.header.clone());
    let metadata = request((), &headers).metadata().clone();
    let auth = api.kv.server.auth.clone();
    tokio::spawn(async move {
        let _close = Close(hub.clone(), stream);
        for c in creates {
            let created = match permitted(&auth, &metadata, &c) {
                Ok(()) => hub.create(stream, spec_of(&c), out.clone()),
                Err(reason) => Err(reason),
            };
            if tx.send(Ok(stream_line(&created_response(&header, &created)))).await.is_err() {
                return;
            }
            if let Ok((id, _)) = created {
                hub.announce(stream, id);
            }
        }
        drop(out);
        loop {
            let next = tokio::select! {
                e = events.recv() => e,
                _ = tx.closed() => return,
            };
            match next {
                Some(Ok(msg)) => {
                    if tx.send(Ok(stream_line(&msg))).await.is_err() {
                        return;
                    }
                }
                Some(Err(status)) => {
                    let _ = tx.send(Ok(stream_error(&status))).await;
                    return;
                }
                None => return,
            }
        }
    });
    streamed(rx)
}

/// Drops a JSON watch stream's watchers.
struct Close(WatchHub, u64);

impl Drop for Close {
    fn drop(&mut self) {
        self.0.close(self.1);
    }
}
