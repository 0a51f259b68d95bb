//! TLS on every link, with rustls: what a listener serves (`--cert-file`,
//! `--key-file`, `--trusted-ca-file`, `--client-cert-auth`, `--auto-tls`, and
//! the `--peer-*` set), and what a client presents to an `https://` URL
//! (`--cacert`, `--cert`, `--key`, as etcdctl names them).
//!
//! - [`ServerTls`] holds a listener's rustls config and rebuilds it when one
//!   of its files changes (checked at most once a second, on accept), so a
//!   renewed certificate is served without a restart; a file that does not
//!   load keeps the old config and logs why.
//! - [`incoming`] accepts TCP connections and runs each TLS handshake on a
//!   task of its own (bounded in number and time), so one slow client never
//!   holds up the others. A refused handshake is logged as etcd logs it:
//!   `rejected connection from "addr" (error "...")`.
//! - [`auto_tls`] makes the self-signed pair of `--auto-tls` once, in the
//!   data directory's `fixtures/client` or `fixtures/peer`, as etcd does.
//! - [`ClientTls::channel`] dials `https://` URLs through rustls (and
//!   `http://` ones as tonic does); the client's files are re-read the same
//!   way as a server's.
//!
//! Crypto is ring's; TLS 1.2 and 1.3; ALPN `h2` (and `http/1.1` on servers,
//! whose client ports also answer `/health`).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tonic::transport::{Channel, Endpoint};

/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes under way at once on one listener; the next accept waits.
const MAX_HANDSHAKES: usize = 128;
/// How often files are looked at for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

mod policy;

pub use policy::{common_name, Policy};
use policy::{CheckedClients, CheckedServer};

/// A listener's certificate files, as etcd's flags name them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to.
    pub trusted_ca: Option<PathBuf>,
    /// Require a client certificate signed by `trusted_ca`.
    pub client_cert_auth: bool,
    /// Certificate revocation lists (PEM): a client certificate listed in
    /// one is refused. A certificate no list speaks of passes, as in etcd.
    pub crl: Option<PathBuf>,
    /// Cipher suites, and name checks on client certificates.
    pub policy: Policy,
}

/// Client-side files: what to trust and what to present.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientFiles {
    /// CA bundle the server's certificate must chain to.
    pub cacert: Option<PathBuf>,
    /// Certificate (and `key`) to present, for servers that ask for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Accept any server certificate (etcd's peers under `--peer-auto-tls`).
    pub insecure_skip_verify: bool,
    /// Cipher suites, and name checks on the server's certificate.
    pub policy: Policy,
}

/// etcdctl's client TLS flags, for every command that dials a cluster
/// (`meridian mirror`, `meridian region ...`, `meridian gateway`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsFlags {
    /// Verify certificates of TLS-enabled (https://) servers using this CA bundle.
    #[arg(long, env = "ETCDCTL_CACERT")]
    pub cacert: Option<PathBuf>,
    /// Identify to https:// servers with this TLS certificate file.
    #[arg(long, env = "ETCDCTL_CERT")]
    pub cert: Option<PathBuf>,
    /// Identify to https:// servers with this TLS key file.
    #[arg(long, env = "ETCDCTL_KEY")]
    pub key: Option<PathBuf>,
    /// Skip verification of servers' certificate chains and host names (insecure).
    #[arg(long, env = "ETCDCTL_INSECURE_SKIP_TLS_VERIFY")]
    pub insecure_skip_tls_verify: bool,
}

/// etcd's flags for a listener's TLS (client URLs), shared by `meridian
/// node` and `meridian gateway`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerTlsFlags {
    /// Path to the TLS certificate served on https:// client URLs.
    #[arg(long)]
    pub cert_file: Option<PathBuf>,
    /// Path to its key.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Path to the CA bundle client certificates must chain to.
    #[arg(long)]
    pub trusted_ca_file: Option<PathBuf>,
    /// Require a client certificate signed by --trusted-ca-file on https:// client URLs.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub client_cert_auth: Option<bool>,
}

impl TlsFlags {
    pub fn files(&self) -> ClientFiles {
        ClientFiles {
            cacert: self.cacert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            insecure_skip_verify: self.insecure_skip_tls_verify,
            policy: Policy::default(),
        }
    }

    /// The files, loaded.
    ///
    /// # Errors
    ///
    /// As [`ClientTls::load`].
    pub fn load(&self) -> Result<ClientTls, String> {
        ClientTls::load(&self.files())
    }
}

