//! `meridian lab`: three regions on one machine in one command.
//!
//! Every member, gateway and mirror is a child process of the same binary,
//! so a kill is a real kill. The lab process itself relays every link that
//! crosses regions with a one-way delay of half the pair's RTT
//! ([`meridian_wire::delay`], userspace: the kernel here has no netem):
//! region R reaches region S's members through R's relays to S. Traffic
//! inside a region is not delayed, nor is the control cluster's raft
//! traffic (each of its members advertises one peer URL for all regions).
//!
//! ```text
//!   us-east (primary)          eu-west                 ap-south
//!   m1 m2 m3  gateway  mirror  m1 m2 m3 gateway mirror m1 m2 m3 gateway mirror
//!         \________ relays with delay between every pair of regions ________/
//!   control cluster: one member per region (primary lease, auto-failover)
//! ```
//!
//! The layout (ports, paths) is decided once and kept in
//! `lab.meridian/lab.json`, so a second `meridian lab` resumes the same
//! lab on the same ports; `--fresh` starts over.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub mod admin;
pub mod compose;
pub mod drill;
mod layout;
mod process;

pub use layout::*;
pub use process::*;

use anyhow::{bail, Context, Result};
use meridian_wire::progress::{Lines, Progress};

/// The lab's primary lease and auto-failover delay (production defaults: 5s, 10s).
pub const LAB_LEASE_TTL: &str = "2s";
pub const LAB_FAILOVER_AFTER: &str = "3s";

/// The regions, the first one the primary.
pub const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

/// Round trips between regions, as cockroach demo --global injects them
/// between us-east1, europe-west1 and us-west1 (66, 64 and 146 ms): the
/// lab's us-east ↔ eu-west 64 ms, us-east ↔ ap-south 66 ms, eu-west ↔
/// ap-south 146 ms.
pub const DEFAULT_RTT_MS: [(&str, &str, u64); 3] =
    [("us-east", "eu-west", 64), ("us-east", "ap-south", 66), ("eu-west", "ap-south", 146)];

#[derive(clap::Args, Debug, Clone)]
pub struct LabFlags {
    /// Members per region (1, 3 or 5).
    #[arg(long, default_value_t = 3)]
    pub members: usize,
    /// Round trips between regions: one duration for every pair (`50ms`, `0` for none), or
    /// pairs `us-east:eu-west=64ms,eu-west:ap-south=146ms,...` (pairs left out keep their
    /// default).
    #[arg(long)]
    pub latency: Option<String>,
    /// Where the lab keeps its data and `lab.json` (the verbs find the lab there too).
    #[arg(long, default_value = "lab.meridian", global = true)]
    pub dir: PathBuf,
    /// Delete the lab's data and start over.
    #[arg(long)]
    pub fresh: bool,
    /// First port of the lab's block of ports.
    #[arg(long, default_value_t = 23000)]
    pub base_port: u16,
}

/// A delay that stands for a cut link: nothing gets through in any time a
/// client waits.
const CUT: Duration = Duration::from_secs(24 * 3600);

/// The running lab, shared with its admin API.
pub struct Lab {
    pub layout: Mutex<Layout>,
    pub dir: PathBuf,
    bin: PathBuf,
    /// By name: `us-east/1`, `us-east/gateway`, `us-east/mirror`, `control/us-east`.
    pub procs: Mutex<BTreeMap<String, Proc>>,
    /// The delays of the relays from one region to another, by (from, to).
    delays: BTreeMap<(String, String), meridian_wire::delay::Delay>,
    /// Links cut by `partition`, as (from, to).
    pub cut: Mutex<BTreeSet<(String, String)>>,
}

impl Lab {
    /// Sets the delay of both directions between `a` and `b` from the
    /// table, or cuts them.
    fn apply_link(&self, a: &str, b: &str) {
        let cut = self.cut.lock().expect("lock").contains(&(a.to_string(), b.to_string()));
        let one_way =
            if cut { CUT } else { Duration::from_millis(rtt(&self.layout.lock().expect("lock").rtt_ms, a, b) / 2) };
        for key in [(a.to_string(), b.to_string()), (b.to_string(), a.to_string())] {
            if let Some(d) = self.delays.get(&key) {
                d.set(one_way);
            }
        }
    }

