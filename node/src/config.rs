//! `meridian node` settings: etcd's flags, a TOML file, and `MERIDIAN_*`
//! environment variables. Precedence: flags over environment over file over
//! defaults. Defaults are etcd 3.4's, except that with no flags at all the
//! member listens on 127.0.0.1 and keeps data in `./default.meridian`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

use meridian_wire::url::Url;

use crate::error::{Error, Result};

mod tls;
pub use tls::{ListenerTls, TransportSecurity};

/// Command-line flags, named as etcd's. Every field is optional so that an
/// absent flag does not hide the file or the environment.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct NodeFlags {
    /// Human-readable name for this member.
    #[arg(long)]
    pub name: Option<String>,
    /// Path to the data directory (default: <name>.meridian).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// URLs to listen on for client traffic (gRPC and HTTP), comma-separated.
    #[arg(long)]
    pub listen_client_urls: Option<String>,
    /// Client URLs advertised to the rest of the cluster.
    #[arg(long)]
    pub advertise_client_urls: Option<String>,
    /// URLs to listen on for peer (raft) traffic.
    #[arg(long)]
    pub listen_peer_urls: Option<String>,
    /// Peer URLs advertised to the rest of the cluster.
    #[arg(long)]
    pub initial_advertise_peer_urls: Option<String>,
    /// Initial cluster configuration: name=peerURL,... (default: this member alone).
    #[arg(long)]
    pub initial_cluster: Option<String>,
    /// 'new' or 'existing'.
    #[arg(long)]
    pub initial_cluster_state: Option<String>,
    /// Token that makes member and cluster ids unique to one bootstrap.
    #[arg(long)]
    pub initial_cluster_token: Option<String>,
    /// Time (ms) of a heartbeat interval.
    #[arg(long)]
    pub heartbeat_interval: Option<u64>,
    /// Time (ms) for an election to time out.
    #[arg(long)]
    pub election_timeout: Option<u64>,
    /// Applied entries between raft log compactions.
    #[arg(long)]
    pub snapshot_count: Option<u64>,
    /// Largest request a client may send, in bytes.
    #[arg(long)]
    pub max_request_bytes: Option<usize>,
    /// Most operations in one txn.
    #[arg(long)]
    pub max_txn_ops: Option<usize>,
    /// Largest message sent to or accepted from a peer, in bytes (Meridian's; snapshots stream in
    /// chunks below it). At least twice --max-request-bytes plus 64 KiB.
    #[arg(long)]
    pub max_peer_message_bytes: Option<usize>,
    /// Most concurrent streams (calls) a client connection may have open (HTTP/2 setting).
    #[arg(long)]
    pub max_concurrent_streams: Option<u32>,
    /// How often the server pings an idle client connection (e.g. 2h; 0 turns pings off).
    #[arg(long)]
    pub grpc_keepalive_interval: Option<String>,
    /// How long the server waits for a ping's answer before it closes the connection (e.g. 20s).
    #[arg(long)]
    pub grpc_keepalive_timeout: Option<String>,
    /// Extra URLs serving /metrics and /health over plain HTTP.
    #[arg(long)]
    pub listen_metrics_urls: Option<String>,
    /// Space quota in bytes; 0 means the default of 2 GiB.
    #[arg(long, allow_hyphen_values = true)]
    pub quota_backend_bytes: Option<i64>,
    /// Interval of watch progress notifications (etcd's flag; e.g. 10m, 30s, 500ms).
    #[arg(long = "experimental-watch-progress-notify-interval")]
    pub watch_progress_notify_interval: Option<String>,
    /// How often the leader checkpoints remaining lease TTLs (etcd's flag), e.g. 5s.
    #[arg(long = "experimental-lease-checkpoint-interval")]
    pub lease_checkpoint_interval: Option<String>,
    /// Auto compaction: 'periodic' (keep a time window) or 'revision' (keep a count of revisions).
    #[arg(long)]
    pub auto_compaction_mode: Option<String>,
    /// Auto compaction retention: hours or a duration (periodic), or revisions (revision); 0 disables.
    #[arg(long)]
    pub auto_compaction_retention: Option<String>,
    /// Region this cluster belongs to.
    #[arg(long)]
    pub region: Option<String>,
    /// Role of a new cluster: primary (takes writes) or secondary (read-only mirror target).
    #[arg(long)]
    pub initial_role: Option<String>,
    /// For a secondary: the region whose primary it mirrors (named when refusing writes).
    #[arg(long)]
    pub primary_region: Option<String>,
    /// Log level: error, warn, info, debug.
    #[arg(long)]
    pub log_level: Option<String>,
    /// Export traces over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317); off when unset.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// File holding the token a mirror must present to write into this secondary (Mirror.Apply).
    #[arg(long)]
    pub mirror_token_file: Option<PathBuf>,
    /// TLS on https:// client URLs: --cert-file, --key-file, --trusted-ca-file, --client-cert-auth.
    #[command(flatten)]
    pub server_tls: meridian_wire::tls::ServerTlsFlags,
    /// Client certificate revocation list (PEM): a listed client certificate is refused.
    #[arg(long)]
    pub client_crl_file: Option<PathBuf>,
    /// Client TLS using a generated self-signed certificate (in <data-dir>/fixtures/client).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub auto_tls: Option<bool>,
    /// Path to the peer server TLS cert file (also presented to other members).
    #[arg(long)]
    pub peer_cert_file: Option<PathBuf>,
    /// Path to the peer server TLS key file.
    #[arg(long)]
    pub peer_key_file: Option<PathBuf>,
    /// Path to the peer server TLS trusted CA file: peers' certificates must chain to it.
    #[arg(long)]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// Require a peer certificate signed by --peer-trusted-ca-file on https:// peer URLs.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub peer_client_cert_auth: Option<bool>,
    /// Peer certificate revocation list (PEM): a listed peer certificate is refused.
    #[arg(long)]
    pub peer_crl_file: Option<PathBuf>,
    /// Peer TLS using generated self-signed certificates (encrypted, peers not authenticated).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub peer_auto_tls: Option<bool>,
    /// Comma-separated TLS 1.2 cipher suites (Go's names) for client and peer links; TLS 1.3
    /// keeps its own. Default: every suite rustls offers.
    #[arg(long)]
    pub cipher_suites: Option<String>,
    /// Client certificates must be valid for this host name (or IP) (with --client-cert-auth).
    #[arg(long)]
    pub client_cert_allowed_hostname: Option<String>,
    /// Peer certificates must carry this subject CN (with --peer-client-cert-auth).
    #[arg(long)]
    pub peer_cert_allowed_cn: Option<String>,
    /// Peer certificates must be valid for this host name (or IP) (with --peer-client-cert-auth).
    #[arg(long)]
    pub peer_cert_allowed_hostname: Option<String>,
    /// What Authenticate hands out: simple (random tokens, known to every member through raft),
    /// or jwt,pub-key=FILE,priv-key=FILE,sign-method=RS256[,ttl=5m] (signed tokens).
    #[arg(long)]
    pub auth_token: Option<String>,
    /// Seconds a simple token lasts past its last use.
    #[arg(long)]
    pub auth_token_ttl: Option<u64>,
    /// The bcrypt cost of password hashes (4 to 31).
    #[arg(long)]
    pub bcrypt_cost: Option<u32>,
    /// The cross-region topology cluster (one member per region), comma-separated: with it a
    /// primary holds the primary lease and refuses writes without it. For three or more regions.
    #[arg(long)]
    pub topology_endpoints: Option<String>,
    /// The primary lease's TTL (a Go duration): a primary cut off from the topology cluster
    /// stops taking writes within it.
    #[arg(long)]
    pub primary_lease_ttl: Option<String>,
    /// Promote this (secondary) region when no primary has held the lease for --failover-after
    /// and it is the most up-to-date reachable secondary. Needs --topology-endpoints.
    #[arg(long)]
    pub auto_failover: bool,
    /// How long no primary must hold the lease before --auto-failover promotes (a Go duration).
    #[arg(long)]
    pub failover_after: Option<String>,
    /// TOML file with any of the settings above (snake_case keys), or etcd's YAML configuration
    /// file (*.yml, *.yaml) with etcd's keys.
    #[arg(long)]
    pub config_file: Option<PathBuf>,
}

