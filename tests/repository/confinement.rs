//! Tenants' own models, confined: two tenants at once on one server, sharing the model cache,
//! the operator's models and the sandbox pool, one of them (mallory) trying what a hostile
//! tenant would. Every refusal names the limit; the other tenant (acme) loads, serves and lists
//! as if mallory were not there.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_tests::{Server, artifact, examples_config};
use serde_json::{Value, json};

use super::sources::{FileServer, offset_bytes, sha256};
use super::{json_of, runtime};

/// The `offset` model's fields for a tenant's own load, with more fields set from `extra`.
fn own_spec(source: &str, sha256: &str, extra: Value) -> Value {
    let mut spec = json!({
        "source": source,
        "sha256": sha256,
        "inputs": [{ "name": "x", "dtype": "FP32", "shape": [-1, 4] }],
        "outputs": [{ "name": "y" }],
    });
    for (k, v) in extra.as_object().expect("object") {
        spec[k] = v.clone();
    }
    spec
}

/// A stand-in HTTP proxy that counts the requests it is sent and answers each 502.
fn counting_proxy() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = stream.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (url, seen)
}

fn error_of(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_default()
}

#[test]
fn a_tenant_cannot_take_another_s_files_exceed_its_model_quota_or_hold_up_another_s_loads() {
    let (one, two, three) = (offset_bytes(1), offset_bytes(2), offset_bytes(3));
    let (d1, d2, d3) = (sha256(&one), sha256(&two), sha256(&three));
    let size = one.len();
    let web = FileServer::start(HashMap::from([
        ("offset-1.pt".to_owned(), one),
        ("offset-2.pt".to_owned(), two),
        ("offset-3.pt".to_owned(), three),
    ]));
    let (proxy, proxied) = counting_proxy();
    let tenants = format!(
        "[[tenant]]\nname = \"acme\"\nmodels = [\"digits\"]\n\
         quota = {{ max_models = 3, max_model_bytes = {big} }}\n\
         [[tenant]]\nname = \"eve\"\nmodels = [\"digits\"]\n\
         quota = {{ max_models = 3, max_model_bytes = {small}, max_model_instances = 2, max_model_threads = 2, \
         max_model_versions = 2, min_latency_objective_ms = 20 }}\n",
        big = size * 10,
        small = size * 3 / 2,
    );
    // The file server is on loopback: let tenants' sources be private here. Every fetch of the
    // server's would go through the proxy the environment names, but tenants' never do.
    let config = examples_config("tenant_private_sources = true", &[], &tenants);
    let env = [("HTTP_PROXY", proxy.as_str()), ("http_proxy", proxy.as_str()), ("ALL_PROXY", proxy.as_str())];
    let server = Server::start_with_env(&config, &["demo", "acme", "eve"], &env).unwrap_or_else(|e| panic!("{e:#}"));
    let cache = server.dir.path.join("state/cache");
    let put = |tenant: &str, name: &str, spec: Value| {
        server.client(tenant).put(server.url(&format!("/v1/models/{name}"))).json(&spec).send()
    };
    let url = |path: &str| web.url(path);
    runtime().block_on(async {
        // acme loads its model straight from the source, past the environment's proxy.
        let (status, body) = json_of(put("acme", "mine", own_spec(&url("/files/offset-1.pt"), &d1, json!({}))).await.expect("put")).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(proxied.load(Ordering::SeqCst), 0, "a tenant's download went through the proxy");

        // eve names acme's digest behind a dead source, then behind a file of its own that is
        // not it: it gets neither acme's cached file nor the real digest of what it sent.
        let (status, body) = json_of(put("eve", "stolen", own_spec(&url("/files/gone.pt"), &d1, json!({}))).await.expect("put")).await;
        assert_eq!(status, 422, "{body}");
        assert!(error_of(&body).contains("404"), "{body}");
        let (status, body) = json_of(put("eve", "stolen", own_spec(&url("/files/offset-2.pt"), &d1, json!({}))).await.expect("put")).await;
        assert_eq!(status, 422, "{body}");
        assert!(error_of(&body).contains("does not match the pinned sha256") && !error_of(&body).contains(&d2), "{body}");
        let (status, _) = json_of(server.client("eve").get(server.url("/v2/models/stolen")).send().await.expect("meta")).await;
        assert_eq!(status, 404, "nothing of acme's is served to eve");

        // Past its bytes: the second version is refused on its announced length, nothing kept.
        let fat = json!({
            "versions": [
                { "version": 1, "source": url("/files/offset-1.pt"), "sha256": d1 },
                { "version": 2, "source": url("/files/offset-2.pt"), "sha256": d2 },
            ],
            "version_policy": "all",
            "inputs": [{ "name": "x", "dtype": "FP32", "shape": [-1, 4] }], "outputs": [{ "name": "y" }],
        });
        let (status, body) = json_of(put("eve", "fat", fat).await.expect("put")).await;
        assert_eq!(status, 403, "{body}");
        assert!(error_of(&body).contains("the tenant's quota.max_model_bytes has left"), "{body}");
        let partial: Vec<_> = std::fs::read_dir(cache.join("partial")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        assert!(partial.is_empty(), "a refused download leaves no partial file: {partial:?}");

        // Devices, instances, threads, versions and the latency objective are under its quota.
        for (extra, naming) in [
            (json!({ "device": "cuda:0" }), "quota.model_devices"),
            (json!({ "device": "auto" }), "quota.model_devices"),
            (json!({ "instances": 3 }), "quota.max_model_instances"),
            (json!({ "threads": 3 }), "quota.max_model_threads"),
            (json!({ "latency_objective_ms": 5 }), "quota.min_latency_objective_ms"),
        ] {
            let (status, body) = json_of(put("eve", "knobs", own_spec(&url("/files/offset-3.pt"), &d3, extra.clone())).await.expect("put")).await;
            assert_eq!(status, 403, "{extra}: {body}");
            assert!(error_of(&body).contains(naming), "{extra}: {body}");
        }
        let three = json!({
            "versions": (1..=3).map(|v| json!({ "version": v, "source": url("/files/offset-3.pt"), "sha256": d3 })).collect::<Vec<_>>(),
            "version_policy": "all",
            "inputs": [{ "name": "x", "dtype": "FP32", "shape": [-1, 4] }], "outputs": [{ "name": "y" }],
        });
        let (status, body) = json_of(put("eve", "three", three).await.expect("put")).await;
        assert_eq!(status, 403, "{body}");
        assert!(error_of(&body).contains("quota.max_model_versions (2)"), "{body}");
        let (status, body) = json_of(put("eve", "one", own_spec(&url("/files/offset-3.pt"), &d3, json!({ "instances": 2 }))).await.expect("put")).await;
        assert_eq!(status, 201, "{body}");
        let (status, body) = json_of(put("eve", "two", own_spec(&url("/files/offset-3.pt"), &d3, json!({}))).await.expect("put")).await;
        assert_eq!(status, 403, "{body}");
        assert!(error_of(&body).contains("quota.max_model_instances (2)"), "counted across its models: {body}");
        let deleted = server.client("eve").delete(server.url("/v1/models/one")).send().await.expect("delete");
        assert_eq!(deleted.status(), 200);

        // One load at a time per tenant: a second while its first downloads is told to wait,
        // while acme's load at the same time goes through.
        let (slow, second, other) = tokio::join!(
            put("eve", "slow", own_spec(&url("/slow/offset-2.pt"), &d2, json!({}))),
            async {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                put("eve", "again", own_spec(&url("/files/offset-3.pt"), &d3, json!({}))).await
            },
            async {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                put("acme", "theirs", own_spec(&url("/files/offset-2.pt"), &d2, json!({}))).await
            },
        );
        let (status, body) = json_of(second.expect("put")).await;
        assert_eq!(status, 429, "{body}");
        assert!(error_of(&body).contains("already has a model loading"), "{body}");
        let (status, body) = json_of(other.expect("put")).await;
        assert_eq!(status, 201, "acme's load is not held up by eve's: {body}");
        let (status, body) = json_of(slow.expect("put")).await;
        assert_eq!(status, 201, "{body}");

        // eve's listing shows its own model and the shared one it may use, with no server path
        // and no other tenant's name in it.
        let (_, listed) = json_of(server.client("eve").get(server.url("/v1/models")).send().await.expect("list")).await;
        let text = listed.to_string();
        for secret in ["acme", "demo", server.dir.path.to_str().expect("path"), artifact("build").to_str().expect("path")] {
            assert!(!text.contains(secret), "eve's listing shows '{secret}': {listed}");
        }
        let names: Vec<&str> = listed["models"].as_array().expect("models").iter().filter_map(|m| m["name"].as_str()).collect();
        assert_eq!(names, ["slow", "digits"], "{listed}");

        // The operator's own fetches still use the environment's proxy: the check above could fail.
        let operator = json!({
            "source": url("/files/offset-1.pt"), "sha256": d1,
            "inputs": [{ "name": "x", "dtype": "FP32", "shape": [-1, 4] }], "outputs": [{ "name": "y" }],
        });
        std::fs::remove_file(cache.join("sha256").join(&d1)).expect("uncache d1");
        let response = server.admin_client().put(server.admin_url("/v1/models/operators")).json(&operator).send().await;
        let (status, body) = json_of(response.expect("put")).await;
        assert_eq!(status, 422, "{body}");
        assert!(proxied.load(Ordering::SeqCst) > 0, "the operator's fetch did not use the proxy: {body}");
    });
}

#[test]
fn a_tenant_s_failing_loads_cannot_flood_the_audit_log_or_the_events_or_write_lines_of_their_own() {
    let tenants = "[[tenant]]\nname = \"eve\"\nmodels = [\"digits\"]\nquota = { max_models = 2 }\n";
    let server = Server::start(&examples_config("", &[], tenants), &["demo", "eve"]).unwrap_or_else(|e| panic!("{e:#}"));
    // A field name of 100 kB that forges a line of its own: echoed in a parse error.
    let forged = format!("x\n{{\"event\":\"forged\"}}\n{}", "y".repeat(100_000));
    let started = std::time::Instant::now();
    runtime().block_on(async {
        for _ in 0..40 {
            let spec = json!({ forged.clone(): 1, "source": "https://example.invalid/m.pt", "sha256": "0".repeat(64) });
            let response = server.client("eve").put(server.url("/v1/models/m")).json(&spec).send().await.expect("put");
            assert_eq!(response.status().as_u16(), 400);
        }
        // The history, as a follower reads it first (the stream stays open: read until quiet).
        let text = server.events_text(std::time::Duration::from_millis(1500)).await;
        let eve = text.matches("eve:m").count();
        // Five a second at most: the seconds the failures took, and one for the edges.
        let most = 5 * (started.elapsed().as_secs() as usize + 2);
        assert!((1..=most.min(39)).contains(&eve), "eve's 40 failures are {eve} events: {}", &text[..text.len().min(2000)]);
        // What was left out is counted where an operator looks.
        let metrics = server.admin_client().get(server.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
        let dropped: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("kiln_events_dropped_total "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no kiln_events_dropped_total in /metrics"));
        assert_eq!(dropped as usize, 40 - eve, "every failure is an event or counted as dropped");
        assert!(text.len() < 40 * 1024, "events carry bounded details: {} bytes", text.len());
    });
    let audit = server.audit_log_with(|l| l.contains("model_load_failed"));
    let failures: Vec<&str> = audit.lines().filter(|l| l.contains("model_load_failed")).collect();
    assert!(!failures.is_empty() && failures.len() <= 40, "{}", failures.len());
    for line in audit.lines() {
        assert!(line.len() < 2048, "an audit line of {} bytes", line.len());
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON line ({e}): {line}"));
        assert_ne!(value["event"], "forged");
    }
    assert!(!server.log_text().lines().any(|l| l.starts_with("{\"event\":\"forged\"}")), "a forged line in the server log");
}

#[test]
fn a_load_that_never_gets_ready_fails_at_its_deadline_and_holds_up_no_other_load() {
    let hang = std::fs::read(artifact("build/models/hang.pt")).expect("hang model");
    let two = offset_bytes(2);
    let (dh, d2) = (sha256(&hang), sha256(&two));
    let web = FileServer::start(HashMap::from([("hang.pt".to_owned(), hang), ("offset-2.pt".to_owned(), two)]));
    let tenants = "[[tenant]]\nname = \"acme\"\nmodels = [\"digits\"]\nquota = { max_models = 2 }\n\
                   [[tenant]]\nname = \"eve\"\nmodels = [\"digits\"]\nquota = { max_models = 2 }\n";
    let config = examples_config("tenant_private_sources = true\nload_timeout_s = 8", &[], tenants);
    let server = Server::start(&config, &["demo", "acme", "eve"]).unwrap_or_else(|e| panic!("{e:#}"));
    let put = |tenant: &str, name: &str, spec: Value| {
        server.client(tenant).put(server.url(&format!("/v1/models/{name}"))).json(&spec).send()
    };
    runtime().block_on(async {
        let started = std::time::Instant::now();
        let (hung, other, operators) = tokio::join!(
            put("eve", "hang", own_spec(&web.url("/files/hang.pt"), &dh, json!({}))),
            async {
                tokio::time::sleep(std::time::Duration::from_millis(800)).await;
                let response = put("acme", "mine", own_spec(&web.url("/files/offset-2.pt"), &d2, json!({}))).await;
                (response, started.elapsed())
            },
            async {
                tokio::time::sleep(std::time::Duration::from_millis(800)).await;
                let spec = json!({
                    "path": artifact("build/models/offset-1.pt").display().to_string(),
                    "inputs": [{ "name": "x", "dtype": "FP32", "shape": [-1, 4] }], "outputs": [{ "name": "y" }],
                    "tenants": ["demo"],
                });
                let response = server.admin_client().put(server.admin_url("/v1/models/offset")).json(&spec).send().await;
                (response, started.elapsed())
            },
        );
        let (status, body) = json_of(hung.expect("put")).await;
        assert_eq!(status, 422, "{body}");
        assert!(error_of(&body).contains("not ready within 8 s"), "{body}");
        let elapsed = started.elapsed();
        assert!(elapsed < std::time::Duration::from_secs(30), "failed at its deadline, not later: {elapsed:?}");
        for (name, (response, done)) in [("acme's", other), ("the operator's", operators)] {
            let (status, body) = json_of(response.expect("put")).await;
            assert_eq!(status, 201, "{name}: {body}");
            assert!(done < std::time::Duration::from_secs(6), "{name} load waited for eve's: {done:?}");
        }
        // eve may load again once its failed load is over.
        let (status, body) = json_of(put("eve", "next", own_spec(&web.url("/files/offset-2.pt"), &d2, json!({}))).await.expect("put")).await;
        assert_eq!(status, 201, "{body}");
    });
}

#[test]
fn a_tenant_s_model_that_reaches_for_files_or_other_operators_is_refused_at_load_while_another_tenant_is_served() {
    let read = |name: &str| std::fs::read(artifact("build/models").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let files: HashMap<String, Vec<u8>> = ["from-file.pt", "odd-op.pt", "setstate-from-file.pt", "offset-2.pt"]
        .into_iter()
        .map(|name| (name.to_owned(), read(name)))
        .collect();
    let digests: HashMap<String, String> = files.iter().map(|(name, bytes)| (name.clone(), sha256(bytes))).collect();
    let web = FileServer::start(files);
    let tenants = "[[tenant]]\nname = \"acme\"\nmodels = [\"digits\"]\nquota = { max_models = 2 }\n\
                   [[tenant]]\nname = \"eve\"\nmodels = [\"digits\"]\nquota = { max_models = 4 }\n";
    let config = examples_config("tenant_private_sources = true", &[], tenants);
    let server = Server::start(&config, &["demo", "acme", "eve"]).unwrap_or_else(|e| panic!("{e:#}"));
    let cwd = std::env::current_dir().expect("cwd");
    let planted = cwd.join("kiln-setstate-from-file.created");
    let _ = std::fs::remove_file(&planted);
    let put = |tenant: &str, name: &str, file: &str| {
        let spec = own_spec(&web.url(&format!("/files/{file}")), &digests[file], json!({}));
        server.client(tenant).put(server.url(&format!("/v1/models/{name}"))).json(&spec).send()
    };
    runtime().block_on(async {
        let (status, body) = json_of(put("acme", "mine", "offset-2.pt").await.expect("put")).await;
        assert_eq!(status, 201, "{body}");
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // acme calls its own model the whole time: every answer is its own, and right.
        let neighbour = {
            let (client, url, done) = (server.client("acme"), server.url("/v2/models/mine/infer"), Arc::clone(&done));
            tokio::spawn(async move {
                let request = json!({ "inputs": [{ "name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.0, 1.0, 2.0, 3.0] }] });
                let mut answered = 0;
                while !done.load(Ordering::SeqCst) {
                    let (status, body) = json_of(client.post(&url).json(&request).send().await.expect("infer")).await;
                    assert_eq!((status, body["outputs"][0]["data"][0].as_f64()), (200, Some(2.0)), "{body}");
                    answered += 1;
                    // Steady traffic, well within its rate.
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                answered
            })
        };
        for (name, file, naming) in [
            ("leak", "from-file.pt", "aten::from_file"),
            ("odd", "odd-op.pt", "prim::Print"),
            ("setstate", "setstate-from-file.pt", "aten::from_file"),
        ] {
            let (status, body) = json_of(put("eve", name, file).await.expect("put")).await;
            assert_eq!(status, 422, "{file}: {body}");
            let error = error_of(&body);
            assert!(error.contains(naming) && error.contains("allow-list"), "{file}: {body}");
            assert!(!error.contains(server.dir.path.to_str().expect("path")), "no server path: {body}");
            let (status, _) = json_of(server.client("eve").get(server.url(&format!("/v2/models/{name}"))).send().await.expect("meta")).await;
            assert_eq!(status, 404, "{file} is not served");
        }
        assert!(!planted.exists(), "the refused model's __setstate__ ran");
        done.store(true, Ordering::SeqCst);
        let answered = neighbour.await.expect("neighbour");
        assert!(answered > 0);
    });
}

#[test]
fn a_tenant_s_download_ends_with_its_request() {
    let one = offset_bytes(1);
    let d1 = sha256(&one);
    let web = FileServer::start(HashMap::from([("offset-1.pt".to_owned(), one)]));
    let tenants = "[[tenant]]\nname = \"eve\"\nmodels = [\"digits\"]\nquota = { max_models = 2 }\n";
    let config = examples_config("tenant_private_sources = true", &[], tenants);
    let server = Server::start(&config, &["demo", "eve"]).unwrap_or_else(|e| panic!("{e:#}"));
    let partial = server.dir.path.join("state/cache/partial");
    runtime().block_on(async {
        // The client gives up after a second of a download that would take minutes.
        let spec = own_spec(&web.url("/trickle/offset-1.pt"), &d1, json!({}));
        let gave_up = server
            .client("eve")
            .put(server.url("/v1/models/slow"))
            .timeout(std::time::Duration::from_secs(1))
            .json(&spec)
            .send()
            .await;
        assert!(gave_up.is_err_and(|e| e.is_timeout()), "the client timed out");
        // Waits up to 5 s for the line; the whole download would take about 7.
        let audit = server.audit_log_with(|l| l.contains("the request that started it ended"));
        assert!(audit.contains("the request that started it ended"), "the download went on: {audit}");
        let left: Vec<_> = std::fs::read_dir(&partial).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "its partial file is gone: {left:?}");
        // And its one load at a time is free again.
        let (status, body) = json_of(server.client("eve").get(server.url("/v1/models/slow")).send().await.expect("get")).await;
        assert_eq!(status, 404, "{body}");
        let spec = own_spec(&web.url("/files/offset-1.pt"), &d1, json!({}));
        let (status, body) = json_of(server.client("eve").put(server.url("/v1/models/quick")).json(&spec).send().await.expect("put")).await;
        assert_eq!(status, 201, "{body}");
    });
}

#[test]
fn a_tenant_s_hub_download_never_carries_the_operator_s_token_nor_stalls_another_s_and_is_admitted_like_any_request() {
    let (one, two) = (offset_bytes(1), offset_bytes(2));
    let (d1, d2) = (sha256(&one), sha256(&two));
    let web = FileServer::start(HashMap::from([("offset-1.pt".to_owned(), one), ("offset-2.pt".to_owned(), two)]));
    let tenants = "[[tenant]]\nname = \"acme\"\nmodels = [\"digits\"]\nquota = { max_models = 2 }\n\
                   [[tenant]]\nname = \"eve\"\nmodels = [\"digits\"]\n\
                   quota = { max_models = 3, requests_per_second = 0.02, burst = 3 }\n";
    let config = examples_config("tenant_private_sources = true", &[], tenants);
    let hub = web.url("/hf");
    let env = [("HF_TOKEN", "the-operators-secret"), ("HF_ENDPOINT", hub.as_str())];
    let server = Server::start_with_env(&config, &["demo", "acme", "eve"], &env).unwrap_or_else(|e| panic!("{e:#}"));
    let put = |tenant: &str, name: &str, spec: Value| {
        server.client(tenant).put(server.url(&format!("/v1/models/{name}"))).json(&spec).send()
    };
    runtime().block_on(async {
        // eve downloads a file slowly; acme's load of the same digest from its own source does
        // not wait for it (one lock per digest made it wait, and resume eve's partial file).
        let eve_slow = put("eve", "slow", own_spec(&web.url("/trickle/offset-1.pt"), &d1, json!({})));
        let acme_quick = async {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let started = std::time::Instant::now();
            let response = put("acme", "quick", own_spec(&web.url("/files/offset-1.pt"), &d1, json!({}))).await;
            (response, started.elapsed())
        };
        let (slow, (quick, took)) = tokio::join!(eve_slow, acme_quick);
        let (status, body) = json_of(quick.expect("put")).await;
        assert_eq!(status, 201, "{body}");
        assert!(took < std::time::Duration::from_secs(3), "acme waited {took:?} for eve's download");
        let (status, body) = json_of(slow.expect("put")).await;
        assert_eq!(status, 201, "eve's own download completes too: {body}");

        // A hub source: eve's own token, or none; never the server's.
        let hub_spec = own_spec("hf://kiln/offsets/offset-2.pt@v1", &d2, json!({}));
        let with_token = server
            .client("eve")
            .put(server.url("/v1/models/hubbed"))
            .header("kiln-source-token", "eves-own-token")
            .json(&hub_spec)
            .send()
            .await;
        let (status, body) = json_of(with_token.expect("put")).await;
        assert_eq!(status, 201, "{body}");
        // Its rate (one in 50 s, a burst of three) applies to loads too: the fourth is refused.
        // (The third is a reload from its own cached file: no download.)
        let (status, body) = json_of(put("eve", "hubbed", hub_spec.clone()).await.expect("put")).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = json_of(put("eve", "hubbed", hub_spec.clone()).await.expect("put")).await;
        assert_eq!(status, 429, "{body}");
        assert_eq!(body["kind"], "quota", "{body}");
        let seen = web.authorizations_to("/hf/");
        assert_eq!(seen, ["Bearer eves-own-token"], "eve's token alone, and only once");
        // The operator's hub loads carry the server's token: the check above could fail.
        let mut operator = hub_spec;
        operator["tenants"] = json!(["demo"]);
        std::fs::remove_file(server.dir.path.join("state/cache/sha256").join(&d2)).expect("uncache");
        let response = server.admin_client().put(server.admin_url("/v1/models/operators")).json(&operator).send().await;
        let (status, body) = json_of(response.expect("put")).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(web.authorizations_to("/hf/").last().map(String::as_str), Some("Bearer the-operators-secret"));
    });
}

/// The processes whose parent is `parent` and whose command line is `kiln model-worker MODEL`.
fn workers_of(parent: u32, model: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let (Ok(stat), Ok(cmdline)) = (std::fs::read_to_string(entry.path().join("stat")), std::fs::read(entry.path().join("cmdline"))) else {
            continue;
        };
        // `pid (comm) state ppid ...`: the command may hold spaces, so read after its `)`.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|p| p.parse::<u32>().ok());
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if ppid == Some(parent) && args.get(1) == Some(&&b"model-worker"[..]) && args.get(2) == Some(&model.as_bytes()) {
            found.push(pid);
        }
    }
    found
}


#[test]
fn a_tenant_s_model_runs_in_a_worker_of_its_own_whose_crash_fails_only_that_tenant_s_requests_until_it_restarts() {
    let two = offset_bytes(2);
    let d2 = sha256(&two);
    let web = FileServer::start(HashMap::from([("offset-2.pt".to_owned(), two)]));
    let tenants = "[[tenant]]\nname = \"acme\"\nmodels = [\"digits\"]\nquota = { max_models = 2 }\n\
                   [[tenant]]\nname = \"eve\"\nmodels = [\"digits\"]\nquota = { max_models = 2 }\n";
    let config = examples_config("tenant_private_sources = true", &[], tenants);
    let server = Server::start(&config, &["demo", "acme", "eve"]).unwrap_or_else(|e| panic!("{e:#}"));
    let server_pid = server.pid().expect("pid");
    runtime().block_on(async {
        // Both tenants load the same file (one cache entry each fetched) under the same name.
        for tenant in ["acme", "eve"] {
            let spec = own_spec(&web.url("/files/offset-2.pt"), &d2, json!({}));
            let response = server.client(tenant).put(server.url("/v1/models/mine")).json(&spec).send().await.expect("put");
            let (status, body) = json_of(response).await;
            assert_eq!(status, 201, "{tenant}: {body}");
        }
        let (acme_workers, eve_workers) = (workers_of(server_pid, "acme:mine"), workers_of(server_pid, "eve:mine"));
        assert_eq!((acme_workers.len(), eve_workers.len()), (1, 1), "one worker each: {acme_workers:?} {eve_workers:?}");
        // The operator's models run in the server, unless one asks for a worker.
        assert!(workers_of(server_pid, "digits").is_empty());
        let spec = json!({
            "path": artifact("build/models/offset-1.pt").display().to_string(), "worker": true,
            "inputs": [{ "name": "x", "dtype": "FP32", "shape": [-1, 4] }], "outputs": [{ "name": "y" }],
        });
        let (status, body) = json_of(server.admin_client().put(server.admin_url("/v1/models/offset")).json(&spec).send().await.expect("put")).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(workers_of(server_pid, "offset").len(), 1, "the operator's offset asked for a worker");
        // The worker confined itself: it cannot read the server's files (its config, for one).
        let status = std::fs::read_to_string(format!("/proc/{}/status", eve_workers[0])).expect("status");
        assert!(status.lines().any(|l| l.starts_with("Seccomp:") && l.ends_with('2')), "a seccomp filter: {status}");
        assert!(status.lines().any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')), "{status}");

        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let request = json!({ "inputs": [{ "name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.0, 1.0, 2.0, 3.0] }] });
        // acme calls its own model and the operator's digits the whole time: every answer right.
        let acme = {
            let (client, done, request) = (server.client("acme"), Arc::clone(&done), request.clone());
            let (mine, digits) = (server.url("/v2/models/mine/infer"), server.url("/v2/models/digits/infer"));
            let image = json!({ "inputs": [{ "name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": vec![0.0; 64] }] });
            tokio::spawn(async move {
                let mut answered = 0;
                while !done.load(Ordering::SeqCst) {
                    let (status, body) = json_of(client.post(&mine).json(&request).send().await.expect("infer")).await;
                    assert_eq!((status, body["outputs"][0]["data"][0].as_f64()), (200, Some(2.0)), "acme's own: {body}");
                    let (status, body) = json_of(client.post(&digits).json(&image).send().await.expect("infer")).await;
                    assert_eq!(status, 200, "the operator's digits: {body}");
                    answered += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                answered
            })
        };
        // eve calls its own: right before the crash, 503 "unavailable" after it, right again once
        // the worker has restarted.
        let eve = {
            let (client, done, url) = (server.client("eve"), Arc::clone(&done), server.url("/v2/models/mine/infer"));
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while !done.load(Ordering::SeqCst) {
                    let (status, body) = json_of(client.post(&url).json(&request).send().await.expect("infer")).await;
                    match status {
                        200 => assert_eq!(body["outputs"][0]["data"][0].as_f64(), Some(2.0), "{body}"),
                        503 => assert_eq!(body["kind"], "unavailable", "{body}"),
                        other => panic!("eve's request got {other}: {body}"),
                    }
                    if statuses.last() != Some(&status) {
                        statuses.push(status);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                statuses
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let killed = std::process::Command::new("kill").args(["-ABRT", &eve_workers[0].to_string()]).status().expect("kill");
        assert!(killed.success());
        // Back once a new worker has loaded: a second or two.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let restarted = loop {
            let now = workers_of(server_pid, "eve:mine");
            if !now.is_empty() && now != eve_workers {
                break now;
            }
            assert!(std::time::Instant::now() < deadline, "eve's worker was not restarted");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        done.store(true, Ordering::SeqCst);
        let statuses = eve.await.expect("eve");
        assert!(acme.await.expect("acme") > 0);
        assert_eq!(statuses.first(), Some(&200), "{statuses:?}");
        assert!(statuses.contains(&503), "eve's requests failed while its worker was down: {statuses:?}");
        assert_eq!(statuses.last(), Some(&200), "and were answered again after: {statuses:?}");
        assert_eq!(workers_of(server_pid, "acme:mine"), acme_workers, "acme's worker never restarted");

        let events = server.events_text(std::time::Duration::from_millis(800)).await;
        let exited = events.lines().find(|l| l.contains("worker_exited") && l.contains("eve:mine")).unwrap_or_else(|| panic!("{events}"));
        assert!(exited.contains("SIGABRT") && exited.contains(&eve_workers[0].to_string()), "{exited}");
        let again = events.lines().find(|l| l.contains("worker_restarted") && l.contains("eve:mine")).unwrap_or_else(|| panic!("{events}"));
        assert!(again.contains(&restarted[0].to_string()), "{again}");
        assert!(!events.contains("worker_exited\",\"detail\":{\"model\":\"acme:mine\""), "{events}");
    });
}