impl ClientFiles {
    /// Whether any TLS setting was given.
    pub fn is_empty(&self) -> bool {
        self.cacert.is_none() && self.cert.is_none() && self.key.is_none() && !self.insecure_skip_verify
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in the file", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

fn server_config(files: &ServerFiles) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(files.policy.provider(rustls::crypto::ring::default_provider())?);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match (&files.trusted_ca, files.client_cert_auth) {
        (Some(ca), true) => {
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(read_roots(ca)?, provider);
            if let Some(crl) = &files.crl {
                let crls = rustls::pki_types::CertificateRevocationListDer::pem_file_iter(crl)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("{}: {e}", crl.display()))?;
                verifier =
                    verifier.with_crls(crls).only_check_end_entity_revocation().allow_unknown_revocation_status();
            }
            let verifier = verifier.build().map_err(|e| format!("{}: {e}", ca.display()))?;
            if files.policy.checks_names() {
                builder.with_client_cert_verifier(Arc::new(CheckedClients {
                    inner: verifier,
                    policy: files.policy.clone(),
                }))
            } else {
                builder.with_client_cert_verifier(verifier)
            }
        }
        (None, true) => return Err("--client-cert-auth needs --trusted-ca-file".into()),
        (_, false) => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(read_certs(&files.cert)?, read_key(&files.key)?)
        .map_err(|e| format!("{} and {}: {e}", files.cert.display(), files.key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn client_config(files: &ClientFiles) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(files.policy.provider(rustls::crypto::ring::default_provider())?);
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if files.insecure_skip_verify {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
    } else {
        let roots = match &files.cacert {
            Some(ca) => read_roots(ca)?,
            None => Arc::new(RootCertStore::empty()),
        };
        if files.policy.checks_names() {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| e.to_string())?;
            let verifier = CheckedServer { inner, policy: files.policy.clone() };
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier))
        } else {
            builder.with_root_certificates(roots)
        }
    };
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("a client certificate needs both --cert and --key".into()),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A value built from files, rebuilt when one of them changes.
struct Watched<F, T> {
    files: F,
    paths: Vec<PathBuf>,
    build: fn(&F) -> Result<Arc<T>, String>,
    state: Mutex<WatchedState<T>>,
}

struct WatchedState<T> {
    value: Arc<T>,
    stamp: Vec<Option<(SystemTime, u64)>>,
    checked: Instant,
}

fn stamp(paths: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    paths.iter().map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())))).collect()
}

impl<F, T> Watched<F, T> {
    fn new(files: F, paths: Vec<PathBuf>, build: fn(&F) -> Result<Arc<T>, String>) -> Result<Self, String> {
        let stamp = stamp(&paths);
        let value = build(&files)?;
        Ok(Self { files, paths, build, state: Mutex::new(WatchedState { value, stamp, checked: Instant::now() }) })
    }

    fn get(&self) -> Arc<T> {
        let mut state = self.state.lock();
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = Instant::now();
            let now = stamp(&self.paths);
            if now != state.stamp {
                match (self.build)(&self.files) {
                    Ok(value) => {
                        tracing::info!(files = ?self.paths, "certificates reloaded");
                        state.value = value;
                        state.stamp = now;
                    }
                    // A half-written file: keep serving the old pair and
                    // look again on the next check.
                    Err(e) => tracing::warn!(error = %e, "certificates changed but do not load; kept the old ones"),
                }
            }
        }
        state.value.clone()
    }
}

/// A listener's TLS, reloaded when its files change.
pub struct ServerTls(Watched<ServerFiles, ServerConfig>);

impl ServerTls {
    /// Loads the files once, refusing what does not parse.
    ///
    /// # Errors
    ///
    /// A file that cannot be read or parsed, a key that does not match, or
    /// `--client-cert-auth` without a CA; the message names the file.
    pub fn load(files: ServerFiles) -> Result<Arc<Self>, String> {
        let mut paths = vec![files.cert.clone(), files.key.clone()];
        paths.extend(files.trusted_ca.clone());
        paths.extend(files.crl.clone());
        Ok(Arc::new(Self(Watched::new(files, paths, server_config)?)))
    }

    /// The config to serve the next connection with.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.0.get()
    }
}

/// A client's TLS for `https://` URLs; `http://` URLs are dialed in the
/// clear whatever it holds.
#[derive(Clone, Default)]
pub struct ClientTls(Option<Arc<Watched<ClientFiles, ClientConfig>>>);

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(w) => write!(f, "ClientTls({:?})", w.files),
            None => f.write_str("ClientTls(none)"),
        }
    }
}

