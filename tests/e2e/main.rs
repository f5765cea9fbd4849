//! End-to-end: one real `kiln serve` on loopback, shared by every test in this binary.

mod batching;
mod digits;
mod embeddings;
mod errors;
mod oip;
mod sandbox;

use std::sync::OnceLock;

use kiln_tests::{Server, examples_config};

/// The shared server: the bundled examples (tenant `demo`) plus the misbehaving guest (tenant
/// `mallory`).
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let config = examples_config("", batching::EXTRA_MODEL_NAMES, &batching::extra_models());
        match Server::start(&config, &["demo", "mallory"]) {
            Ok(server) => server,
            Err(e) => panic!("cannot start the test server: {e:#}"),
        }
    })
}

/// A client with tenant `demo`'s key: the examples' handlers and models.
fn client() -> reqwest::Client {
    server().client("demo")
}

/// A client with tenant `mallory`'s key: the misbehaving guest, and the digits model.
fn mallory() -> reqwest::Client {
    server().client("mallory")
}

/// Status and parsed JSON body of a response.
async fn json_of(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("response body");
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("response ({status}) is not JSON ({e}): {text}"));
    (status, value)
}
