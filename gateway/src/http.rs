//! Plain HTTP beside gRPC: `/health` (a primary takes writes), `/readyz`
//! (every region probed once, and one healthy), `/metrics`, and the admin
//! API `GET /v1/regions`.

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::proxy::Gateway;

pub fn routes(router: Router, gw: Arc<Gateway>) -> Router {
    let (g1, g2, g3, g4) = (gw.clone(), gw.clone(), gw.clone(), gw);
    router
        .route("/health", get(move || health(g1.clone())))
        .route("/readyz", get(move || readyz(g2.clone())))
        .route("/metrics", get(move || metrics(g3.clone())))
        .route("/v1/regions", get(move || regions(g4.clone())))
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
    let body = serde_json::json!({ "gateway": gw.cfg.name, "region": gw.regions.local, "regions": list });
    json(StatusCode::OK, body.to_string())
}