/// What the file, the environment and the flags said, merged, before any
/// check: the shape of the TOML file and of the `MERIDIAN_*` variables. Each
/// field also takes etcd's dashed name, so etcd's YAML configuration file
/// (`--config-file etcd.conf.yml`) works with its own keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Settings {
    pub name: String,
    #[serde(alias = "data-dir")]
    pub data_dir: Option<PathBuf>,
    #[serde(alias = "listen-client-urls")]
    pub listen_client_urls: String,
    #[serde(alias = "advertise-client-urls")]
    pub advertise_client_urls: String,
    #[serde(alias = "listen-peer-urls")]
    pub listen_peer_urls: String,
    #[serde(alias = "initial-advertise-peer-urls")]
    pub initial_advertise_peer_urls: String,
    #[serde(alias = "initial-cluster")]
    pub initial_cluster: Option<String>,
    #[serde(alias = "initial-cluster-state")]
    pub initial_cluster_state: String,
    #[serde(alias = "initial-cluster-token")]
    pub initial_cluster_token: String,
    #[serde(alias = "heartbeat-interval")]
    pub heartbeat_interval: u64,
    #[serde(alias = "election-timeout")]
    pub election_timeout: u64,
    #[serde(alias = "snapshot-count")]
    pub snapshot_count: u64,
    #[serde(alias = "max-request-bytes")]
    pub max_request_bytes: usize,
    #[serde(alias = "max-txn-ops")]
    pub max_txn_ops: usize,
    #[serde(alias = "max-peer-message-bytes")]
    pub max_peer_message_bytes: usize,
    #[serde(alias = "max-concurrent-streams")]
    pub max_concurrent_streams: u32,
    #[serde(alias = "grpc-keepalive-interval")]
    pub grpc_keepalive_interval: String,
    #[serde(alias = "grpc-keepalive-timeout")]
    pub grpc_keepalive_timeout: String,
    #[serde(alias = "listen-metrics-urls")]
    pub listen_metrics_urls: String,
    #[serde(alias = "quota-backend-bytes")]
    pub quota_backend_bytes: i64,
    #[serde(alias = "experimental-watch-progress-notify-interval")]
    pub watch_progress_notify_interval: String,
    #[serde(alias = "experimental-lease-checkpoint-interval")]
    pub lease_checkpoint_interval: String,
    #[serde(alias = "auto-compaction-mode")]
    pub auto_compaction_mode: String,
    #[serde(alias = "auto-compaction-retention")]
    pub auto_compaction_retention: String,
    pub region: String,
    #[serde(alias = "initial-role")]
    pub initial_role: String,
    #[serde(alias = "primary-region")]
    pub primary_region: String,
    #[serde(alias = "log-level")]
    pub log_level: String,
    #[serde(alias = "otlp-endpoint")]
    pub otlp_endpoint: String,
    #[serde(alias = "mirror-token-file")]
    pub mirror_token_file: Option<PathBuf>,
    #[serde(alias = "cert-file")]
    pub cert_file: Option<PathBuf>,
    #[serde(alias = "key-file")]
    pub key_file: Option<PathBuf>,
    #[serde(alias = "trusted-ca-file")]
    pub trusted_ca_file: Option<PathBuf>,
    #[serde(alias = "client-cert-auth")]
    pub client_cert_auth: bool,
    #[serde(alias = "client-crl-file")]
    pub client_crl_file: Option<PathBuf>,
    #[serde(alias = "auto-tls")]
    pub auto_tls: bool,
    #[serde(alias = "peer-cert-file")]
    pub peer_cert_file: Option<PathBuf>,
    #[serde(alias = "peer-key-file")]
    pub peer_key_file: Option<PathBuf>,
    #[serde(alias = "peer-trusted-ca-file")]
    pub peer_trusted_ca_file: Option<PathBuf>,
    #[serde(alias = "peer-client-cert-auth")]
    pub peer_client_cert_auth: bool,
    #[serde(alias = "peer-crl-file")]
    pub peer_crl_file: Option<PathBuf>,
    #[serde(alias = "peer-auto-tls")]
    pub peer_auto_tls: bool,
    #[serde(alias = "cipher-suites", deserialize_with = "tls::comma_list")]
    pub cipher_suites: String,
    #[serde(alias = "client-cert-allowed-hostname")]
    pub client_cert_allowed_hostname: String,
    #[serde(alias = "peer-cert-allowed-cn")]
    pub peer_cert_allowed_cn: String,
    #[serde(alias = "peer-cert-allowed-hostname")]
    pub peer_cert_allowed_hostname: String,
    /// etcd's YAML spelling of the client TLS settings.
    #[serde(alias = "client-transport-security")]
    pub client_transport_security: TransportSecurity,
    /// etcd's YAML spelling of the peer TLS settings.
    #[serde(alias = "peer-transport-security")]
    pub peer_transport_security: TransportSecurity,
    #[serde(alias = "auth-token")]
    pub auth_token: String,
    #[serde(alias = "auth-token-ttl")]
    pub auth_token_ttl: u64,
    #[serde(alias = "bcrypt-cost")]
    pub bcrypt_cost: u32,
    #[serde(alias = "topology-endpoints")]
    pub topology_endpoints: String,
    #[serde(alias = "primary-lease-ttl")]
    pub primary_lease_ttl: String,
    #[serde(alias = "auto-failover")]
    pub auto_failover: bool,
    #[serde(alias = "failover-after")]
    pub failover_after: String,
    /// etcd settings of a YAML file that Meridian ignores, for the log.
    #[serde(skip)]
    pub etcd_warnings: Vec<String>,
}

