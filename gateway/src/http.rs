//! Plain HTTP beside gRPC: `/health` (a primary takes writes), `/readyz`
//! (every region probed once, and one healthy), `/metrics`, the admin API
//! `GET /v1/regions` and `GET /v1/dashboard?since=N`, and the lag dashboard
//! at `/dashboard` (see `dashboard`); etcd's JSON gateway (`/v3/...`) is
//! forwarded to the primary's leader (see `json`).

use std::sync::Arc;

use axum::http::{header, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::dashboard::{self, History};
use crate::proxy::Gateway;

pub fn routes(router: Router, gw: Arc<Gateway>, history: Arc<History>) -> Router {
    let (g1, g2, g3, g4, g5, g6) = (gw.clone(), gw.clone(), gw.clone(), gw.clone(), gw.clone(), gw);
    let json = move |req: axum::extract::Request| crate::json::forward(g6.clone(), req);
    router
        .route("/v3/{*rest}", axum::routing::any(json.clone()))
        .route("/v3beta/{*rest}", axum::routing::any(json))
        .route("/health", get(move || health(g1.clone())))
        .route("/readyz", get(move || readyz(g2.clone())))
        .route("/metrics", get(move || metrics(g3.clone())))
        .route("/v1/regions", get(move || regions(g4.clone())))
        .route("/v1/dashboard", get(move |uri: Uri| dashboard_data(g5.clone(), history.clone(), uri)))
        .route("/dashboard", get(|| asset("text/html; charset=utf-8", dashboard::PAGE)))
        .route("/dashboard/dashboard.js", get(|| asset("text/javascript; charset=utf-8", dashboard::SCRIPT)))
        .route("/dashboard/dashboard.css", get(|| asset("text/css; charset=utf-8", dashboard::STYLE)))
}

/// One of the dashboard's compiled-in files; the policy keeps the page from
/// loading anything that is not this gateway's.
async fn asset(content_type: &'static str, body: &'static str) -> axum::response::Response {
    let policy = "default-src 'self'; img-src 'self' data:";
    ([(header::CONTENT_TYPE, content_type), (header::CONTENT_SECURITY_POLICY, policy)], body).into_response()
}

fn json(code: StatusCode, body: String) -> axum::response::Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn health(gw: Arc<Gateway>) -> axum::response::Response {
    match gw.regions.primary() {
        Some(p) => {
            json(StatusCode::OK, format!(r#"{{"health":"true","primary":{}}}"#, serde_json::json!(p.region.name)))
        }
        None => json(StatusCode::SERVICE_UNAVAILABLE, r#"{"health":"false","reason":"no primary region"}"#.into()),
    }
}

async fn readyz(gw: Arc<Gateway>) -> axum::response::Response {
    let ready = gw.regions.probed() && gw.regions.nearest(|_| true).is_some();
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json(code, format!(r#"{{"ready":{ready}}}"#))
}

async fn metrics(gw: Arc<Gateway>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], gw.metrics.render())
}

/// Every region as the probes see it; the fields are documented in the README.
async fn regions(gw: Arc<Gateway>) -> axum::response::Response {
    json(StatusCode::OK, regions_doc(&gw).to_string())
}

/// What the dashboard shows: the regions now, the RTT matrix (this
/// gateway's row and its peers'), and the samples and events after
/// `?since=N`; `seq` is the next call's `since`. Fields in the README.
async fn dashboard_data(gw: Arc<Gateway>, history: Arc<History>, uri: Uri) -> axum::response::Response {
    let since = uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("since=")?.parse::<u64>().ok())
        .unwrap_or(0);
    let dashboard::Since { samples, events, peers: mut rtt, seq } = history.since(since);
    let own = gw.regions.all.iter().map(|r| (r.name.clone(), (r.state().rtt_ms * 1000.0).round() / 1000.0)).collect();
    rtt.insert(gw.regions.local.clone(), own);
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let mut doc = regions_doc(&gw);
    doc["now_ms"] = serde_json::json!(now_ms);
    doc["window_seconds"] = serde_json::json!(dashboard::WINDOW.as_secs());
    doc["seq"] = serde_json::json!(seq);
    doc["started_ms"] = serde_json::json!(history.started_ms);
    doc["rtt_ms"] = serde_json::json!(rtt);
    doc["samples"] = serde_json::json!(samples);
    doc["events"] = serde_json::json!(events);
    json(StatusCode::OK, doc.to_string())
}

fn regions_doc(gw: &Gateway) -> serde_json::Value {
    let primary = gw.regions.primary().map(|p| p.region.name.clone());
    let list: Vec<serde_json::Value> = gw
        .regions
        .all
        .iter()
        .map(|r| {
            let st = r.state();
            serde_json::json!({
                "name": r.name,
                "local": r.name == gw.regions.local,
                "takes_writes": primary.as_deref() == Some(r.name.as_str()),
                "role": st.role,
                "epoch": st.epoch,
                "endpoints": r.client.members.iter().map(|m| m.url.clone()).collect::<Vec<_>>(),
                "leader": st.leader,
                "leader_url": st.leader_url,
                "healthy": st.healthy,
                "rtt_ms": (st.rtt_ms * 1000.0).round() / 1000.0,
                "revision": st.revision,
                "lag_revisions": st.lag_revisions,
                "staleness_seconds": st.staleness_seconds,
                "error": st.error,
            })
        })
        .collect();
    serde_json::json!({ "gateway": gw.cfg.name, "region": gw.regions.local, "regions": list })
}
