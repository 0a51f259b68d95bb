//! Two regions for the gateway tests: a 1-member primary (us-east) and a 1-member read-only
//! secondary (eu-west), with a mirror between them and a gateway in eu-west.

use std::time::Duration;

use anyhow::Result;
use meridian_proto::etcdserverpb::RangeRequest;
use tonic::Request;

use crate::{secondary_flags, Cluster, ClusterOpts, GatewayProcess, MirrorProcess};

pub struct TwoRegions {
    pub primary: Cluster,
    pub secondary: Cluster,
    pub mirror: MirrorProcess,
    pub gateway: GatewayProcess,
}

/// The two clusters, with no mirror or gateway yet.
pub fn regions_started() -> Result<(Cluster, Cluster)> {
    let primary = Cluster::start(
        1,
        ClusterOpts { extra_args: ["--region", "us-east"].map(String::from).to_vec(), ..ClusterOpts::fast() },
    )?;
    let secondary =
        Cluster::start(1, ClusterOpts { extra_args: secondary_flags("eu-west", "us-east")?, ..ClusterOpts::fast() })?;
    Ok((primary, secondary))
}

/// Both regions, the mirror and the gateway `gw-eu`, once the gateway knows both regions.
pub fn two_regions() -> Result<TwoRegions> {
    let (primary, secondary) = regions_started()?;
    let mirror = MirrorProcess::start(&primary.endpoints(), &secondary, &[])?;
    let gateway = GatewayProcess::start(
        "gw-eu",
        "eu-west",
        &[("us-east", primary.endpoints()), ("eu-west", secondary.endpoints())],
        &[],
    )?;
    // Both regions probed, the secondary's staleness known (the mirror's heartbeats reached it).
    gateway.wait_every_region_known(Duration::from_secs(20))?;
    Ok(TwoRegions { primary, secondary, mirror, gateway })
}

/// The region that served an answer (`x-meridian-region`).
pub fn served_by<T>(resp: &tonic::Response<T>) -> String {
    resp.metadata().get("x-meridian-region").and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
}

/// A serializable Range of `key`, with `x-meridian-max-staleness` when given.
pub fn serializable(key: &str, max_staleness: Option<&str>) -> Request<RangeRequest> {
    let mut req = Request::new(RangeRequest { key: key.into(), serializable: true, ..Default::default() });
    if let Some(s) = max_staleness {
        req.metadata_mut().insert("x-meridian-max-staleness", s.parse().expect("ascii"));
    }
    req
}

/// A region's smoothed RTT in a `/v1/regions` document (NaN when absent).
pub fn rtt_of(doc: &serde_json::Value, region: &str) -> f64 {
    doc["regions"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == region))
        .and_then(|r| r["rtt_ms"].as_f64())
        .unwrap_or(f64::NAN)
}
