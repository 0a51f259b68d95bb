//! The `meridian` binary: parses arguments and dispatches to a subcommand.

use clap::{Parser, Subcommand};
use meridian_gateway::{GatewayConfig, GatewayFlags};
use meridian_mirror::{region, MirrorConfig, MirrorFlags, StatusFlags};
use meridian_node::compat::{take_etcd_flags, EtcdFlags};
use meridian_node::config::{normalize_args, NodeConfig, NodeFlags};

/// The request path allocates small buffers on many threads; glibc's malloc
/// spent a tenth of a member's CPU under load in profiles, mimalloc far less.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "meridian", version, about = "A multi-region key-value store that speaks the etcd v3 API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Three regions on one machine, with latency between them: members, gateways, mirrors.
    Lab(LabCommand),
    /// Run one cluster member. Takes etcd's flags.
    Node(NodeFlags),
    /// Copy every revision of a source cluster into a read-only secondary.
    Mirror(MirrorCommand),
    /// One etcd endpoint for a region: writes to the primary, reads to the nearest fresh region.
    Gateway(GatewayFlags),
    /// A region's role, epoch, fence and lineage; promotion, planned switchover and rejoin.
    Region(RegionCommand),
    /// Relay TCP connections with an added one-way delay (latency between regions, without netem).
    DelayProxy(DelayProxyFlags),
}

#[derive(clap::Args)]
struct DelayProxyFlags {
    /// One-way delay added to every byte, in each direction (a Go duration: 25ms).
    #[arg(long)]
    delay: String,
    /// LISTEN=TARGET, both host:port; repeat for more links.
    #[arg(long = "route", required = true)]
    routes: Vec<String>,
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct LabCommand {
    #[command(subcommand)]
    verb: Option<meridian_lab::admin::Verb>,
    #[command(flatten)]
    flags: meridian_lab::LabFlags,
}

#[derive(clap::Args)]
struct RegionCommand {
    #[command(subcommand)]
    action: RegionAction,
}

#[derive(Subcommand)]
enum RegionAction {
    /// Print a cluster's region state (-w json for a program).
    Status(region::RegionStatusFlags),
    /// Make a secondary whose primary is lost the primary (unplanned failover).
    Promote(region::PromoteFlags),
    /// Hand the primary role to a secondary with no lost write (planned switchover).
    Switchover(region::SwitchoverFlags),
    /// Make a failed old primary a secondary of the new one: rewind to the fence, report what is dropped.
    Rejoin(region::RejoinFlags),
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct MirrorCommand {
    #[command(subcommand)]
    action: Option<MirrorAction>,
    #[command(flatten)]
    flags: MirrorFlags,
}

#[derive(Subcommand)]
enum MirrorAction {
    /// Print the secondary's applied revision and lag, and a running mirror's counters.
    Status(StatusFlags),
}

fn main() -> anyhow::Result<()> {
    abort_on_panic();
    let args = normalize_args(std::env::args());
    // etcd's flags that Meridian does not implement, taken out before clap.
    let (args, etcd_flags) = match args.get(1).map(String::as_str) {
        Some("node") => take_etcd_flags(args),
        _ => (args, EtcdFlags::default()),
    };
    let cli = Cli::parse_from(args);
    match cli.command {
        Command::Node(flags) => {
            if !etcd_flags.refused.is_empty() {
                anyhow::bail!("{}", etcd_flags.refused.join("\n"));
            }
            let cfg = NodeConfig::load(&flags)?;
            let _telemetry =
                telemetry("meridian-node", Some(&cfg.region), cfg.otlp_endpoint.as_deref(), &cfg.log_level)?;
            for flag in &etcd_flags.warnings {
                tracing::warn!("{flag}: an etcd flag Meridian accepts and ignores");
            }
            for setting in &cfg.etcd_warnings {
                tracing::warn!("{setting}: an etcd setting of the config file that Meridian ignores");
            }
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(meridian_node::run(cfg, shutdown_signal()))?;
        }
        Command::Mirror(MirrorCommand { action: Some(MirrorAction::Status(flags)), .. }) => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(meridian_mirror::print_status(&flags))?;
        }
        Command::Lab(LabCommand { verb: None, flags }) => {
            init_logging("warn");
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let result = runtime.block_on(meridian_lab::run(&flags, shutdown_signal()));
            // An admin call still waiting on a child must not hold the exit.
            runtime.shutdown_timeout(std::time::Duration::from_secs(2));
            result?;
        }
        Command::Lab(LabCommand { verb: Some(verb), flags }) => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(meridian_lab::admin::run_verb(&flags.dir, &verb))?;
        }
        Command::Region(RegionCommand { action }) => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                match action {
                    RegionAction::Status(f) => region::status(&f).await,
                    RegionAction::Promote(f) => region::promote(&f).await,
                    RegionAction::Switchover(f) => region::switchover(&f).await,
                    RegionAction::Rejoin(f) => region::rejoin(&f).await,
                }
            })?;
        }
        Command::Gateway(flags) => {
            let cfg = GatewayConfig::load(&flags)?;
            let _telemetry = telemetry("meridian-gateway", Some(&cfg.region), cfg.otlp_endpoint.as_deref(), "info")?;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(meridian_gateway::run(cfg, shutdown_signal()))?;
        }
        Command::DelayProxy(flags) => {
            init_logging("info");
            let delay = meridian_wire::duration::parse_duration(&flags.delay)
                .ok_or_else(|| anyhow::anyhow!("invalid --delay {:?}: want a duration like 25ms", flags.delay))?;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(delay_proxy(delay, &flags.routes))?;
        }
        Command::Mirror(MirrorCommand { action: None, flags }) => {
            let cfg = MirrorConfig::load(&flags)?;
            let _telemetry = telemetry("meridian-mirror", None, cfg.otlp_endpoint.as_deref(), "info")?;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(meridian_mirror::run(cfg, shutdown_signal()))?;
        }
    }
    Ok(())
}

