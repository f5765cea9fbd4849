//! Tests that need a server of their own: deployed handlers live in the state directory, so a
//! restart serves exactly what was deployed and a crash in the middle of a deploy leaves the old
//! version or the new one, never a broken one; and a fuel quota, which meters every guest.

mod operator;

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

/// The examples, draining with a short grace period so the test sees every phase.
fn draining_server(grace_ms: u64) -> Server {
    let config = kiln_tests::examples_config(&format!("drain_grace_ms = {grace_ms}\ndrain_timeout_ms = 20000"), &[], "");
    Server::start(&config, &["demo", "mallory"]).expect("server")
}

/// A client that opens a new connection for every request: after the grace period each new
/// request is refused at connect, never half-served on a connection the server is closing.
fn fresh_connections(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {key}").parse().expect("header"));
    reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// SIGTERM under load: readiness turns 503 at once, requests keep being served through the
/// grace period, everything in flight when the port closes (a guest sleeping past it, queued
/// inference) finishes with 200, the event stream ends with a `draining` event, and the
/// process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_every_request_in_flight_and_exits_0() {
    const GRACE: Duration = Duration::from_millis(800);
    let server = draining_server(GRACE.as_millis() as u64);
    let png = std::fs::read(artifact("build/holdout/digits/0000_9.png")).expect("png");
    let events = {
        let response = server.admin_client().get(server.url("/v1/events")).send().await.expect("events");
        assert_eq!(response.status().as_u16(), 200);
        tokio::spawn(async move { response.text().await.unwrap_or_default() })
    };
    let start = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (client, url, png) = (fresh_connections(server.key("demo")), server.url("/v1/handlers/digits/"), png.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while start.elapsed() < Duration::from_secs(3) {
                    let sent = start.elapsed();
                    let outcome = match client.post(&url).body(png.clone()).send().await {
                        Ok(r) => Ok((r.status().as_u16(), r.text().await.unwrap_or_default())),
                        Err(e) => Err(format!("{e:?}")),
                    };
                    seen.push((w, sent, outcome));
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Sleeps past the grace period: in flight when the port closes.
    let sleeper = {
        let (client, url) = (fresh_connections(server.key("mallory")), server.url("/v1/handlers/misbehave/sleep?900"));
        tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let signalled = start.elapsed();
    server.signal("TERM").expect("SIGTERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ready = reqwest::get(server.url("/v2/health/ready")).await.expect("ready").status().as_u16();
    assert_eq!(ready, 503, "readiness must turn 503 as soon as the drain starts");

    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(w.await.expect("worker"));
    }
    assert_eq!(sleeper.await.expect("task").expect("the sleeping request"), 200, "in flight when the port closed");
    let status = tokio::task::spawn_blocking({
        let server = std::sync::Arc::new(server);
        move || (server.wait_exit(Duration::from_secs(20)), server)
    });
    let (status, server) = status.await.expect("wait");
    let status = status.expect("exit");
    assert!(status.success(), "exit status {status}:\n{}", server.log_text());

    // Everything sent before the port closed was answered, and answered well.
    let closing = signalled + GRACE - Duration::from_millis(150);
    let mut served_during_grace = 0;
    for (worker, sent, outcome) in &outcomes {
        if *sent < closing {
            match outcome {
                Ok((200, _)) => served_during_grace += usize::from(*sent > signalled),
                other => panic!("worker {worker}: a request sent at {sent:?} (drain at {signalled:?}) got {other:?}"),
            }
        }
    }
    assert!(served_during_grace > 0, "nothing was served during the grace period");
    let events = events.await.expect("events");
    assert!(events.trim_end().lines().rev().find(|l| l.starts_with("event:")) == Some("event: draining"), "{events}");
}

/// A second SIGTERM does not wait for anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once() {
    let server = draining_server(10_000);
    let sleeper = {
        let (client, url) = (fresh_connections(server.key("mallory")), server.url("/v1/handlers/misbehave/sleep?900"));
        tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    server.signal("TERM").expect("first SIGTERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.signal("TERM").expect("second SIGTERM");
    let status = tokio::task::spawn_blocking(move || server.wait_exit(Duration::from_secs(5)).expect("exit")).await.expect("wait");
    assert!(!status.success(), "a forced exit is not a clean one: {status}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert!(sleeper.await.expect("task").is_err(), "the request in flight was cut off");
}

/// A deployment signed by a tenant's key is served after a restart while that key is the
/// tenant's; once the operator rotates the key it no longer verifies, so it is kept out of
/// service (and audited), its files kept, until a component signed by the new key is deployed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_deployment_is_checked_again_at_start_against_the_current_key() {
    let dir = kiln_tests::TempDir::new("kiln-rotate").expect("dir");
    let keygen = |name: &str| {
        let prefix = dir.path.join(name);
        kiln_tests::kiln(&["keygen", "--out", &prefix.display().to_string()]).expect("keygen").trim().to_owned()
    };
    let (old_line, new_line) = (keygen("old"), keygen("new"));
    let config = format!("{}signing_key = {}\n", config(), old_line.trim_start_matches("signing_key = "));
    let server = Server::start(&config, &["demo"]).expect("server");
    let component = artifact("target/wasm32-wasip2/guest/greeter.wasm");
    let sig = dir.path.join("greeter.sig");
    kiln_tests::kiln(&[
        "sign", &component.display().to_string(), "--handler", "rotating", "--tenant", "demo",
        "--signing-key", &dir.path.join("old.key").display().to_string(), "--out", &sig.display().to_string(),
    ])
    .expect("sign");
    let signature = std::fs::read_to_string(&sig).expect("signature");
    let response = server
        .admin_client()
        .put(server.admin_url("/v1/handlers/rotating?tenant=demo"))
        .header("kiln-signature", signature.trim())
        .body(wasm("greeter"))
        .send()
        .await
        .expect("deploy");
    assert_eq!(response.status().as_u16(), 201, "{}", response.text().await.unwrap_or_default());
    restart(&server);
    assert_eq!(answer(&server, "rotating").await.0, 200, "still the tenant's key: served after a restart");

    // The operator rotates the tenant's key.
    let rotated = std::fs::read_to_string(&server.config).expect("config").replace(&old_line, &new_line);
    std::fs::write(&server.config, rotated).expect("rotate");
    restart(&server);
    assert_eq!(answer(&server, "rotating").await.0, 404, "signed by the old key: out of service");
    assert!(server.log_text().contains("does not verify against the tenant's current signing_key"));
    let refused = |l: &str| l.contains("deploy_refused") && l.contains("rotating");
    let audit = server.audit_log_with(refused);
    assert!(audit.lines().any(refused), "{audit}");
    let manifests = std::fs::read_dir(server.dir.path.join("state/handlers")).expect("handlers").count();
    assert_eq!(manifests, 1, "the refused deployment is kept for the operator");
}

/// A full sandbox pool is 503 with Retry-After, not a 500: here a pool of two, both taken by
/// one tenant's sleeping guests (its share is the whole pool), and another tenant calling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_is_503_with_retry_after() {
    let config = kiln_tests::examples_config("max_instances = 2", &[], "").replace(
        "memory_limit_mib = 32, deadline_ms = 1000 }",
        "memory_limit_mib = 32, deadline_ms = 1000, max_instances = 2 }",
    );
    let server = Server::start(&config, &["demo", "mallory"]).expect("server");
    let sleepers: Vec<_> = (0..2)
        .map(|_| {
            let (client, url) = (server.client("mallory"), server.url("/v1/handlers/misbehave/sleep?700"));
            tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let png = std::fs::read(artifact("build/holdout/digits/0000_9.png")).expect("png");
    let response = server.client("demo").post(server.url("/v1/handlers/digits/")).body(png.clone()).send().await.expect("post");
    let (status, retry) = (response.status().as_u16(), response.headers().get("retry-after").cloned());
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry.as_ref().and_then(|v| v.to_str().ok()), Some("1"));
    assert!(body.contains("no sandbox is free"), "{body}");
    for s in sleepers {
        assert_eq!(s.await.expect("task").expect("sleeper"), 200);
    }
    let again = server.client("demo").post(server.url("/v1/handlers/digits/")).body(png).send().await.expect("post");
    assert_eq!(again.status().as_u16(), 200, "slots come back");
}
