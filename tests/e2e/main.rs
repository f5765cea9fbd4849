//! End-to-end: one real `kiln serve` on loopback, shared by every test in this binary.

mod author;
mod batching;
mod cache;
mod deploy;
mod digits;
mod embeddings;
mod errors;
mod examples;
mod grpc;
mod logs;
mod observability;
mod oip;
mod openai;
mod portable;
mod sandbox;
mod tenancy;
mod tls;
mod traces;

use std::path::PathBuf;
use std::sync::OnceLock;

use kiln_tests::{Server, TempDir, examples_config_in, kiln};

/// The shared server: the bundled examples (tenant `demo`) plus the misbehaving guest (tenant
/// `mallory`), with `precision = "auto"` as examples/kiln.toml ships them.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let extra = format!("{}{}{}", batching::extra_models(), deploy::tenants(), portable::extra());
        let demo_models = [batching::EXTRA_MODEL_NAMES, portable::MODEL_NAMES].concat();
        let config = examples_config_in("auto", "", &demo_models, &extra);
        match Server::start(&config, &["demo", "mallory", "signed"]) {
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

/// The form `precision = "auto"` chose for `model` on this server's CPU (`fp32`, `bf16`,
/// `fp16` or `bf16-autocast`, and for an image model maybe ` channels-last`): what answers over the wire are compared to TorchScript's FP32 in.
fn served_precision(model: &str) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let info: serde_json::Value = runtime.block_on(async {
        let response = client().get(server().url(&format!("/v1/models/{model}"))).send().await.expect("model info");
        json_of(response).await.1
    });
    let searched = info["precision_search"].as_array().unwrap_or_else(|| panic!("no precision_search in {info}"));
    let on_cpu = searched.iter().find(|c| c["device"] == "cpu").unwrap_or_else(|| panic!("no search on the CPU: {info}"));
    let precision = on_cpu["precision"].as_str().unwrap_or_else(|| panic!("no precision in {on_cpu}"));
    let (base, layout) = precision.split_once(' ').unwrap_or((precision, ""));
    assert!(["fp32", "bf16", "fp16", "bf16-autocast"].contains(&base) && ["", "channels-last"].contains(&layout), "'{precision}' is not a form: {on_cpu}");
    precision.to_owned()
}

/// Status and parsed JSON body of a response.
async fn json_of(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("response body");
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("response ({status}) is not JSON ({e}): {text}"));
    (status, value)
}

/// A folder that lives as long as the test process (the signing key pair lives here).
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    &DIR.get_or_init(|| TempDir::new("kiln-e2e-scratch").expect("scratch dir")).path
}

/// Runs `kiln` and returns its standard output, panicking with its error.
fn run_kiln(args: &[&str]) -> String {
    kiln(args).unwrap_or_else(|e| panic!("{e:#}"))
}
