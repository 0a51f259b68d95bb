//! The TLS settings of `meridian node`: etcd's flags and YAML sections for
//! client and peer listeners, checked into a [`ListenerTls`] per kind.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Settings;
use crate::error::{Error, Result};
use meridian_wire::url::Url;

/// The `client-transport-security` or `peer-transport-security` section of
/// etcd's YAML file; the flat settings (flags, TOML, environment) win.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TransportSecurity {
    #[serde(alias = "cert-file")]
    pub cert_file: Option<PathBuf>,
    #[serde(alias = "key-file")]
    pub key_file: Option<PathBuf>,
    #[serde(alias = "trusted-ca-file")]
    pub trusted_ca_file: Option<PathBuf>,
    #[serde(alias = "client-cert-auth")]
    pub client_cert_auth: bool,
    #[serde(alias = "crl-file")]
    pub crl_file: Option<PathBuf>,
    #[serde(alias = "auto-tls")]
    pub auto_tls: bool,
    /// `--peer-cert-allowed-cn` (peer section only, as in etcd).
    #[serde(alias = "allowed-cn")]
    pub allowed_cn: Option<String>,
    /// `--peer-cert-allowed-hostname` / `--client-cert-allowed-hostname`.
    #[serde(alias = "allowed-hostname")]
    pub allowed_hostname: Option<String>,
}

/// A comma-separated list, from a string (flags, TOML, environment) or a
/// list (etcd's YAML `cipher-suites: [...]`), kept as the string.
pub(super) fn comma_list<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Either::deserialize(d)? {
        Either::One(s) => s,
        Either::Many(v) => v.join(","),
    })
}

/// Splits a comma-separated setting, dropping blanks.
fn split_list(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect()
}

/// What a listener serves TLS with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerTls {
    /// Plain HTTP only.
    Off,
    /// Certificate files given.
    Files(meridian_wire::tls::ServerFiles),
    /// `--auto-tls`: a self-signed pair made in the data directory at start.
    Auto,
}

impl ListenerTls {
    pub fn is_on(&self) -> bool {
        *self != ListenerTls::Off
    }
}

impl Settings {
    /// `--cipher-suites`, as a list.
    pub(super) fn cipher_suites(&self) -> Vec<String> {
        split_list(&self.cipher_suites)
    }

    /// The TLS of one kind of listener (client or peer) from its settings,
    /// etcd's YAML section, and whether any of its URLs is `https://`.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an `https://` URL without a certificate, a
    /// certificate without its key, or client certificates required
    /// without a CA to check them.
    pub(super) fn listener_tls(&self, peer: bool, urls: &[Url], warnings: &mut Vec<String>) -> Result<ListenerTls> {
        let s = self;
        let (cert, key, ca, auth, auto, crl, yaml) = if peer {
            let t = &s.peer_transport_security;
            let (c, k, a) = (&s.peer_cert_file, &s.peer_key_file, &s.peer_trusted_ca_file);
            (c, k, a, s.peer_client_cert_auth, s.peer_auto_tls, &s.peer_crl_file, t)
        } else {
            let t = &s.client_transport_security;
            (&s.cert_file, &s.key_file, &s.trusted_ca_file, s.client_cert_auth, s.auto_tls, &s.client_crl_file, t)
        };
        let crl = crl.clone().or_else(|| yaml.crl_file.clone()).filter(|p| !p.as_os_str().is_empty());
        let cert = cert.clone().or_else(|| yaml.cert_file.clone()).filter(|p| !p.as_os_str().is_empty());
        let key = key.clone().or_else(|| yaml.key_file.clone()).filter(|p| !p.as_os_str().is_empty());
        let trusted_ca = ca.clone().or_else(|| yaml.trusted_ca_file.clone()).filter(|p| !p.as_os_str().is_empty());
        let (auth, auto) = (auth || yaml.client_cert_auth, auto || yaml.auto_tls);
        let p = if peer { "peer-" } else { "" };
        let nonempty = |a: &str, b: &Option<String>| Some(a.to_string()).filter(|x| !x.is_empty()).or(b.clone());
        let policy = meridian_wire::tls::Policy {
            cipher_suites: self.cipher_suites(),
            allowed_cn: if peer { nonempty(&s.peer_cert_allowed_cn, &yaml.allowed_cn) } else { None },
            allowed_hostname: if peer {
                nonempty(&s.peer_cert_allowed_hostname, &yaml.allowed_hostname)
            } else {
                nonempty(&s.client_cert_allowed_hostname, &yaml.allowed_hostname)
            },
        };
        if let (Some(cn), Some(host)) = (&policy.allowed_cn, &policy.allowed_hostname) {
            return Err(Error::Config(format!(
                "AllowedCN and AllowedHostname are mutually exclusive (cn={cn:?}, hostname={host:?})"
            )));
        }
        if policy.checks_names() && !auth {
            warnings.push(format!(
                "--{p}cert-allowed-*: certificate names are checked only with --{p}client-cert-auth; ignored"
            ));
        }
        let tls_urls: Vec<&Url> = urls.iter().filter(|u| u.is_tls()).collect();
        let files = match (cert, key) {
            (Some(cert), Some(key)) => {
                Some(meridian_wire::tls::ServerFiles { cert, key, trusted_ca, client_cert_auth: auth, crl, policy })
            }
            (None, None) => None,
            _ => return Err(Error::Config(format!("--{p}cert-file and --{p}key-file must be given together"))),
        };
        if files.as_ref().is_some_and(|f| f.client_cert_auth && f.trusted_ca.is_none()) {
            return Err(Error::Config(format!("--{p}client-cert-auth needs --{p}trusted-ca-file")));
        }
        if tls_urls.is_empty() {
            if files.is_some() {
                for u in urls {
                    let kind = if peer { "peer" } else { "client" };
                    warnings.push(format!(
                        "the scheme of {kind} url {u} is HTTP while {p}key/cert files are presented; ignored the key/cert files"
                    ));
                }
            }
            return Ok(ListenerTls::Off);
        }
        match files {
            Some(f) => Ok(ListenerTls::Files(f)),
            None if auto => Ok(ListenerTls::Auto),
            None if peer => Err(Error::Config(format!(
                "cannot listen on TLS for {}: KeyFile and CertFile are not presented",
                tls_urls[0].host_port()
            ))),
            None => Err(Error::Config(format!(
                "TLS key/cert (--cert-file, --key-file) must be provided for client url {} with HTTPS scheme",
                tls_urls[0]
            ))),
        }
    }
}
