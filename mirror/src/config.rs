//! `meridian mirror` flags, with the same file and environment layering as
//! the node (`MERIDIAN_MIRROR_*` variables, `--config-file`).

use std::path::PathBuf;

use meridian_wire::tls::{ClientFiles, ClientTls};
use serde::Deserialize;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct MirrorFlags {
    /// Source endpoints (Meridian or etcd), comma-separated host:port or URLs. Repeat it, once
    /// per other region, to follow the topology: the mirror always copies from the region that
    /// is the primary with the highest epoch, and idles while its target is the primary.
    #[arg(long)]
    pub source: Vec<String>,
    /// Target (secondary) endpoints, comma-separated.
    #[arg(long)]
    pub target: Option<String>,
    /// Mirror only keys with this prefix.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Replace the source prefix with this one on the target.
    #[arg(long)]
    pub dest_prefix: Option<String>,
    /// host:port serving /metrics (Prometheus text) and /status (JSON).
    #[arg(long)]
    pub listen_metrics: Option<String>,
    /// File holding the token the target secondary was given (its --mirror-token-file).
    #[arg(long)]
    pub mirror_token_file: Option<PathBuf>,
    /// Let the target follow this source even if it followed another cluster: its store is
    /// replaced by this source's history.
    #[arg(long)]
    pub allow_source_change: bool,
    /// Export traces over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317); off when unset.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// For https:// sources (and the target, unless --dest-* are given).
    #[command(flatten)]
    pub tls: meridian_wire::tls::TlsFlags,
    /// CA bundle the target's certificates must chain to (default: --cacert).
    #[arg(long)]
    pub dest_cacert: Option<PathBuf>,
    /// Certificate to present to an https:// target (default: --cert).
    #[arg(long)]
    pub dest_cert: Option<PathBuf>,
    /// Key of --dest-cert (default: --key).
    #[arg(long)]
    pub dest_key: Option<PathBuf>,
    /// The source's user, NAME:PASSWORD, when auth is on there: one with the role root, or
    /// mirror with read over what is mirrored (MERIDIAN_MIRROR_USER).
    #[arg(long)]
    pub user: Option<String>,
    /// The target's user, NAME:PASSWORD, once auth is on there (default: --user; the target
    /// takes the source's users): one with the role root or mirror.
    #[arg(long)]
    pub dest_user: Option<String>,
    /// TOML file with any of the settings above (snake_case keys).
    #[arg(long)]
    pub config_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct StatusFlags {
    /// Target (secondary) endpoints to ask for the applied revision and lag.
    #[arg(long)]
    pub target: Option<String>,
    /// A running mirror's --listen-metrics address, for its counters.
    #[arg(long)]
    pub metrics: Option<String>,
}

/// The resolved mirror settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct MirrorConfig {
    /// Each source region's endpoints; with more than one, the mirror follows the primary.
    pub sources: Vec<Vec<String>>,
    pub target: Vec<String>,
    pub prefix: String,
    pub dest_prefix: Option<String>,
    pub listen_metrics: Option<String>,
    /// Presented on every Apply (`x-meridian-mirror-token`).
    pub token: String,
    pub allow_source_change: bool,
    /// Where traces go (OTLP/gRPC); `None` when tracing is off.
    pub otlp_endpoint: Option<String>,
    /// `--user` and `--dest-user`: NAME:PASSWORD.
    pub user: Option<String>,
    pub dest_user: Option<String>,
    /// For `https://` sources.
    #[serde(skip)]
    pub source_tls: ClientTls,
    /// For an `https://` target.
    #[serde(skip)]
    pub target_tls: ClientTls,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FileConfig {
    /// One region's endpoints; `sources` lists several.
    source: Option<String>,
    sources: Option<Vec<String>>,
    target: Option<String>,
    prefix: Option<String>,
    dest_prefix: Option<String>,
    listen_metrics: Option<String>,
    mirror_token_file: Option<PathBuf>,
    allow_source_change: Option<bool>,
    otlp_endpoint: Option<String>,
    cacert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    insecure_skip_tls_verify: Option<bool>,
    dest_cacert: Option<PathBuf>,
    dest_cert: Option<PathBuf>,
    dest_key: Option<PathBuf>,
    user: Option<String>,
    dest_user: Option<String>,
}

/// Parses a comma-separated endpoint list (`host:port` or URLs) into URLs.
///
/// # Errors
///
/// The flag and the first endpoint that is not `host:port` or `http://host:port`.
pub fn endpoints(flag: &str, s: &str) -> anyhow::Result<Vec<String>> {
    let urls = meridian_wire::url::parse_endpoints(s).map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
    Ok(urls.iter().map(ToString::to_string).collect())
}

impl MirrorConfig {
    /// Flags over `MERIDIAN_MIRROR_*` environment over the file.
    ///
    /// # Errors
    ///
    /// An unreadable file, or no source or target.
    pub fn load(flags: &MirrorFlags) -> anyhow::Result<Self> {
        let mut b = config::Config::builder();
        if let Some(f) = &flags.config_file {
            b = b.add_source(config::File::from(f.as_path()).format(config::FileFormat::Toml));
        }
        b = b.add_source(config::Environment::with_prefix("MERIDIAN_MIRROR"));
        let file: FileConfig = b.build()?.try_deserialize()?;
        let pick = |flag: &Option<String>, file: Option<String>| flag.clone().or(file);
        let sources: Vec<String> = if !flags.source.is_empty() {
            flags.source.clone()
        } else if let Some(list) = file.sources {
            list
        } else {
            file.source.into_iter().collect()
        };
        let target = pick(&flags.target, file.target).unwrap_or_default();
        let token_file = flags.mirror_token_file.clone().or(file.mirror_token_file).ok_or_else(|| {
            anyhow::anyhow!("--mirror-token-file is required: the file the target secondary was given")
        })?;
        let path = |flag: &Option<PathBuf>, file: Option<PathBuf>| flag.clone().or(file);
        let source_files = ClientFiles {
            cacert: path(&flags.tls.cacert, file.cacert),
            cert: path(&flags.tls.cert, file.cert),
            key: path(&flags.tls.key, file.key),
            insecure_skip_verify: flags.tls.insecure_skip_tls_verify || file.insecure_skip_tls_verify.unwrap_or(false),
            policy: Default::default(),
        };
        let target_files = ClientFiles {
            cacert: path(&flags.dest_cacert, file.dest_cacert).or_else(|| source_files.cacert.clone()),
            cert: path(&flags.dest_cert, file.dest_cert).or_else(|| source_files.cert.clone()),
            key: path(&flags.dest_key, file.dest_key).or_else(|| source_files.key.clone()),
            insecure_skip_verify: source_files.insecure_skip_verify,
            policy: Default::default(),
        };
        let tls =
            |what: &str, files: &ClientFiles| ClientTls::load(files).map_err(|e| anyhow::anyhow!("{what} TLS: {e}"));
        let cfg = Self {
            source_tls: tls("source", &source_files)?,
            target_tls: tls("target", &target_files)?,
            sources: sources.iter().map(|s| endpoints("--source", s)).collect::<anyhow::Result<_>>()?,
            target: endpoints("--target", &target)?,
            prefix: pick(&flags.prefix, file.prefix).unwrap_or_default(),
            dest_prefix: pick(&flags.dest_prefix, file.dest_prefix),
            listen_metrics: pick(&flags.listen_metrics, file.listen_metrics),
            token: meridian_wire::token::read_token(&token_file).map_err(anyhow::Error::msg)?,
            allow_source_change: flags.allow_source_change || file.allow_source_change.unwrap_or(false),
            otlp_endpoint: pick(&flags.otlp_endpoint, file.otlp_endpoint).filter(|e| !e.is_empty()),
            user: pick(&flags.user, file.user.clone()),
            dest_user: pick(&flags.dest_user, file.dest_user).or(pick(&flags.user, file.user)),
        };
        anyhow::ensure!(!cfg.sources.is_empty(), "--source is required");
        anyhow::ensure!(!cfg.target.is_empty(), "--target is required");
        Ok(cfg)
    }

    /// The source key range: the prefix's range, or every key.
    pub fn source_range(&self) -> (Vec<u8>, Vec<u8>) {
        if self.prefix.is_empty() {
            return (vec![0], vec![0]);
        }
        let key = self.prefix.as_bytes().to_vec();
        (key.clone(), prefix_end(&key))
    }

    /// A source key as it is written on the target.
    pub fn target_key(&self, key: &[u8]) -> Vec<u8> {
        match &self.dest_prefix {
            Some(dest) if key.starts_with(self.prefix.as_bytes()) => {
                let mut k = dest.as_bytes().to_vec();
                k.extend_from_slice(&key[self.prefix.len()..]);
                k
            }
            _ => key.to_vec(),
        }
    }
}

pub use meridian_wire::etcd::prefix_end;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_key_rewrites() {
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), [0]);
        let cfg = MirrorConfig { prefix: "app/".into(), dest_prefix: Some("dr/app/".into()), ..Default::default() };
        assert_eq!(cfg.target_key(b"app/x"), b"dr/app/x");
        assert_eq!(cfg.source_range(), (b"app/".to_vec(), b"app0".to_vec()));
        assert_eq!(endpoints("--source", "127.0.0.1:1, http://h:2").unwrap(), ["http://127.0.0.1:1", "http://h:2"]);
        assert_eq!(endpoints("--target", "h:1,https://h:2").unwrap(), ["http://h:1", "https://h:2"]);
        let err = endpoints("--target", "h:1,ftp://h:2").unwrap_err().to_string();
        assert_eq!(
            err,
            "--target: URL \"ftp://h:2\" must look like http://host:port, https://host:port or unix://name"
        );
    }
}
