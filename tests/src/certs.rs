//! Certificates made at test time (rcgen): a CA, and server and client pairs it signs, written
//! as PEM files in a temp dir, so TLS tests need no fixtures checked in.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let ca = meridian_tests::TestCa::new("test CA")?;
//! let server = ca.server("m1")?; // SANs 127.0.0.1 and localhost
//! let alice = ca.client("alice")?; // CN alice
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use tempfile::TempDir;

/// A certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate's serial number (0 for a copy made by hand).
    pub serial: u64,
}

impl Pair {
    pub fn cert(&self) -> &str {
        self.cert.to_str().expect("temp paths are UTF-8")
    }
    pub fn key(&self) -> &str {
        self.key.to_str().expect("temp paths are UTF-8")
    }
}

/// A certificate authority whose files live as long as it does.
pub struct TestCa {
    name: String,
    cert: rcgen::Certificate,
    key: KeyPair,
    ca_path: String,
    dir: TempDir,
    next_serial: std::sync::atomic::AtomicU64,
}

impl TestCa {
    /// A self-signed CA named `name`, its certificate written to `ca.crt`.
    ///
    /// # Errors
    ///
    /// Key generation or writing the file failed.
    pub fn new(name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key)?;
        let dir = tempfile::Builder::new().prefix("meridian-certs-").tempdir()?;
        let ca_path = dir.path().join("ca.crt");
        std::fs::write(&ca_path, cert.pem())?;
        let ca_path = ca_path.to_str().expect("temp paths are UTF-8").to_string();
        Ok(Self { name: name.to_string(), cert, key, ca_path, dir, next_serial: 1000.into() })
    }

    /// The CA certificate file, for `--trusted-ca-file` and `--cacert`.
    pub fn ca(&self) -> &str {
        &self.ca_path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A pair for a server (and, as etcd members use theirs, a client): CN `name`, SANs
    /// 127.0.0.1 and localhost.
    ///
    /// # Errors
    ///
    /// As [`TestCa::new`].
    pub fn server(&self, name: &str) -> Result<Pair> {
        self.issue(name, &["127.0.0.1", "localhost"], true)
    }

    /// A client pair: CN `name` (the user, under `--client-cert-auth`).
    ///
    /// # Errors
    ///
    /// As [`TestCa::new`].
    pub fn client(&self, name: &str) -> Result<Pair> {
        self.issue(name, &[], false)
    }

    fn issue(&self, name: &str, sans: &[&str], server: bool) -> Result<Pair> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        let serial = self.next_serial.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = if server {
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let stem = format!("{}-{name}", self.name.replace(' ', "-"));
        let pair = Pair {
            cert: self.dir.path().join(format!("{stem}.crt")),
            key: self.dir.path().join(format!("{stem}.key")),
            serial,
        };
        std::fs::write(&pair.key, key.serialize_pem())?;
        std::fs::write(&pair.cert, cert.pem())?;
        Ok(pair)
    }
}

impl TestCa {
    /// Writes `file` (in the CA's dir) as a revocation list of this CA naming `revoked`; returns
    /// its path, for `--client-crl-file`.
    ///
    /// # Errors
    ///
    /// Signing or writing failed.
    pub fn crl(&self, file: &str, revoked: &[&Pair]) -> Result<String> {
        let now = time::OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(1),
            crl_number: rcgen::SerialNumber::from(self.next_serial.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|p| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(p.serial),
                    revocation_time: now - time::Duration::minutes(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.cert, &self.key)?;
        let path = self.dir.path().join(file);
        std::fs::write(&path, crl.pem()?)?;
        Ok(path.to_str().expect("temp paths are UTF-8").to_string())
    }
}
