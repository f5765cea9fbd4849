//! The model repository: models loaded, replaced, unloaded and deleted while serving, through
//! Kiln's admin API and the official `tritonclient`; seen at once by guests and OIP callers of
//! the tenants that may use them only; kept across restarts; reloaded under load without a
//! failed request. Own servers, since every test changes the models.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln_tests::{Server, artifact, examples_config, python_checks};

mod confinement;
mod sources;
mod tenants;
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
    python_checks(
        "repository_client.py",
        &[server.admin.replace("http://", ""), server.base.replace("http://", ""), artifact("build/models").display().to_string()],
        &[("KILN_ADMIN_KEY", server.admin_key()), ("KILN_KEY", server.key("demo"))],
        "repository",
        || server.log_text(),
    );
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
        // A model's info: its parameters as loaded, its one version, its load and warm-up times.
        let (_, digits) = model_state(&server, "digits").await;
        assert!(digits["parameters"].as_u64().is_some_and(|n| n > 1000), "{digits}");
        assert_eq!(digits["versions"], json!(["1"]));
        assert!(digits["load_ms"].is_u64() && digits["warmup_ms"].is_u64(), "{digits}");
        assert_eq!((digits["precision"].as_str(), digits["origin"].as_str()), (Some("fp32"), Some("config")));
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