/// Makes any panic, on any thread, end the whole process with a log line.
/// Without it a panic ends only its own thread: a member whose raft thread
/// died would keep serving reads from a frozen state. Stopping lets a
/// supervisor restart it, and a restart replays from the applied index.
fn abort_on_panic() {
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current().name().unwrap_or("unnamed").to_owned();
        tracing::error!(%thread, "fatal: {info}; stopping the process");
        print(info);
        std::process::abort();
    }));
}

fn init_logging(level: &str) {
    // Without an endpoint this only sets up logging, which cannot fail.
    std::mem::forget(telemetry("meridian", None, None, level));
}

/// Logging, and with an OTLP endpoint tracing too; the guard exports what
/// is left when the command returns.
fn telemetry(
    service: &str,
    region: Option<&str>,
    otlp: Option<&str>,
    level: &str,
) -> anyhow::Result<meridian_wire::telemetry::Telemetry> {
    meridian_wire::telemetry::init(service, region, otlp, level).map_err(anyhow::Error::msg)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Runs one delaying relay per `LISTEN=TARGET` route until SIGINT or SIGTERM.
async fn delay_proxy(delay: std::time::Duration, routes: &[String]) -> anyhow::Result<()> {
    let delay = meridian_wire::delay::Delay::new(delay);
    for route in routes {
        let (listen, target) =
            route.split_once('=').ok_or_else(|| anyhow::anyhow!("invalid --route {route:?}: want LISTEN=TARGET"))?;
        let target: std::net::SocketAddr =
            target.parse().map_err(|e| anyhow::anyhow!("invalid --route {route:?} target: {e}"))?;
        let listener =
            tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("listen on {listen}: {e}"))?;
        tracing::info!(listen, %target, delay = ?delay.get(), "delaying");
        tokio::spawn(meridian_wire::delay::run(listener, target, delay.clone()));
    }
    shutdown_signal().await;
    Ok(())
}
