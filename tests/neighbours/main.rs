//! Neighbours: two tenants at once, sharing models and the sandbox pool, one of them hostile.
//! Whatever the attacker does — inputs that make a merged forward pass fail, guests that answer
//! and then compute on, guests that hoard host memory through `wasi:nn` — every request of the
//! other tenant gets a 200 with the answer it gets alone.
//!
//! One server for the binary; the tests take turns (a lock), so each measures its own attack.

use std::sync::OnceLock;
use std::time::Duration;

use futures::StreamExt as _;
use kiln_tests::{Server, artifact, examples_config, same_digits_answer};
use serde_json::{Value, json};

/// `demo` is the victim (the digits and embeddings examples); `mallory` the attacker, with the
/// misbehaving guest and direct access to MiniLM, unchecked and checked.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let minilm = artifact("build/models/minilm.pt").display().to_string();
        let extra = format!(
            r#"
[[model]]
name = "minilm-checked"
path = "{minilm}"
inputs = [
    {{ name = "input_ids", dtype = "INT64", shape = [-1, -1], ragged_dim = 1, pad = 0, min = 0, max = 30521, max_dims = [-1, 512] }},
    {{ name = "attention_mask", dtype = "INT64", shape = [-1, -1], ragged_dim = 1, pad = 0, min = 0, max = 1, max_dims = [-1, 512] }},
]
outputs = [{{ name = "last_hidden_state", ragged_dim = 1 }}]

[[handler]]
name = "keeper"
tenant = "demo"
component = "{misbehave}"
"#,
            misbehave = artifact("target/wasm32-wasip2/guest/misbehave.wasm").display(),
        );
        let config = examples_config("max_instances = 32", &[], &extra)
            .replace(
                "name = \"mallory\"\nmodels = [\"digits\"]",
                "name = \"mallory\"\nmodels = [\"digits\", \"minilm\", \"minilm-checked\"]",
            )
            .replace(
                "memory_limit_mib = 32, deadline_ms = 1000 }",
                "memory_limit_mib = 32, deadline_ms = 400, max_compute_bytes = 4194304, max_response_bytes = 1048576 }",
            );
        assert!(config.contains("minilm-checked\"]"), "the attacker's models were not set:\n{config}");
        match Server::start(&config, &["demo", "mallory"]) {
            Ok(server) => server,
            Err(e) => panic!("cannot start the test server: {e:#}"),
        }
    })
}

/// One attack at a time.
async fn turn() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

async fn json_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn reference() -> Value {
    let text = std::fs::read_to_string(artifact("build/reference/embeddings.json")).expect("reference");
    serde_json::from_str(&text).expect("reference JSON")
}

