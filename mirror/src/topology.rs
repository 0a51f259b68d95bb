//! Which region to mirror from, asked again before every session: with
//! several `--source` regions, the one that says it is the primary with the
//! highest epoch; none while the target itself is that primary (the mirror
//! idles). One source is followed whatever it says, as before (it may be an
//! etcd cluster, or a secondary that a mirror chain reads from). A session
//! on a chosen source ends once that source is not the primary at the epoch
//! the session started with ([`moved`]).

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

/// Whether a session that started on a source at `epoch`, with the target
/// at `checkpoint`, must end now that the source's status is `s`; why, if
/// so. Every promotion and demotion raises a cluster's epoch, so an epoch
/// other than the session's means the source changed role since, even when
/// both changes fell between two looks (demoted, then promoted again): the
/// session would go on stamping its old epoch on the target. A source that
/// is the primary again at another epoch is left at once (the next session
/// starts on it again, at its epoch). A source that is no longer the
/// primary is drained first, up to its fence: the last revision it wrote as
/// the primary. What it holds after that, when it follows the new primary,
/// is the new primary's to send.
pub fn moved(epoch: u64, checkpoint: i64, s: &RegionStatusResponse) -> Option<String> {
    if s.role == "primary" {
        return (s.epoch != epoch).then(|| {
            format!("the source region {:?} is the primary at epoch {}, not at epoch {epoch}", s.region, s.epoch)
        });
    }
    let own_up_to = if s.fence_revision > 0 { s.fence_revision.min(s.revision) } else { s.revision };
    (checkpoint >= own_up_to)
        .then(|| format!("the source region {:?} is now a {} at epoch {}", s.region, s.role, s.epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(role: &str, epoch: u64, fence_revision: i64, revision: i64) -> RegionStatusResponse {
        RegionStatusResponse {
            region: "us-east".into(),
            role: role.into(),
            epoch,
            fence_revision,
            revision,
            ..Default::default()
        }
    }

    #[test]
    fn a_session_ends_when_its_source_leaves_the_epoch_it_started_at() {
        // Still the primary it started on: go on.
        assert_eq!(moved(0, 5, &status("primary", 0, 0, 9)), None);
        // Demoted at revision 5 (epoch 1): drained up to the fence, whatever
        // it got since from the new primary's mirror.
        assert_eq!(moved(0, 4, &status("secondary", 1, 5, 5)), None, "not drained yet");
        assert!(moved(0, 5, &status("secondary", 1, 5, 5)).is_some());
        assert!(moved(0, 5, &status("secondary", 1, 5, 7)).is_some(), "it follows the new primary");
        assert!(moved(0, 7, &status("secondary", 1, 5, 7)).is_some(), "got some through it");
        // Demoted and promoted again between two looks: the primary, but at
        // epoch 2, not the session's 0; the next session starts at epoch 2.
        assert!(moved(0, 9, &status("primary", 2, 9, 9)).is_some());
        assert!(moved(0, 3, &status("primary", 2, 9, 10)).is_some(), "no drain: the same source goes on");
        assert_eq!(moved(2, 10, &status("primary", 2, 9, 10)), None);
    }
}
