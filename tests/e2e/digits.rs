//! The digits example: held-out PNGs through the guest, ≥ 95 % accuracy.

use futures::StreamExt as _;

use super::{client, json_of, server};
use kiln_tests::artifact;

#[tokio::test]
async fn held_out_digits_are_classified_with_at_least_95_percent_accuracy() {
    let server = server();
    let dir = artifact("build/holdout/digits");
    let mut samples: Vec<(std::path::PathBuf, u64)> = std::fs::read_dir(&dir)
        .expect("holdout dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .map(|p| {
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
            let label = stem.rsplit('_').next().and_then(|l| l.parse().ok()).expect("label in name");
            (p, label)
        })
        .collect();
    samples.sort();
    assert!(samples.len() >= 300, "expected the full held-out set, found {}", samples.len());

    let client = client();
    let url = server.url("/v1/handlers/digits/");
    let results: Vec<(u64, u64, f64)> = futures::stream::iter(samples)
        .map(|(path, label)| {
            let client = client.clone();
            let url = url.clone();
            async move {
                let png = std::fs::read(&path).expect("png");
                let (status, body) = json_of(client.post(&url).body(png).send().await.expect("post")).await;
                assert_eq!(status, 200, "{}: {body}", path.display());
                let digit = body["digit"].as_u64().expect("digit");
                let probabilities = body["probabilities"].as_array().expect("probabilities");
                assert_eq!(probabilities.len(), 10);
                let sum: f64 = probabilities.iter().filter_map(|p| p.as_f64()).sum();
                (label, digit, sum)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for (_, _, sum) in &results {
        assert!((sum - 1.0).abs() < 1e-4, "probabilities sum to {sum}");
    }
    let correct = results.iter().filter(|(label, digit, _)| label == digit).count();
    let accuracy = correct as f64 / results.len() as f64;
    assert!(accuracy >= 0.95, "accuracy {accuracy:.4} ({correct}/{})", results.len());
}

#[tokio::test]
async fn dark_ink_on_light_paper_is_read_too() {
    // The same digit twice: as rendered, and inverted like pen on paper.
    let server = server();
    let dir = artifact("build/holdout/digits");
    let first = std::fs::read_dir(&dir)
        .expect("holdout dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "png"))
        .expect("a sample");
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&first).expect("open")));
    let mut reader = decoder.read_info().expect("png info");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).expect("frame");
    pixels.truncate(info.buffer_size());
    let inverted: Vec<u8> = pixels.iter().map(|p| 255 - p).collect();
    let mut encoded = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut encoded, info.width, info.height);
        encoder.set_color(info.color_type);
        encoder.set_depth(info.bit_depth);
        let mut writer = encoder.write_header().expect("header");
        writer.write_image_data(&inverted).expect("data");
    }
    let client = client();
    let url = server.url("/v1/handlers/digits/");
    let (_, original) = json_of(client.post(&url).body(std::fs::read(&first).expect("read")).send().await.expect("post")).await;
    let (status, flipped) = json_of(client.post(&url).body(encoded).send().await.expect("post")).await;
    assert_eq!(status, 200, "{flipped}");
    assert_eq!(original["digit"], flipped["digit"]);
}