fn cosine(a: &Value, b: &Value) -> f64 {
    let (a, b) = (a.as_array().expect("vector"), b.as_array().expect("vector"));
    let f = |v: &Value| v.as_f64().expect("number");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f(x) * f(y)).sum();
    let norm = |v: &[Value]| v.iter().map(|x| f(x) * f(x)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// An OIP request for MiniLM: one row per sequence of ids, all of one length.
fn minilm_request(rows: &[Vec<i64>]) -> Value {
    let len = rows[0].len();
    let ids: Vec<i64> = rows.iter().flatten().copied().collect();
    json!({ "inputs": [
        { "name": "input_ids", "datatype": "INT64", "shape": [rows.len(), len], "data": ids },
        { "name": "attention_mask", "datatype": "INT64", "shape": [rows.len(), len], "data": vec![1; ids.len()] },
    ]})
}

async fn model_stats(model: &str) -> Value {
    let response = server().admin_client().get(server().url("/v1/stats")).send().await.expect("stats");
    let (_, stats) = json_of(response).await;
    stats["models"]
        .as_array()
        .and_then(|models| models.iter().find(|m| m["name"] == model).cloned())
        .unwrap_or(Value::Null)
}

/// Item 1 of the hardening issue. While the shared MiniLM replica is busy, the attacker's
/// out-of-vocabulary ids and 600-token sequence queue beside the victim's sentences, so they
/// share the next batch: the attacker gets the model's error, every victim request its own
/// embedding. On the checked model the same inputs are refused up front, naming the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbour_s_bad_inputs_never_fail_another_tenant_s_requests() {
    let _turn = turn().await;
    let (victim, attacker) = (server().client("demo"), server().client("mallory"));
    let reference = reference();
    let sentences = reference["sentences"].as_array().expect("sentences").clone();
    let out_of_vocabulary = vec![101, 40_000, 102];
    let too_long = vec![1000; 600];
    let isolated_before = model_stats("minilm").await["isolated_batches"].as_u64().unwrap_or(0);
    for round in 0..3 {
        // A long pass keeps the replica busy while everything below queues behind it.
        let busy = {
            let (client, url) = (victim.clone(), server().url("/v2/models/minilm/infer"));
            let rows: Vec<Vec<i64>> = (0..32).map(|r| (0..128).map(|i| 1000 + (r * 7 + i) % 20_000).collect()).collect();
            tokio::spawn(async move { client.post(url).json(&minilm_request(&rows)).send().await.map(|r| r.status().as_u16()) })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        let good = sentences.iter().enumerate().map(|(i, sentence)| {
            let (client, url) = (victim.clone(), server().url("/v1/handlers/embeddings/"));
            let body = json!({ "sentences": [sentence] });
            async move { (i, json_of(client.post(url).json(&body).send().await.expect("post")).await) }
        });
        let bad = [&out_of_vocabulary, &too_long].map(|ids| {
            let (client, url) = (attacker.clone(), server().url("/v2/models/minilm/infer"));
            let body = minilm_request(std::slice::from_ref(ids));
            async move { json_of(client.post(url).json(&body).send().await.expect("post")).await }
        });
        let (good, bad) = tokio::join!(futures::future::join_all(good), futures::future::join_all(bad));
        assert_eq!(busy.await.expect("task").expect("busy pass"), 200);
        for (i, (status, body)) in good {
            assert_eq!(status, 200, "round {round}: the victim's sentence {i} failed: {body}");
            let distance = 1.0 - cosine(&body["embeddings"][0], &reference["embeddings"][i]);
            assert!(distance < 1e-4, "round {round}: sentence {i} is off by {distance:e}");
        }
        for (status, body) in bad {
            assert_eq!(status, 500, "round {round}: {body}");
            assert!(body["error"].as_str().is_some_and(|e| e.contains("model 'minilm'")), "{body}");
        }
    }
    let isolated = model_stats("minilm").await["isolated_batches"].as_u64().unwrap_or(0) - isolated_before;
    assert!(isolated >= 1, "no failed batch was split: the bad inputs never shared a batch");

    for (ids, limit) in [(&out_of_vocabulary, "outside the model's range 0 ..= 30521"), (&too_long, "over the model's limit of 512")] {
        let response = attacker.post(server().url("/v2/models/minilm-checked/infer")).json(&minilm_request(std::slice::from_ref(ids))).send().await;
        let (status, body) = json_of(response.expect("post")).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains(limit)), "{body}");
    }
}

/// The victim's digits answers when nothing else runs: what every later answer must equal.
async fn digits_baseline(client: &reqwest::Client) -> Vec<(Vec<u8>, Value)> {
    let dir = artifact("build/holdout/digits");
    let mut pngs: Vec<_> = std::fs::read_dir(dir).expect("holdout").filter_map(|e| e.ok().map(|e| e.path())).collect();
    pngs.sort();
    let mut baseline = Vec::new();
    for path in pngs.into_iter().take(20) {
        let png = std::fs::read(&path).expect("png");
        let (status, body) = json_of(client.post(server().url("/v1/handlers/digits/")).body(png.clone()).send().await.expect("post")).await;
        assert_eq!(status, 200, "{body}");
        baseline.push((png, body));
    }
    baseline
}

