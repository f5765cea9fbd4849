//! The embeddings example: the guest's tokenizer and embeddings against Python `transformers`.

use super::{client, json_of, server};
use kiln_tests::artifact;
use serde_json::{Value, json};

fn reference() -> Value {
    let text = std::fs::read_to_string(artifact("build/reference/embeddings.json")).expect("reference");
    serde_json::from_str(&text).expect("reference JSON")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number")).collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[tokio::test]
async fn guest_tokenizer_matches_the_python_tokenizer_ids() {
    let reference = reference();
    let (status, body) = json_of(
        client()
            .post(server().url("/v1/handlers/embeddings/tokenize"))
            .json(&json!({ "sentences": reference["sentences"] }))
            .send()
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sentences = reference["sentences"].as_array().expect("sentences");
    for (i, sentence) in sentences.iter().enumerate() {
        assert_eq!(body["input_ids"][i], reference["input_ids"][i], "ids differ for {sentence}");
    }
}

#[tokio::test]
async fn embeddings_match_transformers_within_1e4_cosine_distance() {
    let reference = reference();
    let sentences = reference["sentences"].as_array().expect("sentences").clone();
    let client = client();
    let url = server().url("/v1/handlers/embeddings/");
    // As one batch, and as pairs (each request pads to its own longest sentence).
    let (status, batch) = json_of(client.post(&url).json(&json!({ "sentences": sentences })).send().await.expect("post")).await;
    assert_eq!(status, 200, "{batch}");
    for (i, sentence) in sentences.iter().enumerate() {
        let got = floats(&batch["embeddings"][i]);
        assert_eq!(got.len(), 384);
        let distance = 1.0 - cosine(&got, &floats(&reference["embeddings"][i]));
        assert!(distance < 1e-4, "cosine distance {distance:e} for {sentence}");
    }
    for pair in sentences.chunks(2) {
        let (status, body) = json_of(client.post(&url).json(&json!({ "sentences": pair })).send().await.expect("post")).await;
        assert_eq!(status, 200, "{body}");
        for (j, sentence) in pair.iter().enumerate() {
            let i = sentences.iter().position(|s| s == sentence).expect("known sentence");
            let distance = 1.0 - cosine(&floats(&body["embeddings"][j]), &floats(&reference["embeddings"][i]));
            assert!(distance < 1e-4, "cosine distance {distance:e} for {sentence} in a pair");
        }
    }
    // Related sentences are closer than unrelated ones.
    let e = |i: usize| floats(&batch["embeddings"][i]);
    assert!(cosine(&e(0), &e(1)) > cosine(&e(0), &e(4)));
}

#[tokio::test]
async fn embeddings_reject_bad_requests_with_400() {
    let client = client();
    let url = server().url("/v1/handlers/embeddings/");
    for body in [json!({ "sentences": [] }), json!({ "text": "x" }), json!({ "sentences": vec!["x"; 65] })] {
        let (status, answer) = json_of(client.post(&url).json(&body).send().await.expect("post")).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()), "{answer}");
    }
}