    fn names(&self, target: &str) -> Result<Vec<String>> {
        let procs = self.procs.lock().expect("lock");
        let names: Vec<String> = if target.contains('/') {
            procs.keys().filter(|k| k.as_str() == target).cloned().collect()
        } else {
            // A whole region: its members, gateway and mirror, and its control member.
            procs
                .keys()
                .filter(|k| k.starts_with(&format!("{target}/")) || k.as_str() == format!("control/{target}"))
                .cloned()
                .collect()
        };
        if names.is_empty() {
            bail!("no {target:?} in the lab (regions: {}; members: REGION/N)", REGIONS.join(", "));
        }
        Ok(names)
    }

    /// `kill REGION[/MEMBER]`: SIGKILL.
    pub fn kill(&self, target: &str) -> Result<String> {
        let names = self.names(target)?;
        let mut procs = self.procs.lock().expect("lock");
        for n in &names {
            if let Some(p) = procs.get_mut(n) {
                p.kill9();
            }
        }
        Ok(format!("killed {}", names.join(", ")))
    }

    /// `restart REGION[/MEMBER]`: starts what is not running.
    pub fn restart(&self, target: &str) -> Result<String> {
        let names = self.names(target)?;
        let mut procs = self.procs.lock().expect("lock");
        let mut started = Vec::new();
        for n in &names {
            if let Some(p) = procs.get_mut(n) {
                if !p.running() {
                    p.start(&self.bin)?;
                    started.push(n.clone());
                }
            }
        }
        Ok(if started.is_empty() { "everything was running".into() } else { format!("started {}", started.join(", ")) })
    }

    /// `partition A [B]`: cuts A from B, or from every other region (its
    /// control member is then frozen too, since the control cluster's own
    /// traffic has no relay).
    pub fn partition(&self, a: &str, b: Option<&str>) -> Result<String> {
        check_region(a)?;
        let others: Vec<&str> = match b {
            Some(b) => {
                check_region(b)?;
                vec![b]
            }
            None => REGIONS.iter().copied().filter(|r| *r != a).collect(),
        };
        {
            let mut cut = self.cut.lock().expect("lock");
            for o in &others {
                cut.insert((a.to_string(), o.to_string()));
                cut.insert((o.to_string(), a.to_string()));
            }
        }
        for o in &others {
            self.apply_link(a, o);
        }
        if b.is_none() {
            if let Some(p) = self.procs.lock().expect("lock").get_mut(&format!("control/{a}")) {
                p.signal("STOP");
                p.frozen = true;
            }
        }
        Ok(format!("cut {a} from {}", others.join(", ")))
    }

    /// `heal`: every link back to its latency, frozen processes resumed.
    pub fn heal(&self) -> Result<String> {
        self.cut.lock().expect("lock").clear();
        for (i, a) in REGIONS.iter().enumerate() {
            for b in &REGIONS[i + 1..] {
                self.apply_link(a, b);
            }
        }
        for p in self.procs.lock().expect("lock").values_mut() {
            if p.frozen {
                p.signal("CONT");
                p.frozen = false;
            }
        }
        Ok("every link is back".into())
    }

    /// `latency A B RTT`.
    pub fn latency(&self, a: &str, b: &str, rtt_text: &str) -> Result<String> {
        check_region(a)?;
        check_region(b)?;
        let table = parse_latency(Some(&format!("{a}:{b}={rtt_text}")))?;
        let ms = rtt(&table, a, b);
        {
            let mut layout = self.layout.lock().expect("lock");
            layout.rtt_ms.remove(&format!("{b}:{a}"));
            layout.rtt_ms.insert(format!("{a}:{b}"), ms);
            std::fs::write(self.dir.join("lab.json"), serde_json::to_vec_pretty(&*layout)?)?;
        }
        self.apply_link(a, b);
        Ok(format!("{a} ↔ {b}: {ms} ms round trip"))
    }