impl ClientTls {
    /// Loads `files` (none given: `https://` URLs are refused for want of a
    /// CA, as no certificate can be checked).
    ///
    /// # Errors
    ///
    /// A file that cannot be read or parsed, or a certificate without its key.
    pub fn load(files: &ClientFiles) -> Result<Self, String> {
        if files.is_empty() {
            return Ok(Self::default());
        }
        let paths = [&files.cacert, &files.cert, &files.key].into_iter().flatten().cloned().collect();
        Ok(Self(Some(Arc::new(Watched::new(files.clone(), paths, client_config)?))))
    }

    fn config(&self) -> Arc<ClientConfig> {
        match &self.0 {
            Some(w) => w.get(),
            None => {
                static NONE: std::sync::OnceLock<Arc<ClientConfig>> = std::sync::OnceLock::new();
                NONE.get_or_init(|| client_config(&ClientFiles::default()).expect("an empty client config builds"))
                    .clone()
            }
        }
    }

    /// A lazy channel to `endpoint`, dialed by [`Connector`]: writes
    /// coalesced, and through rustls for `https://` and `unixs://`.
    pub fn channel(&self, endpoint: &Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(Connector(self.clone()))
    }

    /// A connection to `uri` (`http`, `https`, `unix` or `unixs`), for a
    /// client of its own (hyper's): TCP or the socket file, then rustls.
    ///
    /// # Errors
    ///
    /// What dialing or the handshake failed with.
    pub async fn dial(&self, uri: http::Uri) -> io::Result<hyper_util::rt::TokioIo<ClientStream>> {
        use tower::Service;
        Connector(self.clone()).call(uri).await
    }
}

/// A connection [`ClientTls`] dialed, its writes coalesced.
pub type ClientStream = crate::coalesce::Coalesce<Stream<tokio_rustls::client::TlsStream<Io>>>;

/// Dials for tonic (and the gateway's JSON forwarding): TCP (no Nagle), or the socket file of
/// `unix(s)://`, then rustls for `https://` and `unixs://`.
#[derive(Clone)]
struct Connector(ClientTls);

impl tower::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<ClientStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.0.clone();
        Box::pin(async move {
            let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: no host:port"));
            let host = uri.host().ok_or_else(bad)?.trim_start_matches('[').trim_end_matches(']').to_string();
            let io = if matches!(uri.scheme_str(), Some("unix" | "unixs")) {
                // The socket file is named by the whole authority, as etcd names it.
                let file = uri.authority().ok_or_else(bad)?.as_str().to_string();
                Io::Unix(tokio::net::UnixStream::connect(file).await?)
            } else {
                let port = uri.port_u16().ok_or_else(bad)?;
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                Io::Tcp(tcp)
            };
            let coalesce = |s| hyper_util::rt::TokioIo::new(crate::coalesce::Coalesce::new(s));
            if !matches!(uri.scheme_str(), Some("https" | "unixs")) {
                return Ok(coalesce(Stream::Plain(io)));
            }
            let name = ServerName::try_from(host.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
            let stream = tokio_rustls::TlsConnector::from(tls.config()).connect(name, io).await?;
            Ok(coalesce(Stream::Tls(Box::new(stream))))
        })
    }
}

/// Accepts every server certificate: etcd's peers under `--peer-auto-tls`
/// encrypt without authenticating, each having made its own certificate.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A byte stream: TCP, or a unix socket (`unix://` URLs).
pub enum Io {
    Tcp(TcpStream),
    Unix(tokio::net::UnixStream),
}

/// A connection, in the clear or under TLS.
pub enum Stream<T> {
    Plain(Io),
    Tls(Box<T>),
}

/// A connection a listener accepted.
pub type ServerStream = Stream<tokio_rustls::server::TlsStream<Io>>;

impl ServerStream {
    /// The subject CN of the certificate the client presented, which the
    /// listener verified (`--client-cert-auth`); `None` without one.
    pub fn peer_common_name(&self) -> Option<String> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(s) => policy::common_name(s.get_ref().1.peer_certificates()?.first()?),
        }
    }
}

impl<T: UnderTls> Stream<T> {
    fn io(&self) -> &Io {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.io(),
        }
    }
}

/// The stream under a TLS one, client or server side.
pub trait UnderTls {
    fn io(&self) -> &Io;
}

