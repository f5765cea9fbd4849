//! Every error class of the HTTP API, each followed by a request that must still succeed.

use super::{client, json_of, mallory, server};
use serde_json::json;

async fn still_serving() {
    let response = mallory()
        .post(server().url("/v1/handlers/misbehave/echo"))
        .body("ping")
        .send()
        .await
        .expect("post");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.text().await.expect("body"), "ping");
}

#[tokio::test]
async fn unknown_handler_and_model_are_404_with_a_json_error() {
    let client = client();
    for path in ["/v1/handlers/nope/", "/v1/handlers/nope", "/v2/models/nope", "/v2/models/nope/ready", "/nowhere"] {
        let (status, body) = json_of(client.get(server().url(path)).send().await.expect("get")).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{path}: {body}");
    }
    let (status, body) = json_of(
        client.post(server().url("/v2/models/nope/infer")).json(&json!({"inputs": []})).send().await.expect("post"),
    )
    .await;
    assert_eq!(status, 404);
    let error: kiln_wire::ErrorBody = serde_json::from_value(body).expect("the error body");
    assert_eq!(error, kiln_wire::ErrorBody { error: "model 'nope' not found".into(), kind: "not_found".into() });
    still_serving().await;
}

#[tokio::test]
async fn bad_tensors_are_400_naming_the_input() {
    let client = client();
    let url = server().url("/v2/models/digits/infer");
    let image = |datatype: &str, shape: serde_json::Value, data: serde_json::Value| {
        json!({ "inputs": [{ "name": "image", "datatype": datatype, "shape": shape, "data": data }] })
    };
    let cases = [
        (image("FP32", json!([1, 1, 8, 8]), json!(vec![0.0; 63])), "input 'image': shape [1, 1, 8, 8] needs 64 values, got 63"),
        (image("INT64", json!([1, 1, 8, 8]), json!(vec![0; 64])), "input 'image': expected dtype FP32, got INT64"),
        (image("FP32", json!([1, 64]), json!(vec![0.0; 64])), "input 'image': expected rank 4 (shape [-1, 1, 8, 8]), got shape [1, 64]"),
        (image("FP32", json!([1, 1, 8, 9]), json!(vec![0.0; 72])), "input 'image': dimension 3 must be 8 (shape [-1, 1, 8, 8]), got shape [1, 1, 8, 9]"),
        (image("STRING", json!([1]), json!(["x"])), "input 'image': unsupported datatype 'STRING'"),
        (json!({ "inputs": [{ "name": "pixels", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": vec![0.0; 64] }] }),
            "input 'pixels' is not an input of model 'digits' (expected [\"image\"])"),
        (json!({ "inputs": [] }), "input 'image' is missing"),
    ];
    for (request, expected) in cases {
        let (status, body) = json_of(client.post(&url).json(&request).send().await.expect("post")).await;
        assert_eq!(status, 400, "{request}: {body}");
        assert_eq!(body["error"], expected);
    }
    let (status, body) = json_of(client.post(&url).body("{not json").send().await.expect("post")).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().is_some_and(|e| e.starts_with("invalid inference request")), "{body}");
    still_serving().await;
}

#[tokio::test]
async fn an_over_size_body_is_413() {
    let big = vec![0u8; 8 * 1024 * 1024 + 1];
    for path in ["/v1/handlers/misbehave/echo", "/v2/models/digits/infer"] {
        let (status, body) = json_of(mallory().post(server().url(path)).body(big.clone()).send().await.expect("post")).await;
        assert_eq!(status, 413, "{path}: {body}");
        assert_eq!(body["error"], "request body is larger than the limit of 8388608 bytes");
    }
    still_serving().await;
}

#[tokio::test]
async fn a_guest_trap_is_500_with_a_short_reason() {
    let (status, body) = json_of(mallory().get(server().url("/v1/handlers/misbehave/panic")).send().await.expect("get")).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"], "handler 'misbehave' trapped: unreachable instruction (a guest panic)");
    still_serving().await;
}

#[tokio::test]
async fn invalid_scheduling_headers_are_400() {
    let client = mallory();
    for (header, value, expected) in [
        ("kiln-priority", "10", "header kiln-priority must be 0 to 9, got 10"),
        ("kiln-priority", "high", "header kiln-priority must be a whole number"),
        ("kiln-timeout-ms", "0", "header kiln-timeout-ms must be at least 1"),
    ] {
        let (status, body) = json_of(
            client
                .post(server().url("/v1/handlers/misbehave/echo"))
                .header(header, value)
                .body("x")
                .send()
                .await
                .expect("post"),
        )
        .await;
        assert_eq!(status, 400, "{header}: {value}: {body}");
        assert_eq!(body["error"], expected);
    }
    // In range, they are accepted (and a handler's maximum caps the priority).
    let response = client
        .post(server().url("/v1/handlers/misbehave/echo"))
        .header("kiln-priority", "9")
        .header("kiln-timeout-ms", "5000")
        .body("x")
        .send()
        .await
        .expect("post");
    assert_eq!(response.status().as_u16(), 200);
}
