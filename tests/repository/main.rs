//! The model repository: models loaded, replaced, unloaded and deleted while serving, through
//! Kiln's admin API and the official `tritonclient`; seen at once by guests and OIP callers of
//! the tenants that may use them only; kept across restarts; reloaded under load without a
//! failed request. Own servers, since every test changes the models.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln_tests::{Server, artifact, examples_config, python, root};
use serde_json::{Value, json};

fn start() -> Server {
    Server::start(&examples_config("", &[], ""), &["demo", "mallory"]).unwrap_or_else(|e| panic!("{e:#}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

async fn json_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({status}, {e}): {text}")))
}

/// `offset-VERSION.pt` as the `[[model]]` fields in JSON, for `tenants` (version 9 does not
/// exist).
fn offset_spec(version: u32, tenants: &[&str]) -> Value {
    json!({
        "path": artifact("build/models").join(format!("offset-{version}.pt")).display().to_string(),
        "inputs": [{ "name": "x", "dtype": "FP32", "shape": [-1, 4] }],
        "outputs": [{ "name": "y" }],
        "tenants": tenants,
    })
}

/// One OIP call to `offset` with x = [0, 1, 2, 3]: the status, and the version that answered
/// (y - x, the same in every column) when it succeeded.
async fn offset_version(client: &reqwest::Client, server: &Server) -> (u16, Option<f64>) {
    let request = json!({ "inputs": [{ "name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.0, 1.0, 2.0, 3.0] }] });
    let response = client.post(server.url("/v2/models/offset/infer")).json(&request).send().await.expect("infer");
    let (status, body) = json_of(response).await;
    let version = body["outputs"][0]["data"].as_array().map(|y| y[0].as_f64().unwrap_or(f64::NAN));
    if let Some(y) = body["outputs"][0]["data"].as_array() {
        let offsets: Vec<f64> = y.iter().enumerate().map(|(i, v)| v.as_f64().unwrap_or(f64::NAN) - i as f64).collect();
        assert!(offsets.iter().all(|o| Some(*o) == version), "one version per answer: {offsets:?}");
    }
    (status, version)
}

/// What the misbehaving guest (tenant mallory) gets from `load-by-name(name)`.
async fn guest_load(server: &Server, name: &str) -> String {
    let response = server.client("mallory").get(server.url(&format!("/v1/handlers/misbehave/nn/load?{name}"))).send().await;
    let (status, body) = json_of(response.expect("guest call")).await;
    assert_eq!(status, 200, "{body}");
    body["code"].as_str().unwrap_or_default().to_owned()
}

async fn model_state(server: &Server, name: &str) -> (u16, Value) {
    json_of(server.admin_client().get(server.admin_url(&format!("/v1/models/{name}"))).send().await.expect("get")).await
}

/// Waits until the repository says `name` is READY (a kept model loads after a restart).
async fn until_ready(server: &Server, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = model_state(server, name).await;
        if status == 200 && body["state"] == "READY" {
            return;
        }
        assert!(Instant::now() < deadline, "model '{name}' never became ready: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn the_official_tritonclient_loads_lists_and_unloads_models() {
    let server = start();
    let output = Command::new(python())
        .arg(root().join("tests/python/repository_client.py"))
        .arg(server.admin.trim_start_matches("http://"))
        .arg(server.base.trim_start_matches("http://"))
        .arg(artifact("build/models").display().to_string())
        .env("KILN_ADMIN_KEY", server.admin_key())
        .env("KILN_KEY", server.key("demo"))
        .output()
        .expect("run the Python repository client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "repository_client.py failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("repository: all checks passed"), "{stdout}");
    let audit = server.audit_log_with(|l| l.contains("model_unload"));
    for event in ["model_load", "model_load_failed", "model_unload"] {
        assert!(audit.lines().any(|l| l.contains(event)), "no {event} in the audit log:\n{audit}");
    }

    // The same through `kiln model`, with a TOML spec whose path is relative to its own folder.
    let folder = &server.dir.path;
    std::fs::copy(artifact("build/models/offset-3.pt"), folder.join("weights.pt")).expect("copy weights");
    let spec = folder.join("offset.toml");
    std::fs::write(
        &spec,
        "path = \"weights.pt\"\ninputs = [{ name = \"x\", dtype = \"FP32\", shape = [-1, 4] }]\n\
         outputs = [{ name = \"y\" }]\ntenants = [\"demo\"]\n",
    )
    .expect("spec");
    let cli = |args: &[&str]| {
        let mut all = vec!["model"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--admin-url", &server.admin, "--admin-key", server.admin_key()]);
        kiln_tests::kiln(&all).unwrap_or_else(|e| panic!("{e:#}"))
    };
    let loaded: Value = serde_json::from_str(&cli(&["load", "offset", "--spec", &spec.display().to_string()])).expect("JSON");
    assert_eq!((loaded["state"].as_str(), loaded["path"].as_str()), (Some("READY"), Some(folder.join("weights.pt").to_str().unwrap_or_default())));
    let rt = runtime();
    assert_eq!(rt.block_on(offset_version(&server.client("demo"), &server)), (200, Some(3.0)));
    let listed = cli(&["ls"]);
    assert!(listed.lines().any(|l| l.starts_with("offset ") && l.contains("READY") && l.contains("demo")), "{listed}");
    assert!(listed.lines().any(|l| l.starts_with("missing ") && l.contains("UNAVAILABLE") && l.contains("offset-9.pt")), "{listed}");
    let unloaded: Value = serde_json::from_str(&cli(&["unload", "offset"])).expect("JSON");
    assert_eq!(unloaded["state"], "UNAVAILABLE");
    cli(&["load", "offset"]);
    assert_eq!(rt.block_on(offset_version(&server.client("demo"), &server)), (200, Some(3.0)));
    cli(&["delete", "offset"]);
    assert_eq!(rt.block_on(offset_version(&server.client("demo"), &server)).0, 404);
}

#[test]
fn a_model_loaded_through_the_api_is_its_tenants_only_and_comes_back_after_a_restart() {
    let server = start();
    let rt = runtime();
    let admin = server.admin_client();
    let put = |body: String| admin.put(server.admin_url("/v1/models/offset")).body(body).send();
    rt.block_on(async {
        assert_eq!(guest_load(&server, "offset").await, "NotFound");
        // TOML, as in a [[model]] section.
        let toml = format!(
            "path = \"{}\"\ninputs = [{{ name = \"x\", dtype = \"FP32\", shape = [-1, 4] }}]\noutputs = [{{ name = \"y\" }}]\ntenants = [\"mallory\"]\n",
            artifact("build/models/offset-1.pt").display()
        );
        let (status, body) = json_of(put(toml).await.expect("put")).await;
        assert_eq!((status, body["state"].as_str(), body["origin"].as_str()), (201, Some("READY"), Some("api")), "{body}");
        assert_eq!(body["tenants"], json!(["mallory"]));
        assert_eq!(body["inputs"], json!([{ "name": "x", "datatype": "FP32", "shape": [-1, 4] }]));

        // Its tenant's guest sees it at once; another tenant sees nothing.
        assert_eq!(guest_load(&server, "offset").await, "ok");
        assert_eq!(offset_version(&server.client("mallory"), &server).await, (200, Some(1.0)));
        assert_eq!(offset_version(&server.client("demo"), &server).await, (404, None));

        // Replaced by JSON; then refused changes leave version 2 serving.
        let (status, body) = json_of(put(offset_spec(2, &["mallory"]).to_string()).await.expect("put")).await;
        assert_eq!((status, body["state"].as_str()), (200, Some("READY")), "{body}");
        assert_eq!(offset_version(&server.client("mallory"), &server).await, (200, Some(2.0)));
        let mut wrong_type = offset_spec(3, &["mallory"]);
        wrong_type["inputs"][0]["dtype"] = json!("FP99");
        let refusals = [
            (wrong_type, 400, "inputs[0].dtype"),
            (offset_spec(9, &["mallory"]), 422, "offset-9.pt"),
            (offset_spec(3, &["nobody"]), 400, "tenant 'nobody'"),
            (json!({ "name": "other" }), 400, "not the name in the path"),
        ];
        for (spec, want, naming) in refusals {
            let (status, body) = json_of(put(spec.to_string()).await.expect("put")).await;
            assert_eq!(status, want, "{body}");
            assert!(body["error"].as_str().unwrap_or_default().contains(naming), "{naming}: {body}");
        }
        assert_eq!(offset_version(&server.client("mallory"), &server).await, (200, Some(2.0)));
        let (status, body) = json_of(admin.put(server.admin_url("/v1/models/digits")).json(&offset_spec(1, &[])).send().await.expect("put")).await;
        assert_eq!(status, 409, "{body}");
        let (status, _) = json_of(server.client("demo").get(server.admin_url("/v1/models")).send().await.expect("get")).await;
        assert_eq!(status, 403, "a tenant key cannot list models");

        let (_, list) = json_of(admin.get(server.admin_url("/v1/models")).send().await.expect("list")).await;
        let listed: Vec<(&str, &str)> = list["models"]
            .as_array()
            .expect("models")
            .iter()
            .map(|m| (m["name"].as_str().unwrap_or_default(), m["origin"].as_str().unwrap_or_default()))
            .collect();
        assert_eq!(listed, [("digits", "config"), ("minilm", "config"), ("offset", "api")]);
    });

    server.restart().expect("restart");
    rt.block_on(async {
        until_ready(&server, "offset").await;
        assert_eq!(offset_version(&server.client("mallory"), &server).await, (200, Some(2.0)), "version 2 came back");
        assert_eq!(guest_load(&server, "offset").await, "ok");
        let (status, body) = json_of(admin.delete(server.admin_url("/v1/models/offset")).send().await.expect("delete")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(guest_load(&server, "offset").await, "NotFound");
        let (status, _) = json_of(admin.delete(server.admin_url("/v1/models/digits")).send().await.expect("delete")).await;
        assert_eq!(status, 409, "the config file owns digits");
    });

    server.restart().expect("restart");
    rt.block_on(async {
        assert_eq!(model_state(&server, "offset").await.0, 404, "a deleted model stays deleted");
    });
}

#[test]
fn three_reloads_under_load_lose_no_request_and_switch_to_the_new_weights() {
    let server = Arc::new(start());
    let rt = runtime();
    rt.block_on(async {
        let admin = server.admin_client();
        let reload = |version: u32| {
            admin.put(server.admin_url("/v1/models/offset")).json(&offset_spec(version, &["demo"])).send()
        };
        assert_eq!(reload(1).await.expect("load").status(), 201);
        let stop = Arc::new(AtomicBool::new(false));
        let callers: Vec<_> = (0..6)
            .map(|_| {
                let (server, stop) = (Arc::clone(&server), Arc::clone(&stop));
                tokio::spawn(async move {
                    let client = server.client("demo");
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        seen.push(offset_version(&client, &server).await);
                    }
                    seen
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        for version in [2, 3, 1] {
            let response = reload(version).await.expect("reload");
            assert_eq!(response.status(), 200, "{}", response.text().await.unwrap_or_default());
            // Every request sent after the reload answered gets the new weights.
            assert_eq!(offset_version(&server.client("demo"), &server).await, (200, Some(f64::from(version))));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let mut answers = Vec::new();
        for caller in callers {
            answers.extend(caller.await.expect("caller"));
        }
        let failed: Vec<_> = answers.iter().filter(|(status, _)| *status != 200).collect();
        assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), answers.len());
        for version in [1.0, 2.0, 3.0] {
            assert!(answers.iter().any(|(_, v)| *v == Some(version)), "no answer from version {version}");
        }
        assert!(answers.len() > 100, "too little load to mean anything: {}", answers.len());
    });
}