impl UnderTls for tokio_rustls::server::TlsStream<Io> {
    fn io(&self) -> &Io {
        self.get_ref().0
    }
}

impl UnderTls for tokio_rustls::client::TlsStream<Io> {
    fn io(&self) -> &Io {
        self.get_ref().0
    }
}

macro_rules! io_either {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Io::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Io::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        io_either!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        io_either!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io_either!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io_either!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        io_either!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Tcp(s) => s.is_write_vectored(),
            Io::Unix(s) => s.is_write_vectored(),
        }
    }
}

macro_rules! either {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        either!(self, s => s.poll_read(cx, buf))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        either!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        either!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for ServerStream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        match self.io() {
            Io::Tcp(s) => s.connect_info(),
            // A unix socket has no addresses to give.
            Io::Unix(_) => tonic::transport::server::TcpConnectInfo { local_addr: None, remote_addr: None },
        }
    }
}

/// Where a server accepts: a TCP port, or a socket file (`unix://`).
pub enum Listener {
    Tcp(TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// Binds `url`'s address: for `unix://name`, the socket file `name`,
    /// replacing one a stopped process left behind, as etcd does.
    ///
    /// # Errors
    ///
    /// What binding failed with.
    pub async fn bind(url: &crate::url::Url) -> io::Result<Self> {
        if url.is_unix() {
            let path = url.host_port();
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            return Ok(Self::Unix(tokio::net::UnixListener::bind(path)?));
        }
        Ok(Self::Tcp(TcpListener::bind(url.host_port()).await?))
    }

    /// The TCP address bound (none for a socket file).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(l) => l.local_addr().ok(),
            Self::Unix(_) => None,
        }
    }

    async fn accept(&self) -> io::Result<(Io, String)> {
        match self {
            Self::Tcp(l) => {
                let (tcp, addr) = l.accept().await?;
                let _ = tcp.set_nodelay(true);
                Ok((Io::Tcp(tcp), addr.to_string()))
            }
            Self::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Io::Unix(s), "unix socket".into()))
            }
        }
    }
}

