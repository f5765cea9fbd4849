//! Cluster mode without an orchestrator: two replicas started from one config on loopback, each
//! with its own state directory and both reading key hashes from one shared folder (as a mounted
//! Kubernetes Secret). They serve the same, name themselves in their request ids, refuse the
//! changes that would set one apart, send a cancel to the replica it belongs to, and see a key
//! added to the shared folder while they run.

use kiln_tests::{Server, TempDir, examples_config, kiln};
use serde_json::Value;

const REQUEST_ID: &str = "kiln-request-id";

fn replica(keys: &TempDir, name: &str) -> Server {
    let server = format!("cluster = true\nkeys_dir = \"{}\"", keys.path.display());
    Server::start_with_env(&examples_config(&server, &[], ""), &["demo", "mallory"], &[("KILN_SERVER__REPLICA", name)]).expect("replica")
}

async fn digits(server: &Server, png: &[u8]) -> (String, Value) {
    let response = server.client("demo").post(server.url("/v1/handlers/digits/")).body(png.to_vec()).send().await.expect("post");
    assert_eq!(response.status(), 200);
    let id = response.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    (id, response.json().await.expect("json"))
}

#[tokio::test]
async fn replicas_from_one_config_serve_alike_and_refuse_what_would_set_one_apart() {
    let keys = TempDir::new("kiln-cluster-keys").expect("keys");
    let (a, b) = (replica(&keys, "kiln-a"), replica(&keys, "kiln-b"));
    let png = kiln_tests::a_digit();

    // The same answer from both; each request id starts with its replica's name.
    let ((id_a, answer_a), (id_b, answer_b)) = (digits(&a, &png).await, digits(&b, &png).await);
    assert_eq!(answer_a, answer_b);
    assert!(id_a.starts_with("kiln-a-") && id_a.len() == "kiln-a-".len() + 24, "{id_a}");
    assert!(id_b.starts_with("kiln-b-"), "{id_b}");

    // Changes that would set a replica apart: 409, saying how to make them on all.
    let admin = a.admin_client();
    let refused = [
        admin.put(a.admin_url("/v1/handlers/extra")).body(vec![0u8; 8]).send(),
        admin.delete(a.admin_url("/v1/handlers/digits")).send(),
        admin.put(a.admin_url("/v1/models/extra")).body(r#"{"path": "x.pt"}"#).send(),
        admin.patch(a.admin_url("/v1/models/digits")).body(r#"{"batching": {"max_batch_size": 2}}"#).send(),
        admin.post(a.admin_url("/v2/repository/models/digits/unload")).send(),
        a.client("demo").put(a.url("/v1/models/mine")).body(r#"{"source": "https://example.com/m.pt"}"#).send(),
    ];
    for response in futures::future::join_all(refused).await {
        let response = response.expect("send");
        let (status, url) = (response.status(), response.url().path().to_owned());
        let body: Value = response.json().await.expect("json");
        assert_eq!(status, 409, "{url}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains("replica 'kiln-a'") && error.contains("change the config"), "{url}: {error}");
    }
    // Reads and the log filter are not changes; nothing changed either.
    let listed: Value = admin.get(a.admin_url("/v1/handlers")).send().await.expect("list").json().await.expect("json");
    let listed_b: Value = b.admin_client().get(b.admin_url("/v1/handlers")).send().await.expect("list").json().await.expect("json");
    assert_eq!(listed.to_string().matches("\"name\"").count(), listed_b.to_string().matches("\"name\"").count());
    assert_eq!(digits(&a, &png).await.1, answer_a);
    let log = admin.put(a.admin_url("/v1/log")).body("info").send().await.expect("log filter");
    assert_ne!(log.status(), 409);

    // A cancel of b's request sent to a says where it belongs.
    let response = admin.delete(a.admin_url(&format!("/v1/requests/{id_b}"))).send().await.expect("cancel");
    assert_eq!(response.status(), 421);
    let error = response.text().await.expect("text");
    assert!(error.contains("belongs to replica 'kiln-b'") && error.contains("replica 'kiln-a'"), "{error}");

    // A key added to the shared folder (a Secret being updated) works on both while they run.
    let config = a.config.display().to_string();
    let key = kiln(&["tenant", "add-key", "demo", "--config", &config]).expect("add-key");
    let key = key.trim();
    for server in [&a, &b] {
        let client = kiln_tests::bearer_client(key);
        let start = std::time::Instant::now();
        loop {
            let status = client.post(server.url("/v1/handlers/digits/")).body(png.clone()).send().await.expect("post").status();
            if status == 200 {
                break;
            }
            assert!(start.elapsed() < std::time::Duration::from_secs(10), "the new key is still refused ({status})");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

#[test]
fn a_replica_refuses_allow_unpinned_from_the_command_line_too() {
    let dir = TempDir::new("kiln-cluster-unpinned").expect("dir");
    let config = dir.path.join("kiln.toml");
    std::fs::write(&config, "[server]\ncluster = true\nreplica = \"kiln-a\"\n").expect("config");
    let e = kiln(&["serve", "--config", &config.display().to_string(), "--allow-unpinned"]).expect_err("refused");
    assert!(e.to_string().contains("--allow-unpinned: replica 'kiln-a' is in cluster mode"), "{e}");
}
