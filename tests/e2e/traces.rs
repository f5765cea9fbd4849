//! OpenTelemetry traces sent over OTLP/gRPC to a real receiver this test starts (the
//! OpenTelemetry project's service definitions from PyPI, served by grpcio): the span tree of a
//! digits request under the client's `traceparent`, eight model calls batched into one forward
//! span linked to each of them, and the receiver going away losing spans, never requests.

use std::collections::HashMap;
use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use kiln_tests::{Server, TempDir, a_digit, examples_config, python, root};

/// The receiver, killed on drop.
struct Receiver(std::process::Child);

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spans(file: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(file).unwrap_or_default().lines().map(|l| serde_json::from_str(l).expect("span JSON")).collect()
}

/// The spans once `done` accepts them, or a failure showing them.
async fn until(file: &std::path::Path, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let all = spans(file);
        if done(&all) {
            return all;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{what}: not received; spans:\n{all:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_is_a_span_tree_and_a_batch_one_forward_span_linked_to_each_call() {
    let dir = TempDir::new("kiln-traces").expect("dir");
    let out = dir.path.join("spans.jsonl");
    let mut child = Command::new(python())
        .arg(root().join("tests/python/otlp_receiver.py"))
        .arg(&out)
        .stdout(Stdio::piped())
        .spawn()
        .expect("receiver");
    let mut port = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut port).expect("port");
    let receiver = Receiver(child);
    let endpoint = format!("http://127.0.0.1:{}", port.trim());
    let server = tokio::task::spawn_blocking(move || {
        Server::start_with_env(&examples_config("", &[], ""), &["demo"], &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("KILN_LOG", "info,kiln=debug,kiln::access=off")])
    })
    .await
    .expect("start thread")
    .expect("server");
    let demo = server.client("demo");
    let started = Instant::now();
    while demo.get(server.url("/v2/health/ready")).send().await.map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
        assert!(started.elapsed() < Duration::from_secs(120), "not ready:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // One digits request under the client's trace: its span is a child of the client's, and the
    // sandbox, its model call, the call's queue wait and the forward pass hang below it.
    let (trace, client_span) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let answer = demo
        .post(server.url("/v1/handlers/digits/"))
        .header("traceparent", format!("00-{trace}-{client_span}-01"))
        .body(a_digit())
        .send()
        .await
        .expect("digits");
    assert_eq!(answer.status(), 200);
    let names = ["sandbox.instantiate", "sandbox.run", "compute", "queue wait", "forward"];
    let all = until(&out, "the digits request's spans", |all| {
        let of_trace: Vec<&Value> = all.iter().filter(|s| s["trace_id"] == trace).collect();
        names.iter().all(|n| of_trace.iter().any(|s| s["name"] == *n)) && of_trace.iter().any(|s| s["kind"] == 2)
    })
    .await;
    let of_trace: Vec<&Value> = all.iter().filter(|s| s["trace_id"] == trace).collect();
    let named = |name: &str| -> &Value {
        let found: Vec<&&Value> = of_trace.iter().filter(|s| s["name"] == name).collect();
        assert_eq!(found.len(), 1, "{name}: {of_trace:#?}");
        found[0]
    };
    let request = of_trace.iter().find(|s| s["kind"] == 2).expect("the request's span");
    assert_eq!(request["parent_span_id"], client_span, "the client's span is its parent");
    assert_eq!(request["name"], "POST digits");
    let attributes = &request["attributes"];
    assert_eq!((attributes["kiln.tenant"].as_str(), attributes["kiln.handler"].as_str(), attributes["kiln.model"].as_str()), (Some("demo"), Some("digits"), Some("digits")));
    assert_eq!(attributes["http.response.status_code"], 200);
    assert_eq!(attributes["kiln.request_id"].as_str(), answer.headers()["kiln-request-id"].to_str().ok());
    assert_eq!(request["resource"]["service.name"], "kiln");
    let (instantiate, run, compute, wait, forward) = (named("sandbox.instantiate"), named("sandbox.run"), named("compute"), named("queue wait"), named("forward"));
    assert_eq!(instantiate["parent_span_id"], request["span_id"]);
    assert_eq!(run["parent_span_id"], request["span_id"]);
    assert_eq!(compute["parent_span_id"], run["span_id"], "a guest's model call is a child of its run");
    assert_eq!(wait["parent_span_id"], compute["span_id"]);
    assert_eq!(forward["parent_span_id"], compute["span_id"]);
    assert_eq!(forward["links"], serde_json::json!([{ "trace_id": trace, "span_id": compute["span_id"] }]));
    assert_eq!(compute["attributes"]["kiln.model"], "digits");
    for span in &of_trace {
        assert!(span["start"].as_u64() <= span["end"].as_u64(), "{span}");
    }
    // Access lines are off in this server: the spans are complete without them.
    assert!(!server.log_text().contains("kiln::access"), "an access line was written with kiln::access=off");
    // Never a key or a body.
    let text = serde_json::to_string(&all).expect("JSON");
    assert!(!text.contains(server.key("demo")) && !text.to_lowercase().contains("authorization"), "a key in a span");

    // Eight model calls queued while the model is paused run as one batch on resume: one
    // forward span, linked to each call's compute span in its own trace.
    let admin = server.admin_client();
    let pause = admin.post(server.admin_url("/v1/models/digits/pause")).send().await.expect("pause");
    assert_eq!(pause.status(), 200);
    let pixels = vec![0.0f32; 64];
    let body = serde_json::json!({ "inputs": [{ "name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": pixels }] });
    let traces: Vec<String> = (0..8).map(|i| format!("{:032x}", 0x5eed_0000_u128 + i)).collect();
    let calls: Vec<_> = traces
        .iter()
        .map(|t| {
            let request = demo.post(server.url("/v2/models/digits/infer")).header("traceparent", format!("00-{t}-{client_span}-01")).json(&body);
            tokio::spawn(async move { request.send().await.expect("infer").status().as_u16() })
        })
        .collect();
    let queued = Instant::now();
    loop {
        let stats: Value = admin.get(server.url("/v1/stats")).send().await.expect("stats").json().await.expect("JSON");
        let queue = stats["models"].as_array().and_then(|m| m.iter().find(|m| m["name"] == "digits")).map_or(0, |m| m["queued"].as_u64().unwrap_or(0));
        if queue == 8 {
            break;
        }
        assert!(queued.elapsed() < Duration::from_secs(20), "the eight calls did not queue: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(admin.post(server.admin_url("/v1/models/digits/resume")).send().await.expect("resume").status(), 200);
    for call in calls {
        assert_eq!(call.await.expect("call"), 200);
    }
    let all = until(&out, "the batch's forward span", |all| {
        all.iter().any(|s| s["name"] == "forward" && s["links"].as_array().is_some_and(|l| l.len() == 8))
    })
    .await;
    let forward = all.iter().find(|s| s["name"] == "forward" && s["links"].as_array().is_some_and(|l| l.len() == 8)).expect("forward");
    assert_eq!(forward["attributes"]["kiln.batch.requests"], 8, "{forward}");
    let computes: HashMap<&str, &Value> =
        all.iter().filter(|s| s["name"] == "compute").map(|s| (s["span_id"].as_str().expect("id"), s)).collect();
    let mut linked: Vec<&str> = Vec::new();
    for link in forward["links"].as_array().expect("links") {
        let compute = computes.get(link["span_id"].as_str().expect("id")).unwrap_or_else(|| panic!("a link to no compute span: {link}"));
        assert_eq!(compute["trace_id"], link["trace_id"]);
        assert_eq!(compute["attributes"]["kiln.batch.requests"], 8, "{compute}");
        linked.push(link["trace_id"].as_str().expect("trace"));
    }
    linked.sort_unstable();
    assert_eq!(linked, traces.iter().map(String::as_str).collect::<Vec<_>>(), "one link to each call's trace");
    assert!(traces.contains(&forward["trace_id"].as_str().expect("trace").to_owned()), "the forward span is in one of the calls' traces");

    // The receiver gone, spans are dropped and said to be; every request is still answered.
    drop(receiver);
    for _ in 0..20 {
        let answer = demo.post(server.url("/v1/handlers/digits/")).body(a_digit()).send().await.expect("digits");
        assert_eq!(answer.status(), 200);
    }
    let warned = Instant::now();
    while !server.log_text().contains("cannot export traces") {
        assert!(warned.elapsed() < Duration::from_secs(30), "no warning about the lost receiver:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
