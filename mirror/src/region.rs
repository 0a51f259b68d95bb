//! `meridian region`: the region state of a cluster (status), an unplanned
//! promotion of a secondary (promote), a planned switchover with no lost
//! write (switchover), and the return of a failed old primary as a
//! secondary, with a report of every write it drops (rejoin). Each change is one call to the cluster's
//! `meridian.v1.Region` service, which makes it one raft entry.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use meridian_proto::meridian::v1::region_client::RegionClient as RegionRpc;
use meridian_proto::meridian::v1::{
    DemoteRequest, KvRecord, PromoteRequest, RegionStatusRequest, RegionStatusResponse,
};
use meridian_wire::lineage::fence_between;
use meridian_wire::region::RegionClient;
use meridian_wire::token::TOKEN_METADATA;
use serde_json::json;
use tonic::transport::Channel;

use crate::config::endpoints;

/// How long the old primary may still take writes after the mirror last
/// heard from it: the primary lease a primary holds (5 s) plus a margin for
/// clock drift. A promotion sooner than that may split the brain.
pub const PRIMARY_LEASE_AND_DRIFT: Duration = Duration::from_secs(6);

#[derive(clap::Args, Debug, Clone)]
pub struct RegionStatusFlags {
    /// The cluster's endpoints, comma-separated host:port or URLs.
    #[arg(long)]
    pub endpoints: String,
    /// Output format: simple (for a person) or json (for a program).
    #[arg(long, short = 'w', default_value = "simple")]
    pub write_out: String,
    /// For https:// endpoints.
    #[command(flatten)]
    pub tls: meridian_wire::tls::TlsFlags,
}

#[derive(clap::Args, Debug, Clone)]
pub struct PromoteFlags {
    /// The secondary's endpoints.
    #[arg(long)]
    pub endpoints: String,
    /// Promote even though writes may be lost: the RPO is unknown or above zero, or the old
    /// primary was heard from too recently to be sure it stopped taking writes.
    #[arg(long)]
    pub allow_data_loss: bool,
    /// The cluster's --mirror-token-file: region changes need it.
    #[arg(long, env = "MERIDIAN_MIRROR_TOKEN_FILE")]
    pub mirror_token_file: PathBuf,
    /// For https:// endpoints.
    #[command(flatten)]
    pub tls: meridian_wire::tls::TlsFlags,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SwitchoverFlags {
    /// The primary's endpoints.
    #[arg(long)]
    pub from: String,
    /// The endpoints of the secondary that takes over.
    #[arg(long)]
    pub to: String,
    /// The --mirror-token-file both clusters were given.
    #[arg(long, env = "MERIDIAN_MIRROR_TOKEN_FILE")]
    pub mirror_token_file: PathBuf,
    /// How long the new primary may take to apply the old one's last revision (a Go
    /// duration); past it the old primary is restored and nothing changes.
    #[arg(long, default_value = "30s")]
    pub timeout: String,
    /// For https:// endpoints.
    #[command(flatten)]
    pub tls: meridian_wire::tls::TlsFlags,
}

/// One cluster, through its leader.
struct Cluster {
    /// The leader's connection (or the first member that answered).
    channel: Channel,
    rpc: RegionRpc<Channel>,
    token: Option<tonic::metadata::AsciiMetadataValue>,
}

impl Cluster {
    async fn connect(
        flag: &str,
        eps: &str,
        token_file: Option<&PathBuf>,
        tls: &meridian_wire::tls::TlsFlags,
    ) -> anyhow::Result<Self> {
        let urls = endpoints(flag, eps)?;
        let tls = tls.load().map_err(anyhow::Error::msg)?;
        let region = RegionClient::connect(&urls, Duration::from_secs(3), &tls)
            .await
            .map_err(|e| anyhow::anyhow!("{flag}: no member answers: {e}"))?;
        let token = match token_file {
            Some(f) => {
                let t = meridian_wire::token::read_token(f).map_err(anyhow::Error::msg)?;
                Some(t.parse().context("the mirror token is not valid gRPC metadata")?)
            }
            None => None,
        };
        let channel = region.channel().0;
        Ok(Self { rpc: RegionRpc::new(channel.clone()), channel, token })
    }

    async fn status(&mut self) -> anyhow::Result<RegionStatusResponse> {
        Ok(self.rpc.status(RegionStatusRequest {}).await.map_err(status_error)?.into_inner())
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            req.metadata_mut().insert(TOKEN_METADATA, t.clone());
        }
        req
    }

