//! TLS for Kiln's listeners (rustls on ring, as the rest of Kiln: no OpenSSL): a certificate and
//! key read from PEM files and read again when they change, so that new handshakes get the new
//! certificate while connections made before keep theirs; and a listener that hands axum only
//! connections whose handshake finished, each handshake on its own task, bounded in time, so a
//! client that stalls its handshake holds up no one else's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context as _, bail};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
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

/// The certificate the listeners present now; [`LiveCert::watch`] replaces it when its files
/// change.
#[derive(Debug)]
pub struct LiveCert {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl LiveCert {
    /// Reads `files`; an error names the file and what is wrong with it.
    pub fn load(files: &TlsFiles) -> anyhow::Result<LiveCert> {
        let key = read(files)?;
        Ok(LiveCert { files: files.clone(), current: RwLock::new(Arc::new(key)) })
    }

    /// Reads the files again every `every` while the runtime runs, and serves what they hold
    /// from the next handshake on whenever both parse and the key matches the certificate. A
    /// half-written pair (a certificate renewed before its key) is retried, and the certificate
    /// served so far stays until the pair is whole.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let live = Arc::clone(self);
        tokio::spawn(async move {
            let mut seen = fingerprint(&live.files);
            let mut complained = None;
            loop {
                tokio::time::sleep(every).await;
                let now = fingerprint(&live.files);
                if now == seen {
                    continue;
                }
                match read(&live.files) {
                    Ok(key) => {
                        seen = now;
                        complained = None;
                        *live.current.writing() = Arc::new(key);
                        tracing::info!(cert = %live.files.cert.display(), "TLS certificate reloaded; new connections get it");
                    }
                    Err(e) => {
                        let message = format!("{e:#}");
                        if complained.as_ref() != Some(&message) {
                            tracing::warn!("TLS certificate files changed but cannot be used yet (the old certificate stays): {message}");
                            complained = Some(message);
                        }
                    }
                }
            }
        });
    }

    /// A rustls configuration serving this certificate (HTTP/1.1 and HTTP/2 by ALPN).
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

impl ResolvesServerCert for LiveCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.reading()))
    }
}

/// The SHA-256 of both files (or `None` for one that cannot be read): changes with any write,
/// even within one timestamp tick.
fn fingerprint(files: &TlsFiles) -> [Option<String>; 2] {
    [&files.cert, &files.key].map(|path| std::fs::read(path).ok().map(|bytes| crate::files::sha256_hex(&bytes)))
}

fn read(files: &TlsFiles) -> anyhow::Result<CertifiedKey> {
    let cert_pem = std::fs::read(&files.cert).with_context(|| format!("cannot read the TLS certificate {}", files.cert.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", files.cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate (a PEM 'CERTIFICATE' block)", files.cert.display());
    }
    let key_pem = std::fs::read(&files.key).with_context(|| format!("cannot read the TLS key {}", files.key.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .with_context(|| format!("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)", files.key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider).with_context(|| {
        format!("the key {} does not go with the certificate {}, or is of a kind rustls cannot sign with", files.key.display(), files.cert.display())
    })
}

/// A listener for axum whose connections are TLS: TCP connections are accepted as they come,
/// each handshake runs on its own task (at most [`HANDSHAKE_TIMEOUT`]), and `accept` yields
/// the ones that finished. Failed handshakes are logged at debug level and dropped.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<tokio::net::TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// TLS over `listener`, with `config`'s certificate.
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
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
                let (acceptor, done) = (acceptor.clone(), done.clone());
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
/// only one is.
pub fn files(cert: Option<&Path>, key: Option<&Path>) -> Result<Option<TlsFiles>, String> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert: cert.to_owned(), key: key.to_owned() })),
        (None, None) => Ok(None),
        (Some(_), None) => Err("tls_cert is set but tls_key is not: TLS needs both the certificate and its key".to_owned()),
        (None, Some(_)) => Err("tls_key is set but tls_cert is not: TLS needs both the certificate and its key".to_owned()),
    }
}
