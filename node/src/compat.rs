//! etcd 3.4's flags that `meridian node` takes so that an etcd unit file, an
//! etcd YAML config or etcd's own end-to-end tests start it unchanged.
//!
//! `meridian node` implements the flags that apply (see `config`); this
//! module takes the others out of the argument list before clap sees them,
//! and sorts each into one of three fates:
//! - **ignored**: tuning and experimental knobs that mean nothing here; the
//!   member starts and logs one warning naming them;
//! - **refused**: flags whose effect a user relies on and Meridian does not
//!   have (discovery, proxy mode, the v2 API, forcing a new cluster);
//!   starting as if they were absent would be silently wrong;
//! - flags with their default or a "disabled" value pass either way.
//!
//! Go's flag package takes `--flag=value`, `--flag value`, and for booleans
//! only `--flag` or `--flag=bool`; the same spellings are taken here.

/// What becomes of an etcd flag Meridian does not implement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Accepted; a warning names it.
    Ignore,
    /// Refused unless its value is one of these (the defaults, "off").
    RefuseUnless(&'static [&'static str]),
}

/// Whether the flag is a Go boolean flag (takes no separate value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arity {
    Bool,
    Value,
}

use std::collections::HashMap;

use Arity::{Bool, Value};
use Fate::{Ignore, RefuseUnless};

use crate::error::{Error, Result};

const OFF: &[&str] = &["", "false"];

/// Every flag of `etcd --help` (3.4) that `meridian node` does not implement.
const FLAGS: &[(&str, Arity, Fate)] = &[
    ("backend-batch-interval", Value, Ignore),
    ("backend-batch-limit", Value, Ignore),
    ("cors", Value, Ignore),
    ("debug", Bool, Ignore),
    ("discovery", Value, RefuseUnless(OFF)),
    ("discovery-fallback", Value, Ignore),
    ("discovery-proxy", Value, RefuseUnless(OFF)),
    ("discovery-srv", Value, RefuseUnless(OFF)),
    ("discovery-srv-name", Value, Ignore),
    ("enable-pprof", Bool, Ignore),
    ("enable-v2", Bool, RefuseUnless(OFF)),
    ("experimental-backend-bbolt-freelist-type", Value, Ignore),
    ("experimental-compaction-batch-limit", Value, Ignore),
    ("experimental-corrupt-check-time", Value, Ignore),
    ("experimental-enable-lease-checkpoint", Bool, Ignore),
    ("experimental-enable-v2v3", Value, RefuseUnless(OFF)),
    ("experimental-initial-corrupt-check", Bool, Ignore),
    ("experimental-peer-skip-client-san-verification", Bool, Ignore),
    ("experimental-warning-apply-duration", Value, Ignore),
    ("force-new-cluster", Bool, RefuseUnless(OFF)),
    // The HTTP/2 server cannot enforce a minimum time between a client's pings.
    ("grpc-keepalive-min-time", Value, Ignore),
    ("host-whitelist", Value, Ignore),
    ("initial-election-tick-advance", Bool, Ignore),
    ("log-outputs", Value, Ignore),
    ("log-package-levels", Value, Ignore),
    ("logger", Value, Ignore),
    ("max-snapshots", Value, Ignore),
    ("max-wals", Value, Ignore),
    ("metrics", Value, Ignore),
    ("pre-vote", Bool, Ignore),
    ("proxy", Value, RefuseUnless(&["", "off"])),
    ("proxy-dial-timeout", Value, Ignore),
    ("proxy-failure-wait", Value, Ignore),
    ("proxy-read-timeout", Value, Ignore),
    ("proxy-refresh-interval", Value, Ignore),
    ("proxy-write-timeout", Value, Ignore),
    ("strict-reconfig-check", Bool, Ignore),
    ("wal-dir", Value, Ignore),
];

/// Why a flag stops the member at startup.
fn refusal(flag: &str, value: &str) -> String {
    let why = match flag {
        "enable-v2" | "experimental-enable-v2v3" => "the etcd v2 API is out of scope; Meridian serves the v3 API only",
        "force-new-cluster" => "Meridian cannot force a new cluster from a member's data yet",
        "proxy" => "Meridian has no etcd proxy mode; see `meridian gateway` for one endpoint per region",
        f if f.starts_with("discovery") => "discovery is not supported; give --initial-cluster",
        _ => "it is not supported",
    };
    format!("--{flag}={value}: {why}")
}

