//! etcd's JSON gateway (`POST /v3/...`, `/v3beta/...`) through a gateway:
//! each request goes, as it came, to the JSON gateway of the primary
//! region's leader, and its answer (a stream too: `/v3/watch`,
//! `/v3/election/observe`) comes back as it goes, with `x-meridian-region`.
//! Every JSON call is classed a write: it is rate-limited as one and served
//! by the primary, which is always correct (reads are linearizable), if not
//! the nearest. Members turn the JSON into their gRPC calls.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tonic::transport::server::TcpConnectInfo;
use tonic::Status;

use crate::proxy::Gateway;
use crate::route::Class;

/// How long reaching the member may take (a black-holed member would
/// otherwise hold the client for the kernel's connect timeout).
const DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Answers as etcd's gateway does: `{"error", "message", "code"}`.
fn error(status: &Status, http: StatusCode) -> Response {
    let message = serde_json::Value::from(status.message()).to_string();
    let body = format!(r#"{{"error":{message},"message":{message},"code":{}}}"#, status.code() as i32);
    (http, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub async fn forward(gw: Arc<Gateway>, req: Request) -> Response {
    let conn = req.extensions().get::<TcpConnectInfo>().and_then(|c| c.remote_addr);
    let meta = tonic::metadata::MetadataMap::from_headers(req.headers().clone());
    if let Err(status) = gw.admit(Class::Write, conn, &meta) {
        return error(&status, StatusCode::TOO_MANY_REQUESTS);
    }
    let Some(pick) = gw.regions.primary() else {
        return error(&Status::unavailable(crate::proxy::NO_PRIMARY), StatusCode::SERVICE_UNAVAILABLE);
    };
    let (_, member) = pick.region.channel();
    let Ok(target) = member.parse::<http::Uri>() else {
        return error(&Status::internal(format!("bad member URL {member}")), StatusCode::INTERNAL_SERVER_ERROR);
    };
    let unavailable = |e: String| error(&Status::unavailable(e), StatusCode::SERVICE_UNAVAILABLE);
    let io = match tokio::time::timeout(DIAL_TIMEOUT, gw.cfg.upstream_tls.dial(target.clone())).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => return unavailable(format!("{member}: {e}")),
        Err(_) => return unavailable(format!("{member}: no connection within {DIAL_TIMEOUT:?}")),
    };
    let (mut sender, connection) = match hyper::client::conn::http1::handshake::<_, Body>(io).await {
        Ok(pair) => pair,
        Err(e) => return unavailable(format!("{member}: {e}")),
    };
    tokio::spawn(connection);
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut upstream = http::Request::builder().method(parts.method).uri(path);
    let host = target.authority().map_or("localhost", |a| a.as_str());
    upstream = upstream.header(header::HOST, host);
    for name in [header::CONTENT_TYPE, header::AUTHORIZATION, header::ACCEPT] {
        if let Some(v) = parts.headers.get(&name) {
            upstream = upstream.header(name, v.clone());
        }
    }
    let Ok(upstream) = upstream.body(body) else {
        return error(&Status::invalid_argument("bad request"), StatusCode::BAD_REQUEST);
    };
    match sender.send_request(upstream).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            if let Ok(v) = HeaderValue::from_str(&pick.region.name) {
                parts.headers.insert("x-meridian-region", v);
            }
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => unavailable(format!("{member}: {e}")),
    }
}
