//! Remote model sources: files served by a local HTTP server in this process (no internet),
//! fetched by digest into the model cache, resumed after a cut, refused on a wrong digest,
//! downloaded once for concurrent loads, evicted least recently used, and pulled ahead of time
//! with `kiln model cache pull`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub(crate) use kiln_tests::files::{FileServer, sha256};
use kiln_tests::{Server, artifact, examples_config};
use serde_json::{Value, json};

use super::{json_of, model_state, runtime, until_ready};

pub(crate) fn offset_bytes(version: u32) -> Vec<u8> {
    std::fs::read(artifact("build/models").join(format!("offset-{version}.pt"))).expect("offset model")
}

/// The `offset` model's fields with a remote `source` (and `sha256`, when given).
pub(crate) fn remote_spec(source: &str, sha256: Option<&str>) -> Value {
    let mut spec = json!({
        "source": source,
        "inputs": [{ "name": "x", "dtype": "FP32", "shape": [-1, 4] }],
        "outputs": [{ "name": "y" }],
        "tenants": ["demo"],
    });
    if let Some(digest) = sha256 {
        spec["sha256"] = json!(digest);
    }
    spec
}

/// The version model `name` answers with (its y - x).
async fn version_of(server: &Server, name: &str) -> (u16, Option<f64>) {
    let request = json!({ "inputs": [{ "name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.0, 1.0, 2.0, 3.0] }] });
    let response = server.client("demo").post(server.url(&format!("/v2/models/{name}/infer"))).json(&request).send().await;
    let (status, body) = json_of(response.expect("infer")).await;
    (status, body["outputs"][0]["data"][0].as_f64())
}

fn cached_files(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache.join("sha256"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| !n.ends_with(".json")).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn partial_files(cache: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(cache.join("partial")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

#[test]
fn a_model_fetched_by_digest_from_a_local_server_serves_and_a_bad_download_keeps_nothing() {
    let (one, two, three) = (offset_bytes(1), offset_bytes(2), offset_bytes(3));
    let (d1, d2, d3) = (sha256(&one), sha256(&two), sha256(&three));
    let files = HashMap::from([
        ("offset-1.pt".to_owned(), one.clone()),
        ("offset-2.pt".to_owned(), two.clone()),
        ("offset-3.pt".to_owned(), three.clone()),
    ]);
    let web = FileServer::start(files);
    // Room for two of the three files: the third load evicts the one no model uses.
    let limit = one.len().max(two.len()).max(three.len()) * 5 / 2;
    // A config-file model from the "hub", fetched and checked before the server is ready.
    let hub_model = format!(
        "[[model]]\nname = \"hubbed\"\nsource = \"hf://kiln/offsets/offset-2.pt@v1\"\nsha256 = \"{d2}\"\n\
         inputs = [{{ name = \"x\", dtype = \"FP32\", shape = [-1, 4] }}]\noutputs = [{{ name = \"y\" }}]\n"
    );
    let config = examples_config(&format!("cache_max_bytes = {limit}"), &["hubbed"], &hub_model);
    let hf_endpoint = web.url("/hf");
    let server = Server::start_with_env(&config, &["demo", "mallory"], &[("HF_ENDPOINT", &hf_endpoint)])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let cache = server.dir.path.join("state/cache");
    let rt = runtime();
    let admin = server.admin_client();
    let put = |name: &str, spec: Value| admin.put(server.admin_url(&format!("/v1/models/{name}"))).json(&spec).send();
    rt.block_on(async {
        assert_eq!(version_of(&server, "hubbed").await, (200, Some(2.0)));
        assert_eq!(web.requests_to("/hf/"), [("/hf/kiln/offsets/resolve/v1/offset-2.pt".to_owned(), String::new())]);
        let (_, info) = model_state(&server, "hubbed").await;
        assert_eq!((info["source"].as_str(), info["sha256"].as_str()), (Some("hf://kiln/offsets/offset-2.pt@v1"), Some(d2.as_str())));

        // Cut half-way: resumed from where it stopped with a range request, then served.
        let (status, body) = json_of(put("offset", remote_spec(&web.url("/cut/offset-1.pt"), Some(&d1))).await.expect("put")).await;
        assert_eq!((status, body["state"].as_str()), (201, Some("READY")), "{body}");
        let cut = web.requests_to("/cut/");
        assert_eq!(cut.len(), 2, "one cut transfer and one resumed: {cut:?}");
        assert_eq!(cut[1].1, format!("bytes={}-", one.len() / 2), "{cut:?}");
        assert_eq!(version_of(&server, "offset").await, (200, Some(1.0)));

        // The wrong file for its pin: refused naming both digests, nothing kept, nothing served.
        let wrong_pin = sha256(b"not the file");
        let (status, body) = json_of(put("wrong", remote_spec(&web.url("/files/offset-3.pt"), Some(&wrong_pin))).await.expect("put")).await;
        let error = body["error"].as_str().unwrap_or_default();
        assert_eq!(status, 422, "{body}");
        assert!(error.contains(&wrong_pin) && error.contains(&d3) && error.contains("nothing was kept"), "{error}");
        assert!(!cached_files(&cache).contains(&d3), "a wrong download stays out of the cache");
        assert_eq!(partial_files(&cache), Vec::<PathBuf>::new(), "and leaves no partial file");
        assert_eq!(version_of(&server, "wrong").await.0, 404);
        let (_, listed) = model_state(&server, "wrong").await;
        assert_eq!(listed["state"], "UNAVAILABLE", "{listed}");

        // Unpinned remote sources are refused (this server does not allow them); bad sources
        // are named.
        let (status, body) = json_of(put("unpinned", remote_spec(&web.url("/files/offset-3.pt"), None)).await.expect("put")).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].as_str().unwrap_or_default().contains("no sha256 pin"), "{body}");
        for (source, naming) in [("s3://bucket/m.pt", "unsupported scheme"), ("hf://org/m.pt", "hf://ORG/REPO/FILE@REVISION")] {
            let (status, body) = json_of(put("bad", remote_spec(source, Some(&d3))).await.expect("put")).await;
            assert_eq!(status, 400, "{body}");
            assert!(body["error"].as_str().unwrap_or_default().contains(naming), "{naming}: {body}");
        }

        // Two models of the same slow file loading at once: one download.
        let (a, b) = tokio::join!(
            put("slow-a", remote_spec(&web.url("/slow/offset-3.pt"), Some(&d3))),
            put("slow-b", remote_spec(&web.url("/slow/offset-3.pt"), Some(&d3))),
        );
        for response in [a, b] {
            let (status, body) = json_of(response.expect("put")).await;
            assert_eq!(status, 201, "{body}");
        }
        assert_eq!(web.requests_to("/slow/").len(), 1, "concurrent loads of one digest download it once");
        assert_eq!(version_of(&server, "slow-b").await, (200, Some(3.0)));

        // Three files fit only while each is in use; once `offset` is gone, the next load evicts
        // its file, the least recently used one no model uses.
        assert_eq!(cached_files(&cache), sorted([&d1, &d2, &d3]));
        let (status, _) = json_of(admin.delete(server.admin_url("/v1/models/offset")).send().await.expect("delete")).await;
        assert_eq!(status, 200);
        let (status, body) = json_of(put("slow-c", remote_spec(&web.url("/slow/offset-3.pt"), Some(&d3))).await.expect("put")).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(web.requests_to("/slow/").len(), 1, "a cached digest is not downloaded again");
        assert_eq!(cached_files(&cache), sorted([&d2, &d3]));
    });

    // Kept across a restart: the cached file is loaded again without a download.
    server.restart().expect("restart");
    rt.block_on(async {
        until_ready(&server, "slow-a").await;
        assert_eq!(version_of(&server, "slow-a").await, (200, Some(3.0)));
        assert_eq!(version_of(&server, "hubbed").await, (200, Some(2.0)));
    });
    assert_eq!(web.requests_to("/slow/").len() + web.requests_to("/hf/").len(), 2, "no download after the restart");

    // `kiln model cache pull` fills the same cache ahead of time; `kiln model cache ls` and `rm` manage it.
    let config_arg = server.config.display().to_string();
    let url = web.url("/files/offset-1.pt");
    let pulled = kiln_tests::kiln(&["model", "cache", "pull", &url, "--sha256", &d1, "--config", &config_arg]).expect("pull");
    assert!(pulled.contains("downloaded") && pulled.contains(&d1), "{pulled}");
    let again = kiln_tests::kiln(&["model", "cache", "pull", &url, "--sha256", &d1, "--config", &config_arg]).expect("pull");
    assert!(again.contains("already cached"), "{again}");
    let unpinned = kiln_tests::kiln(&["model", "cache", "pull", &url, "--config", &config_arg]).expect_err("unpinned pull");
    assert!(unpinned.to_string().contains("--allow-unpinned"), "{unpinned:#}");
    let printed = kiln_tests::kiln(&["model", "cache", "pull", &url, "--allow-unpinned", "--config", &config_arg]).expect("pull");
    assert!(printed.contains(&format!("sha256 = \"{d1}\"")), "the digest to pin is printed: {printed}");
    let other = sha256(b"another file");
    let wrong = kiln_tests::kiln(&["model", "cache", "pull", &url, "--sha256", &other, "--config", &config_arg]).expect_err("wrong pin");
    assert!(wrong.to_string().contains(&d1) && wrong.to_string().contains(&other), "{wrong:#}");
    let listed = kiln_tests::kiln(&["model", "cache", "ls", "--config", &config_arg]).expect("ls");
    assert!(listed.lines().any(|l| l.starts_with(&d1) && l.contains(&url)), "{listed}");
    kiln_tests::kiln(&["model", "cache", "rm", &d1, "--config", &config_arg]).expect("rm");
    // The previous release's spelling of `model cache ls` still works.
    let listed = kiln_tests::kiln(&["model", "ls", "--cache", "--config", &config_arg]).expect("ls");
    assert!(!listed.contains(&d1) && listed.contains(&d3), "{listed}");
}

fn sorted<const N: usize>(digests: [&String; N]) -> Vec<String> {
    let mut all: Vec<String> = digests.iter().map(|d| (*d).clone()).collect();
    all.sort();
    all
}