/// etcd's default space quota.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// The shortest periodic compaction window: a shorter one would poll in a
/// busy loop.
const MIN_PERIODIC_RETENTION: Duration = Duration::from_secs(1);

impl Default for Settings {
    fn default() -> Self {
        Self {
            name: "default".into(),
            data_dir: None,
            listen_client_urls: "http://127.0.0.1:2379".into(),
            advertise_client_urls: "http://127.0.0.1:2379".into(),
            listen_peer_urls: "http://127.0.0.1:2380".into(),
            initial_advertise_peer_urls: "http://127.0.0.1:2380".into(),
            initial_cluster: None,
            initial_cluster_state: "new".into(),
            initial_cluster_token: "etcd-cluster".into(),
            heartbeat_interval: 100,
            election_timeout: 1000,
            snapshot_count: 100_000,
            max_request_bytes: 1536 * 1024,
            max_txn_ops: 128,
            max_peer_message_bytes: crate::raft::transport::DEFAULT_MAX_PEER_MESSAGE,
            // etcd 3.4's defaults.
            max_concurrent_streams: u32::MAX,
            grpc_keepalive_interval: "2h".into(),
            grpc_keepalive_timeout: "20s".into(),
            listen_metrics_urls: String::new(),
            quota_backend_bytes: 0,
            watch_progress_notify_interval: "10m".into(),
            lease_checkpoint_interval: "5s".into(),
            auto_compaction_mode: "periodic".into(),
            auto_compaction_retention: "0".into(),
            region: "default".into(),
            initial_role: "primary".into(),
            primary_region: String::new(),
            log_level: "info".into(),
            otlp_endpoint: String::new(),
            mirror_token_file: None,
            cert_file: None,
            key_file: None,
            trusted_ca_file: None,
            client_cert_auth: false,
            client_crl_file: None,
            auto_tls: false,
            peer_cert_file: None,
            peer_key_file: None,
            peer_trusted_ca_file: None,
            peer_client_cert_auth: false,
            peer_crl_file: None,
            peer_auto_tls: false,
            cipher_suites: String::new(),
            client_cert_allowed_hostname: String::new(),
            peer_cert_allowed_cn: String::new(),
            peer_cert_allowed_hostname: String::new(),
            client_transport_security: TransportSecurity::default(),
            peer_transport_security: TransportSecurity::default(),
            topology_endpoints: String::new(),
            primary_lease_ttl: "5s".into(),
            auth_token: "simple".into(),
            auth_token_ttl: 300,
            bcrypt_cost: crate::server::auth::store::DEFAULT_BCRYPT_COST,
            auto_failover: false,
            failover_after: "10s".into(),
            etcd_warnings: Vec::new(),
        }
    }
}

