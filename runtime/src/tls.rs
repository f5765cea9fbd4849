//! TLS for Kiln's listeners and its clients, with rustls on ring as the rest of Kiln (no
//! OpenSSL).
//!
//! A listener's certificate and key, and the CA its clients' certificates must chain to where it
//! asks for them, are read from PEM files and read again when they change: new handshakes get
//! what the files hold now, connections made before keep theirs. [`TlsListener`] hands the
//! server only connections whose handshake finished, each handshake on its own task and bounded
//! in time, so a client that stalls its handshake holds up no one else's.
//!
//! Kiln's clients (the admin commands, `kiln health`, `kiln bench`, its gRPC client) trust the
//! system's roots, or the CAs of a `--cacert` file instead, and may present a certificate of
//! their own ([`ClientTls`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context as _, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpListener;
use tokio_rustls::server::TlsStream;

use crate::sync::RwLockExt as _;

/// How long a client has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes finished and not yet taken by the server.
const READY_BACKLOG: usize = 1024;

/// Where a listener's certificate chain and private key are (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What one listener serves over TLS: its certificate and key, and where clients must present
/// a certificate, the CAs (PEM) it must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub files: TlsFiles,
    pub client_ca: Option<PathBuf>,
}

/// A listener's rustls configuration as its files are now; [`LiveTls::watch`] replaces it
/// when they change.
#[derive(Debug)]
pub struct LiveTls {
    tls: ServerTls,
    /// The ALPN protocols offered: `h2` and `http/1.1`, or `h2` alone for gRPC.
    alpn: Vec<Vec<u8>>,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl LiveTls {
    /// Reads `tls`' files; an error names the file and what is wrong with it. `http1` offers
    /// HTTP/1.1 besides HTTP/2.
    pub fn load(tls: &ServerTls, http1: bool) -> anyhow::Result<Arc<LiveTls>> {
        let alpn = if http1 { vec![b"h2".to_vec(), b"http/1.1".to_vec()] } else { vec![b"h2".to_vec()] };
        let config = server_config(tls, &alpn)?;
        Ok(Arc::new(LiveTls { tls: tls.clone(), alpn, current: RwLock::new(Arc::new(config)) }))
    }

    /// Reads the files again every `every` while the runtime runs, and serves what they hold
    /// from the next handshake on whenever they are whole: both parse and the key matches the
    /// certificate. A half-written set (a certificate renewed before its key) is retried, and
    /// what was served so far stays until the set is whole.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let live = Arc::clone(self);
        let mut paths = vec![self.tls.files.cert.clone(), self.tls.files.key.clone()];
        paths.extend(self.tls.client_ca.clone());
        crate::files::watch(paths, every, "the TLS certificate files", move || {
            let config = server_config(&live.tls, &live.alpn).map_err(|e| format!("{e:#}"))?;
            *live.current.writing() = Arc::new(config);
            tracing::info!(cert = %live.tls.files.cert.display(), "TLS certificate reloaded; new connections get it");
            Ok(())
        });
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.current.reading())
    }
}