    /// Runs `meridian region ARGS` with the lab's token.
    fn region_command(&self, args: &[String]) -> Result<String> {
        let token = self.layout.lock().expect("lock").mirror_token_file.clone();
        let out = Command::new(&self.bin).arg("region").args(args).env("MERIDIAN_MIRROR_TOKEN_FILE", token).output()?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("{}", text.trim_end());
        }
        Ok(text.trim_end().to_string())
    }

    fn members(&self, region: &str) -> Result<String> {
        check_region(region)?;
        let layout = self.layout.lock().expect("lock");
        Ok(layout.endpoints(region, region).join(","))
    }

    /// Each region's `meridian region status -w json`, or why not.
    pub fn region_states(&self) -> BTreeMap<String, serde_json::Value> {
        REGIONS
            .iter()
            .map(|r| {
                let v = self
                    .members(r)
                    .and_then(|eps| {
                        self.region_command(&["status".into(), "--endpoints".into(), eps, "-w".into(), "json".into()])
                    })
                    .and_then(|out| Ok(serde_json::from_str::<serde_json::Value>(&out)?))
                    .unwrap_or_else(|e| serde_json::json!({ "error": format!("{e:#}") }));
                (r.to_string(), v)
            })
            .collect()
    }

    /// The region that is the primary with the highest epoch.
    fn primary(&self) -> Result<String> {
        primary_of(self.region_states().iter()).ok_or_else(|| anyhow::anyhow!("no region answers as the primary"))
    }

    /// Whether every member of `region` may take writes under the primary
    /// lease now (`primary_lease_ms` is -1 without a topology cluster).
    fn holds_primary_lease(&self, region: &str) -> Result<bool> {
        let endpoints = self.layout.lock().expect("lock").endpoints(region, region);
        for ep in endpoints {
            let out = self.region_command(&["status".into(), "--endpoints".into(), ep, "-w".into(), "json".into()])?;
            if serde_json::from_str::<serde_json::Value>(&out)?["primary_lease_ms"].as_i64().unwrap_or(0) == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `promote REGION`: an unplanned failover, at once.
    pub fn promote(&self, region: &str) -> Result<String> {
        let eps = self.members(region)?;
        self.region_command(&["promote".into(), "--endpoints".into(), eps, "--allow-data-loss".into()])
    }

    /// `switchover REGION`: the primary hands over to REGION.
    pub fn switchover(&self, region: &str) -> Result<String> {
        let from = self.primary()?;
        if from == region {
            bail!("{region} is the primary already");
        }
        let (from_eps, to_eps) = (self.members(&from)?, self.members(region)?);
        self.region_command(&["switchover".into(), "--from".into(), from_eps, "--to".into(), to_eps])
    }

    /// `rejoin REGION`: a failed old primary follows the current one; the
    /// report goes under the lab directory.
    pub fn rejoin(&self, region: &str) -> Result<String> {
        let primary = self.primary()?;
        let report = self.dir.join(format!(
            "rejoin-{region}-{}.jsonl",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs()
        ));
        let (old, new) = (self.members(region)?, self.members(&primary)?);
        self.region_command(&[
            "rejoin".into(),
            "--endpoints".into(),
            old,
            "--primary".into(),
            new,
            "--report".into(),
            report.display().to_string(),
        ])
    }

    /// What `meridian lab status` shows.
    pub fn status(&self) -> serde_json::Value {
        let running: BTreeMap<String, bool> =
            self.procs.lock().expect("lock").iter_mut().map(|(k, p)| (k.clone(), p.running() && !p.frozen)).collect();
        let cut: Vec<String> = self.cut.lock().expect("lock").iter().map(|(a, b)| format!("{a}->{b}")).collect();
        let regions = self.region_states();
        let rtt_ms = self.layout.lock().expect("lock").rtt_ms.clone();
        serde_json::json!({ "regions": regions, "processes": running, "rtt_ms": rtt_ms, "cut": cut })
    }
}

/// Of regions and their `region status -w json`, the one that is the
/// primary with the highest epoch.
pub fn primary_of<'a>(states: impl Iterator<Item = (&'a String, &'a serde_json::Value)>) -> Option<String> {
    states
        .filter(|(_, s)| s["role"] == "primary")
        .max_by_key(|(_, s)| s["epoch"].as_u64().unwrap_or(0))
        .map(|(r, _)| r.clone())
}

