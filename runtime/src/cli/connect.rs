//! How Kiln's commands reach a server: plain or TLS as the URL's scheme says, trusting what
//! their `--cacert` (or the system) trusts, with their client certificate where they have one.

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;

use crate::tls::ClientTls;

/// A connector for `http://` and `https://` URLs.
pub type Connector = HttpsConnector<HttpConnector>;

/// For HTTP/1.1 calls; `https` when any URL it will be given is an `https://` one.
pub fn http(tls: &ClientTls, https: bool) -> anyhow::Result<Connector> {
    Ok(HttpsConnectorBuilder::new().with_tls_config(config(tls, https)?).https_or_http().enable_http1().wrap_connector(tcp()))
}

/// For gRPC (HTTP/2) calls.
pub fn grpc(tls: &ClientTls, https: bool) -> anyhow::Result<Connector> {
    Ok(HttpsConnectorBuilder::new().with_tls_config(config(tls, https)?).https_or_http().enable_http2().wrap_connector(tcp()))
}

/// Whether `url` is an `https://` one.
pub fn is_https(url: &str) -> bool {
    url.get(..8).is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
}

/// `tls`' configuration when there are `https://` URLs to reach; without, one that trusts
/// nothing, so that reading the system's roots cannot fail a command that has no use for them.
fn config(tls: &ClientTls, https: bool) -> anyhow::Result<rustls::ClientConfig> {
    if https {
        return tls.config();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

fn tcp() -> HttpConnector {
    let mut tcp = HttpConnector::new();
    // The TLS layer above takes https:// URLs.
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp
}