fn server_config(tls: &ServerTls, alpn: &[Vec<u8>]) -> anyhow::Result<rustls::ServerConfig> {
    let key = Arc::new(read_pair(&tls.files)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let builder = match &tls.client_ca {
        Some(ca) => {
            let roots = read_roots(ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("the client CA file {} cannot be used", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(Fixed(key)));
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

/// One certificate for every handshake (a configuration is replaced whole when files change).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

fn read_certs(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate (a PEM 'CERTIFICATE' block)", path.display());
    }
    Ok(certs)
}

fn read_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path, "CA certificate file")? {
        roots.add(cert).with_context(|| format!("{} holds a certificate that cannot be a trust anchor", path.display()))?;
    }
    Ok(roots)
}

fn read_pair(files: &TlsFiles) -> anyhow::Result<CertifiedKey> {
    let chain = read_certs(&files.cert, "TLS certificate")?;
    let key_pem = std::fs::read(&files.key).with_context(|| format!("cannot read the TLS key {}", files.key.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .with_context(|| format!("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)", files.key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider).with_context(|| {
        format!("the key {} does not go with the certificate {}, or is of a kind rustls cannot sign with", files.key.display(), files.cert.display())
    })
}

/// A listener whose connections are TLS: TCP connections are accepted as they come, each
/// handshake runs on its own task (at most [`HANDSHAKE_TIMEOUT`]) with the listener's
/// configuration of that moment, and `accept` yields the ones that finished. Failed
/// handshakes are logged at debug level and dropped.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<tokio::net::TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// TLS over `listener`, with `live`'s certificate.
    pub fn new(listener: TcpListener, live: Arc<LiveTls>) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (done, ready) = tokio::sync::mpsc::channel(READY_BACKLOG);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            // Out of file descriptors and the like: wait instead of spinning.
                            tracing::warn!("cannot accept a connection on {local}: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    // The server stopped taking connections (it is draining): stop accepting.
                    () = done.closed() => return,
                };
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!("cannot set TCP_NODELAY: {e}");
                }
                let (acceptor, done) = (tokio_rustls::TlsAcceptor::from(live.current()), done.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = done.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake not finished within {HANDSHAKE_TIMEOUT:?}"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }

    /// The connections as a stream, for tonic.
    pub fn into_stream(self) -> impl futures::Stream<Item = std::io::Result<TlsConnection>> + Send + 'static {
        futures::stream::unfold(self.ready, |mut ready| async move {
            let (stream, _peer) = ready.recv().await?;
            Some((Ok(TlsConnection(stream)), ready))
        })
    }
}

/// A TLS connection served as gRPC: tonic sees its addresses as those of a plain TCP
/// connection's, so the gRPC service finds the caller's address the same way either way.
pub struct TlsConnection(TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        let (tcp, _session) = self.0.get_ref();
        tonic::transport::server::TcpConnectInfo { local_addr: tcp.local_addr().ok(), remote_addr: tcp.peer_addr().ok() }
    }
}

impl tokio::io::AsyncRead for TlsConnection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accepting task is gone only once this listener is: never while it is used.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// `cert` and `key` as [`TlsFiles`] when both are given; an error naming the one missing when
/// only one is. `prefix` is the fields' prefix (`""`, `"admin_"`, ...).
pub fn files(prefix: &str, cert: Option<&Path>, key: Option<&Path>) -> Result<Option<TlsFiles>, String> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert: cert.to_owned(), key: key.to_owned() })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(format!("{prefix}tls_cert is set but {prefix}tls_key is not: TLS needs both the certificate and its key")),
        (None, Some(_)) => Err(format!("{prefix}tls_key is set but {prefix}tls_cert is not: TLS needs both the certificate and its key")),
    }
}

/// Which servers a client believes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Trust {
    /// Certificates chaining to the system's roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` where
    /// set, else the platform's store).
    #[default]
    System,
    /// Certificates chaining to a CA of this PEM file, and no other (as curl's `--cacert`).
    CaFile(PathBuf),
    /// Any certificate, its signature over the handshake still checked: only for `kiln health`
    /// probing the server of this machine's config at its listen address, which no certificate
    /// names (as Kubernetes' HTTPS probes do).
    Anything,
}

/// How one of Kiln's clients speaks TLS: whom it trusts, and the certificate it presents
/// where a listener asks for one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientTls {
    pub trust: Trust,
    pub identity: Option<TlsFiles>,
}

impl ClientTls {
    /// `--cacert`, `--client-cert` and `--client-key` as given on a command line; an error
    /// naming the missing half of a client certificate.
    pub fn from_flags(cacert: Option<PathBuf>, cert: Option<PathBuf>, key: Option<PathBuf>) -> anyhow::Result<ClientTls> {
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => bail!("--client-cert needs --client-key (the certificate's private key)"),
            (None, Some(_)) => bail!("--client-key needs --client-cert"),
        };
        Ok(ClientTls { trust: cacert.map_or(Trust::System, Trust::CaFile), identity })
    }

    /// A rustls client configuration (no ALPN: the connector sets it).
    pub fn config(&self) -> anyhow::Result<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let builder = match &self.trust {
            Trust::System => builder.with_root_certificates(system_roots()?),
            Trust::CaFile(path) => builder.with_root_certificates(read_roots(path)?),
            Trust::Anything => builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyCertificate(provider))),
        };
        Ok(match &self.identity {
            Some(files) => {
                let chain = read_certs(&files.cert, "client certificate")?;
                let key_pem = std::fs::read(&files.key).with_context(|| format!("cannot read the client key {}", files.key.display()))?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem)
                    .with_context(|| format!("{} holds no PEM private key", files.key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .with_context(|| format!("the client key {} does not go with {}", files.key.display(), files.cert.display()))?
            }
            None => builder.with_no_client_auth(),
        })
    }
}

/// The system's CA certificates; an error when there are none (a minimal image), pointing at
/// `--cacert`.
fn system_roots() -> anyhow::Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found.errors.first().map_or_else(|| "none are installed".to_owned(), ToString::to_string);
        bail!("no system CA certificates to check the server's with ({why}); give the server's CA with --cacert FILE");
    }
    Ok(roots)
}

/// [`Trust::Anything`]'s verifier.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
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
