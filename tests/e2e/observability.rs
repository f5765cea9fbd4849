//! `/metrics`, `/v1/stats` and `/v1/events`: behind the admin key, parsed the way their readers
//! parse them (Prometheus' own OpenMetrics parser, `kiln-wire`, an SSE stream).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use kiln_tests::{python, root};
use serde_json::Value;

use super::{client, json_of, mallory, server};

async fn admin_text(path: &str) -> String {
    let response = server().admin_client().get(server().url(path)).send().await.expect("get");
    assert_eq!(response.status(), 200, "{path}");
    response.text().await.expect("text")
}

/// `/metrics` through `prometheus_client`'s OpenMetrics parser: `{name: {type, samples}}`.
fn parse_metrics(text: &str) -> Value {
    let mut child = Command::new(python())
        .arg(root().join("tests/python/parse_metrics.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    use std::io::Write as _;
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
    let output = child.wait_with_output().expect("parser");
    assert!(output.status.success(), "the OpenMetrics parser refused /metrics: {}\n{text}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("parser JSON")
}

#[tokio::test]
async fn metrics_have_the_documented_names_types_and_labels() {
    for (who, status) in [(reqwest::Client::new(), 401), (client(), 403)] {
        let response = who.get(server().url("/metrics")).send().await.expect("get");
        assert_eq!(response.status(), status);
    }
    // Something to count: a served request, a trap.
    let png = std::fs::read(kiln_tests::artifact("build/holdout/digits").join(
        std::fs::read_dir(kiln_tests::artifact("build/holdout/digits")).expect("dir").flatten().next().expect("png").file_name(),
    ))
    .expect("png");
    let (status, _) = json_of(client().post(server().url("/v1/handlers/digits/")).body(png).send().await.expect("post")).await;
    assert_eq!(status, 200);
    let (status, _) = json_of(mallory().get(server().url("/v1/handlers/misbehave/panic")).send().await.expect("get")).await;
    assert_eq!(status, 500);

    let families = parse_metrics(&admin_text("/metrics").await);
    let expect = [
        ("kiln_requests", "counter"),
        ("kiln_request_duration_seconds", "histogram"),
        ("kiln_queue_depth", "gauge"),
        ("kiln_queue_wait_seconds", "histogram"),
        ("kiln_batch_size", "histogram"),
        ("kiln_forward_duration_seconds", "histogram"),
        ("kiln_inferences", "counter"),
        ("kiln_executions", "counter"),
        ("kiln_replicas", "gauge"),
        ("kiln_gpu_utilization_ratio", "gauge"),
        ("kiln_gpu_memory_used_bytes", "gauge"),
        ("kiln_gpu_memory_total_bytes", "gauge"),
        ("kiln_gpu_temperature_celsius", "gauge"),
        ("kiln_gpu_power_watts", "gauge"),
        ("kiln_sandbox_instantiation_seconds", "histogram"),
        ("kiln_guests_running", "gauge"),
        ("kiln_requests_in_flight", "gauge"),
        ("kiln_guest_traps", "counter"),
        ("kiln_quota_refusals", "counter"),
        ("kiln_scaling_decisions", "counter"),
    ];
    for (name, kind) in expect {
        assert_eq!(families[name]["type"], kind, "{name}: {}", families[name]);
    }
    let samples = |name: &str| families[name]["samples"].as_array().cloned().unwrap_or_default();
    // The scrape itself is a request in flight while it is answered.
    assert!(samples("kiln_requests_in_flight").iter().any(|s| s[2].as_f64() >= Some(1.0)), "{}", families["kiln_requests_in_flight"]);
    let served = samples("kiln_requests").into_iter().any(|s| {
        s[0] == "kiln_requests_total" && s[1]["handler"] == "digits" && s[1]["tenant"] == "demo" && s[1]["status"] == "200" && s[2].as_f64() >= Some(1.0)
    });
    assert!(served, "{}", families["kiln_requests"]);
    let trapped = samples("kiln_guest_traps").into_iter().any(|s| s[1]["kind"] == "trap" && s[2].as_f64() >= Some(1.0));
    assert!(trapped, "{}", families["kiln_guest_traps"]);
    // Histograms have explicit buckets in seconds, +Inf last.
    let buckets: Vec<String> = samples("kiln_queue_wait_seconds")
        .into_iter()
        .filter(|s| s[0] == "kiln_queue_wait_seconds_bucket" && s[1]["model"] == "digits")
        .map(|s| s[1]["le"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(buckets.first().map(String::as_str), Some("0.00001"), "{buckets:?}");
    assert_eq!(buckets.len(), kiln_wire::LATENCY_BOUNDS_US.len() + 1);
    assert_eq!(buckets.last().map(String::as_str), Some("+Inf"));
    assert!(samples("kiln_sandbox_instantiation_seconds").iter().any(|s| s[0] == "kiln_sandbox_instantiation_seconds_count" && s[2].as_f64() >= Some(2.0)));
    // No label is taken from the request: a missing handler is counted as "(unknown)".
    let _ = client().get(server().url("/v1/handlers/no-such-handler-x1")).send().await.expect("get");
    assert!(!admin_text("/metrics").await.contains("no-such-handler-x1"));
}

#[tokio::test]
async fn stats_parse_as_the_dashboards_wire_type() {
    let (status, _) = json_of(client().post(server().url("/v1/handlers/embeddings/")).json(&serde_json::json!({ "sentences": ["hi"] })).send().await.expect("post")).await;
    assert_eq!(status, 200);
    // A replica records its forward pass's time just after it answers: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let stats = loop {
        let stats: kiln_wire::Stats = serde_json::from_str(&admin_text("/v1/stats").await).expect("Stats");
        let timed = stats.models.iter().any(|m| m.name == "minilm" && !m.forward_curve.is_empty());
        if timed || Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(stats.server.starts_with("kiln "));
    let minilm = stats.models.iter().find(|m| m.name == "minilm").expect("minilm");
    assert_eq!(minilm.state, "ready");
    assert!(minilm.inferences >= 1 && minilm.queue_wait.count() >= 1);
    // The examples serve MiniLM as two single-threaded CPU replicas.
    assert_eq!(minilm.replicas.len(), 2);
    assert!(minilm.replicas.iter().all(|r| r.device == "cpu"), "{:?}", minilm.replicas);
    // The scheduler's learned forward curve, and what the process itself costs.
    assert!(minilm.forward_curve.iter().any(|p| p.rows >= 1 && p.samples >= 1 && p.forward_ms > 0.0), "{:?}", minilm.forward_curve);
    assert!(stats.process.threads >= 4 && stats.process.rss_bytes > 100 << 20 && stats.process.cpu_seconds > 0.0, "{:?}", stats.process);
    assert!(stats.process.voluntary_switches > 0, "{:?}", stats.process);
    let embeddings = stats.handlers.iter().find(|h| h.name == "embeddings").expect("embeddings handler");
    assert!(embeddings.requests >= 1 && embeddings.latency.quantile_ms(0.5) > 0.0);
    assert!(stats.tenants.iter().any(|t| t.name == "demo"));
    // The server counts its own heap allocations, and a request makes some.
    let (status, _) = json_of(client().post(server().url("/v1/handlers/embeddings/")).json(&serde_json::json!({ "sentences": ["again"] })).send().await.expect("post")).await;
    assert_eq!(status, 200);
    let later: kiln_wire::Stats = serde_json::from_str(&admin_text("/v1/stats").await).expect("Stats");
    assert!(stats.process.allocations > 0, "{:?}", stats.process);
    assert!(later.process.allocations > stats.process.allocations, "{:?} then {:?}", stats.process, later.process);
}

#[tokio::test]
async fn every_answer_carries_a_request_id_of_its_own_that_a_guest_cannot_choose() {
    let id = |response: &reqwest::Response| -> String {
        let value = response.headers().get(kiln_wire::headers::REQUEST_ID);
        let id = value.and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert!(id.len() == 24 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{} {}: id {id:?}", response.status(), response.url());
        id
    };
    let image = std::fs::read(kiln_tests::artifact("build/holdout/digits/0000_9.png")).expect("a hold-out digit");
    let mut ids = std::collections::HashSet::new();
    for _ in 0..3 {
        let answers = [
            client().post(server().url("/v1/handlers/digits/")).body(image.clone()).send().await.expect("handler"),
            client().get(server().url("/v2/models/digits/ready")).send().await.expect("oip"),
            reqwest::Client::new().post(server().url("/v1/handlers/digits/")).send().await.expect("no key"),
            client().get(server().url("/no/such/route")).send().await.expect("missing route"),
            server().admin_client().get(server().admin_url("/v1/handlers")).send().await.expect("admin"),
            mallory().get(server().url("/v1/handlers/misbehave/request-id")).send().await.expect("guest"),
        ];
        let statuses: Vec<u16> = answers.iter().map(|r| r.status().as_u16()).collect();
        assert_eq!(statuses, [200, 200, 401, 404, 200, 200]);
        for answer in &answers {
            assert!(ids.insert(id(answer)), "a request id came twice: {}", id(answer));
        }
        // The guest's own header is replaced, not kept beside the server's.
        assert_eq!(answers[5].headers().get_all(kiln_wire::headers::REQUEST_ID).iter().count(), 1);
    }
}

/// The log filter changes while serving: a debug line the server writes for every API error
/// stops and starts again. A server of its own, so no other test's log changes under it.
#[tokio::test]
async fn the_log_filter_changes_at_run_time_through_the_admin_api_and_is_audited() {
    let server = tokio::task::spawn_blocking(|| kiln_tests::Server::start(&kiln_tests::examples_config("", &[], ""), &["demo"]))
        .await
        .expect("start thread")
        .expect("server");
    let (admin, url) = (server.admin_client(), |path: &str| server.admin_url(path));
    let put = |filter: &str| admin.put(url("/v1/log")).json(&serde_json::json!({ "filter": filter })).send();
    let shown = |response: reqwest::Response| async move {
        let (status, body) = json_of(response).await;
        (status, body["filter"].as_str().unwrap_or_default().to_owned())
    };
    // The test harness starts servers with KILN_LOG=info,kiln=debug; the filter shows most
    // specific directives first.
    assert_eq!(shown(admin.get(url("/v1/log")).send().await.expect("get")).await, (200, "kiln=debug,info".to_owned()));
    // Every API error is logged at debug level with its message, which names the path.
    let missing = |marker: &'static str| server.client("demo").get(server.url(&format!("/no/such/{marker}"))).send();
    // (Its access line, at info level, names the path whatever the filter says of debug lines.)
    let debug_line = |marker: &str| server.log_text().lines().any(|l| l.contains(marker) && l.contains("DEBUG"));
    let logged = |marker: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !debug_line(marker) {
            std::thread::sleep(Duration::from_millis(20));
        }
        debug_line(marker)
    };

    assert_eq!(shown(put("info").await.expect("put")).await, (200, "info".to_owned()));
    assert_eq!(missing("quiet-marker").await.expect("get").status(), 404);
    assert_eq!(shown(put("info,kiln=debug").await.expect("put")).await, (200, "kiln=debug,info".to_owned()));
    assert_eq!(missing("loud-marker").await.expect("get").status(), 404);
    assert!(logged("loud-marker"), "debug lines did not come back:\n{}", server.log_text());
    // The quiet request's line, had it been written, came before the loud one's.
    assert!(!debug_line("quiet-marker"), "a debug line was written under `info`");
    assert!(server.log_text().lines().any(|l| l.contains("quiet-marker") && l.contains("kiln::access")), "no access line");

    // A filter that does not parse is refused by name, and nothing changes; tenants cannot.
    let (status, body) = json_of(put("kiln=loud").await.expect("put")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("\"kiln=loud\" is not a log filter")), "{body}");
    let tenant = server.client("demo").put(url("/v1/log")).json(&serde_json::json!({ "filter": "trace" })).send().await.expect("put");
    assert_eq!(tenant.status(), 403);
    assert_eq!(shown(admin.get(url("/v1/log")).send().await.expect("get")).await.1, "kiln=debug,info");
    let audit = server.audit_log_with(|line| line.contains("log_filter") && line.contains("-> kiln=debug,info"));
    assert!(audit.lines().any(|l| l.contains("log_filter") && l.contains("kiln=debug,info -> info")), "{audit}");
}

/// Reads SSE `data:` lines until `found` accepts one, or fails after a while.
async fn until_event(response: reqwest::Response, found: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await else {
            continue;
        };
        buffer.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            for line in block.lines() {
                if let Some(data) = line.strip_prefix("data: ").or_else(|| line.strip_prefix("data:")) {
                    let event: Value = serde_json::from_str(data).expect("event JSON");
                    let done = found(&event);
                    seen.push(event);
                    if done {
                        return seen;
                    }
                }
            }
        }
    }
    panic!("event not seen; saw {seen:#?}");
}

#[tokio::test]
async fn events_replay_history_then_follow_live() {
    let response = server().admin_client().get(server().url("/v1/events")).send().await.expect("events");
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap_or("").starts_with("text/event-stream"));
    // History: every model's load, from before this follower connected.
    let seen = until_event(response, |e| e["type"] == "model_loaded" && e["detail"]["model"] == "minilm").await;
    assert!(seen.iter().all(|e| e["seq"].as_u64() >= Some(1)));

    // Live: a trap that happens after connecting arrives as it happens.
    let response = server().admin_client().get(server().url("/v1/events")).send().await.expect("events");
    let trigger = tokio::spawn(async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        mallory().get(server().url("/v1/handlers/misbehave/panic")).send().await.expect("get").status()
    });
    let seen = until_event(response, |e| e["type"] == "guest_trap" && e["detail"]["handler"] == "misbehave" && e["detail"]["tenant"] == "mallory").await;
    assert_eq!(trigger.await.expect("trigger"), 500);
    let trap = &seen.last().expect("trap")["detail"];
    assert_eq!(trap["kind"], "trap");
    assert!(trap["message"].as_str().unwrap_or("").contains("unreachable"), "{trap}");
    // Tenants cannot follow.
    assert_eq!(client().get(server().url("/v1/events")).send().await.expect("get").status(), 403);
}