fn check_region(r: &str) -> Result<()> {
    if REGIONS.contains(&r) {
        Ok(())
    } else {
        bail!("no region {r:?} in the lab ({})", REGIONS.join(", "))
    }
}

/// Runs the lab until `shutdown` resolves: every process is stopped then.
///
/// # Errors
///
/// Bad flags, a lab directory that cannot be written, or a process that
/// does not come up (its log is under the lab directory).
pub async fn run(flags: &LabFlags, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    if !matches!(flags.members, 1 | 3 | 5) {
        bail!("--members {}: a region has 1, 3 or 5 members", flags.members);
    }
    let rtt_ms = parse_latency(flags.latency.as_deref())?;
    let dir = &flags.dir;
    if flags.fresh && dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    let json = dir.join("lab.json");
    let resumed = json.exists();
    let layout = if resumed {
        let mut l: Layout = serde_json::from_slice(&std::fs::read(&json)?).context("lab.json")?;
        if l.regions[0].members.len() != flags.members {
            bail!(
                "{} has {} members per region; use --members {} or --fresh",
                dir.display(),
                l.regions[0].members.len(),
                l.regions[0].members.len()
            );
        }
        if flags.latency.is_some() {
            l.rtt_ms = rtt_ms;
        }
        l
    } else {
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        Layout::new(&dir, flags.members, flags.base_port, rtt_ms)
    };
    let dir = dir.canonicalize()?;
    std::fs::create_dir_all(dir.join("logs"))?;
    if !layout.mirror_token_file.exists() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        std::fs::write(&layout.mirror_token_file, format!("lab-{nanos:x}\n"))?;
    }
    std::fs::write(&json, serde_json::to_vec_pretty(&layout)?)?;
    std::fs::write(dir.join("prometheus-targets.json"), serde_json::to_vec_pretty(&layout.prometheus_targets())?)?;
    let bin = std::env::current_exe()?;
    let logs = dir.join("logs");
    let started = Instant::now();
    // Steps: the start, the relays, the control cluster, each region, the mirrors and gateways,
    // the primary taking writes.
    let steps = 5 + layout.regions.len() as u64;
    let progress = std::cell::RefCell::new(Progress::steps("starting the lab", steps, Lines::Stderr));
    let step = |what: &str| {
        let mut p = progress.borrow_mut();
        p.note(&format!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64()));
        p.message(what);
        p.inc(1);
    };
    step(if resumed { "resuming the lab" } else { "starting a new lab" });

    // The relays: region R dials region S's member i at R's relay i for S,
    // and S's control member at R's control relay for S.
    let mut relays = Vec::new();
    let mut delays = BTreeMap::new();
    for r in &layout.regions {
        for (to, ports) in &r.relays {
            let one_way = Duration::from_millis(rtt(&layout.rtt_ms, &r.name, to) / 2);
            let delay = meridian_wire::delay::Delay::new(one_way);
            let control_target = REGIONS.iter().position(|n| n == to).map(|i| &layout.control[i].client_url);
            let targets = layout.region(to).members.iter().map(|m| &m.client_url).chain(control_target);
            let listens = ports.iter().chain(std::iter::once(&r.control_relays[to]));
            for (listen, target) in listens.zip(targets) {
                let target: std::net::SocketAddr = host_port(target).parse()?;
                let listener =
                    tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listen on {listen}"))?;
                relays.push(tokio::spawn(meridian_wire::delay::run(listener, target, delay.clone())));
            }
            delays.insert((r.name.clone(), to.clone()), delay);
        }
    }
    step("latency relays up");

    let mut procs = BTreeMap::new();
    let control_cluster: Vec<String> = layout.control.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect();
    for (name, m) in REGIONS.iter().zip(&layout.control) {
        let args = node_args(m, &control_cluster.join(","), "lab-control");
        procs.insert(format!("control/{name}"), Proc::new(&m.name, args, logs.join(format!("{}.log", m.name))));
    }
    for r in &layout.regions {
        let cluster: Vec<String> = r.members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect();
        for (i, m) in r.members.iter().enumerate() {
            let mut args = node_args(m, &cluster.join(","), &format!("lab-{}", r.name));
            args.extend(region_member_flags(
                &r.name,
                &r.role,
                &layout.mirror_token_file.display().to_string(),
                &layout.control_endpoints(&r.name).join(","),
            ));
            procs.insert(
                format!("{}/{}", r.name, i + 1),
                Proc::new(&m.name, args, logs.join(format!("{}.log", m.name))),
            );
        }
        // A mirror into the region from the others (it follows the primary).
        let mut args: Vec<String> =
            vec!["mirror".into(), "--target".into(), layout.endpoints(&r.name, &r.name).join(",")];
        for other in layout.regions.iter().filter(|o| o.name != r.name) {
            args.extend(["--source".to_string(), layout.endpoints(&r.name, &other.name).join(",")]);
        }
        args.extend(
            [
                "--mirror-token-file",
                &layout.mirror_token_file.display().to_string(),
                "--listen-metrics",
                &r.mirror_metrics,
            ]
            .map(String::from),
        );
        let what = format!("mirror-{}", r.name);
        procs.insert(format!("{}/mirror", r.name), Proc::new(&what, args, logs.join(format!("{what}.log"))));
        let mut args: Vec<String> =
            ["gateway", "--name", &format!("gw-{}", r.name), "--region", &r.name].map(String::from).to_vec();
        args.extend(["--listen-client-urls".to_string(), r.gateway_url.clone()]);
        args.extend(["--listen-metrics-urls".to_string(), format!("http://{}", r.gateway_metrics)]);
        for other in &layout.regions {
            args.extend([
                "--upstream".to_string(),
                format!("{}={}", other.name, layout.endpoints(&r.name, &other.name).join(",")),
            ]);
            if other.name != r.name {
                args.extend(["--peer-gateway".to_string(), format!("{}=http://{}", other.name, other.gateway_metrics)]);
            }
        }
        let what = format!("gateway-{}", r.name);
        procs.insert(format!("{}/gateway", r.name), Proc::new(&what, args, logs.join(format!("{what}.log"))));
    }
    let lab = std::sync::Arc::new(Lab {
        layout: Mutex::new(layout.clone()),
        dir: dir.clone(),
        bin: bin.clone(),
        procs: Mutex::new(procs),
        delays,
        cut: Mutex::new(BTreeSet::new()),
    });
    let result = bring_up(&lab, &layout, &step).await;
    let result = match result {
        Ok(()) => writes_taken(&lab, Duration::from_secs(60)).await.map(|r| step(&format!("{r} takes writes"))),
        e => e,
    };
    progress.borrow_mut().finish();
    if let Err(e) = result {
        lab.procs.lock().expect("lock").clear();
        return Err(e);
    }
    let admin = admin::serve(lab.clone(), host_port(&layout.admin_url)).await?;
    print_table(&layout);

    // Until Ctrl-C; a child that exits on its own is reported and the lab goes on.
    let mut shutdown = std::pin::pin!(shutdown);
    let mut check = tokio::time::interval(Duration::from_secs(1));
    let mut reported = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = check.tick() => {
                let mut procs = lab.procs.lock().expect("lock");
                for (name, p) in procs.iter_mut() {
                    let exited = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                    match exited {
                        Some(status) if reported.insert(name.clone()) => {
                            eprintln!("{name} exited ({status}); its log: {}", p.log.display());
                        }
                        None if p.child.is_some() => {
                            reported.remove(name);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    eprintln!("stopping the lab");
    admin.abort();
    let procs = std::mem::take(&mut *lab.procs.lock().expect("lock"));
    // Gateways and mirrors first, then the regions' members, then the control cluster.
    let (mut front, rest): (Vec<_>, Vec<_>) =
        procs.into_iter().partition(|(k, _)| k.ends_with("/gateway") || k.ends_with("/mirror"));
    let (mut members, mut control): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(k, _)| !k.starts_with("control/"));
    for (_, p) in front.iter_mut().chain(members.iter_mut()).chain(control.iter_mut()) {
        p.stop();
    }
    for r in relays {
        r.abort();
    }
    eprintln!("stopped; `meridian lab` resumes it");
    Ok(())
}

/// Waits until the primary region's every member holds the primary lease,
/// so the lab's first write, a user's or a drill's, is taken: a new primary
/// takes writes only once it has confirmed the lease. Returns that region.
async fn writes_taken(lab: &std::sync::Arc<Lab>, limit: Duration) -> Result<String> {
    let lab = lab.clone();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + limit;
        loop {
            let why = match lab.primary().and_then(|region| Ok((lab.holds_primary_lease(&region)?, region))) {
                Ok((true, region)) => return Ok(region),
                Ok((false, region)) => format!("region {region} does not hold the primary lease yet"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!("the lab takes no writes after {limit:?}: {why}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await?
}

/// Starts every process in order, each step once the previous is healthy.
async fn bring_up(lab: &Lab, layout: &Layout, step: &dyn Fn(&str)) -> Result<()> {
    let start = |prefix: &dyn Fn(&str) -> bool| -> Result<()> {
        let mut procs = lab.procs.lock().expect("lock");
        for (name, p) in procs.iter_mut().filter(|(n, _)| prefix(n)) {
            p.start(&lab.bin).with_context(|| name.clone())?;
        }
        Ok(())
    };
    start(&|n| n.starts_with("control/"))?;
    for m in &layout.control {
        wait_healthy(&m.name, host_port(&m.client_url), Duration::from_secs(60)).await?;
    }
    step("control cluster up (primary lease, auto-failover)");
    start(&|n| n.rsplit('/').next().is_some_and(|last| last.parse::<usize>().is_ok()))?;
    for r in &layout.regions {
        for m in &r.members {
            wait_healthy(&m.name, host_port(&m.client_url), Duration::from_secs(60)).await?;
        }
        step(&format!("region {} up ({} members)", r.name, r.members.len()));
    }
    start(&|n| n.ends_with("/mirror") || n.ends_with("/gateway"))?;
    for r in &layout.regions {
        wait_healthy(&format!("gateway-{}", r.name), host_port(&r.gateway_url), Duration::from_secs(60)).await?;
    }
    step("mirrors and gateways up");
    Ok(())
}

/// A region member's flags beyond etcd's (the lab's and the compose
/// file's): its region and first role, the mirror token, the topology
/// cluster and auto-failover at the lab's timings (a region loss fails over
/// in seconds, not the production defaults' 16).
pub(crate) fn region_member_flags(region: &str, role: &str, token_file: &str, topology: &str) -> Vec<String> {
    [
        "--region",
        region,
        "--initial-role",
        role,
        "--primary-region",
        REGIONS[0],
        "--mirror-token-file",
        token_file,
        "--topology-endpoints",
        topology,
        "--auto-failover",
        "--primary-lease-ttl",
        LAB_LEASE_TTL,
        "--failover-after",
        LAB_FAILOVER_AFTER,
    ]
    .map(String::from)
    .to_vec()
}

fn node_args(m: &MemberLayout, cluster: &str, token: &str) -> Vec<String> {
    [
        "node",
        "--name",
        &m.name,
        "--data-dir",
        &m.data_dir.display().to_string(),
        "--listen-client-urls",
        &m.client_url,
        "--advertise-client-urls",
        &m.client_url,
        "--listen-peer-urls",
        &m.peer_url,
        "--initial-advertise-peer-urls",
        &m.peer_url,
        "--initial-cluster",
        cluster,
        "--initial-cluster-token",
        token,
    ]
    .map(String::from)
    .to_vec()
}