/// The model's info as `GET /v1/models/offset` shows it, once `want` accepts it.
async fn info_until(server: &Server, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = model_state(server, "offset").await;
        if want(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{what}: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_served_model_pauses_resumes_flushes_retunes_and_its_requests_cancel_by_id() {
    let server = Arc::new(start());
    let rt = runtime();
    rt.block_on(async {
        let admin = server.admin_client();
        let mut spec = offset_spec(1, &["demo"]);
        spec["instances"] = json!({ "min": 1, "max": 3 });
        let response = admin.put(server.admin_url("/v1/models/offset")).json(&spec).send().await.expect("load");
        assert_eq!(response.status(), 201);
        let act = |action: &'static str| {
            let (admin, url) = (admin.clone(), server.admin_url(&format!("/v1/models/offset/{action}")));
            async move { json_of(admin.post(url).send().await.expect(action)).await }
        };
        let calls = |n: usize| -> Vec<tokio::task::JoinHandle<(u16, Option<f64>)>> {
            (0..n)
                .map(|_| {
                    let server = Arc::clone(&server);
                    tokio::spawn(async move { offset_version(&server.client("demo"), &server).await })
                })
                .collect()
        };

        // Paused: requests queue; resumed: every one is answered.
        let (status, body) = act("pause").await;
        assert_eq!((status, body["paused"].as_bool(), body["done"].as_str()), (200, Some(true), Some("paused")), "{body}");
        let waiting = calls(3);
        info_until(&server, "three requests queue while paused", |b| b["queued"] == 3).await;
        let (_, body) = act("resume").await;
        assert_eq!(body["paused"], false);
        for call in waiting {
            assert_eq!(call.await.expect("call"), (200, Some(1.0)));
        }

        // Flushed: the queued callers get 503 `flushed`.
        act("pause").await;
        let flushed: Vec<_> = (0..2)
            .map(|_| {
                let server = Arc::clone(&server);
                tokio::spawn(async move {
                    let request = json!({ "inputs": [{ "name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0] }] });
                    let response = server.client("demo").post(server.url("/v2/models/offset/infer")).json(&request).send().await;
                    json_of(response.expect("infer")).await
                })
            })
            .collect();
        info_until(&server, "two requests queue", |b| b["queued"] == 2).await;
        let (_, body) = act("flush").await;
        assert_eq!(body["done"], "flushed 2 queued requests", "{body}");
        for call in flushed {
            let (status, body) = call.await.expect("call");
            assert_eq!((status, body["kind"].as_str()), (503, Some("flushed")), "{body}");
        }

        // Cancelled by id: listed in flight, then answered 503 `cancelled` under that id.
        let waiting = tokio::spawn({
            let server = Arc::clone(&server);
            async move {
                let request = json!({ "inputs": [{ "name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0] }] });
                server.client("demo").post(server.url("/v2/models/offset/infer")).json(&request).send().await.expect("infer")
            }
        });
        info_until(&server, "one request queues", |b| b["queued"] == 1).await;
        let (_, listed) = json_of(admin.get(server.admin_url("/v1/requests")).send().await.expect("list")).await;
        let id = listed["requests"]
            .as_array()
            .expect("requests")
            .iter()
            .find(|r| r["path"] == "/v2/models/offset/infer")
            .and_then(|r| r["id"].as_str())
            .unwrap_or_else(|| panic!("the waiting request is listed: {listed}"))
            .to_owned();
        let (status, body) = json_of(admin.delete(server.admin_url(&format!("/v1/requests/{id}"))).send().await.expect("cancel")).await;
        assert_eq!((status, body["cancelled"].as_str()), (200, Some(id.as_str())), "{body}");
        let response = waiting.await.expect("waiting call");
        let header = response.headers().get("kiln-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        assert_eq!(header.as_deref(), Some(id.as_str()));
        let (status, body) = json_of(response).await;
        assert_eq!((status, body["kind"].as_str()), (503, Some("cancelled")), "{body}");
        info_until(&server, "the cancelled request leaves the queue", |b| b["queued"] == 0).await;
        let (status, _) = json_of(admin.delete(server.admin_url(&format!("/v1/requests/{id}"))).send().await.expect("cancel")).await;
        assert_eq!(status, 404, "a request no longer in flight");

        // A client that hangs up leaves neither the list of requests in flight nor the queue.
        let impatient = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .default_headers(std::iter::once((reqwest::header::AUTHORIZATION, format!("Bearer {}", server.key("demo")).parse().expect("header"))).collect())
            .build()
            .expect("client");
        let request = json!({ "inputs": [{ "name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0] }] });
        assert!(impatient.post(server.url("/v2/models/offset/infer")).json(&request).send().await.is_err(), "the client gave up");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, listed) = json_of(admin.get(server.admin_url("/v1/requests")).send().await.expect("list")).await;
            let stale = listed["requests"].as_array().is_some_and(|r| r.iter().any(|r| r["path"] == "/v2/models/offset/infer"));
            if !stale {
                break;
            }
            assert!(Instant::now() < deadline, "a request whose client left is still listed: {listed}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        info_until(&server, "the abandoned request leaves the queue", |b| b["queued"] == 0).await;

        // A live timeout: a paused model's request gives up after it.
        let patch = |body: Value| admin.patch(server.admin_url("/v1/models/offset")).json(&body).send();
        let (status, body) = json_of(patch(json!({ "timeout_ms": 300 })).await.expect("patch")).await;
        assert_eq!((status, body["timeout_ms"].as_u64()), (200, Some(300)), "{body}");
        let started = Instant::now();
        let (status, _) = offset_version(&server.client("demo"), &server).await;
        assert_eq!(status, 504);
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        act("resume").await;

        // Batch size, delay and replica bounds, live; bad values refused by name.
        let change = json!({ "max_batch_size": 4, "max_queue_delay_us": 500, "instances": { "min": 2, "max": 3 } });
        let (status, body) = json_of(patch(change).await.expect("patch")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!((body["max_batch_size"].as_u64(), body["max_queue_delay_us"].as_u64()), (Some(4), Some(500)));
        assert_eq!(body["instances"], json!({ "min": 2, "max": 3 }));
        info_until(&server, "a second replica is ready", |b| {
            b["replicas"].as_array().is_some_and(|r| r.iter().filter(|r| r["state"] == "ready").count() == 2)
        })
        .await;
        assert_eq!(offset_version(&server.client("demo"), &server).await, (200, Some(1.0)));
        let (_, body) = json_of(patch(json!({ "instances": 1 })).await.expect("patch")).await;
        assert_eq!(body["instances"], json!({ "min": 1, "max": 1 }));
        info_until(&server, "back to one replica", |b| b["replicas"].as_array().is_some_and(|r| r.len() == 1)).await;
        // The same ranges, in the same words, as the config file's (runtime/tests/config-errors).
        for (bad, naming) in [
            (json!({ "max_batch_size": 0 }), "max_batch_size: 0 is out of range (1 ..= 4096)"),
            (json!({ "max_queue_delay_us": 1_000_001 }), "max_queue_delay_us: 1000001 is out of range (0 ..= 1000000)"),
            (json!({ "timeout_ms": 0 }), "timeout_ms: 0 is out of range (1 ..= 3600000)"),
            (json!({ "instances": { "min": 3, "max": 2 } }), "instances"),
            (json!({ "batch": 3 }), "unknown field"),
        ] {
            let (status, body) = json_of(patch(bad).await.expect("patch")).await;
            assert_eq!(status, 400, "{body}");
            assert!(body["error"].as_str().unwrap_or_default().contains(naming), "{naming}: {body}");
        }

        // Statistics reset to zero; the model keeps serving.
        let before = stats_inferences(&server).await;
        assert!(before > 0);
        let (_, body) = act("reset-stats").await;
        assert_eq!(body["done"], "statistics reset");
        assert_eq!(stats_inferences(&server).await, 0);
        assert_eq!(offset_version(&server.client("demo"), &server).await, (200, Some(1.0)));
        assert_eq!(act("explode").await.0, 404);
        let tenant = server.client("demo");
        let refused = tenant.post(server.admin_url("/v1/models/offset/pause")).send().await.expect("pause");
        assert_eq!(refused.status(), 403, "a tenant key cannot steer a model");
        let refused = tenant.delete(server.admin_url(&format!("/v1/requests/{id}"))).send().await.expect("cancel");
        assert_eq!(refused.status(), 403, "a tenant key cannot cancel requests");

        // The same through `kiln model` and `kiln request`.
        let cli = |args: &[&str]| {
            let mut all = args.to_vec();
            all.extend_from_slice(&["--admin-url", &server.admin, "--admin-key", server.admin_key()]);
            kiln_tests::kiln(&all).unwrap_or_else(|e| panic!("{e:#}"))
        };
        assert_eq!(cli(&["model", "pause", "offset"]).trim(), "paused");
        let said = cli(&["model", "set", "offset", "--max-batch-size", "8", "--instances", "1..2"]);
        assert!(said.contains("max_batch_size 8") && said.contains("instances 1..=2"), "{said}");
        assert_eq!(model_state(&server, "offset").await.1["instances"], json!({ "min": 1, "max": 2 }));
        assert_eq!(cli(&["model", "resume", "offset"]).trim(), "resumed");
        assert!(cli(&["request", "ls"]).starts_with("ID "), "a table of requests");
        // Deleting a paused model does not strand what it queued: those requests run on it.
        act("pause").await;
        let waiting = calls(1);
        info_until(&server, "one request queues before the delete", |b| b["queued"] == 1).await;
        let (status, _) = json_of(admin.delete(server.admin_url("/v1/models/offset")).send().await.expect("delete")).await;
        assert_eq!(status, 200);
        for call in waiting {
            assert_eq!(call.await.expect("call"), (200, Some(1.0)), "answered by the deleted model");
        }
        let audit = server.audit_log_with(|l| l.contains("statistics reset"));
        for line in ["paused", "resumed", "flushed 2 queued requests", "tuned", "request_cancel"] {
            assert!(audit.contains(line), "{line} in the audit log:\n{audit}");
        }
    });
}

/// The offset model's inferences as `/v1/stats` counts them.
async fn stats_inferences(server: &Server) -> u64 {
    let (_, stats) = json_of(server.admin_client().get(server.url("/v1/stats")).send().await.expect("stats")).await;
    stats["models"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "offset"))
        .and_then(|m| m["inferences"].as_u64())
        .expect("offset in the stats")
}

/// `offset` with every version listed (`offset-N.pt` answers y = x + N) and `policy`.
fn versioned_spec(versions: &[u32], policy: &str) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({ "version": v, "source": artifact("build/models").join(format!("offset-{v}.pt")).display().to_string() }))
        .collect();
    json!({
        "versions": versions,
        "version_policy": policy,
        "inputs": [{ "name": "x", "dtype": "FP32", "shape": [-1, 4] }],
        "outputs": [{ "name": "y" }],
        "tenants": ["mallory"],
    })
}

/// `/v2/models/{path}/infer` for mallory: the status, the version that answered (y - x) and the
/// `model_version` it reported.
async fn answer_of(server: &Server, path: &str) -> (u16, Option<f64>, Value) {
    let request = json!({ "inputs": [{ "name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.0, 1.0, 2.0, 3.0] }] });
    let response = server.client("mallory").post(server.url(&format!("/v2/models/{path}/infer"))).json(&request).send().await;
    let (status, body) = json_of(response.expect("infer")).await;
    (status, body["outputs"][0]["data"][0].as_f64(), body["model_version"].clone())
}

#[test]
fn versions_serve_by_policy_and_by_number_for_guests_and_oip_callers() {
    let server = start();
    let rt = runtime();
    let admin = server.admin_client();
    let put = |spec: Value| admin.put(server.admin_url("/v1/models/multi")).json(&spec).send();
    rt.block_on(async {
        let (status, body) = json_of(put(versioned_spec(&[1, 2, 3], "latest(2)")).await.expect("put")).await;
        assert_eq!((status, body["state"].as_str()), (201, Some("READY")), "{body}");
        assert_eq!(body["versions"], json!(["2", "3"]));

        // The plain name is the latest version; each served version by number; 1 is not served.
        assert_eq!(answer_of(&server, "multi").await, (200, Some(3.0), json!("3")));
        assert_eq!(answer_of(&server, "multi/versions/2").await, (200, Some(2.0), json!("2")));
        let (status, _, _) = answer_of(&server, "multi/versions/1").await;
        assert_eq!(status, 404);
        let (status, body) = json_of(server.client("mallory").get(server.url("/v2/models/multi/versions/1/ready")).send().await.expect("ready")).await;
        assert_eq!(status, 404, "{body}");
        assert!(body["error"].as_str().unwrap_or_default().contains("has no version '1'"), "{body}");
        let (_, meta) = json_of(server.client("mallory").get(server.url("/v2/models/multi")).send().await.expect("meta")).await;
        assert_eq!((meta["name"].as_str(), &meta["versions"]), (Some("multi"), &json!(["2", "3"])), "{meta}");
        // Another tenant sees no version of it.
        let (status, _) = json_of(server.client("demo").get(server.url("/v2/models/multi/versions/2")).send().await.expect("meta")).await;
        assert_eq!(status, 404);

        // A guest: `multi` and `multi@2` load, `multi@1` is not there, a malformed one is refused.
        assert_eq!(guest_load(&server, "multi").await, "ok");
        assert_eq!(guest_load(&server, "multi@2").await, "ok");
        assert_eq!(guest_load(&server, "multi@1").await, "NotFound");
        assert_eq!(guest_load(&server, "multi@two").await, "InvalidArgument");

        // Triton's index lists each version served; the stats one row per version.
        let (_, index) = json_of(admin.post(server.admin_url("/v2/repository/index")).json(&json!({})).send().await.expect("index")).await;
        let rows: Vec<(String, String)> = index
            .as_array()
            .expect("rows")
            .iter()
            .filter(|r| r["name"] == "multi")
            .map(|r| (r["version"].as_str().unwrap_or_default().to_owned(), r["state"].as_str().unwrap_or_default().to_owned()))
            .collect();
        assert_eq!(rows, [("2".to_owned(), "READY".to_owned()), ("3".to_owned(), "READY".to_owned())]);
        let (_, stats) = json_of(admin.get(server.url("/v1/stats")).send().await.expect("stats")).await;
        let names: Vec<&str> = stats["models"].as_array().expect("models").iter().filter_map(|m| m["name"].as_str()).collect();
        assert!(names.contains(&"multi@2") && names.contains(&"multi@3") && !names.contains(&"multi@1"), "{names:?}");

        // Other policies, loaded over the running one.
        let (status, body) = json_of(put(versioned_spec(&[1, 2, 3], "specific(1)")).await.expect("put")).await;
        assert_eq!((status, &body["versions"]), (200, &json!(["1"])), "{body}");
        assert_eq!(answer_of(&server, "multi").await, (200, Some(1.0), json!("1")));
        let (status, body) = json_of(put(versioned_spec(&[1, 3], "all")).await.expect("put")).await;
        assert_eq!((status, &body["versions"]), (200, &json!(["1", "3"])), "{body}");
        assert_eq!(answer_of(&server, "multi/versions/1").await.1, Some(1.0));
        assert_eq!(answer_of(&server, "multi").await.1, Some(3.0));

        // Refused definitions name what is wrong, and the versions served stay.
        for (spec, naming) in [
            (versioned_spec(&[1, 2], "newest"), "version_policy"),
            (versioned_spec(&[1, 2], "specific(5)"), "version 5 is not in `versions`"),
            (versioned_spec(&[1, 1], "all"), "version 1 is listed twice"),
            (versioned_spec(&[0], "all"), "not a version number"),
        ] {
            let (status, body) = json_of(put(spec).await.expect("put")).await;
            assert_eq!(status, 400, "{body}");
            assert!(body["error"].as_str().unwrap_or_default().contains(naming), "{naming}: {body}");
        }
        let (_, info) = model_state(&server, "multi").await;
        assert_eq!(info["versions"], json!(["1", "3"]));
    });
}
