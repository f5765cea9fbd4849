//! Placement and scaling through a real server: simulated GPUs (`[[gpus.simulated]]`), the
//! MiniLM model with room for 1 to 4 replicas, and load from OIP clients. The scaler must add
//! replicas under sustained queueing (only as many as GPU memory allows), take them away when
//! the load stops, fail no request on the way, and show every decision through `/v1/scaler`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_tests::{Server, artifact};
use serde_json::{Value, json};

/// Two simulated 4096 MiB GPUs, cuda:1 mostly used by someone else. A replica books
/// 1024 MiB of headroom plus MiniLM's ~87 MiB of weights, so cuda:0 takes three and cuda:1 none.
fn config(gpus: &str, headroom_mib: u64) -> String {
    format!(
        r#"
[scaler]
interval_ms = 200
up_cooldown_ms = 400
down_cooldown_ms = 1500

[gpus]
{gpus}

[[model]]
name = "minilm"
path = "{}"
device = "auto"
instances = {{ min = 1, max = 4 }}
latency_objective_ms = 2
memory_headroom_mib = {headroom_mib}
inputs = [
    {{ name = "input_ids", dtype = "INT64", shape = [-1, -1], ragged_dim = 1, pad = 0 }},
    {{ name = "attention_mask", dtype = "INT64", shape = [-1, -1], ragged_dim = 1, pad = 0 }},
]
outputs = [{{ name = "last_hidden_state", ragged_dim = 1 }}]
batching = {{ max_batch_size = 4 }}
warmup_runs = 1

[[tenant]]
name = "demo"
models = ["minilm"]
quota = {{ requests_per_second = 1000000, max_concurrent = 1024 }}
"#,
        artifact("build/models/minilm.pt").display()
    )
}

const TWO_GPUS: &str = r#"
[[gpus.simulated]]
name = "Simulated A"
memory_mib = 4096

[[gpus.simulated]]
name = "Simulated B"
memory_mib = 4096
script = [{ at_ms = 0, used_mib = 3000, utilization = 40 }]
"#;

fn infer_body(len: usize) -> Value {
    let ids: Vec<i64> = (0..len).map(|i| 1000 + i as i64 * 7).collect();
    json!({ "inputs": [
        { "name": "input_ids", "datatype": "INT64", "shape": [1, len], "data": ids },
        { "name": "attention_mask", "datatype": "INT64", "shape": [1, len], "data": vec![1; len] },
    ]})
}

async fn admin_get(server: &Server, path: &str) -> Value {
    let response = server.admin_client().get(server.url(path)).send().await.expect("get");
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.expect("json")
}

async fn decisions(server: &Server) -> Vec<Value> {
    admin_get(server, "/v1/scaler").await["decisions"].as_array().cloned().unwrap_or_default()
}

async fn minilm_stats(server: &Server) -> Value {
    let stats = admin_get(server, "/v1/stats").await;
    stats["models"][0].clone()
}

