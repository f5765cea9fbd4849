//! Tests that need a server of their own: deployed handlers live in the state directory, so a
//! restart serves exactly what was deployed and a crash in the middle of a deploy leaves the old
//! version or the new one, never a broken one; and a fuel quota, which meters every guest.

use std::time::{Duration, Instant};

use kiln_tests::{Server, artifact};
use serde_json::Value;

fn config() -> String {
    format!(
        r#"
[[model]]
name = "digits"
path = "{}"
inputs = [{{ name = "image", dtype = "FP32", shape = [-1, 1, 8, 8] }}]
outputs = [{{ name = "logits" }}]

[[tenant]]
name = "demo"
models = ["digits"]
"#,
        artifact("build/models/digits.pt").display()
    )
}

fn wasm(name: &str) -> Vec<u8> {
    std::fs::read(artifact(&format!("target/wasm32-wasip2/guest/{name}.wasm"))).expect("guest")
}

/// Which guest answers `POST /echo` with "ping": misbehave echoes, greeter greets.
const MISBEHAVE: &str = "ping";
const GREETER: &str = "hello from greeter (4 bytes)";

async fn put(server: &Server, name: &str, bytes: Vec<u8>) -> Result<u16, reqwest::Error> {
    let response = server
        .admin_client()
        .put(server.admin_url(&format!("/v1/handlers/{name}?tenant=demo")))
        .body(bytes)
        .send()
        .await?;
    Ok(response.status().as_u16())
}

async fn answer(server: &Server, name: &str) -> (u16, String) {
    let response = server
        .client("demo")
        .post(server.url(&format!("/v1/handlers/{name}/echo")))
        .body("ping")
        .send()
        .await
        .expect("call");
    (response.status().as_u16(), response.text().await.expect("body"))
}

async fn deployed(server: &Server) -> Vec<String> {
    let list: Value = server
        .admin_client()
        .get(server.admin_url("/v1/handlers"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    list["handlers"]
        .as_array()
        .expect("handlers")
        .iter()
        .filter_map(|h| h["name"].as_str().map(str::to_owned))
        .collect()
}

fn restart(server: &Server) {
    tokio::task::block_in_place(|| server.restart()).unwrap_or_else(|e| panic!("restart: {e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_serves_exactly_the_handlers_deployed_before_it() {
    let server = Server::start(&config(), &["demo"]).expect("server");
    assert_eq!(put(&server, "a", wasm("greeter")).await.expect("a"), 201);
    assert_eq!(put(&server, "b", wasm("misbehave")).await.expect("b"), 201);
    assert_eq!(put(&server, "c", wasm("greeter")).await.expect("c"), 201);
    assert_eq!(put(&server, "b", wasm("greeter")).await.expect("b again"), 200);
    let deleted = server.admin_client().delete(server.admin_url("/v1/handlers/c")).send().await.expect("delete");
    assert_eq!(deleted.status().as_u16(), 200);
    assert_eq!(deployed(&server).await, ["a", "b"]);

    restart(&server);
    assert_eq!(deployed(&server).await, ["a", "b"]);
    assert_eq!(answer(&server, "a").await, (200, GREETER.into()));
    assert_eq!(answer(&server, "b").await, (200, GREETER.into()), "b is the replacement");
    assert_eq!(answer(&server, "c").await.0, 404, "c was deleted");
    // Only the blob still in use is kept.
    let blobs = std::fs::read_dir(server.dir.path.join("state/blobs")).expect("blobs").count();
    assert_eq!(blobs, 1, "a and b share the greeter blob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_deploy_leaves_the_old_or_the_new_version() {
    let server = Server::start(&config(), &["demo"]).expect("server");
    assert_eq!(put(&server, "crash", wasm("misbehave")).await.expect("first deploy"), 201);
    let mut current = MISBEHAVE;
    let mut outcomes = Vec::new();
    // Kill points from before the upload to after the answer; a deploy compiles for about a second.
    for (i, delay_ms) in [0u64, 40, 150, 400, 900, 2500].into_iter().enumerate() {
        let (next, bytes) = if current == MISBEHAVE { (GREETER, wasm("greeter")) } else { (MISBEHAVE, wasm("misbehave")) };
        let deploying = {
            let client = server.admin_client();
            let url = server.admin_url("/v1/handlers/crash?tenant=demo");
            tokio::spawn(async move { client.put(url).body(bytes).send().await.map(|r| r.status().as_u16()) })
        };
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        tokio::task::block_in_place(|| server.kill()).expect("kill");
        let acknowledged = matches!(deploying.await.expect("task"), Ok(200 | 201));
        restart(&server);
        let (status, body) = answer(&server, "crash").await;
        assert_eq!(status, 200, "kill {i} after {delay_ms} ms: the handler is broken: {body}");
        assert!(body == current || body == next, "kill {i}: unexpected answer {body}");
        if acknowledged {
            assert_eq!(body, next, "kill {i}: an acknowledged deploy must survive the crash");
        }
        outcomes.push((delay_ms, acknowledged, body == next));
        current = if body == next { next } else { current };
    }
    assert!(outcomes.iter().any(|(_, ack, _)| *ack), "no deploy finished before its kill: {outcomes:?}");
    assert!(server.log_text().contains("listening on"), "the server restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fuel_quota_stops_a_busy_guest_and_spares_a_modest_one() {
    let config = format!(
        "{}quota = {{ fuel = 50000000 }}\n\n[[handler]]\nname = \"metered\"\ntenant = \"demo\"\ncomponent = \"{}\"\n",
        config(),
        artifact("target/wasm32-wasip2/guest/misbehave.wasm").display()
    );
    let server = Server::start(&config, &["demo"]).expect("server");
    let client = server.client("demo");
    let started = Instant::now();
    let response = client.get(server.url("/v1/handlers/metered/loop")).send().await.expect("loop");
    assert_eq!(response.status().as_u16(), 500);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "handler 'metered' ran out of fuel (50000000 units per request)");
    assert!(started.elapsed() < Duration::from_secs(5), "fuel, not the 10 s deadline, stopped it");
    let (status, text) = answer(&server, "metered").await;
    assert_eq!((status, text.as_str()), (200, "ping"));
}