/// `--initial-cluster-state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterState {
    New,
    Existing,
}

/// `--initial-role`: what a brand-new cluster starts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitialRole {
    Primary,
    Secondary,
}

/// How much history auto compaction keeps (`--auto-compaction-mode` and
/// `--auto-compaction-retention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Keep the revisions of the last window of time.
    Periodic(Duration),
    /// Keep this many revisions behind the current one.
    Revision(i64),
}

impl Retention {
    /// Parses etcd's pair of flags. A bare integer is hours in periodic
    /// mode and revisions in revision mode; periodic mode also takes a
    /// duration (`30m`, `1h30m`). Zero disables compaction (`None`).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an unknown mode, a malformed retention, or a
    /// periodic window under a second.
    pub fn parse(mode: &str, retention: &str) -> Result<Option<Self>> {
        let retention = retention.trim();
        let count = retention.parse::<i64>().ok().filter(|n| *n >= 0);
        let parsed = match (mode, count) {
            ("periodic", Some(hours)) => Some(Self::Periodic(Duration::from_secs(hours as u64 * 3600))),
            ("periodic", None) => parse_duration(retention).map(Self::Periodic),
            ("revision", count) => count.map(Self::Revision),
            _ => {
                return Err(Error::Config(format!(
                    "invalid --auto-compaction-mode {mode:?}: valid values are \"periodic\" or \"revision\""
                )))
            }
        };
        match parsed {
            None => Err(Error::Config(format!(
                "invalid --auto-compaction-retention {retention:?}: want hours or a duration like 30m \
                 (periodic mode) or a number of revisions (revision mode)"
            ))),
            Some(Self::Periodic(d)) if d.is_zero() => Ok(None),
            Some(Self::Periodic(d)) if d < MIN_PERIODIC_RETENTION => Err(Error::Config(format!(
                "invalid --auto-compaction-retention {retention:?}: a periodic window must be at least 1s"
            ))),
            Some(Self::Revision(0)) => Ok(None),
            Some(r) => Ok(Some(r)),
        }
    }
}

