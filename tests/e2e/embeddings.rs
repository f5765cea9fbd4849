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

/// The cosine distance from Python's FP32 embeddings the example keeps in the precision
/// `precision = "auto"` chose for MiniLM on this machine: 1e-4 in FP32 (the traced module's own
/// drift is ~1e-7), 5e-3 in a reduced one (bf16 keeps ~8 bits of mantissa; the search's per-row
/// tolerance on the hidden states is cosine 0.999).
async fn stated_distance() -> (String, f64) {
    let (status, info) = json_of(client().get(server().url("/v1/models/minilm")).send().await.expect("info")).await;
    assert_eq!(status, 200, "{info}");
    let searched = info["precision_search"].as_array().unwrap_or_else(|| panic!("no precision_search in {info}"));
    assert_eq!(searched.len(), 1, "one search, on the CPU: {info}");
    let choice = &searched[0];
    assert_eq!((choice["model"].as_str(), choice["device"].as_str()), (Some("minilm"), Some("cpu")), "{choice}");
    assert_eq!(choice["candidates"].as_array().map(Vec::len), Some(3), "{choice}");
    let precision = choice["precision"].as_str().expect("precision").to_owned();
    assert!(info["precision"].as_str().is_some_and(|p| p.starts_with(&precision)), "{info}");
    match precision.as_str() {
        "fp32" => (precision, 1e-4),
        "bf16" | "fp16" | "bf16-autocast" => {
            assert!(choice["worst_cosine"].as_f64().is_some_and(|c| c >= 0.999), "{choice}");
            (precision, 5e-3)
        }
        other => panic!("'{other}' is not a precision: {choice}"),
    }
}

#[tokio::test]
async fn embeddings_under_auto_precision_stay_within_the_stated_distance_of_transformers() {
    let (precision, stated) = stated_distance().await;
    eprintln!("minilm serves in {precision}: cosine distance under {stated:e}");
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
        assert!(distance < stated, "cosine distance {distance:e} for {sentence} in {precision}");
    }
    for pair in sentences.chunks(2) {
        let (status, body) = json_of(client.post(&url).json(&json!({ "sentences": pair })).send().await.expect("post")).await;
        assert_eq!(status, 200, "{body}");
        for (j, sentence) in pair.iter().enumerate() {
            let i = sentences.iter().position(|s| s == sentence).expect("known sentence");
            let distance = 1.0 - cosine(&floats(&body["embeddings"][j]), &floats(&reference["embeddings"][i]));
            assert!(distance < stated, "cosine distance {distance:e} for {sentence} in a pair, in {precision}");
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

/// `kiln bench-raw` times a model in the precision it is given, or searches as the server does.
#[test]
fn bench_raw_times_the_precision_it_is_given_or_the_one_the_search_chooses() {
    let config = kiln_tests::root().join("examples/kiln.toml");
    let run = |model: &str, precision: &str| {
        let output = std::process::Command::new(kiln_tests::kiln_bin())
            .args(["bench-raw", "-c", &config.display().to_string(), "--model", model, "--batch-sizes", "1,4", "--duration", "100ms"])
            .args(["--precision", precision])
            .output()
            .expect("kiln bench-raw");
        let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned());
        assert!(output.status.success(), "{stdout}{stderr}");
        (stdout, stderr)
    };
    let (stdout, _) = run("minilm", "bf16-autocast");
    assert!(stdout.starts_with("model minilm on cpu in bf16-autocast, in this process"), "{stdout}");
    assert_eq!(stdout.lines().count(), 4, "a header, a title and two batch sizes: {stdout}");
    let (stdout, stderr) = run("digits", "auto");
    let searched = stderr.lines().find(|l| l.starts_with("precision search: digits: ")).unwrap_or_else(|| panic!("{stderr}"));
    for candidate in ["fp32 channels-last: ", "bf16: ", "bf16 channels-last: ", "fp16: ", "bf16-autocast: "] {
        assert!(stderr.lines().any(|l| l.trim_start().starts_with(candidate)), "{candidate} not reported: {stderr}");
    }
    // The title names what the search chose.
    let rest = &searched["precision search: digits: ".len()..];
    let chosen = rest[..rest.find([',', '(']).unwrap_or(rest.len())].trim();
    assert!(stdout.starts_with(&format!("model digits on cpu in {chosen}, ")), "{searched}\n{stdout}");
    let error = std::process::Command::new(kiln_tests::kiln_bin())
        .args(["bench-raw", "-c", &config.display().to_string(), "--model", "digits", "--precision", "int8"])
        .output()
        .expect("kiln bench-raw");
    let stderr = String::from_utf8_lossy(&error.stderr);
    assert!(!error.status.success() && stderr.contains("--precision: 'int8' is not a precision"), "{stderr}");
}