/// Waits until `check` holds for the decisions, or fails showing them and the log.
async fn until(server: &Server, what: &str, limit: Duration, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let list = decisions(server).await;
        if check(&list) {
            return list;
        }
        assert!(
            started.elapsed() < limit,
            "{what}: not seen in {limit:?}; decisions: {list:#?}\nlog:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn count(list: &[Value], action: &str) -> usize {
    list.iter().filter(|d| d["action"] == action).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaler_follows_load_within_gpu_memory_and_loses_no_request() {
    let server = Arc::new(Server::start(&config(TWO_GPUS, 1024), &["demo"]).expect("server"));
    let stats = admin_get(&server, "/v1/stats").await;
    let gpus = stats["gpus"].as_array().expect("gpus");
    assert_eq!(gpus.len(), 2, "{stats:#}");
    assert!(gpus.iter().all(|g| g["simulated"] == true));
    assert_eq!(stats["models"][0]["replicas"][0]["device"], "cuda:0", "{stats:#}");

    // Sustained load: 12 clients, each waiting for its answer before the next request.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for c in 0..12usize {
        let (server, stop, ok, failed) = (Arc::clone(&server), Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        clients.push(tokio::spawn(async move {
            let client = server.client("demo");
            let body = infer_body(24 + c);
            while !stop.load(Ordering::Relaxed) {
                let response = client.post(server.url("/v2/models/minilm/infer")).json(&body).send().await;
                match response {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => {
                        eprintln!("request failed: {} {}", r.status(), r.text().await.unwrap_or_default());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("request failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }

    // Up to three replicas, all on cuda:0, then a hold for memory rather than a fourth.
    let list = until(&server, "scale-ups to the memory limit", Duration::from_secs(90), |l| {
        count(l, "up") >= 2 && l.iter().any(|d| d["action"] == "hold" && d["reason"].as_str().unwrap_or("").starts_with("no GPU memory"))
    })
    .await;
    let ups: Vec<&Value> = list.iter().filter(|d| d["action"] == "up").collect();
    assert_eq!(ups.len(), 2, "{list:#?}");
    for up in &ups {
        assert_eq!(up["device"], "cuda:0", "{up:#}");
        assert!(up["reason"].as_str().unwrap_or("").contains("over the 2 ms objective") || up["reason"].as_str().unwrap_or("").contains("queued"), "{up:#}");
        assert!(up["inputs"]["requests"].as_u64().unwrap_or(0) > 0, "{up:#}");
        assert_eq!(up["inputs"]["gpus"].as_array().map(Vec::len), Some(2), "{up:#}");
    }
    assert_eq!((ups[0]["from"].as_u64(), ups[1]["to"].as_u64()), (Some(1), Some(3)));
    let hold = list.iter().find(|d| d["action"] == "hold" && d["reason"].as_str().unwrap_or("").starts_with("no GPU memory")).expect("hold");
    assert!(hold["reason"].as_str().unwrap_or("").contains("cuda:1 has"), "{hold:#}");
    let model = minilm_stats(&server).await;
    assert_eq!(model["replica_target"], 3, "{model:#}");
    // The work spread over the replicas.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let model = minilm_stats(&server).await;
    let replicas = model["replicas"].as_array().expect("replicas");
    let working = replicas.iter().filter(|r| r["batches"].as_u64().unwrap_or(0) > 0).count();
    assert!(working >= 2, "{model:#}");

    // The load stops: back to one replica, one step per cooldown, and nothing failed.
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client");
    }
    let list = until(&server, "scale-downs to min", Duration::from_secs(60), |l| count(l, "down") >= 2).await;
    let downs: Vec<&Value> = list.iter().filter(|d| d["action"] == "down").collect();
    assert_eq!((downs[0]["from"].as_u64(), downs[1]["to"].as_u64()), (Some(3), Some(1)), "{list:#?}");
    assert!(downs[0]["reason"].as_str().unwrap_or("").starts_with("idle for"), "{list:#?}");
    assert!(downs[1]["at_unix_ms"].as_u64() >= downs[0]["at_unix_ms"].as_u64().map(|t| t + 1400), "{list:#?}");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed while scaling");
    assert!(ok.load(Ordering::Relaxed) > 100);
    let started = Instant::now();
    loop {
        let model = minilm_stats(&server).await;
        if model["replicas"].as_array().map(Vec::len) == Some(1) {
            assert_eq!(model["replica_target"], 1);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "drained replicas linger: {model:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Served answers stay right after all that.
    let response = server.client("demo").post(server.url("/v2/models/minilm/infer")).json(&infer_body(8)).send().await.expect("infer");
    assert_eq!(response.status(), 200);
    assert!(server.log_text().contains("replica draining"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_fits_on_no_gpu_is_refused_at_start_with_the_numbers() {
    let gpus = "[[gpus.simulated]]\nmemory_mib = 2048\nscript = [{ at_ms = 0, used_mib = 1500 }]\n";
    let error = match Server::start(&config(gpus, 1024), &["demo"]) {
        Ok(_) => panic!("the server started with a model that fits nowhere"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("cannot start model 'minilm'"), "{error}");
    assert!(error.contains("fits on no GPU: cuda:0 has 548 MiB free"), "{error}");
}
