//! The image: the bundled examples served from a read-only root as a non-root user, with
//! libtorch found beside the binary, Docker's health check answered by `kiln health`, and a
//! clean drain on `docker stop`.

use std::time::Duration;

use super::docker::{Container, Volume, daemon_or_skip, docker, docker_status, image};
use kiln_tests::{artifact, holdout};

#[tokio::test]
async fn the_image_serves_the_examples_as_a_non_root_user_from_a_read_only_root() {
    if !daemon_or_skip("fleet::image::the_image_serves_the_examples") {
        return;
    }
    let image = image();
    let state = Volume::new().expect("volume");
    // A key for the examples' tenant, made by the image's own kiln in the state volume.
    let key = docker(&["run", "--rm", "--read-only", "-v", &state.at("/var/lib/kiln"), image, "tenant", "add-key", "demo"]).expect("tenant add-key");
    let key = key.trim().to_owned();
    assert!(key.starts_with("kiln_"), "{key}");

    let server = Container::run(&["--read-only", "-v", &state.at("/var/lib/kiln"), "-p", "127.0.0.1::8080", "-p", "127.0.0.1::9090", image])
        .expect("docker run");
    server.wait_healthy(Duration::from_secs(180)).expect("healthy");

    // Who it runs as, and what it was given.
    assert_eq!(server.inspect("{{.Config.User}}").expect("user"), "10001:10001");
    let (_, status, _) = server.exec(&["cat", "/proc/1/status"]).expect("status");
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or_default().to_owned();
    assert!(uid.split_whitespace().skip(1).all(|id| id == "10001"), "kiln runs as {uid}");
    // The image's kiln looks for libraries beside itself only, never in the build's venv.
    let copy = kiln_tests::TempDir::new("kiln-image-bin").expect("dir");
    docker(&["cp", &format!("{}:/usr/local/bin/kiln", server.name), &copy.path.display().to_string()]).expect("docker cp");
    let dynamic = std::process::Command::new("readelf").arg("-d").arg(copy.path.join("kiln")).output().expect("readelf");
    let dynamic = String::from_utf8_lossy(&dynamic.stdout);
    let runpath = dynamic.lines().find(|l| l.contains("RUNPATH") || l.contains("RPATH")).unwrap_or_default();
    assert!(runpath.ends_with("[$ORIGIN/../lib/kiln]"), "{runpath}");
    assert!(!dynamic.contains("libtorch_cuda"), "kiln links libtorch_cuda: {dynamic}");
    let env = server.inspect("{{json .Config.Env}}").expect("env");
    assert!(!env.contains("LD_LIBRARY_PATH"), "libtorch is found through kiln's run path: {env}");
    // The root is read-only for kiln's user.
    let (code, _, err) = server.exec(&["sh", "-c", "echo x > /usr/local/bin/x"]).expect("exec");
    assert_ne!(code, 0, "wrote into /usr/local/bin");
    assert!(err.contains("Read-only file system"), "{err}");
    // A CPU image without libtorch's CUDA half, and kiln knows it.
    let (code, devices, err) = server.exec(&["kiln", "devices", "--json"]).expect("devices");
    assert_eq!(code, 0, "{err}");
    let devices: serde_json::Value = serde_json::from_str(&devices).expect("devices json");
    assert_eq!(devices["cuda_available"], false);
    assert!(devices["cuda_library_error"].as_str().is_some_and(|e| e.contains("libtorch_cuda.so")), "{devices}");

    // The examples answer: held-out digits and a sentence's embedding.
    let url = format!("http://{}", server.published(8080).expect("port"));
    let client = kiln_tests::bearer_client(&key);
    let samples = holdout(40);
    let mut correct = 0;
    for (png, label) in &samples {
        let response = client.post(format!("{url}/v1/handlers/digits/")).body(png.clone()).send().await.expect("post");
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.expect("json");
        correct += usize::from(body["digit"].as_u64() == Some(*label));
    }
    assert!(correct * 100 >= samples.len() * 90, "{correct} of {} digits right", samples.len());
    // The same embedding as Python's transformers gives (build/reference/embeddings.json).
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(artifact("build/reference/embeddings.json")).expect("reference")).expect("reference json");
    let sentence = &reference["sentences"][0];
    let response = client.post(format!("{url}/v1/handlers/embeddings/")).json(&serde_json::json!({ "sentences": [sentence] })).send().await.expect("post");
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.expect("json");
    let floats = |v: &serde_json::Value| v.as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect::<Vec<_>>()).unwrap_or_default();
    let (got, want) = (floats(&body["embeddings"][0]), floats(&reference["embeddings"][0]));
    assert_eq!(got.len(), 384, "{body}");
    let dot: f64 = got.iter().zip(&want).map(|(a, b)| a * b).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let distance = 1.0 - dot / (norm(&got) * norm(&want));
    assert!(distance < 1e-4, "cosine distance {distance:e} from the Python reference for {sentence}");
    // Prometheus scrapes without a key.
    let metrics = reqwest::get(format!("http://{}/metrics", server.published(9090).expect("port"))).await.expect("metrics");
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.expect("text").contains("kiln_"));

    // docker stop sends SIGTERM to kiln as PID 1: it drains and exits 0 within the grace period.
    docker(&["stop", "--time", "30", &server.name]).expect("stop");
    assert_eq!(server.inspect("{{.State.ExitCode}}").expect("exit code"), "0", "{}", server.logs());
}

#[test]
fn the_image_says_where_it_looked_for_a_config_and_shows_the_one_it_uses() {
    if !daemon_or_skip("fleet::image::the_image_says_where_it_looked") {
        return;
    }
    let image = image();
    // With KILN_CONFIG emptied there is no config: not ./kiln.toml, not the examples of a checkout.
    let (code, _, err) = docker_status(&["run", "--rm", "--read-only", "-e", "KILN_CONFIG=", image, "serve"]).expect("run");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--config (not given)") && err.contains("kiln.toml"), "{err}");
    // An override from the environment shows where it came from.
    let shown = docker(&["run", "--rm", "--read-only", "-e", "KILN_SERVER__MAX_BODY_BYTES=4096", image, "config", "show"]).expect("config show");
    let line = shown.lines().find(|l| l.contains("max_body_bytes")).unwrap_or_default();
    assert!(line.contains("4096") && line.contains("KILN_SERVER__MAX_BODY_BYTES"), "{shown}");
    assert!(shown.contains("/usr/share/kiln/examples/kiln.toml"), "{shown}");
}
