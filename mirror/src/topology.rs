//! Which region to mirror from, asked again before every session: with
//! several `--source` regions, the one that says it is the primary with the
//! highest epoch; none while the target itself is that primary (the mirror
//! idles). One source is followed whatever it says, as before (it may be an
//! etcd cluster, or a secondary that a mirror chain reads from).

use std::time::Duration;

use meridian_proto::meridian::v1::region_client::RegionClient as RegionRpc;
use meridian_proto::meridian::v1::{RegionStatusRequest, RegionStatusResponse};
use meridian_wire::region::RegionClient;
use meridian_wire::tls::ClientTls;

use crate::config::MirrorConfig;

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the next session does.
#[derive(Debug, PartialEq)]
pub enum Choice {
    /// Mirror from these endpoints.
    Follow(Vec<String>),
    /// Mirror nothing, for this reason (the target is the primary).
    Idle(String),
}

/// A region's `Region.Status`, through its leader; `None` when no member
/// answers or it has no Region service (etcd).
pub async fn region_status(endpoints: &[String], tls: &ClientTls) -> Option<RegionStatusResponse> {
    let region = RegionClient::connect(endpoints, PROBE_TIMEOUT, tls).await.ok()?;
    let mut rpc = RegionRpc::new(region.channel().0);
    let status = tokio::time::timeout(PROBE_TIMEOUT, rpc.status(RegionStatusRequest {})).await.ok()?;
    status.ok().map(tonic::Response::into_inner)
}

/// Picks the source for the next session.
///
/// # Errors
///
/// None: a region that does not answer is left out, and with none to follow
/// the mirror idles.
pub async fn choose(cfg: &MirrorConfig) -> anyhow::Result<Choice> {
    let target = region_status(&cfg.target, &cfg.target_tls).await;
    if cfg.sources.len() == 1 {
        if let Some(t) = target.filter(|t| t.role == "primary") {
            return Ok(Choice::Idle(format!("the target region {:?} is the primary (epoch {})", t.region, t.epoch)));
        }
        return Ok(Choice::Follow(cfg.sources[0].clone()));
    }
    let probes = cfg.sources.iter().map(|eps| async move { (eps, region_status(eps, &cfg.source_tls).await) });
    let answers = futures::future::join_all(probes).await;
    let best = answers
        .iter()
        .filter_map(|(eps, s)| s.as_ref().filter(|s| s.role == "primary").map(|s| (*eps, s)))
        .max_by_key(|(_, s)| s.epoch);
    match (best, &target) {
        (_, Some(t)) if t.role == "primary" && best.is_none_or(|(_, b)| t.epoch >= b.epoch) => {
            Ok(Choice::Idle(format!("the target region {:?} is the primary (epoch {})", t.region, t.epoch)))
        }
        (Some((eps, _)), _) => Ok(Choice::Follow(eps.clone())),
        (None, _) => {
            let seen: Vec<String> = answers
                .iter()
                .map(|(eps, s)| match s {
                    Some(s) => format!("{} is a {} at epoch {}", s.region, s.role, s.epoch),
                    None => format!("{} does not answer", eps.join(",")),
                })
                .collect();
            // Between a demotion and a promotion, or while the primary is
            // lost: wait and look again.
            Ok(Choice::Idle(format!("no source region is a reachable primary ({})", seen.join("; "))))
        }
    }
}