/// The checked settings of one member: every value parsed into its type
/// once, at startup, by [`NodeConfig::load`]. Nothing downstream parses.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub listen_client_urls: Vec<Url>,
    pub advertise_client_urls: Vec<Url>,
    pub listen_peer_urls: Vec<Url>,
    pub listen_metrics_urls: Vec<Url>,
    /// The bootstrap cluster: name → peer URLs (this member alone by default).
    pub initial_members: BTreeMap<String, Vec<String>>,
    pub initial_cluster_state: ClusterState,
    pub initial_cluster_token: String,
    pub heartbeat: Duration,
    pub election: Duration,
    pub snapshot_count: u64,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    pub max_peer_message_bytes: usize,
    pub max_concurrent_streams: u32,
    /// Server pings to idle client connections; `None` when off.
    pub grpc_keepalive_interval: Option<Duration>,
    pub grpc_keepalive_timeout: Duration,
    /// The space quota in bytes; `None` when disabled (negative, as etcd).
    pub quota: Option<u64>,
    pub progress_notify_interval: Duration,
    pub lease_checkpoint_interval: Duration,
    /// `None` when auto compaction is off.
    pub auto_compaction: Option<Retention>,
    pub region: String,
    pub initial_role: InitialRole,
    /// The region a secondary mirrors (this region for a primary).
    pub primary_region: String,
    pub log_level: String,
    /// Where traces go (OTLP/gRPC); `None` when tracing is off.
    pub otlp_endpoint: Option<String>,
    /// The token `Mirror.Apply` must carry; without one, Apply is refused.
    pub mirror_token: Option<String>,
    /// TLS on the client (and metrics) listeners with `https://` URLs.
    pub client_tls: ListenerTls,
    /// TLS on the peer listeners with `https://` URLs.
    pub peer_tls: ListenerTls,
    /// What this member trusts and presents when it dials a peer.
    pub peer_client: meridian_wire::tls::ClientFiles,
    /// `--cipher-suites`, for the pairs `--auto-tls` makes.
    pub cipher_suites: Vec<String>,
    /// The primary lease and auto-failover; `None` without a topology cluster.
    pub topology: Option<crate::server::primary_lease::TopologyConfig>,
    /// `--auth-token`, `--auth-token-ttl`, `--bcrypt-cost`.
    pub auth: crate::server::auth::store::AuthConfig,
    /// etcd settings of the config file that Meridian accepts and ignores.
    pub etcd_warnings: Vec<String>,
}

macro_rules! overlay {
    ($cfg:ident, $flags:ident, $($field:ident),*) => {
        $( if let Some(v) = &$flags.$field { $cfg.$field = v.clone().into(); } )*
    };
}

