//! Sandbox limits and capabilities: deadline, memory, stack, WASI grants nothing, and Kiln's
//! wasi:nn answers guests with codes, never traps.

use std::time::{Duration, Instant};

use super::{json_of, mallory, server};
use serde_json::Value;

async fn get(path: &str) -> (u16, Value) {
    json_of(mallory().get(server().url(path)).send().await.expect("get")).await
}

async fn digits_still_works() {
    let (status, body) = json_of(
        mallory()
            .post(server().url("/v2/models/digits/infer"))
            .json(&serde_json::json!({ "inputs": [{ "name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": vec![0.5; 64] }] }))
            .send()
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let response = mallory().post(server().url("/v1/handlers/misbehave/echo")).body("after").send().await.expect("post");
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn an_endless_loop_is_stopped_at_its_deadline() {
    let started = Instant::now();
    let (status, body) = get("/v1/handlers/misbehave/loop").await;
    let took = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"], "handler 'misbehave' exceeded its deadline of 1000 ms");
    assert!(took >= Duration::from_millis(990) && took < Duration::from_secs(5), "took {took:?}");
    digits_still_works().await;
}

#[tokio::test]
async fn a_memory_bomb_traps_at_the_limit() {
    let (status, body) = get("/v1/handlers/misbehave/memory").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"], "handler 'misbehave' exceeded its memory limit of 32 MiB");
    digits_still_works().await;
}

#[tokio::test]
async fn unbounded_recursion_traps_as_a_stack_overflow() {
    let (status, body) = get("/v1/handlers/misbehave/recurse").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"], "handler 'misbehave' trapped: stack overflow");
    digits_still_works().await;
}

#[tokio::test]
async fn wasi_grants_no_environment() {
    let (status, env) = get("/v1/handlers/misbehave/env").await;
    assert_eq!(status, 200);
    assert_eq!(env, serde_json::json!([]));
}

#[tokio::test]
async fn guest_output_reaches_the_server_log_tagged_with_the_handler() {
    let response = mallory().get(server().url("/v1/handlers/misbehave/print")).send().await.expect("get");
    assert_eq!(response.status().as_u16(), 200);
    // Log lines are written as the guest prints; give the writer a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = server().log_text();
        let tagged = |needle: &str| {
            log.lines().any(|l| l.contains("handler=misbehave") && l.contains(needle))
        };
        if tagged("hello from the guest's stdout") && tagged("hello from the guest's stderr") {
            break;
        }
        assert!(Instant::now() < deadline, "guest output not in the log:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn load_from_bytes_is_refused_as_security() {
    let (status, body) = get("/v1/handlers/misbehave/nn/load-bytes").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["code"], "Security");
}

#[tokio::test]
async fn only_allowed_models_can_be_loaded_and_paths_are_refused_by_their_form() {
    for name in ["digits", "digits@1"] {
        let (_, body) = get(&format!("/v1/handlers/misbehave/nn/load?{name}")).await;
        assert_eq!(body["code"], "ok", "{name}: {body}");
    }
    for name in ["minilm", "nope", "digits@2"] {
        let (status, body) = get(&format!("/v1/handlers/misbehave/nn/load?{name}")).await;
        assert_eq!(status, 200);
        assert_eq!(body["code"], "NotFound", "{name}: {body}");
        assert_eq!(body["message"], format!("model '{name}' not found"));
    }
    for name in ["../build/models/digits.pt", "/etc/passwd", "a/../../b", ".hidden"] {
        let (status, body) = get(&format!("/v1/handlers/misbehave/nn/load?{name}")).await;
        assert_eq!(status, 200);
        assert_eq!(body["code"], "InvalidArgument", "{name}: {body}");
    }
}

#[tokio::test]
async fn wrong_inputs_are_invalid_argument_naming_the_input_never_a_trap() {
    let (_, ok) = get("/v1/handlers/misbehave/nn/compute?ok").await;
    assert_eq!(ok["code"], "ok", "{ok}");
    let cases = [
        ("name", "model 'digits': input 'pixels' is not an input of model 'digits' (expected [\"image\"])"),
        ("dtype", "model 'digits': input 'image': expected dtype FP32, got INT64"),
        ("rank", "model 'digits': input 'image': expected rank 4 (shape [-1, 1, 8, 8]), got shape [1, 64]"),
        ("shape", "model 'digits': input 'image': dimension 3 must be 8 (shape [-1, 1, 8, 8]), got shape [1, 1, 8, 9]"),
        ("bytes", "model 'digits': input 'image': FP32 tensor of shape [1, 1, 8, 8] needs 256 bytes, got 7"),
        ("empty", "model 'digits': input 'image': expected rank 4 (shape [-1, 1, 8, 8]), got shape [0]"),
    ];
    for (case, message) in cases {
        let (status, body) = get(&format!("/v1/handlers/misbehave/nn/compute?{case}")).await;
        assert_eq!(status, 200, "{case}: {body}");
        assert_eq!(body["code"], "InvalidArgument", "{case}: {body}");
        assert_eq!(body["message"], message, "{case}");
    }
}

/// The caller's API key and Kiln's own scheduling headers are Kiln's: a guest never sees them.
#[tokio::test]
async fn the_guest_never_sees_the_api_key_or_kiln_headers() {
    let response = mallory()
        .get(server().url("/v1/handlers/misbehave/headers"))
        .header("kiln-priority", "0")
        .header("kiln-timeout-ms", "5000")
        .header("x-tenant-header", "kept")
        .send()
        .await
        .expect("get");
    let (status, seen) = json_of(response).await;
    assert_eq!(status, 200, "{seen}");
    let seen = seen.as_array().expect("headers").clone();
    let names: Vec<String> = seen.iter().map(|h| h[0].as_str().expect("name").to_ascii_lowercase()).collect();
    assert!(names.iter().any(|n| n == "x-tenant-header"), "the client's own headers pass: {names:?}");
    for hidden in ["authorization", "kiln-priority", "kiln-timeout-ms"] {
        assert!(!names.iter().any(|n| n == hidden), "{hidden} reached the guest: {names:?}");
    }
    let key = server().key("mallory");
    assert!(!seen.iter().any(|h| h[1].as_str().is_some_and(|v| v.contains(key))), "the key reached the guest");
}

/// The guest gets the path as the client sent it: an encoded `?` stays in the path and cannot
/// start a query of the client's choosing.
#[tokio::test]
async fn the_guest_sees_the_path_exactly_as_sent() {
    for (sent, seen) in [
        ("/v1/handlers/misbehave/path%3Fadmin=1", "/path%3Fadmin=1"),
        ("/v1/handlers/misbehave/path%3Fadmin=1?real=2", "/path%3Fadmin=1?real=2"),
        ("/v1/handlers/misbehave/path/a%2Fb/c%20d%25", "/path/a%2Fb/c%20d%25"),
        ("/v1/handlers/misbe%68ave/path-x?q=%20", "/path-x?q=%20"),
    ] {
        let response = mallory().get(server().url(sent)).send().await.expect("get");
        assert_eq!(response.status().as_u16(), 200, "{sent}");
        assert_eq!(response.text().await.expect("body"), seen, "{sent}");
    }
}
