//! Tests that need an NVIDIA GPU. Where `kiln` sees none they skip, saying so; with
//! `KILN_EXPECT_GPU=1` (as `scripts/gpu-check.sh` sets) a missing GPU is a failure.
//!
//! They check that the `kiln` binary finds CUDA through libtorch (libtorch_cuda loaded at start), that
//! NVML lists the GPU, and that the bundled examples answer on `cuda:0` in FP32 and BF16 as they
//! do on the CPU: held-out digits at ≥ 95 % accuracy, embeddings close to `transformers`.

use futures::StreamExt as _;
use kiln_tests::{Server, artifact, examples_config, kiln, skip};
use serde_json::{Value, json};

/// What `kiln devices --json` reports, or `None` (with the skip recorded for `test`) where there
/// is no GPU to test.
fn gpu(test: &str) -> Option<Value> {
    let text = kiln(&["devices", "--json"]).expect("kiln devices");
    let report: Value = serde_json::from_str(&text).expect("devices JSON");
    if report["cuda_available"] == true {
        return Some(report);
    }
    assert!(
        std::env::var_os("KILN_EXPECT_GPU").is_none_or(|v| v.is_empty() || v == "0"),
        "KILN_EXPECT_GPU is set but kiln sees no CUDA device: {report}"
    );
    skip(test, "no GPU here (kiln devices sees no CUDA device); set KILN_EXPECT_GPU=1 to require one");
    None
}

#[test]
fn kiln_finds_cuda_through_libtorch_and_nvml_lists_the_gpu() {
    let Some(report) = gpu("gpu::kiln_finds_cuda_through_libtorch_and_nvml_lists_the_gpu") else { return };
    assert!(report["cuda_devices"].as_i64().unwrap_or(0) >= 1, "{report}");
    assert!(report["cuda_library_error"].is_null(), "{report}");
    let gpus = report["gpus"].as_array().expect("gpus");
    assert!(!gpus.is_empty(), "NVML lists no GPU although CUDA works: {report}");
    let first = &gpus[0];
    assert!(first["memory_total_bytes"].as_u64().unwrap_or(0) > 1 << 30, "{first}");
    assert_eq!(first["simulated"], false);
    assert!(!first["name"].as_str().unwrap_or("").is_empty(), "{first}");
}

/// The examples' models on `device` at `precision`.
fn server_on(device: &str, precision: &str) -> Server {
    let config = examples_config("", &[], "");
    let mut out = String::new();
    for line in config.lines() {
        out.push_str(line);
        out.push('\n');
        if line.starts_with("path = ") && line.ends_with(".pt\"") {
            out.push_str(&format!("device = \"{device}\"\nprecision = \"{precision}\"\n"));
        }
    }
    Server::start(&out, &["demo"]).expect("server")
}

async fn digits_accuracy(server: &Server) -> f64 {
    let dir = artifact("build/holdout/digits");
    let samples: Vec<(std::path::PathBuf, u64)> = std::fs::read_dir(&dir)
        .expect("holdout dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .filter_map(|p| {
            let label = p.file_stem()?.to_str()?.rsplit('_').next()?.parse().ok()?;
            Some((p, label))
        })
        .collect();
    assert!(samples.len() >= 300, "{} held-out digits", samples.len());
    let client = server.client("demo");
    let url = server.url("/v1/handlers/digits/");
    let right: Vec<bool> = futures::stream::iter(samples.clone())
        .map(|(path, label)| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let response = client.post(&url).body(std::fs::read(&path).expect("png")).send().await.expect("post");
                assert_eq!(response.status(), 200, "{}", path.display());
                let body: Value = response.json().await.expect("json");
                body["digit"].as_u64() == Some(label)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    right.iter().filter(|r| **r).count() as f64 / samples.len() as f64
}