/// Rewrites Go-style single-dash long flags (`-name x`) to `--name x`, so a
/// unit file written for etcd works unchanged.
pub fn normalize_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .map(|a| {
            let b = a.as_bytes();
            if b.len() > 2 && b[0] == b'-' && b[1] != b'-' && b[1].is_ascii_alphabetic() {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

impl Settings {
    /// Merges the defaults, the config file `flags` names, the environment
    /// and `flags`, in rising precedence.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an unreadable file or a value of the wrong type.
    pub fn gather(flags: &NodeFlags) -> Result<Self> {
        let mut builder = config::Config::builder();
        let mut etcd = crate::compat::EtcdFlags::default();
        if let Some(file) = &flags.config_file {
            let yaml = file.extension().is_some_and(|e| e == "yml" || e == "yaml");
            let format = if yaml { config::FileFormat::Yaml } else { config::FileFormat::Toml };
            if yaml {
                etcd = crate::compat::check_etcd_yaml(file)?;
            }
            builder = builder.add_source(config::File::from(file.as_path()).format(format));
        }
        if !etcd.refused.is_empty() {
            return Err(Error::Config(etcd.refused.join("; ")));
        }
        builder = builder.add_source(config::Environment::with_prefix("MERIDIAN").try_parsing(true));
        let mut cfg: Settings =
            builder.build().and_then(|c| c.try_deserialize()).map_err(|e| Error::Config(e.to_string()))?;
        cfg.etcd_warnings = etcd.warnings;
        overlay!(
            cfg,
            flags,
            name,
            listen_client_urls,
            advertise_client_urls,
            listen_peer_urls,
            initial_advertise_peer_urls,
            initial_cluster_state,
            initial_cluster_token,
            heartbeat_interval,
            election_timeout,
            snapshot_count,
            max_request_bytes,
            max_txn_ops,
            max_peer_message_bytes,
            max_concurrent_streams,
            grpc_keepalive_interval,
            grpc_keepalive_timeout,
            listen_metrics_urls,
            quota_backend_bytes,
            log_level,
            otlp_endpoint,
            watch_progress_notify_interval,
            lease_checkpoint_interval,
            auto_compaction_mode,
            auto_compaction_retention,
            region,
            initial_role,
            primary_region,
            cipher_suites,
            client_cert_allowed_hostname,
            peer_cert_allowed_cn,
            peer_cert_allowed_hostname,
            auth_token,
            auth_token_ttl,
            bcrypt_cost,
            topology_endpoints,
            primary_lease_ttl,
            failover_after
        );
        cfg.auto_failover |= flags.auto_failover;
        if let Some(d) = &flags.data_dir {
            cfg.data_dir = Some(d.clone());
        }
        if let Some(c) = &flags.initial_cluster {
            cfg.initial_cluster = Some(c.clone());
        }
        if let Some(f) = &flags.mirror_token_file {
            cfg.mirror_token_file = Some(f.clone());
        }
        for (flag, setting) in [
            (&flags.server_tls.cert_file, &mut cfg.cert_file),
            (&flags.server_tls.key_file, &mut cfg.key_file),
            (&flags.server_tls.trusted_ca_file, &mut cfg.trusted_ca_file),
            (&flags.peer_cert_file, &mut cfg.peer_cert_file),
            (&flags.peer_key_file, &mut cfg.peer_key_file),
            (&flags.peer_trusted_ca_file, &mut cfg.peer_trusted_ca_file),
            (&flags.client_crl_file, &mut cfg.client_crl_file),
            (&flags.peer_crl_file, &mut cfg.peer_crl_file),
        ] {
            if let Some(f) = flag {
                *setting = Some(f.clone());
            }
        }
        for (flag, setting) in [
            (flags.server_tls.client_cert_auth, &mut cfg.client_cert_auth),
            (flags.auto_tls, &mut cfg.auto_tls),
            (flags.peer_client_cert_auth, &mut cfg.peer_client_cert_auth),
            (flags.peer_auto_tls, &mut cfg.peer_auto_tls),
        ] {
            if let Some(v) = flag {
                *setting = v;
            }
        }
        Ok(cfg)
    }

    /// `--topology-endpoints` and the settings that go with it.
    fn topology(&self) -> Result<Option<crate::server::primary_lease::TopologyConfig>> {
        if self.topology_endpoints.is_empty() {
            if self.auto_failover {
                return Err(Error::Config("--auto-failover needs --topology-endpoints".into()));
            }
            return Ok(None);
        }
        let endpoints = meridian_wire::url::parse_endpoints(&self.topology_endpoints)
            .map_err(|e| Error::Config(format!("--topology-endpoints: {e}")))?;
        let ttl = positive_duration("--primary-lease-ttl", &self.primary_lease_ttl)?;
        if ttl < Duration::from_secs(1) {
            return Err(Error::Config(format!(
                "--primary-lease-ttl {} is below the 1s minimum",
                self.primary_lease_ttl
            )));
        }
        Ok(Some(crate::server::primary_lease::TopologyConfig {
            endpoints: endpoints.iter().map(ToString::to_string).collect(),
            ttl,
            auto_failover: self.auto_failover,
            failover_after: positive_duration("--failover-after", &self.failover_after)?,
        }))
    }

    /// `--auth-token` and the settings that go with it.
    fn auth(&self) -> Result<crate::server::auth::store::AuthConfig> {
        let (kind, options) = self.auth_token.split_once(',').unwrap_or((&self.auth_token, ""));
        let jwt = match kind {
            "" | "simple" => None,
            "jwt" => Some(std::sync::Arc::new(
                crate::server::auth::jwt::Jwt::parse(options)
                    .map_err(|e| Error::Config(format!("--auth-token {}: {e}", self.auth_token)))?,
            )),
            other => return Err(Error::Config(format!("--auth-token: unknown token type: {other}"))),
        };
        if !(4..=31).contains(&self.bcrypt_cost) {
            return Err(Error::Config(format!("--bcrypt-cost {}: between 4 and 31", self.bcrypt_cost)));
        }
        if self.auth_token_ttl == 0 {
            return Err(Error::Config("--auth-token-ttl must be > 0".into()));
        }
        Ok(crate::server::auth::store::AuthConfig {
            token_ttl: Duration::from_secs(self.auth_token_ttl),
            bcrypt_cost: self.bcrypt_cost,
            jwt,
        })
    }

    /// Checks every value and parses it into its type.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the first flag whose value is refused.
    pub fn check(self) -> Result<NodeConfig> {
        if self.heartbeat_interval == 0 {
            return Err(Error::Config("--heartbeat-interval must be > 0".into()));
        }
        if self.election_timeout < 5 * self.heartbeat_interval {
            return Err(Error::Config(format!(
                "--election-timeout[{}ms] should be at least as 5 times as --heartbeat-interval[{}ms]",
                self.election_timeout, self.heartbeat_interval
            )));
        }
        let initial_cluster_state = match self.initial_cluster_state.as_str() {
            "new" => ClusterState::New,
            "existing" => ClusterState::Existing,
            other => {
                return Err(Error::Config(format!(
                    "invalid value {other:?} for --initial-cluster-state: valid values are \"new\" or \"existing\""
                )))
            }
        };
        let initial_role = match self.initial_role.as_str() {
            "primary" => InitialRole::Primary,
            "secondary" => InitialRole::Secondary,
            other => {
                return Err(Error::Config(format!(
                    "invalid value {other:?} for --initial-role: valid values are \"primary\" or \"secondary\""
                )))
            }
        };
        if self.max_txn_ops == 0 || self.max_request_bytes == 0 || self.snapshot_count == 0 {
            return Err(Error::Config("--max-txn-ops, --max-request-bytes and --snapshot-count must be > 0".into()));
        }
        // The largest raft entry (a mirror batch: twice a client request)
        // must fit in one peer message, with raft's framing.
        let min_peer_message = (2 * self.max_request_bytes).max(1 << 20) + (64 << 10);
        if self.max_peer_message_bytes < min_peer_message {
            return Err(Error::Config(format!(
                "--max-peer-message-bytes {} is too small: a raft entry must fit in one peer message, \
                 so it must be at least twice --max-request-bytes plus 64 KiB ({min_peer_message})",
                self.max_peer_message_bytes
            )));
        }
        if self.max_concurrent_streams == 0 {
            return Err(Error::Config("--max-concurrent-streams must be > 0".into()));
        }
        if !matches!(self.log_level.as_str(), "error" | "warn" | "info" | "debug" | "trace") {
            return Err(Error::Config(format!(
                "invalid --log-level {:?}: valid values are error, warn, info, debug or trace",
                self.log_level
            )));
        }
        let quota = match self.quota_backend_bytes {
            q if q < 0 => None,
            0 => Some(DEFAULT_QUOTA_BYTES),
            q => Some(q as u64),
        };
        let primary_region =
            if self.primary_region.is_empty() { self.region.clone() } else { self.primary_region.clone() };
        let listen_client_urls = urls("--listen-client-urls", &self.listen_client_urls)?;
        let listen_peer_urls = urls("--listen-peer-urls", &self.listen_peer_urls)?;
        let listen_metrics_urls = urls("--listen-metrics-urls", &self.listen_metrics_urls)?;
        let mut etcd_warnings = self.etcd_warnings.clone();
        let client_urls: Vec<Url> = listen_client_urls.iter().chain(&listen_metrics_urls).cloned().collect();
        meridian_wire::tls::Policy { cipher_suites: self.cipher_suites(), ..Default::default() }
            .check_cipher_suites()
            .map_err(Error::Config)?;
        let client_tls = self.listener_tls(false, &client_urls, &mut etcd_warnings)?;
        let peer_tls = self.listener_tls(true, &listen_peer_urls, &mut etcd_warnings)?;
        let peer_client = meridian_wire::tls::ClientFiles {
            cacert: self.peer_trusted_ca_file.clone().or_else(|| self.peer_transport_security.trusted_ca_file.clone()),
            cert: self.peer_cert_file.clone().or_else(|| self.peer_transport_security.cert_file.clone()),
            key: self.peer_key_file.clone().or_else(|| self.peer_transport_security.key_file.clone()),
            insecure_skip_verify: peer_tls == ListenerTls::Auto,
            // A member checks the names of the peers it dials too, as etcd does.
            policy: match &peer_tls {
                ListenerTls::Files(f) => f.policy.clone(),
                _ => meridian_wire::tls::Policy { cipher_suites: self.cipher_suites(), ..Default::default() },
            },
        };
        Ok(NodeConfig {
            data_dir: self.data_dir.clone().unwrap_or_else(|| PathBuf::from(format!("{}.meridian", self.name))),
            listen_client_urls,
            advertise_client_urls: urls("--advertise-client-urls", &self.advertise_client_urls)?,
            listen_peer_urls,
            listen_metrics_urls,
            client_tls,
            peer_tls,
            peer_client,
            cipher_suites: self.cipher_suites(),
            initial_members: self.initial_members()?,
            initial_cluster_state,
            heartbeat: Duration::from_millis(self.heartbeat_interval),
            election: Duration::from_millis(self.election_timeout),
            snapshot_count: self.snapshot_count,
            max_request_bytes: self.max_request_bytes,
            max_txn_ops: self.max_txn_ops,
            max_peer_message_bytes: self.max_peer_message_bytes,
            max_concurrent_streams: self.max_concurrent_streams,
            grpc_keepalive_interval: match parse_duration(&self.grpc_keepalive_interval) {
                Some(d) if d.is_zero() => None,
                Some(d) => Some(d),
                None => {
                    return Err(Error::Config(format!(
                        "invalid --grpc-keepalive-interval {:?}: want a duration like 2h or 30s (0 turns pings off)",
                        self.grpc_keepalive_interval
                    )))
                }
            },
            grpc_keepalive_timeout: positive_duration("--grpc-keepalive-timeout", &self.grpc_keepalive_timeout)?,
            quota,
            progress_notify_interval: positive_duration(
                "--experimental-watch-progress-notify-interval",
                &self.watch_progress_notify_interval,
            )?,
            lease_checkpoint_interval: positive_duration(
                "--experimental-lease-checkpoint-interval",
                &self.lease_checkpoint_interval,
            )?,
            auto_compaction: Retention::parse(&self.auto_compaction_mode, &self.auto_compaction_retention)?,
            mirror_token: self
                .mirror_token_file
                .as_deref()
                .map(|f| meridian_wire::token::read_token(f).map_err(Error::Config))
                .transpose()?,
            initial_role,
            primary_region,
            topology: self.topology()?,
            auth: self.auth()?,
            etcd_warnings,
            name: self.name,
            initial_cluster_token: self.initial_cluster_token,
            region: self.region,
            log_level: self.log_level,
            otlp_endpoint: Some(self.otlp_endpoint).filter(|e| !e.is_empty()),
        })
    }

    /// The bootstrap cluster: name → peer URLs. Defaults to this member alone.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when malformed or when this member is missing.
    fn initial_members(&self) -> Result<BTreeMap<String, Vec<String>>> {
        urls("--initial-advertise-peer-urls", &self.initial_advertise_peer_urls)?;
        let spec = self
            .initial_cluster
            .clone()
            .unwrap_or_else(|| format!("{}={}", self.name, self.initial_advertise_peer_urls));
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, url) = part
                .split_once('=')
                .ok_or_else(|| Error::Config(format!("bad --initial-cluster entry {part:?}: want name=URL")))?;
            let url = Url::parse(url).map_err(|e| Error::Config(format!("--initial-cluster: {e}")))?;
            out.entry(name.to_string()).or_default().push(url.to_string());
        }
        if !out.contains_key(&self.name) {
            return Err(Error::Config(format!(
                "couldn't find local name {:?} in the initial cluster configuration",
                self.name
            )));
        }
        Ok(out)
    }
}

impl NodeConfig {
    /// Resolves and checks the settings from `flags`, the config file it
    /// names, and the environment.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an unreadable file or a refused value; the
    /// message names the flag.
    pub fn load(flags: &NodeFlags) -> Result<Self> {
        Settings::gather(flags)?.check()
    }
}

/// A URL list flag, parsed.
fn urls(flag: &str, value: &str) -> Result<Vec<Url>> {
    meridian_wire::url::parse_list(value).map_err(|e| Error::Config(format!("{flag}: {e}")))
}

/// A duration flag that must be above zero.
fn positive_duration(flag: &str, value: &str) -> Result<Duration> {
    match parse_duration(value) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(Error::Config(format!("invalid {flag} {value:?}: want a duration above zero like 10m, 5s or 500ms"))),
    }
}

pub use meridian_wire::duration::parse_duration;

/// etcd's member id: SHA-1 of the sorted peer URLs and the cluster token.
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut h = Sha1::new();
    h.update(urls.concat().as_bytes());
    h.update(token.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("sha1 is 20 bytes"))
}

/// etcd's cluster id: SHA-1 of the sorted member ids.
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let mut h = Sha1::new();
    for id in ids {
        h.update(id.to_be_bytes());
    }
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("sha1 is 20 bytes"))
}

#[cfg(test)]
mod tests;
