//! `meridian gateway`'s settings: flags, `MERIDIAN_*` environment variables
//! and a TOML file (`configs/gateway.toml`), in falling precedence, checked
//! once into a typed [`GatewayConfig`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use meridian_wire::duration::parse_duration;
use meridian_wire::url::Url;
use serde::Deserialize;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct GatewayFlags {
    /// This gateway's name (listed by MemberList).
    #[arg(long)]
    pub name: Option<String>,
    /// The region this gateway runs in: it wins ties for the nearest region.
    #[arg(long)]
    pub region: Option<String>,
    /// URLs to serve the etcd API on, comma-separated.
    #[arg(long)]
    pub listen_client_urls: Option<String>,
    /// One region's endpoints: `NAME=URL,URL,...`. Repeat once per region.
    #[arg(long = "upstream")]
    pub upstreams: Vec<String>,
    /// Extra URLs serving /metrics, /health, /readyz and /v1/regions over plain HTTP.
    #[arg(long)]
    pub listen_metrics_urls: Option<String>,
    /// Default bound for serializable reads (a Go duration); `x-meridian-max-staleness` overrides it.
    #[arg(long)]
    pub max_staleness: Option<String>,
    /// How often each region is probed (a Go duration).
    #[arg(long)]
    pub probe_interval: Option<String>,
    /// Acknowledge a write only once this many secondary regions applied it (default 0);
    /// `x-meridian-wait-regions` overrides it per request.
    #[arg(long)]
    pub write_wait_regions: Option<usize>,
    /// How long a write waits for those regions before the client gets DeadlineExceeded.
    #[arg(long)]
    pub write_wait_timeout: Option<String>,
    /// Refuse writes ("etcdserver: too many requests") while every secondary is staler than
    /// this (a Go duration; 0 = off): lag cannot silently grow past the RPO chosen.
    #[arg(long)]
    pub max_write_lag: Option<String>,
    /// Most concurrent calls (HTTP/2 streams) one client connection may have open.
    #[arg(long)]
    pub max_concurrent_streams: Option<u32>,
    /// Export traces over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317); off when unset.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Another region's gateway, for the dashboard's RTT matrix: `REGION=URL` of its
    /// /v1/regions (its client or metrics URL). Repeat once per region.
    #[arg(long = "peer-gateway")]
    pub peer_gateways: Vec<String>,
    /// For https:// upstreams: what to trust and present (etcdctl's names).
    #[command(flatten)]
    pub tls: meridian_wire::tls::TlsFlags,
    /// TLS on https:// client and metrics URLs: --cert-file, --key-file, --trusted-ca-file,
    /// --client-cert-auth, as a member takes them.
    #[command(flatten)]
    pub server_tls: meridian_wire::tls::ServerTlsFlags,
    /// TOML file with any of the settings above (snake_case keys; `upstream` and
    /// `peer_gateway` are tables).
    #[arg(long)]
    pub config_file: Option<PathBuf>,
}

/// The file's and the environment's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FileSettings {
    name: Option<String>,
    region: Option<String>,
    listen_client_urls: Option<String>,
    /// region name -> comma-separated endpoints.
    upstream: std::collections::BTreeMap<String, String>,
    listen_metrics_urls: Option<String>,
    max_staleness: Option<String>,
    probe_interval: Option<String>,
    write_wait_regions: Option<usize>,
    write_wait_timeout: Option<String>,
    max_write_lag: Option<String>,
    max_concurrent_streams: Option<u32>,
    rate_limits: crate::limits::RateLimits,
    /// region name -> that region's gateway URL.
    peer_gateway: std::collections::BTreeMap<String, String>,
    otlp_endpoint: Option<String>,
    cacert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    insecure_skip_tls_verify: Option<bool>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    trusted_ca_file: Option<PathBuf>,
    client_cert_auth: Option<bool>,
}

/// One region the gateway routes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub region: String,
    pub endpoints: Vec<Url>,
}

/// The checked settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub name: String,
    pub region: String,
    pub listen_client_urls: Vec<Url>,
    pub listen_metrics_urls: Vec<Url>,
    pub upstreams: Vec<Upstream>,
    pub max_staleness: Duration,
    pub probe_interval: Duration,
    pub write_wait_regions: usize,
    pub write_wait_timeout: Duration,
    /// `None` when the RPO guard is off.
    pub max_write_lag: Option<Duration>,
    /// Most concurrent calls (HTTP/2 streams) on one client connection.
    pub max_concurrent_streams: u32,
    /// Per client and class, from the config file's `[rate_limits]`.
    pub rate_limits: crate::limits::RateLimits,
    /// Other regions' gateways (region, base URL), whose RTT rows the
    /// dashboard shows.
    pub peer_gateways: Vec<(String, String)>,
    /// Where traces go (OTLP/gRPC); `None` when tracing is off.
    pub otlp_endpoint: Option<String>,
    /// For `https://` upstreams.
    pub upstream_tls: meridian_wire::tls::ClientTls,
    /// For `https://` client and metrics URLs.
    pub server_tls: Option<meridian_wire::tls::ServerFiles>,
}