    async fn promote(&mut self, epoch: u64, expect_revision: i64) -> anyhow::Result<RegionStatusResponse> {
        let req = self.request(PromoteRequest { epoch, expect_revision });
        Ok(self.rpc.promote(req).await.map_err(status_error)?.into_inner())
    }

    async fn demote(&mut self, epoch: u64, region: &str, cluster_id: u64) -> anyhow::Result<RegionStatusResponse> {
        let req = self.request(DemoteRequest {
            epoch,
            primary_region: region.into(),
            primary_cluster_id: cluster_id,
            ..Default::default()
        });
        Ok(self.rpc.demote(req).await.map_err(status_error)?.into_inner())
    }
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

fn cluster_id(s: &RegionStatusResponse) -> u64 {
    s.header.as_ref().map_or(0, |h| h.cluster_id)
}

/// The status as `-w json` prints it (ids in hex, as etcdctl's simple output).
pub fn status_json(s: &RegionStatusResponse) -> serde_json::Value {
    json!({
        "region": s.region,
        "role": s.role,
        "epoch": s.epoch,
        "fence_revision": s.fence_revision,
        "revision": s.revision,
        "cluster_id": format!("{:x}", cluster_id(s)),
        "primary_region": s.primary_region,
        "source_cluster_id": format!("{:x}", s.source_cluster_id),
        "source_revision": s.source_revision,
        "heard_ms_ago": s.heard_ms_ago,
        "staleness_ms": s.staleness_ms,
        "primary_lease_ms": s.primary_lease_ms,
        "lineage": s.lineage.iter().map(|l| json!({
            "epoch": l.epoch,
            "first_revision": l.first_revision,
            "primary_cluster_id": format!("{:x}", l.primary_cluster_id),
            "region": l.region,
        })).collect::<Vec<_>>(),
    })
}

fn print_simple(s: &RegionStatusResponse) {
    println!("region:          {}", s.region);
    if s.role == "primary" {
        println!("role:            primary (cluster {:x})", cluster_id(s));
    } else {
        println!(
            "role:            secondary of {:?} (source cluster {:x}; cluster {:x})",
            s.primary_region,
            s.source_cluster_id,
            cluster_id(s)
        );
    }
    println!("epoch:           {}", s.epoch);
    println!("fence revision:  {}", s.fence_revision);
    println!("revision:        {}", s.revision);
    for (i, l) in s.lineage.iter().enumerate() {
        println!(
            "{}epoch {} from revision {}: cluster {:x} ({})",
            if i == 0 { "lineage:         " } else { "                 " },
            l.epoch,
            l.first_revision,
            l.primary_cluster_id,
            l.region
        );
    }
    if s.role == "secondary" {
        let heard = match s.heard_ms_ago {
            ms if ms < 0 => "never".to_string(),
            ms => format!("{:.3} s ago", ms as f64 / 1000.0),
        };
        println!("mirror:          source revision {}, heard {heard}", s.source_revision);
    }
}

/// `meridian region status`.
///
/// # Errors
///
/// No member answers, or an unknown output format.
pub async fn status(flags: &RegionStatusFlags) -> anyhow::Result<()> {
    let json = match flags.write_out.as_str() {
        "simple" => false,
        "json" => true,
        other => bail!("unsupported output format {other:?}: use simple or json"),
    };
    let s = Cluster::connect("--endpoints", &flags.endpoints, None, &flags.tls).await?.status().await?;
    if json {
        println!("{}", status_json(&s));
    } else {
        print_simple(&s);
    }
    Ok(())
}

/// What a promotion of a secondary in state `s` would lose, at most, as far
/// as the secondary knows: the newest source revision the mirror reported
/// minus the revision it has applied. `None` when the mirror never reported.
pub fn rpo_bound(s: &RegionStatusResponse) -> Option<i64> {
    (s.source_revision > 0).then(|| (s.source_revision - s.revision).max(0))
}

/// Why a promotion of `s` without `--allow-data-loss` must not go ahead.
pub fn promote_refusal(s: &RegionStatusResponse) -> Option<String> {
    let Some(bound) = rpo_bound(s) else {
        return Some("the RPO is unknown: the mirror never reported a source revision to this secondary".into());
    };
    if bound > 0 {
        return Some(format!(
            "revisions {}..={} that the old primary committed are not here and would be lost",
            s.revision + 1,
            s.source_revision
        ));
    }
    let heard = u64::try_from(s.heard_ms_ago).ok().map(Duration::from_millis);
    if let Some(ago) = heard.filter(|ago| *ago < PRIMARY_LEASE_AND_DRIFT) {
        return Some(format!(
            "the old primary may still be taking writes: the mirror heard from it {:.1} s ago, less than its \
             primary lease plus drift ({} s); fence it with `meridian region switchover`, or wait",
            ago.as_secs_f64(),
            PRIMARY_LEASE_AND_DRIFT.as_secs()
        ));
    }
    None
}

/// `meridian region promote`.
///
/// # Errors
///
/// The cluster is not a secondary, a refusal without `--allow-data-loss`,
/// or the promotion failed.
pub async fn promote(flags: &PromoteFlags) -> anyhow::Result<()> {
    let mut c = Cluster::connect("--endpoints", &flags.endpoints, Some(&flags.mirror_token_file), &flags.tls).await?;
    let s = c.status().await?;
    if s.role != "secondary" {
        bail!("region {:?} is already the primary (epoch {})", s.region, s.epoch);
    }
    match rpo_bound(&s) {
        Some(bound) => println!(
            "RPO bound: {bound} revisions (the mirror last reported source revision {}; this secondary has {})",
            s.source_revision, s.revision
        ),
        None => println!("RPO bound: unknown (the mirror never reported a source revision)"),
    }
    if let Some(why) = promote_refusal(&s) {
        if !flags.allow_data_loss {
            bail!("not promoting region {:?}: {why}; pass --allow-data-loss to promote anyway", s.region);
        }
        println!("--allow-data-loss: promoting although {why}");
    }
    let started = Instant::now();
    let done = c.promote(s.epoch + 1, s.revision).await?;
    println!(
        "promoted: region {:?} is the primary at epoch {}, fence revision {}; new writes go on at revision {} ({} ms)",
        done.region,
        done.epoch,
        done.fence_revision,
        done.fence_revision + 1,
        started.elapsed().as_millis()
    );
    Ok(())
}

/// `meridian region switchover`: fence the old primary, wait for the new
/// one to hold its last revision, promote the new one. Nothing is lost.
///
/// # Errors
///
/// The regions are not a primary and its secondary, or a step failed (the
/// message says what state each region was left in).
pub async fn switchover(flags: &SwitchoverFlags) -> anyhow::Result<()> {
    let timeout = meridian_wire::duration::parse_duration(&flags.timeout)
        .ok_or_else(|| anyhow::anyhow!("invalid --timeout {:?}: want a duration like 30s", flags.timeout))?;
    let token = Some(&flags.mirror_token_file);
    let mut old = Cluster::connect("--from", &flags.from, token, &flags.tls).await?;
    let mut new = Cluster::connect("--to", &flags.to, token, &flags.tls).await?;
    let (o, n) = (old.status().await?, new.status().await?);
    if o.role != "primary" {
        bail!("--from is region {:?}, a {}, not the primary", o.region, o.role);
    }
    if n.role != "secondary" || n.source_cluster_id != cluster_id(&o) {
        bail!(
            "--to is region {:?}, which does not mirror the primary {:?} (it is a {} following cluster {:x})",
            n.region,
            o.region,
            n.role,
            n.source_cluster_id
        );
    }
    let epoch = o.epoch.max(n.epoch) + 1;
    let started = Instant::now();
    let fenced = old.demote(epoch, &n.region, cluster_id(&n)).await?;
    let fence = fenced.fence_revision;
    println!("fenced: region {:?} is a secondary at epoch {epoch}; its last revision is {fence}", o.region);
    let deadline = Instant::now() + timeout;
    loop {
        let now = new.status().await?;
        if now.revision >= fence {
            break;
        }
        if Instant::now() >= deadline {
            // Nothing was written since the fence: the old primary can take
            // over again as it was.
            let back = old.promote(epoch + 1, fence).await;
            let state = match back {
                Ok(b) => format!("region {:?} is the primary again at epoch {}; nothing was lost", o.region, b.epoch),
                Err(e) => format!("restoring region {:?} failed ({e}); it is a fenced secondary", o.region),
            };
            bail!(
                "switchover abandoned: region {:?} reached revision {} of {fence} within {timeout:?} (is its \
                 mirror running?); {state}",
                n.region,
                now.revision
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let promoted = new.promote(epoch, fence).await?;
    // With a topology cluster the new primary takes writes once it holds
    // the primary lease: that is part of the window.
    if promoted.primary_lease_ms >= 0 {
        let lease_deadline = Instant::now() + Duration::from_secs(30);
        while new.status().await?.primary_lease_ms <= 0 {
            if Instant::now() >= lease_deadline {
                bail!("region {:?} was promoted but does not hold the primary lease after 30 s", promoted.region);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let window = started.elapsed();
    println!(
        "promoted: region {:?} is the primary at epoch {}; new writes go on at revision {}",
        promoted.region,
        promoted.epoch,
        fence + 1
    );
    println!("write-unavailability window: {} ms", window.as_millis());
    println!(
        "next: mirror region {:?} into {:?} (meridian mirror --source {} --target {})",
        promoted.region, o.region, flags.to, flags.from
    );
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct RejoinFlags {
    /// The endpoints of the failed old primary (running again, cut off from writes).
    #[arg(long)]
    pub endpoints: String,
    /// The endpoints of the current primary it is to follow.
    #[arg(long)]
    pub primary: String,
    /// Where to write every revision the old primary drops (JSON lines, then a summary line).
    #[arg(long)]
    pub report: PathBuf,
    /// The --mirror-token-file both clusters were given.
    #[arg(long, env = "MERIDIAN_MIRROR_TOKEN_FILE")]
    pub mirror_token_file: PathBuf,
    /// For https:// endpoints.
    #[command(flatten)]
    pub tls: meridian_wire::tls::TlsFlags,
}

/// A key or value for the report: text when it is UTF-8, else base64 under
/// `<name>_base64`.
fn bytes_field(map: &mut serde_json::Map<String, serde_json::Value>, name: &str, b: &[u8]) {
    use base64::Engine as _;
    match std::str::from_utf8(b) {
        Ok(s) => map.insert(name.into(), s.into()),
        Err(_) => map.insert(format!("{name}_base64"), base64::engine::general_purpose::STANDARD.encode(b).into()),
    };
}

fn kv_json(rec: &KvRecord) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    bytes_field(&mut m, "key", &rec.key);
    bytes_field(&mut m, "value", &rec.value);
    m.insert("create_revision".into(), rec.create_revision.into());
    m.insert("mod_revision".into(), rec.main.into());
    m.insert("version".into(), rec.version.into());
    m.insert("lease".into(), rec.lease.into());
    m.into()
}

/// One dropped change as a report line.
fn report_line(rec: &KvRecord, prev: Option<&KvRecord>) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("revision".into(), rec.main.into());
    m.insert("sub".into(), rec.sub.into());
    m.insert("op".into(), if rec.tombstone { "delete" } else { "put" }.into());
    bytes_field(&mut m, "key", &rec.key);
    if !rec.tombstone {
        bytes_field(&mut m, "value", &rec.value);
        m.insert("lease".into(), rec.lease.into());
    }
    m.insert("prev_kv".into(), prev.filter(|p| !p.tombstone).map_or(serde_json::Value::Null, kv_json));
    m.into()
}

/// Every change after `fence` in the old primary's retained history, with
/// the version each one replaced; and whether the history after the fence
/// is whole (nothing compacted away).
async fn dropped_changes(channel: Channel, fence: i64) -> anyhow::Result<(Vec<serde_json::Value>, bool)> {
    use meridian_proto::meridian::v1::mirror_client::MirrorClient;
    use meridian_proto::meridian::v1::RangeStreamRequest;
    let mut stream = MirrorClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .range_stream(RangeStreamRequest { key: vec![0], range_end: vec![0] })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut latest: std::collections::HashMap<Vec<u8>, KvRecord> = std::collections::HashMap::new();
    let mut lines = Vec::new();
    let mut compacted = 0;
    while let Some(chunk) = stream.message().await.map_err(status_error)? {
        compacted = chunk.compact_revision;
        for rec in chunk.records {
            if rec.main > fence {
                lines.push(report_line(&rec, latest.get(&rec.key)));
            }
            latest.insert(rec.key.clone(), rec);
        }
    }
    Ok((lines, compacted <= fence))
}

async fn hash_at(channel: Channel, rev: i64) -> Result<(u32, i64), tonic::Status> {
    use meridian_proto::etcdserverpb::maintenance_client::MaintenanceClient;
    use meridian_proto::etcdserverpb::HashKvRequest;
    let r = MaintenanceClient::new(channel).hash_kv(HashKvRequest { revision: rev }).await?.into_inner();
    Ok((r.hash, r.compact_revision))
}

/// `meridian region rejoin`: turns a failed old primary into a secondary of
/// the current one without a full copy when their histories agree up to the
/// fence, and names every write it drops.
///
/// # Errors
///
/// The lineages do not say where the two parted, the report cannot be
/// written, or a call failed (nothing was changed before the report is on
/// disk).
pub async fn rejoin(flags: &RejoinFlags) -> anyhow::Result<()> {
    let token = Some(&flags.mirror_token_file);
    let mut old = Cluster::connect("--endpoints", &flags.endpoints, token, &flags.tls).await?;
    let mut new = Cluster::connect("--primary", &flags.primary, token, &flags.tls).await?;
    let (o, n) = (old.status().await?, new.status().await?);
    if n.role != "primary" {
        bail!("--primary is region {:?}, a {}, not the primary", n.region, n.role);
    }
    if o.role == "primary" && o.epoch >= n.epoch {
        bail!("region {:?} is the primary at epoch {}, not older than {:?}'s {}", o.region, o.epoch, n.region, n.epoch);
    }
    let fence = fence_between(&o.lineage, &n.lineage).ok_or_else(|| {
        anyhow::anyhow!("the lineages do not part: {:?} already holds {:?}'s history", o.region, n.region)
    })?;
    // HashKV covers the revisions after each side's compact revision: the
    // two agree only when that is the same on both sides.
    let hashes = (hash_at(old.channel.clone(), fence).await, hash_at(new.channel.clone(), fence).await);
    let (equal, why) = match hashes {
        (Ok(a), Ok(b)) if a == b => (true, String::new()),
        (Ok(a), Ok(b)) if a.1 != b.1 => (false, format!("compacted at {} and {}: not comparable", a.1, b.1)),
        (Ok(_), Ok(_)) => (false, "HashKV differs at the fence".to_string()),
        (Err(e), _) | (_, Err(e)) => (false, format!("HashKV at the fence failed: {}", e.message())),
    };
    let (lines, complete) = dropped_changes(old.channel.clone(), fence).await?;
    let summary = json!({
        "summary": true,
        "fence": fence,
        "epoch": n.epoch,
        "count": lines.len(),
        "region": o.region,
        "primary_region": n.region,
        "first_revision": fence + 1,
        "last_revision": o.revision,
        "hash_equal": equal,
        "complete": complete,
        "recopied": !equal,
    });
    let mut text = String::new();
    for l in lines.iter().chain(std::iter::once(&summary)) {
        text.push_str(&l.to_string());
        text.push('\n');
    }
    write_durably(&flags.report, text.as_bytes())
        .with_context(|| format!("writing the report {}", flags.report.display()))?;
    println!(
        "report: {} changes after the fence {fence} (revisions {}..={}) written to {}",
        lines.len(),
        fence + 1,
        o.revision,
        flags.report.display()
    );
    if !complete {
        println!("warning: {:?} compacted past the fence; the report lists what its store kept", o.region);
    }
    let req = old.request(DemoteRequest {
        epoch: n.epoch,
        primary_region: n.region.clone(),
        primary_cluster_id: cluster_id(&n),
        rewind_to: fence,
        wipe: !equal,
        lineage: n.lineage.clone(),
    });
    let done = old.rpc.demote(req).await.map_err(status_error)?.into_inner();
    if equal {
        println!(
            "rewound: region {:?} is a secondary of {:?} at epoch {}, at revision {fence}; the mirror resumes at {}",
            done.region,
            n.region,
            done.epoch,
            fence + 1
        );
    } else {
        println!(
            "emptied: region {:?} is a secondary of {:?} at epoch {} ({why}); the mirror copies its history",
            done.region, n.region, done.epoch
        );
    }
    println!("next: meridian mirror --source {} --target {}", flags.primary, flags.endpoints);
    Ok(())
}

/// Writes `data` to `path` through a temporary file that is synced and then
/// renamed, so a crash leaves the old file or the whole new one.
fn write_durably(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
