//! End-to-end: one real `kiln serve` on loopback, shared by every test in this binary.

mod batching;
mod digits;
mod embeddings;
mod errors;
mod oip;
mod sandbox;

use std::sync::OnceLock;

use kiln_tests::{Server, examples_config};

/// The shared server: the bundled examples plus the misbehaving guest.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| match Server::start(&examples_config("", &batching::extra_models())) {
        Ok(server) => server,
        Err(e) => panic!("cannot start the test server: {e:#}"),
    })
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("reqwest client")
}

/// Status and parsed JSON body of a response.
async fn json_of(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("response body");
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("response ({status}) is not JSON ({e}): {text}"));
    (status, value)
}