/// The etcd flags taken out of the arguments.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EtcdFlags {
    /// One line per ignored flag, for the log once it is up.
    pub warnings: Vec<String>,
    /// Flags that stop the member, each with why.
    pub refused: Vec<String>,
}

/// Takes the etcd flags Meridian does not implement out of `args` (already
/// normalized to `--flag` spellings). The rest goes on to clap.
pub fn take_etcd_flags(args: Vec<String>) -> (Vec<String>, EtcdFlags) {
    let mut kept = Vec::with_capacity(args.len());
    let mut found = EtcdFlags::default();
    let mut it = args.into_iter().peekable();
    while let Some(arg) = it.next() {
        let Some(body) = arg.strip_prefix("--") else {
            kept.push(arg);
            continue;
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let Some(&(flag, arity, fate)) = FLAGS.iter().find(|(f, _, _)| *f == name) else {
            kept.push(arg);
            continue;
        };
        let value = match (inline, arity) {
            (Some(v), _) => v,
            (None, Bool) => "true".to_string(),
            (None, Value) => match it.peek() {
                Some(next) if !next.starts_with("--") => it.next().unwrap_or_default(),
                _ => String::new(),
            },
        };
        match fate {
            RefuseUnless(ok) if !ok.contains(&value.as_str()) => found.refused.push(refusal(flag, &value)),
            RefuseUnless(_) => {}
            Ignore => found.warnings.push(format!("--{flag}={value}")),
        }
    }
    (kept, found)
}

/// The keys of etcd's YAML configuration file that `Settings` takes (etcd's
/// dashed names).
const SETTINGS_KEYS: &[&str] = &[
    "name",
    "data-dir",
    "listen-client-urls",
    "advertise-client-urls",
    "listen-peer-urls",
    "initial-advertise-peer-urls",
    "initial-cluster",
    "initial-cluster-state",
    "initial-cluster-token",
    "heartbeat-interval",
    "election-timeout",
    "snapshot-count",
    "max-request-bytes",
    "max-txn-ops",
    "listen-metrics-urls",
    "quota-backend-bytes",
    "experimental-watch-progress-notify-interval",
    "experimental-lease-checkpoint-interval",
    "auto-compaction-mode",
    "auto-compaction-retention",
    "log-level",
    "region",
    "initial-role",
    "primary-region",
    "mirror-token-file",
    "max-peer-message-bytes",
    "max-concurrent-streams",
    "grpc-keepalive-interval",
    "grpc-keepalive-timeout",
    "cipher-suites",
];

/// The keys of a `*-transport-security` section that `Settings` takes.
const TRANSPORT_KEYS: &[&str] = &[
    "cert-file",
    "key-file",
    "trusted-ca-file",
    "client-cert-auth",
    "auto-tls",
    "crl-file",
    "allowed-cn",
    "allowed-hostname",
];

/// Sorts the keys of an etcd YAML configuration file as [`take_etcd_flags`]
/// sorts flags: those `Settings` takes pass; the rest are ignored with a
/// warning or refused. In the TLS sections (`client-transport-security`,
/// `peer-transport-security`) the certificate files, `client-cert-auth` and
/// `auto-tls` pass; the rest are refused or ignored as their flags are.
///
/// # Errors
///
/// [`Error::Config`] when the file does not parse as YAML.
pub fn check_etcd_yaml(path: &std::path::Path) -> Result<EtcdFlags> {
    let map: HashMap<String, config::Value> = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Yaml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| Error::Config(format!("--config-file {}: {e}", path.display())))?;
    let mut found = EtcdFlags::default();
    let mut keys: Vec<_> = map.into_iter().collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, value) in keys {
        let key = key.replace('_', "-");
        if SETTINGS_KEYS.contains(&key.as_str()) {
            continue;
        }
        if key.ends_with("transport-security") {
            let prefix = if key.starts_with("peer") { "peer-" } else { "" };
            let mut inner: Vec<_> = value.into_table().unwrap_or_default().into_iter().collect();
            inner.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, v) in inner {
                let name = name.replace('_', "-");
                let text = v.to_string();
                if TRANSPORT_KEYS.contains(&name.as_str()) || is_unset(&text) {
                    continue;
                }
                // The YAML names the name checks `allowed-cn` and `allowed-hostname`.
                let flag = match name.as_str() {
                    "allowed-cn" | "allowed-hostname" => format!("{prefix}cert-{name}"),
                    _ => format!("{prefix}{name}"),
                };
                match FLAGS.iter().find(|(f, _, _)| *f == flag) {
                    Some((flag, _, RefuseUnless(_))) => found.refused.push(refusal(flag, &text)),
                    _ => found.warnings.push(format!("{key}.{name}: {text} (ignored)")),
                }
            }
            continue;
        }
        let text = match value.clone().into_array() {
            Ok(items) => items.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            Err(_) => value.to_string(),
        };
        let text = if is_unset(&text) && text != "false" { String::new() } else { text };
        match FLAGS.iter().find(|(f, _, _)| *f == key) {
            Some(&(flag, _, RefuseUnless(ok))) if !ok.contains(&text.as_str()) => {
                found.refused.push(refusal(flag, &text))
            }
            Some((_, _, RefuseUnless(_))) => {}
            Some((flag, _, Ignore)) => found.warnings.push(format!("{flag}: {text}")),
            None => found.warnings.push(format!("{key}: {text} (not an etcd 3.4 setting)")),
        }
    }
    Ok(found)
}