/// What `precision = "auto"` chose for each model, from the models' info: `; chose digits: …`.
async fn chosen(server: &Server) -> String {
    let mut out = String::new();
    for model in ["digits", "minilm"] {
        let response = server.client("demo").get(server.url(&format!("/v1/models/{model}"))).send().await.expect("info");
        let info: Value = response.json().await.expect("json");
        let choice = &info["precision_search"][0];
        assert!(choice.is_object(), "no search for {model}: {info}");
        let candidates: Vec<&str> = choice["candidates"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        out.push_str(&format!("; {model}: {} ({})", choice["precision"].as_str().unwrap_or("?"), candidates.join(", ")));
    }
    out
}

/// The largest cosine distance from the `transformers` reference over the reference sentences.
async fn embeddings_distance(server: &Server) -> f64 {
    let text = std::fs::read_to_string(artifact("build/reference/embeddings.json")).expect("reference");
    let reference: Value = serde_json::from_str(&text).expect("reference JSON");
    let response = server
        .client("demo")
        .post(server.url("/v1/handlers/embeddings/"))
        .json(&json!({ "sentences": reference["sentences"] }))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    let floats = |v: &Value| -> Vec<f64> { v.as_array().expect("array").iter().filter_map(Value::as_f64).collect() };
    let n = reference["sentences"].as_array().map_or(0, Vec::len);
    (0..n)
        .map(|i| {
            let (a, b) = (floats(&body["embeddings"][i]), floats(&reference["embeddings"][i]));
            let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            1.0 - dot / (norm(&a) * norm(&b))
        })
        .fold(0.0, f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_examples_answer_on_cuda_in_fp32_and_bf16() {
    // `scripts/gpu-check.sh` on a machine without a GPU (KILN_GPU_CHECK_DEVICE=cpu) runs this
    // on the CPU, to try the script itself.
    let device = std::env::var("KILN_GPU_CHECK_DEVICE").unwrap_or_else(|_| "cuda:0".to_owned());
    if device != "cpu" && gpu("gpu::the_examples_answer_on_cuda_in_fp32_and_bf16").is_none() {
        return;
    }
    // `auto` searches at load (fp16, bf16) and serves what it measured fastest within tolerance.
    for (precision, max_distance) in [("fp32", 1e-4), ("bf16", 2e-2), ("auto", 2e-2)] {
        let server = server_on(&device, precision);
        let log = server.log_text();
        assert!(log.contains(&format!("device={device}")), "models not on {device}:\n{log}");
        let accuracy = digits_accuracy(&server).await;
        let distance = embeddings_distance(&server).await;
        let chose = if precision == "auto" { chosen(&server).await } else { String::new() };
        println!("gpu-check {precision}: digits accuracy {:.1}%, embeddings max cosine distance {distance:.2e}{chose}", accuracy * 100.0);
        assert!(accuracy >= 0.95, "{precision}: digits accuracy {accuracy}");
        assert!(distance < max_distance, "{precision}: embeddings cosine distance {distance}");
    }
}


/// MiniLM in a confined worker on the GPU (as a tenant's own model runs) answers as in the
/// server; token ids past its vocabulary (no `max` declared) make CUDA assert on the device,
/// which poisons the worker's CUDA context: its batch fails, the worker restarts and answers
/// again, and digits, in the server's process on the same GPU, answers throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_on_cuda_survives_a_device_side_assert_and_takes_nothing_else_down() {
    let device = std::env::var("KILN_GPU_CHECK_DEVICE").unwrap_or_else(|_| "cuda:0".to_owned());
    if device != "cpu" && gpu("gpu::a_worker_on_cuda_survives_a_device_side_assert_and_takes_nothing_else_down").is_none() {
        return;
    }
    let mut config = String::new();
    for line in examples_config("", &[], "").lines() {
        config.push_str(line);
        config.push('\n');
        if line.starts_with("path = ") && line.ends_with(".pt\"") {
            config.push_str(&format!("device = \"{device}\"\n"));
            if line.contains("minilm") {
                config.push_str("worker = true\n");
            }
        }
    }
    let server = Server::start(&config, &["demo"]).expect("server");
    let client = server.client("demo");
    let ids = |id: i64| json!({ "inputs": [
        { "name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [101, id, 102] },
        { "name": "attention_mask", "datatype": "INT64", "shape": [1, 3], "data": [1, 1, 1] },
    ] });
    let minilm = server.url("/v2/models/minilm/infer");
    let first = client.post(&minilm).json(&ids(2023)).send().await.expect("infer");
    assert_eq!(first.status(), 200, "{}", first.text().await.unwrap_or_default());
    let digits = tokio::spawn({
        let (client, url) = (server.client("demo"), server.url("/v2/models/digits/infer"));
        async move {
            let image = json!({ "inputs": [{ "name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": vec![0.0; 64] }] });
            for _ in 0..200 {
                let response = client.post(&url).json(&image).send().await.expect("digits");
                assert_eq!(response.status(), 200, "digits failed beside the worker's assert");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    });
    let bad = client.post(&minilm).json(&ids(5_000_000)).send().await.expect("infer");
    let status = bad.status().as_u16();
    let body: Value = bad.json().await.expect("json");
    // On a GPU the assert ends the worker (503); on the CPU the index is an ordinary error (500).
    assert!(status == 503 && body["kind"] == "unavailable" || status == 500 && device == "cpu", "{status}: {body}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let response = client.post(&minilm).json(&ids(2023)).send().await.expect("infer");
        if response.status() == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "minilm's worker never came back: {}", response.status());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    digits.await.expect("digits");
    if status == 503 {
        let events = server.events_text(std::time::Duration::from_millis(800)).await;
        assert!(events.contains("worker_exited") && events.contains("worker_restarted"), "{events}");
        println!("gpu-check worker: a device-side assert restarted minilm's worker; digits answered throughout");
    }
}