/// Item 3: hundreds of requests whose guests answer at once and then spin to their deadline.
/// The attacker's slots stay taken until each guest is gone, so it runs into its own quota
/// (429) instead of taking the pool, and its busy loops take turns for one core: the victim's
/// digits calls all succeed with their own answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_that_answer_then_spin_cannot_take_the_pool_or_the_cpu_from_another_tenant() {
    let _turn = turn().await;
    let (victim, attacker) = (server().client("demo"), server().client("mallory"));
    let baseline = digits_baseline(&victim).await;
    let spin_url = server().url("/v1/handlers/misbehave/answer-then-spin");
    let attack = tokio::spawn(async move {
        futures::stream::iter(0..300)
            .map(|_| {
                let (client, url) = (attacker.clone(), spin_url.clone());
                async move {
                    match client.get(url).send().await {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    }
                }
            })
            .buffer_unordered(48)
            .collect::<Vec<u16>>()
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answers: Vec<(u16, Value, usize)> = futures::stream::iter(0..120)
        .map(|i| {
            let (client, url) = (victim.clone(), server().url("/v1/handlers/digits/"));
            let (png, _) = &baseline[i % baseline.len()];
            let png = png.clone();
            async move {
                let (status, body) = json_of(client.post(url).body(png).send().await.expect("post")).await;
                (status, body, i % 20)
            }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    let statuses = attack.await.expect("attack");
    for (status, body, i) in &answers {
        assert_eq!(*status, 200, "the victim failed while the attacker spun: {body}");
        assert!(same_digits_answer(body, &baseline[*i].1), "{body} differs from {}", baseline[*i].1);
    }
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "the attacker got {statuses:?}");
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert!(refused > 0, "the attacker was never held to its share: {statuses:?}");
    eprintln!("answer-then-spin: {} answered, {refused} refused (429)", statuses.len() - refused);
    // The last spinners run out their 400 ms deadline before the next attack takes its turn.
    tokio::time::sleep(Duration::from_millis(600)).await;
}

/// The server's peak resident memory so far (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let pid = server().pid().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

/// Item 4: guests that keep everything `wasi:nn` hands them — errors about 1 MiB model names,
/// tensors with a million dimensions, contexts by the hundred thousand, outputs — four at a
/// time. Names are capped, dimensions refused on arrival, and every resource counts against the
/// request's budget (4 MiB for this tenant), so the server's peak memory grows by less than
/// 96 MiB (without the caps: several hundred).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hoarding_wasi_nn_resources_keeps_server_memory_bounded() {
    const BOUND: u64 = 96 << 20;
    let _turn = turn().await;
    let attacker = server().client("mallory");
    // Warm: every path below has run once before the baseline is taken.
    for path in ["/nn/long-names?1", "/nn/many-dims?1", "/nn/contexts?1", "/nn/outputs?1"] {
        let (status, body) = json_of(attacker.get(server().url(&format!("/v1/handlers/misbehave{path}"))).send().await.expect("get")).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let before = peak_rss();
    for (path, want) in [
        ("/nn/long-names?100", 200),
        ("/nn/many-dims?100", 200),
        ("/nn/contexts?200000", 500),
        ("/nn/outputs?60", 200),
    ] {
        let calls = (0..4).map(|_| {
            let (client, url) = (attacker.clone(), server().url(&format!("/v1/handlers/misbehave{path}")));
            async move { json_of(client.get(url).send().await.expect("get")).await }
        });
        for (status, body) in futures::future::join_all(calls).await {
            assert_eq!(status, want, "{path}: {body}");
            if want == 500 {
                assert!(body["error"].as_str().is_some_and(|e| e.contains("host budget")), "{path}: {body}");
            }
        }
    }
    let grown = peak_rss().saturating_sub(before);
    eprintln!("wasi:nn hoarding: peak RSS grew by {} MiB", grown >> 20);
    assert!(grown < BOUND, "peak RSS grew by {} MiB", grown >> 20);
    // The victim is served as ever.
    let (status, _) = json_of(
        server().client("demo").post(server().url("/v1/handlers/embeddings/")).json(&json!({ "sentences": ["still here"] })).send().await.expect("post"),
    )
    .await;
    assert_eq!(status, 200);
}

/// Item 8: a guest printing empty lines as fast as it can for its whole deadline writes at most
/// its request's budget (100 lines) and one "truncated" line to the server log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_flooding_its_output_writes_at_most_its_budget_to_the_log() {
    let _turn = turn().await;
    let guest_lines = || server().log_text().lines().filter(|l| l.contains("kiln::guest")).count();
    let before = guest_lines();
    let (status, body) =
        json_of(server().client("mallory").get(server().url("/v1/handlers/misbehave/print-flood")).send().await.expect("get")).await;
    assert_eq!(status, 504, "{body}");
    // The log is written by another process: give it a moment to land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let written = guest_lines() - before;
    assert!((2..=101).contains(&written), "the flood wrote {written} log lines");
    assert!(server().log_text().contains("log output truncated"), "no truncation notice");
}

/// Item 6: rows per request are capped, and the attacker's OIP answers are held to its `max_response_bytes` (1 MiB): an answer
/// sure to be over is refused up front, JSON is streamed and cut off where it passes the limit,
/// and one under the limit streams whole and equals what another tenant gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oip_answers_stream_within_the_tenant_s_response_limit() {
    let _turn = turn().await;
    let url = server().url("/v2/models/minilm/infer");
    let rows = |n: usize, len: usize| -> Vec<Vec<i64>> { (0..n).map(|r| (0..len).map(|i| 1000 + (r + i) as i64).collect()).collect() };
    // 32 x 128 x 384 floats: at least 3 MB as JSON, 6 MB as binary.
    let mut binary = minilm_request(&rows(32, 128));
    binary["parameters"] = json!({ "binary_data_output": true });
    for body in [minilm_request(&rows(32, 128)), binary] {
        let (status, answer) = json_of(server().client("mallory").post(&url).json(&body).send().await.expect("post")).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer["error"].as_str().is_some_and(|e| e.contains("max_response_bytes")), "{answer}");
    }
    // 2 x 100 x 384 floats: about 1.5 MB of JSON, more than the lower bound says.
    let response = server().client("mallory").post(&url).json(&minilm_request(&rows(2, 100))).send().await.expect("post");
    assert_eq!(response.status().as_u16(), 200, "the start of the stream");
    let (received, cut) = kiln_tests::read_until_cut(response).await;
    assert!(cut && received <= 1 << 20, "cut: {cut}, received {received} bytes");
    // 1 x 100 x 384 floats: well under; the same numbers the other tenant gets.
    let one = minilm_request(&rows(1, 100));
    let (status, mine) = json_of(server().client("mallory").post(&url).json(&one).send().await.expect("post")).await;
    assert_eq!(status, 200, "{mine}");
    let (status, theirs) = json_of(server().client("demo").post(&url).json(&one).send().await.expect("post")).await;
    assert_eq!(status, 200);
    assert_eq!(mine["outputs"][0]["shape"], json!([1, 100, 384]));
    assert_eq!(mine["outputs"][0]["data"].as_array().map(Vec::len), Some(38_400));
    assert_eq!(mine, theirs, "the streamed JSON is the same document");

    // Rows per request are capped (at max_batch_size by default, 64 for MiniLM here): no caller
    // makes a forward pass of its own size.
    let (status, answer) = json_of(server().client("mallory").post(&url).json(&minilm_request(&rows(65, 4))).send().await.expect("post")).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().is_some_and(|e| e.contains("limit of 64 rows per request")), "{answer}");
}