impl GatewayConfig {
    /// Merges the file, the environment and the flags, and checks every value.
    ///
    /// # Errors
    ///
    /// An unreadable file, or a value that is refused, naming its flag.
    pub fn load(flags: &GatewayFlags) -> Result<Self> {
        let mut b = config::Config::builder();
        if let Some(f) = &flags.config_file {
            b = b.add_source(config::File::from(f.as_path()).format(config::FileFormat::Toml));
        }
        b = b.add_source(config::Environment::with_prefix("MERIDIAN").separator("__"));
        let file: FileSettings = b.build()?.try_deserialize().context("gateway settings")?;
        let pick = |flag: &Option<String>, file: Option<String>, default: &str| {
            flag.clone().or(file).unwrap_or_else(|| default.to_string())
        };
        let mut upstreams = Vec::new();
        if flags.upstreams.is_empty() {
            for (region, eps) in &file.upstream {
                upstreams.push(upstream(&format!("{region}={eps}"))?);
            }
        } else {
            for u in &flags.upstreams {
                upstreams.push(upstream(u)?);
            }
        }
        if upstreams.is_empty() {
            bail!("--upstream is required: one NAME=URL,URL,... per region");
        }
        for (i, u) in upstreams.iter().enumerate() {
            if upstreams[..i].iter().any(|o| o.region == u.region) {
                bail!("--upstream names region {:?} twice", u.region);
            }
        }
        let mut peer_gateways = Vec::new();
        let peers: Vec<String> = if flags.peer_gateways.is_empty() {
            file.peer_gateway.iter().map(|(r, u)| format!("{r}={u}")).collect()
        } else {
            flags.peer_gateways.clone()
        };
        for p in &peers {
            let (region, url) = p.split_once('=').with_context(|| format!("--peer-gateway {p:?}: want REGION=URL"))?;
            let url = meridian_wire::url::Url::parse(url.trim())
                .map_err(|e| anyhow::anyhow!("invalid --peer-gateway {p:?}: {e}"))?;
            peer_gateways.push((region.trim().to_string(), url.to_string()));
        }
        let region = pick(&flags.region, file.region, "default");
        let path = |flag: &Option<PathBuf>, file: Option<PathBuf>| flag.clone().or(file);
        let upstream_files = meridian_wire::tls::ClientFiles {
            cacert: path(&flags.tls.cacert, file.cacert),
            cert: path(&flags.tls.cert, file.cert),
            key: path(&flags.tls.key, file.key),
            insecure_skip_verify: flags.tls.insecure_skip_tls_verify || file.insecure_skip_tls_verify.unwrap_or(false),
            policy: Default::default(),
        };
        let upstream_tls =
            meridian_wire::tls::ClientTls::load(&upstream_files).map_err(|e| anyhow::anyhow!("upstream TLS: {e}"))?;
        let t = &flags.server_tls;
        let server_tls = match (path(&t.cert_file, file.cert_file), path(&t.key_file, file.key_file)) {
            (Some(cert), Some(key)) => Some(meridian_wire::tls::ServerFiles {
                cert,
                key,
                trusted_ca: path(&t.trusted_ca_file, file.trusted_ca_file),
                client_cert_auth: t.client_cert_auth.or(file.client_cert_auth).unwrap_or(false),
                crl: None,
                policy: Default::default(),
            }),
            (None, None) => None,
            _ => bail!("--cert-file and --key-file must be given together"),
        };
        let cfg = Self {
            upstream_tls,
            server_tls,
            name: pick(&flags.name, file.name, "gateway"),
            region,
            listen_client_urls: urls(
                "--listen-client-urls",
                &pick(&flags.listen_client_urls, file.listen_client_urls, "http://127.0.0.1:23790"),
            )?,
            listen_metrics_urls: urls(
                "--listen-metrics-urls",
                &pick(&flags.listen_metrics_urls, file.listen_metrics_urls, ""),
            )?,
            upstreams,
            max_staleness: duration("--max-staleness", &pick(&flags.max_staleness, file.max_staleness, "5s"))?,
            probe_interval: positive("--probe-interval", &pick(&flags.probe_interval, file.probe_interval, "200ms"))?,
            write_wait_regions: flags.write_wait_regions.or(file.write_wait_regions).unwrap_or(0),
            write_wait_timeout: positive(
                "--write-wait-timeout",
                &pick(&flags.write_wait_timeout, file.write_wait_timeout, "2s"),
            )?,
            max_write_lag: Some(duration("--max-write-lag", &pick(&flags.max_write_lag, file.max_write_lag, "0"))?)
                .filter(|d| !d.is_zero()),
            max_concurrent_streams: flags.max_concurrent_streams.or(file.max_concurrent_streams).unwrap_or(1000),
            rate_limits: file.rate_limits,
            peer_gateways,
            otlp_endpoint: flags.otlp_endpoint.clone().or(file.otlp_endpoint).filter(|e| !e.is_empty()),
        };
        if cfg.max_concurrent_streams == 0 {
            bail!("--max-concurrent-streams must be > 0");
        }
        if cfg.listen_client_urls.is_empty() {
            bail!("--listen-client-urls is empty");
        }
        if cfg.server_tls.is_none() {
            if let Some(u) = cfg.listen_client_urls.iter().chain(&cfg.listen_metrics_urls).find(|u| u.is_tls()) {
                bail!("TLS key/cert (--cert-file, --key-file) must be provided for client url {u} with HTTPS scheme");
            }
        }
        Ok(cfg)
    }
}

