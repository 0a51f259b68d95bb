//! What a TLS link asks beyond its files, as etcd's flags name it:
//! `--cipher-suites`, and the name checks on the other side's certificate
//! (`--peer-cert-allowed-cn`, `--peer-cert-allowed-hostname`,
//! `--client-cert-allowed-hostname`).
//!
//! - Cipher suites take Go's names (etcd's). They restrict TLS 1.2 only, as
//!   Go's do; TLS 1.3 keeps its own three. rustls offers only ECDHE with
//!   AES-GCM or ChaCha20-Poly1305, so Go's older suites (CBC, RSA key
//!   exchange, RC4, 3DES) are dropped with a warning; a list left empty, or
//!   a name Go does not know, is refused.
//! - A name check runs after the chain is verified, on the end-entity
//!   certificate: its subject CN must equal `allowed_cn`, and it must be
//!   valid for `allowed_hostname` (SAN DNS names with wildcards, or IPs).
//!   A listener checks the certificates clients present (so only with
//!   client certificates required); a client checks the server's. Refusals
//!   say what etcd says: `CommonName authentication failed`,
//!   `HostName authentication failed`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme, SupportedCipherSuite,
};

/// A link's cipher suites and name checks; empty, it asks nothing more.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Go's names of the TLS 1.2 suites to offer; empty offers every one.
    pub cipher_suites: Vec<String>,
    /// The subject CN the other side's certificate must carry.
    pub allowed_cn: Option<String>,
    /// A host name (or IP) the other side's certificate must be valid for.
    pub allowed_hostname: Option<String>,
}

/// Go's TLS 1.2 suites that rustls does not implement.
const GO_ONLY: &[&str] = &[
    "TLS_RSA_WITH_RC4_128_SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
];

impl Policy {
    /// Whether a name check is asked for.
    pub fn checks_names(&self) -> bool {
        self.allowed_cn.is_some() || self.allowed_hostname.is_some()
    }

    /// `base` with only the chosen TLS 1.2 suites (and every TLS 1.3 one).
    ///
    /// # Errors
    ///
    /// A name Go does not know, or a list none of whose suites rustls has.
    pub(super) fn provider(&self, base: CryptoProvider) -> Result<CryptoProvider, String> {
        if self.cipher_suites.is_empty() {
            return Ok(base);
        }
        let mut chosen: Vec<SupportedCipherSuite> =
            base.cipher_suites.iter().filter(|s| matches!(s, SupportedCipherSuite::Tls13(_))).copied().collect();
        let mut dropped = Vec::new();
        for name in &self.cipher_suites {
            // Go names ChaCha20 suites without the hash; the IANA names (rustls's) carry it.
            let iana = if name.ends_with("_CHACHA20_POLY1305") { format!("{name}_SHA256") } else { name.clone() };
            let found = base
                .cipher_suites
                .iter()
                .find(|s| matches!(s, SupportedCipherSuite::Tls12(_)) && s.suite().as_str() == Some(iana.as_str()));
            match found {
                Some(s) if !chosen.contains(s) => chosen.push(*s),
                Some(_) => {}
                None if GO_ONLY.contains(&name.as_str()) => dropped.push(name.as_str()),
                None => return Err(format!("unexpected TLS cipher suite {name:?}")),
            }
        }
        if !dropped.is_empty() {
            tracing::warn!(suites = %dropped.join(","), "--cipher-suites: rustls does not offer these older suites; not offered");
        }
        if !chosen.iter().any(|s| matches!(s, SupportedCipherSuite::Tls12(_))) {
            return Err(format!(
                "--cipher-suites {}: none is offered by Meridian's TLS (rustls has only ECDHE with AES-GCM or ChaCha20-Poly1305 for TLS 1.2)",
                self.cipher_suites.join(",")
            ));
        }
        Ok(CryptoProvider { cipher_suites: chosen, ..base })
    }

    /// Checks the cipher suite names alone (at startup, before any
    /// listener loads its files).
    ///
    /// # Errors
    ///
    /// As [`Policy::provider`].
    pub fn check_cipher_suites(&self) -> Result<(), String> {
        self.provider(rustls::crypto::ring::default_provider()).map(|_| ())
    }

    /// The name checks on an end-entity certificate whose chain verified.
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let refuse = |why: &'static str| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(std::io::Error::other(why)))))
        };
        if let Some(cn) = &self.allowed_cn {
            if common_name(cert).as_deref() != Some(cn.as_str()) {
                return Err(refuse("CommonName authentication failed"));
            }
        }
        if let Some(host) = &self.allowed_hostname {
            let valid = ServerName::try_from(host.as_str()).ok().is_some_and(|name| {
                webpki::EndEntityCert::try_from(cert).is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
            });
            if !valid {
                return Err(refuse("HostName authentication failed"));
            }
        }
        Ok(())
    }
}

/// The subject's common name (the last one, as Go reads it).
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().last()?;
    cn.as_str().ok().map(str::to_string)
}

/// A client-certificate verifier that also runs [`Policy`]'s name checks.
#[derive(Debug)]
pub(super) struct CheckedClients {
    pub inner: Arc<dyn ClientCertVerifier>,
    pub policy: Policy,
}

impl ClientCertVerifier for CheckedClients {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        self.policy.check(end_entity)?;
        Ok(verified)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server-certificate verifier that also runs [`Policy`]'s name checks.
#[derive(Debug)]
pub(super) struct CheckedServer {
    pub inner: Arc<dyn ServerCertVerifier>,
    pub policy: Policy,
}

impl ServerCertVerifier for CheckedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        self.policy.check(end_entity)?;
        Ok(verified)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
