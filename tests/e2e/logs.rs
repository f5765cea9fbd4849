//! JSON logs (`KILN_LOG_FORMAT=json`) under load, with a guest printing binary junk: every line
//! of the server's log parses (Python's `json.loads`, as a log shipper would read it), each
//! request has exactly one access line with what it was (route, handler, model, tenant, status,
//! bytes, latency, queue wait, batch size) under its request id and the trace id of the
//! client's `traceparent`, on HTTP and gRPC alike, and a guest's lines carry its request's id
//! and tenant with its junk escaped inside them. A client that gives up before its answer
//! starts gets a line too, as status 499.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use kiln_tests::{Server, TempDir, a_digit, artifact, examples_config, kiln_bin, python};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn traceparent(n: usize) -> String {
    format!("00-{}{n:08x}-00f067aa0ba902b7-01", &TRACE[..24])
}

#[tokio::test(flavor = "multi_thread")]
async fn every_log_line_is_json_and_every_request_has_one_access_line() {
    let component = artifact("target/wasm32-wasip2/guest/misbehave.wasm");
    let extra = format!("\n[[handler]]\nname = \"junk\"\ntenant = \"mallory\"\ncomponent = \"{}\"\n", component.display());
    let server = tokio::task::spawn_blocking(move || {
        Server::start_with_env(&examples_config("", &[], &extra), &["demo", "mallory"], &[("KILN_LOG_FORMAT", "json")])
    })
    .await
    .expect("start thread")
    .expect("server");
    let demo = server.client("demo");
    let mallory = server.client("mallory");
    let png = a_digit();
    let started = std::time::Instant::now();
    while demo.get(server.url("/v2/health/ready")).send().await.map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
        assert!(started.elapsed() < Duration::from_secs(120), "not ready:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Under load: digits calls with a traceparent each, the junk printer, and a missing route.
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (demo, mallory, png) = (demo.clone(), mallory.clone(), png.clone());
        let (digits, junk, missing) = (server.url("/v1/handlers/digits/"), server.url("/v1/handlers/junk/print-junk"), server.url("/v1/handlers/nothing/"));
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..10 {
                let n = worker * 10 + i;
                let answer = demo.post(&digits).header("traceparent", traceparent(n)).body(png.clone()).send().await.expect("digits");
                assert_eq!(answer.status(), 200);
                let id = answer.headers()["kiln-request-id"].to_str().expect("id").to_owned();
                let body = answer.bytes().await.expect("body");
                ids.push(("digits", id, n, body.len()));
                if i % 5 == 0 {
                    let answer = mallory.post(&junk).send().await.expect("junk");
                    assert_eq!(answer.status(), 200);
                    let id = answer.headers()["kiln-request-id"].to_str().expect("id").to_owned();
                    ids.push(("junk", id, n, answer.bytes().await.expect("body").len()));
                }
            }
            let answer = demo.post(&missing).send().await.expect("missing");
            assert_eq!(answer.status(), 404);
            let id = answer.headers()["kiln-request-id"].to_str().expect("id").to_owned();
            ids.push(("missing", id, 0, answer.bytes().await.expect("body").len()));
            ids
        }));
    }
    let mut calls = Vec::new();
    for task in tasks {
        calls.extend(task.await.expect("load"));
    }
    // And gRPC, with the client's trace id in the metadata.
    let dir = TempDir::new("kiln-logs").expect("dir");
    let oip = dir.path.join("oip.json");
    let pixels = vec![0.0f32; 64];
    std::fs::write(&oip, serde_json::json!({ "inputs": [{ "name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": pixels }] }).to_string()).expect("oip");
    let grpc_trace = traceparent(999);
    let bench = std::process::Command::new(kiln_bin())
        .args(["bench", "--model", "digits", "--grpc", &server.grpc, "--body", &oip.display().to_string(), "--requests", "12", "--concurrency", "4", "--json"])
        .args(["--tenant-key", server.key("demo"), "--header", &format!("traceparent:{grpc_trace}")])
        .output()
        .expect("kiln bench");
    let report: Value = serde_json::from_slice(&bench.stdout).unwrap_or_else(|_| panic!("bench: {}", String::from_utf8_lossy(&bench.stderr)));
    assert_eq!(report["ok"], 12, "{report}");
    // A client that gives up before its answer starts still gets a line, as status 499.
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().expect("client");
    let gave_up = impatient.post(server.url("/v1/handlers/junk/sleep?3000")).bearer_auth(server.key("mallory")).send().await;
    assert!(gave_up.is_err_and(|e| e.is_timeout()), "the sleeping guest answered within 300 ms");
    // Lines are written as each answer's body ends: give the last ones a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Every line parses, read as a log shipper would.
    let check = "import json, sys\nn = 0\nfor n, line in enumerate(open(sys.argv[1], encoding='utf-8'), 1):\n    value = json.loads(line)\n    assert isinstance(value, dict) and 'level' in value and 'timestamp' in value, line\nprint(n)\n";
    let parsed = std::process::Command::new(python()).args(["-c", check, &server.log.display().to_string()]).output().expect("python");
    assert!(parsed.status.success(), "a log line is not JSON: {}", String::from_utf8_lossy(&parsed.stderr));
    let lines: Vec<Value> = server.log_text().lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    assert_eq!(String::from_utf8_lossy(&parsed.stdout).trim(), lines.len().to_string());
    assert!(lines.iter().all(|l| l.get("forged").is_none()), "a guest's text became a line of its own");

    let access: Vec<&Value> = lines.iter().filter(|l| l["target"] == "kiln::access").collect();
    let by_id: HashMap<&str, Vec<&Value>> = access.iter().fold(HashMap::new(), |mut m, l| {
        m.entry(l["request_id"].as_str().expect("request_id")).or_default().push(*l);
        m
    });
    let one = |id: &str| -> &Value {
        match by_id.get(id).map(Vec::as_slice) {
            Some([line]) => line,
            other => panic!("request {id}: {} access lines", other.map_or(0, <[_]>::len)),
        }
    };
    for (kind, id, n, bytes_out) in &calls {
        let line = one(id);
        assert_eq!(line["protocol"], "http", "{line}");
        assert_eq!(line["method"], "POST", "{line}");
        assert_eq!(line["bytes_out"], *bytes_out as u64, "{line}");
        assert!(line["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{line}");
        match *kind {
            "digits" => {
                assert_eq!((line["route"].as_str(), line["handler"].as_str(), line["tenant"].as_str()), (Some("/v1/handlers/digits/"), Some("digits"), Some("demo")), "{line}");
                assert_eq!((line["status"].as_u64(), line["model"].as_str(), line["computes"].as_u64()), (Some(200), Some("digits"), Some(1)), "{line}");
                assert_eq!(line["bytes_in"], png.len() as u64, "{line}");
                assert!(line["batch_size"].as_u64().is_some_and(|b| b >= 1) && line["queue_wait_ms"].as_f64().is_some_and(|w| w >= 0.0), "{line}");
                assert_eq!(line["trace_id"].as_str(), Some(&traceparent(*n)[3..35]), "{line}");
            }
            "junk" => {
                assert_eq!((line["handler"].as_str(), line["tenant"].as_str(), line["status"].as_u64()), (Some("junk"), Some("mallory"), Some(200)), "{line}");
                assert_eq!((line["model"].as_str(), line["computes"].as_u64()), (Some(""), Some(0)), "{line}");
                // No traceparent: a trace of its own.
                assert!(line["trace_id"].as_str().is_some_and(|t| t.len() == 32 && !t.starts_with(&TRACE[..24])), "{line}");
                // Its guest's lines carry its id and tenant, the junk escaped inside them.
                let guest: Vec<&Value> = lines.iter().filter(|l| l["target"] == "kiln::guest" && l["request_id"] == id.as_str()).collect();
                assert!(guest.len() >= 4, "{id}: {guest:?}");
                assert!(guest.iter().all(|l| l["tenant"] == "mallory" && l["handler"] == "junk"), "{guest:?}");
                let text: Vec<&str> = guest.iter().filter_map(|l| l["message"].as_str()).collect();
                assert!(text.iter().any(|t| t.contains("\\u{1b}[31mred") && t.contains("\\u{0}") && t.contains('\u{fffd}')), "{text:?}");
                assert!(text.iter().all(|t| !t.chars().any(char::is_control)), "{text:?}");
                assert!(text.iter().any(|t| t.contains("forged")), "{text:?}");
                assert!(text.iter().all(|t| t.len() <= 8192 + 3), "a guest line was not cut");
            }
            _ => assert_eq!((line["status"].as_u64(), line["tenant"].as_str()), (Some(404), Some("demo")), "{line}"),
        }
    }
    let abandoned: Vec<&&Value> = access.iter().filter(|l| l["route"] == "/v1/handlers/junk/sleep").collect();
    assert_eq!(abandoned.len(), 1, "{abandoned:?}");
    assert_eq!((abandoned[0]["status"].as_u64(), abandoned[0]["bytes_out"].as_u64()), (Some(499), Some(0)), "{}", abandoned[0]);
    let grpc: Vec<&&Value> = access.iter().filter(|l| l["protocol"] == "grpc" && l["route"] == "/inference.GRPCInferenceService/ModelInfer").collect();
    assert_eq!(grpc.len(), 12, "{grpc:?}");
    for line in grpc {
        assert_eq!((line["tenant"].as_str(), line["model"].as_str(), line["grpc_status"].as_i64()), (Some("demo"), Some("digits"), Some(0)), "{line}");
        assert_eq!(line["trace_id"].as_str(), Some(&grpc_trace[3..35]), "{line}");
        assert!(line["bytes_in"].as_u64().is_some_and(|b| b > 256) && line["bytes_out"].as_u64().is_some_and(|b| b > 0), "{line}");
    }
}
