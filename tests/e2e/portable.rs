//! Portability, Kiln's side: a component written for `wasmtime serve -S nn` (no Kiln SDK; its
//! one input sent as `input`, its output read as `output`, the names that host uses) runs on Kiln
//! unchanged once the model's config names them so. The other direction, Kiln's examples under
//! wasmtime, is `scripts/portability.sh` (it needs a wasmtime built with libtorch 2.4.0).

use kiln_tests::artifact;
use serde_json::{Value, json};

use super::{client, server};

/// The model the foreign guest loads: the digits `.pt`, named as that guest names things.
pub(crate) const MODEL_NAMES: &[&str] = &["mnist8"];

pub(crate) fn extra() -> String {
    format!(
        r#"
[[model]]
name = "mnist8"
path = "{digits}"
inputs = [{{ name = "input", dtype = "FP32", shape = [-1, 1, 8, 8] }}]
outputs = [{{ name = "output" }}]

[[handler]]
name = "foreign"
tenant = "demo"
component = "{foreign}"
"#,
        digits = artifact("build/models/digits.pt").display(),
        foreign = artifact("target/wasm32-wasip2/guest/foreign.wasm").display(),
    )
}

#[tokio::test]
async fn a_guest_written_for_wasmtime_serve_runs_on_kiln_unchanged() {
    let pixels: Vec<f32> = (0..64).map(|i| ((i * 5) % 17) as f32 / 16.0).collect();
    let response = client().post(server().url("/v1/handlers/foreign/")).json(&pixels).send().await.expect("call");
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(status, 200, "{body}");
    // The same numbers the model gives through the Open Inference Protocol.
    let oip = json!({ "inputs": [{ "name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": pixels }] });
    let direct: Value = client().post(server().url("/v2/models/digits/infer")).json(&oip).send().await.expect("OIP").json().await.expect("JSON");
    let want: Vec<f64> = direct["outputs"][0]["data"].as_array().expect("data").iter().filter_map(Value::as_f64).collect();
    let got: Vec<f64> = body["logits"].as_array().expect("logits").iter().filter_map(Value::as_f64).collect();
    assert_eq!(got.len(), 10, "{body}");
    let off = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(off < 1e-5, "{got:?} against {want:?}");
}