/// `NAME=URL,URL,...`.
fn upstream(s: &str) -> Result<Upstream> {
    let (region, eps) = s.split_once('=').with_context(|| format!("--upstream {s:?}: want NAME=URL,URL,..."))?;
    let region = region.trim();
    if region.is_empty() {
        bail!("--upstream {s:?}: the region name is empty");
    }
    let endpoints = endpoints(&format!("--upstream {region}"), eps)?;
    if endpoints.is_empty() {
        bail!("--upstream {s:?}: no endpoints");
    }
    Ok(Upstream { region: region.to_string(), endpoints })
}

fn urls(flag: &str, list: &str) -> Result<Vec<Url>> {
    meridian_wire::url::parse_list(list).map_err(|e| anyhow::anyhow!("invalid {flag}: {e}"))
}

fn endpoints(flag: &str, list: &str) -> Result<Vec<Url>> {
    meridian_wire::url::parse_endpoints(list).map_err(|e| anyhow::anyhow!("invalid {flag}: {e}"))
}

fn duration(flag: &str, s: &str) -> Result<Duration> {
    parse_duration(s).with_context(|| format!("invalid {flag} {s:?}: want a duration like 5s or 500ms"))
}

fn positive(flag: &str, s: &str) -> Result<Duration> {
    match duration(flag, s)? {
        d if d.is_zero() => bail!("invalid {flag} {s:?}: must be above zero"),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(upstreams: &[&str]) -> GatewayFlags {
        GatewayFlags { upstreams: upstreams.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn upstreams_and_defaults() {
        let cfg = GatewayConfig::load(&flags(&[
            "us-east=http://127.0.0.1:12379,http://127.0.0.1:22379",
            "eu-west=127.0.0.1:42379",
        ]))
        .unwrap();
        assert_eq!(cfg.upstreams.len(), 2);
        assert_eq!(cfg.upstreams[0].region, "us-east");
        assert_eq!(cfg.upstreams[0].endpoints.len(), 2);
        assert_eq!(cfg.upstreams[1].endpoints[0].to_string(), "http://127.0.0.1:42379");
        assert_eq!(cfg.max_staleness, Duration::from_secs(5));
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (f, want) in [
            (flags(&[]), "--upstream is required"),
            (flags(&["nowhere"]), "want NAME=URL"),
            (flags(&["a=http://h:1", "a=http://h:2"]), "twice"),
            (flags(&["a="]), "no endpoints"),
            (GatewayFlags { max_staleness: Some("soon".into()), ..flags(&["a=h:1"]) }, "--max-staleness"),
            (GatewayFlags { probe_interval: Some("0".into()), ..flags(&["a=h:1"]) }, "--probe-interval"),
            (GatewayFlags { write_wait_timeout: Some("0".into()), ..flags(&["a=h:1"]) }, "--write-wait-timeout"),
            (GatewayFlags { max_write_lag: Some("1 year".into()), ..flags(&["a=h:1"]) }, "--max-write-lag"),
            (GatewayFlags { peer_gateways: vec!["b".into()], ..flags(&["a=h:1"]) }, "want REGION=URL"),
            (GatewayFlags { peer_gateways: vec!["b=ftp://x".into()], ..flags(&["a=h:1"]) }, "--peer-gateway"),
        ] {
            let err = GatewayConfig::load(&f).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} does not say {want:?}");
        }
    }

    #[test]
    fn the_commented_config_file_loads() {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/gateway.toml");
        let cfg = GatewayConfig::load(&GatewayFlags { config_file: Some(file), ..Default::default() }).unwrap();
        assert_eq!((cfg.name.as_str(), cfg.region.as_str()), ("gw-eu", "eu-west"));
        let regions: Vec<_> = cfg.upstreams.iter().map(|u| (u.region.as_str(), u.endpoints.len())).collect();
        assert_eq!(regions, [("eu-west", 1), ("us-east", 3)]);
        assert_eq!(cfg.probe_interval, Duration::from_millis(200));
        assert_eq!(cfg.rate_limits, crate::limits::RateLimits::default());
        assert_eq!(cfg.max_concurrent_streams, 1000);
        assert_eq!(cfg.peer_gateways, [("us-east".to_string(), "http://127.0.0.1:3380".to_string())]);
    }
}
