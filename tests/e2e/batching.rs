//! Batching seen from outside: batch sizes in /v1/stats, and overload answered quickly.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::{Value, json};

use super::{client, json_of, server};
use kiln_tests::artifact;

/// The extra models' names, which tenant `demo` may use.
pub(crate) const EXTRA_MODEL_NAMES: &[&str] = &["minilm-stats", "minilm-tight"];

/// Extra copies of MiniLM so these tests own their counters and queue limits.
pub(crate) const EXTRA_MODELS: &str = r#"
[[model]]
name = "minilm-stats"
path = "MINILM"
inputs = [
    { name = "input_ids", dtype = "INT64", shape = [-1, -1], ragged_dim = 1, pad = 0 },
    { name = "attention_mask", dtype = "INT64", shape = [-1, -1], ragged_dim = 1, pad = 0 },
]
outputs = [{ name = "last_hidden_state", ragged_dim = 1 }]
batching = { max_batch_size = 64 }

[[model]]
name = "minilm-tight"
path = "MINILM"
inputs = [
    { name = "input_ids", dtype = "INT64", shape = [-1, -1] },
    { name = "attention_mask", dtype = "INT64", shape = [-1, -1] },
]
outputs = [{ name = "last_hidden_state" }]
batching = { max_batch_size = 1, max_queue_size = 2 }
"#;

pub(crate) fn extra_models() -> String {
    EXTRA_MODELS.replace("MINILM", &artifact("build/models/minilm.pt").display().to_string())
}

fn sentence(len: usize) -> Value {
    let ids: Vec<i64> = (0..len).map(|i| 1000 + i as i64).collect();
    let mask = vec![1; len];
    json!({ "inputs": [
        { "name": "input_ids", "datatype": "INT64", "shape": [1, len], "data": ids },
        { "name": "attention_mask", "datatype": "INT64", "shape": [1, len], "data": mask },
    ]})
}

async fn counters(model: &str) -> (u64, u64) {
    let (status, stats) =
        json_of(server().admin_client().get(server().url("/v1/stats")).send().await.expect("stats")).await;
    assert_eq!(status, 200, "{stats}");
    let stats: kiln_wire::Stats = serde_json::from_value(stats).expect("stats");
    let m = stats.models.iter().find(|m| m.name == model).unwrap_or_else(|| panic!("{model} not in {stats:?}"));
    (m.inferences, m.executions)
}

#[tokio::test]
async fn batches_form_under_concurrent_load_and_not_for_one_at_a_time() {
    let client = client();
    let url = server().url("/v2/models/minilm-stats/infer");
    let (i0, e0) = counters("minilm-stats").await;
    for len in 1..=8 {
        let response = client.post(&url).json(&sentence(len)).send().await.expect("post");
        assert_eq!(response.status().as_u16(), 200);
    }
    let (i1, e1) = counters("minilm-stats").await;
    assert_eq!((i1 - i0, e1 - e0), (8, 8), "requests one at a time run alone");

    // Ragged lengths 1..=64 arriving together share forward passes.
    let statuses: Vec<u16> = futures::stream::iter(1..=64usize)
        .map(|len| {
            let (client, url) = (client.clone(), url.clone());
            async move { client.post(&url).json(&sentence(len)).send().await.expect("post").status().as_u16() }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let (i2, e2) = counters("minilm-stats").await;
    assert_eq!(i2 - i1, 64);
    assert!(e2 - e1 < 64, "64 concurrent requests ran in {} forward passes", e2 - e1);
}

#[tokio::test]
async fn a_full_queue_answers_503_quickly_and_the_server_stays_healthy() {
    let client = client();
    let url = server().url("/v2/models/minilm-tight/infer");
    let results: Vec<(u16, Option<String>, Duration)> = futures::stream::iter(0..48)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let started = Instant::now();
                let response = client.post(&url).json(&sentence(200)).send().await.expect("post");
                let retry = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
                (response.status().as_u16(), retry, started.elapsed())
            }
        })
        .buffer_unordered(48)
        .collect()
        .await;
    let refused: Vec<_> = results.iter().filter(|(s, _, _)| *s == 503).collect();
    assert!(!refused.is_empty(), "no request was refused: {results:?}");
    assert!(results.iter().any(|(s, _, _)| *s == 200), "some requests are served");
    for (_, retry, took) in &refused {
        assert_eq!(retry.as_deref(), Some("1"));
        assert!(*took < Duration::from_secs(2), "refusal took {took:?}");
    }
    let live = client.get(server().url("/v2/health/live")).send().await.expect("live");
    assert_eq!(live.status().as_u16(), 200);
    let again = client.post(&url).json(&sentence(4)).send().await.expect("post");
    assert_eq!(again.status().as_u16(), 200);
}