/// What one tenant's guest leaves in linear memory never reaches another tenant's sandbox. The
/// victim's guest leaves a marker on every page of 3 MiB of heap (past the prefix a slot reset
/// always clears) while the attacker's guest — the same component, the same pool, so its slots
/// are the victim's last ones — grows its memory by 8 MiB and scans all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_never_reads_what_another_tenant_s_guest_left_in_memory() {
    let _turn = turn().await;
    let (victim, attacker) = (server().client("demo"), server().client("mallory"));
    let plant_url = server().url("/v1/handlers/keeper/plant");
    let scan_url = server().url("/v1/handlers/misbehave/scan");
    let plants = futures::stream::iter(0..120)
        .map(|_| {
            let (client, url) = (victim.clone(), plant_url.clone());
            async move {
                let response = client.post(url).send().await.expect("plant");
                (response.status().as_u16(), response.text().await.unwrap_or_default())
            }
        })
        .buffer_unordered(3)
        .collect::<Vec<_>>();
    let scans = futures::stream::iter(0..120)
        .map(|_| {
            let (client, url) = (attacker.clone(), scan_url.clone());
            async move { json_of(client.post(url).send().await.expect("scan")).await }
        })
        .buffer_unordered(3)
        .collect::<Vec<_>>();
    let (plants, scans) = tokio::join!(plants, scans);
    for (status, planted) in &plants {
        assert_eq!(*status, 200, "{planted}");
        assert!(planted.parse::<usize>().is_ok_and(|n| n > 700), "planted {planted}");
    }
    for (status, body) in &scans {
        assert_eq!(*status, 200, "{body}");
        assert!(body["grown"] == true && body["scanned_bytes"].as_u64().is_some_and(|b| b >= 8 << 20), "{body}");
        assert_eq!(body["found"], 0, "the attacker read the victim's memory: {body}");
    }
    // The victim's own next sandboxes start clean too.
    let (status, body) = json_of(victim.post(server().url("/v1/handlers/keeper/scan")).send().await.expect("scan")).await;
    assert_eq!((status, &body["found"]), (200, &serde_json::json!(0)), "{body}");
}


/// Item 1 of the hardening issue over gRPC (issue 14's listener shares the same path): the
/// attacker's out-of-vocabulary ids, 600-token sequences and busy batches, from several channels
/// at once, beside the victim's MiniLM and digits calls; every victim call answers what it answers
/// alone, every bad attacker call fails. Checked with the official `tritonclient[grpc]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbour_s_bad_grpc_calls_never_fail_another_tenant_s_grpc_calls() {
    let _turn = turn().await;
    let mut command = std::process::Command::new(kiln_tests::python());
    command
        .arg(kiln_tests::root().join("tests/python/grpc_neighbours.py"))
        .arg(&server().grpc)
        .env("VICTIM_KEY", server().key("demo"))
        .env("ATTACKER_KEY", server().key("mallory"));
    let output = tokio::task::spawn_blocking(move || command.output()).await.expect("task").expect("run the Python gRPC client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "grpc_neighbours.py failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("grpc neighbours: all checks passed"), "{stdout}");
    print!("{stdout}");
}