/// A YAML value that leaves a setting off: empty, null or false.
fn is_unset(v: &str) -> bool {
    matches!(v, "" | "nil" | "null" | "~" | "false")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn etcd_e2e_flags_are_taken_out_and_sorted() {
        let (kept, found) = take_etcd_flags(args(&[
            "node",
            "--name",
            "m1",
            "--experimental-initial-corrupt-check",
            "--strict-reconfig-check",
            "--max-concurrent-streams",
            "100",
            "--enable-v2=false",
            "--logger=zap",
            "--data-dir",
            "d",
        ]));
        assert_eq!(kept, args(&["node", "--name", "m1", "--max-concurrent-streams", "100", "--data-dir", "d"]));
        assert_eq!(
            found.warnings,
            ["--experimental-initial-corrupt-check=true", "--strict-reconfig-check=true", "--logger=zap"]
        );
        assert!(found.refused.is_empty());
    }

    #[test]
    fn flags_whose_effect_matters_are_refused() {
        for (given, want) in [
            (vec!["--enable-v2=true"], "v2 API is out of scope"),
            (vec!["--enable-v2"], "v2 API is out of scope"),
            (vec!["--force-new-cluster"], "cannot force a new cluster"),
            (vec!["--discovery=https://discovery.etcd.io/x"], "discovery is not supported"),
            (vec!["--proxy", "on"], "no etcd proxy mode"),
        ] {
            let (_, found) = take_etcd_flags(args(&given));
            assert_eq!(found.refused.len(), 1, "{given:?}");
            assert!(found.refused[0].contains(want), "{given:?}: {:?}", found.refused);
        }
        // Their defaults pass.
        let (_, found) = take_etcd_flags(args(&["--proxy=off", "--discovery="]));
        assert_eq!(found, EtcdFlags::default());
    }

    #[test]
    fn every_flag_of_etcd_help_is_known() {
        // `meridian node`'s own flags plus this table cover etcd 3.4's `etcd --help`.
        let implemented = [
            "advertise-client-urls",
            "auto-tls",
            "cert-file",
            "client-cert-auth",
            "key-file",
            "peer-auto-tls",
            "client-crl-file",
            "peer-crl-file",
            "cipher-suites",
            "auth-token",
            "auth-token-ttl",
            "bcrypt-cost",
            "client-cert-allowed-hostname",
            "peer-cert-allowed-cn",
            "peer-cert-allowed-hostname",
            "peer-cert-file",
            "peer-client-cert-auth",
            "peer-key-file",
            "peer-trusted-ca-file",
            "trusted-ca-file",
            "auto-compaction-mode",
            "auto-compaction-retention",
            "data-dir",
            "election-timeout",
            "experimental-watch-progress-notify-interval",
            "heartbeat-interval",
            "initial-advertise-peer-urls",
            "initial-cluster",
            "initial-cluster-state",
            "initial-cluster-token",
            "listen-client-urls",
            "listen-metrics-urls",
            "listen-peer-urls",
            "log-level",
            "grpc-keepalive-interval",
            "grpc-keepalive-timeout",
            "max-concurrent-streams",
            "max-request-bytes",
            "max-txn-ops",
            "name",
            "quota-backend-bytes",
            "snapshot-count",
        ];
        let etcd_help = include_str!("compat/etcd-3.4-flags.txt");
        for flag in etcd_help.lines().filter(|l| l.starts_with("--")) {
            let flag = flag.trim_start_matches("--");
            assert!(
                implemented.contains(&flag) || FLAGS.iter().any(|(f, _, _)| *f == flag),
                "etcd 3.4's --{flag} is neither implemented nor taken"
            );
        }
    }
}