/// Accepts on `listener` (no Nagle on any connection) and, with `tls`,
/// hands each connection over once its handshake is done. The stream ends
/// when the receiver is dropped.
pub fn incoming(
    listener: Listener,
    tls: Option<Arc<ServerTls>>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<ServerStream>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (io, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(tls) = &tls else {
                if tx.send(Ok(Stream::Plain(io))).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let shaken = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await;
                drop(permit);
                match shaken {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(Stream::Tls(Box::new(stream)))).await;
                    }
                    Ok(Err(e)) => rejected(&addr, &e.to_string()),
                    Err(_) => rejected(&addr, "handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn rejected(addr: &str, error: &str) {
    tracing::info!("rejected connection from {addr:?} (error {error:?})");
}

/// `--auto-tls`: a self-signed certificate for `hosts` (IP addresses and
/// names) in `dir` (`cert.pem`, `key.pem`), made on first start and reused
/// after, valid a year, ECDSA P-256, organization "etcd", as etcd makes it.
///
/// # Errors
///
/// The directory or files cannot be written, or a host is not a valid name.
pub fn auto_tls(dir: &Path, hosts: &[String]) -> Result<(PathBuf, PathBuf), String> {
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let mut names: Vec<String> =
        hosts.iter().map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string()).collect();
    names.sort();
    names.dedup();
    let mut params = rcgen::CertificateParams::new(names).map_err(|e| format!("--auto-tls: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "etcd");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now;
    params.not_after = now + time::Duration::days(365);
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().map_err(|e| format!("--auto-tls: {e}"))?;
    let cert = params.self_signed(&key).map_err(|e| format!("--auto-tls: {e}"))?;
    let io = |e: io::Error| format!("--auto-tls: {}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(io)?;
    write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io)?;
    std::fs::write(&cert_path, cert.pem()).map_err(io)?;
    Ok((cert_path, key_path))
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_tls_makes_a_pair_once_and_it_serves() {
        let dir = tempfile::tempdir().unwrap();
        let fixtures = dir.path().join("fixtures/client");
        let (cert, key) = auto_tls(&fixtures, &["127.0.0.1".into(), "localhost".into()]).unwrap();
        let first = std::fs::read(&cert).unwrap();
        assert_eq!(auto_tls(&fixtures, &["127.0.0.1".into()]).unwrap(), (cert.clone(), key.clone()));
        assert_eq!(std::fs::read(&cert).unwrap(), first, "an existing pair is reused");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let files =
            ServerFiles { cert, key, trusted_ca: None, client_cert_auth: false, crl: None, policy: Policy::default() };
        ServerTls::load(files).unwrap();
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let files = ServerFiles {
            cert: junk.clone(),
            key: junk.clone(),
            trusted_ca: None,
            client_cert_auth: false,
            crl: None,
            policy: Policy::default(),
        };
        let e = ServerTls::load(files).err().unwrap();
        assert!(e.contains("junk.pem") && e.contains("no PEM certificate"), "{e}");
        let (cert, key) = auto_tls(dir.path(), &["127.0.0.1".into()]).unwrap();
        let files =
            ServerFiles { cert, key, trusted_ca: None, client_cert_auth: true, crl: None, policy: Policy::default() };
        assert_eq!(ServerTls::load(files).err().unwrap(), "--client-cert-auth needs --trusted-ca-file");
        let only_cert = ClientFiles { cert: Some(junk), ..Default::default() };
        assert!(ClientTls::load(&only_cert).is_err());
    }

    /// A handshake in memory between `server` and a client offering only `suites` over TLS 1.2
    /// (every TLS 1.3 suite when `suites` is empty).
    fn handshake(server: Arc<ServerConfig>, suites: &[&str]) -> Result<(), rustls::Error> {
        let base = rustls::crypto::ring::default_provider();
        let (provider, versions): (_, &[&rustls::SupportedProtocolVersion]) = if suites.is_empty() {
            (base, &[&rustls::version::TLS13])
        } else {
            let chosen =
                base.cipher_suites.iter().filter(|s| suites.contains(&s.suite().as_str().unwrap_or(""))).copied();
            (CryptoProvider { cipher_suites: chosen.collect(), ..base }, &[&rustls::version::TLS12])
        };
        let provider = Arc::new(provider);
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
            .with_no_client_auth();
        let mut c = rustls::ClientConnection::new(Arc::new(client), ServerName::try_from("127.0.0.1").unwrap())?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            s.read_tls(&mut wire.as_slice()).unwrap();
            s.process_new_packets()?;
            let mut wire = Vec::new();
            s.write_tls(&mut wire).unwrap();
            c.read_tls(&mut wire.as_slice()).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn cipher_suites_restrict_tls12_only() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = auto_tls(dir.path(), &["127.0.0.1".into()]).unwrap();
        let policy =
            Policy { cipher_suites: vec!["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256".into()], ..Default::default() };
        let files = ServerFiles { cert, key, trusted_ca: None, client_cert_auth: false, crl: None, policy };
        let server = server_config(&files).unwrap();
        handshake(server.clone(), &["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"]).unwrap();
        assert!(handshake(server.clone(), &["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"]).is_err());
        handshake(server, &[]).unwrap();

        // Go's names: ChaCha20 without its hash; older suites dropped; unknown names refused.
        let check = |names: &[&str]| {
            Policy { cipher_suites: names.iter().map(|n| n.to_string()).collect(), ..Default::default() }
                .check_cipher_suites()
        };
        check(&["TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305", "TLS_RSA_WITH_AES_128_CBC_SHA"]).unwrap();
        assert!(check(&["TLS_RSA_WITH_AES_128_CBC_SHA"]).unwrap_err().contains("none is offered"));
        assert_eq!(
            check(&["TLS_AES_128_GCM_SHA256"]).unwrap_err(),
            r#"unexpected TLS cipher suite "TLS_AES_128_GCM_SHA256""#
        );
    }

    #[test]
    fn a_changed_pair_is_served_after_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = auto_tls(&dir.path().join("a"), &["127.0.0.1".into()]).unwrap();
        let files = ServerFiles {
            cert: cert.clone(),
            key: key.clone(),
            trusted_ca: None,
            client_cert_auth: false,
            crl: None,
            policy: Policy::default(),
        };
        let tls = ServerTls::load(files).unwrap();
        let before = tls.config();
        // A half-written file keeps the old config.
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\n").unwrap();
        tls.0.state.lock().checked -= RELOAD_CHECK;
        assert!(Arc::ptr_eq(&before, &tls.config()));
        let (cert2, key2) = auto_tls(&dir.path().join("b"), &["127.0.0.1".into()]).unwrap();
        std::fs::copy(&key2, &key).unwrap();
        std::fs::copy(&cert2, &cert).unwrap();
        tls.0.state.lock().checked -= RELOAD_CHECK;
        assert!(!Arc::ptr_eq(&before, &tls.config()), "the new pair is served");
    }
}
