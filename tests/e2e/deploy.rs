//! Deploying handlers at run time: the admin API, `kiln handler deploy`, validation, signatures and
//! atomic hot swaps.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{json_of, run_kiln, scratch, server};
use kiln_tests::artifact;

/// Tenant `signed`, whose deployments must carry a signature by a key made with `kiln keygen`.
pub(crate) fn tenants() -> String {
    let prefix = scratch().join("signer");
    let line = run_kiln(&["keygen", "--out", &prefix.display().to_string()]);
    format!("\n[[tenant]]\nname = \"signed\"\nmodels = [\"digits\"]\n{}\n", line.trim())
}

fn wasm(name: &str) -> Vec<u8> {
    std::fs::read(artifact(&format!("target/wasm32-wasip2/guest/{name}.wasm"))).expect("guest")
}

async fn put(name: &str, query: &str, body: Vec<u8>, signature: Option<&str>) -> (u16, Value) {
    let mut request = server()
        .admin_client()
        .put(server().admin_url(&format!("/v1/handlers/{name}?{query}")))
        .body(body);
    if let Some(sig) = signature {
        request = request.header("kiln-signature", sig);
    }
    json_of(request.send().await.expect("put")).await
}

async fn call(tenant: &str, name: &str, body: &'static str) -> (u16, String) {
    let response = server()
        .client(tenant)
        .post(server().url(&format!("/v1/handlers/{name}/echo")))
        .body(body)
        .send()
        .await
        .expect("call");
    (response.status().as_u16(), response.text().await.expect("body"))
}


#[tokio::test]
async fn a_deployed_handler_serves_is_listed_replaced_and_deleted() {
    let greeter = wasm("greeter");
    let (status, body) = put("greet-1", "tenant=demo", greeter.clone(), None).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["origin"], "deployed");
    assert_eq!(body["tenant"], "demo");
    assert_eq!(body["models"], serde_json::json!(["digits", "minilm", "minilm-stats", "minilm-tight", "mnist8"]));
    assert_eq!(body["sha256"].as_str().map(str::len), Some(64));

    assert_eq!(call("demo", "greet-1", "hi").await, (200, "hello from greeter (2 bytes)".into()));
    let (status, text) = call("mallory", "greet-1", "hi").await;
    assert_eq!(status, 404, "another tenant's handler: {text}");

    let (status, list) = json_of(server().admin_client().get(server().admin_url("/v1/handlers")).send().await.expect("list")).await;
    assert_eq!(status, 200);
    let list: kiln_wire::HandlerList = serde_json::from_value(list).expect("a handler list");
    let names: Vec<&str> = list.handlers.iter().map(|h| h.name.as_str()).collect();
    assert!(names.contains(&"greet-1") && names.contains(&"digits"), "{names:?}");
    let deployed = list.handlers.iter().find(|h| h.name == "greet-1").expect("greet-1");
    assert_eq!((deployed.origin, deployed.tenant.as_str()), (kiln_wire::HandlerOrigin::Deployed, "demo"));
    assert_eq!(deployed.sha256.as_ref().map(String::len), Some(64));

    // Same name again: replaced, with tighter limits this time.
    let (status, body) = put("greet-1", "tenant=demo&memory_limit_mib=16&deadline_ms=500&models=digits", greeter, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["limits"]["memory_limit_mib"], 16);
    assert_eq!(body["limits"]["deadline_ms"], 500);
    assert_eq!(body["models"], serde_json::json!(["digits"]));

    let delete = || async {
        json_of(server().admin_client().delete(server().admin_url("/v1/handlers/greet-1")).send().await.expect("delete")).await
    };
    assert_eq!(delete().await.0, 200);
    assert_eq!(call("demo", "greet-1", "hi").await.0, 404);
    let (status, body) = delete().await;
    assert_eq!(status, 404, "{body}");

    for needle in ["\"event\":\"deploy\"", "\"event\":\"delete\""] {
        let audited = |l: &str| l.contains(needle) && l.contains("\"handler\":\"greet-1\"") && l.contains("\"tenant\":\"demo\"");
        let audit = server().audit_log_with(audited);
        assert!(audit.lines().any(audited), "{needle} not in the audit log:\n{audit}");
    }
}

#[tokio::test]
async fn deploy_refuses_what_cannot_be_a_handler_naming_the_problem() {
    let empty_component = b"\0asm\x0d\0\x01\0".to_vec();
    let core_module = b"\0asm\x01\0\0\0".to_vec();
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("bad-1", "tenant=demo", b"this is not wasm".to_vec(), 400, "not a valid WebAssembly component"),
        ("bad-2", "tenant=demo", core_module, 400, "not a valid WebAssembly component"),
        ("bad-3", "tenant=demo", empty_component, 400, "does not export wasi:http/incoming-handler"),
        ("bad-4", "tenant=demo", wasm("forbidden"), 400, "wasi:filesystem/"),
        ("bad-5", "tenant=nobody", wasm("greeter"), 400, "tenant 'nobody' is not declared in the config"),
        ("bad-6", "tenant=demo&memory_limit_mib=4096", wasm("greeter"), 400, "memory_limit_mib: 4096 is out of range (1 ..= 128, the quota of tenant 'demo')"),
        ("bad-7", "tenant=mallory&models=minilm", wasm("greeter"), 400, "models: model 'minilm' is not among the models of tenant 'mallory'"),
        ("bad-8", "tenant=demo&colour=red", wasm("greeter"), 400, "unknown field `colour`"),
        ("digits", "tenant=demo", wasm("greeter"), 409, "handler 'digits' is defined in the config file"),
        (".hidden", "tenant=demo", wasm("greeter"), 400, "is not a valid name"),
    ];
    for (name, query, bytes, expected, message) in cases {
        let (status, body) = put(name, query, bytes, None).await;
        assert_eq!(status, expected, "{name}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{name}: expected '{message}' in: {error}");
    }
    // The forbidden guest's refusal names both of its forbidden interfaces.
    let (_, body) = put("bad-4", "tenant=demo", wasm("forbidden"), None).await;
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("wasi:filesystem/") && error.contains("wasi:sockets/"), "{error}");
    let refused = |l: &str| l.contains("deploy_refused") && l.contains("\"handler\":\"bad-4\"");
    assert!(server().audit_log_with(refused).lines().any(refused));

    // Only the admin key deploys.
    let request = |client: reqwest::Client| {
        client.put(server().admin_url("/v1/handlers/bad-9?tenant=demo")).body(wasm("greeter")).send()
    };
    assert_eq!(request(server().client("demo")).await.expect("put").status().as_u16(), 403);
    assert_eq!(request(reqwest::Client::new()).await.expect("put").status().as_u16(), 401);
    for name in ["bad-1", "bad-2", "bad-3", "bad-4", "bad-9"] {
        assert_eq!(call("demo", name, "x").await.0, 404, "{name} must not exist");
    }
}

#[tokio::test]
async fn a_tenant_with_a_signing_key_accepts_only_components_it_signed() {
    let component = artifact("target/wasm32-wasip2/guest/greeter.wasm");
    let sig_file = scratch().join("greeter.wasm.sig");
    let key = scratch().join("signer.key");
    run_kiln(&[
        "sign",
        &component.display().to_string(),
        "--handler",
        "signed-1",
        "--tenant",
        "signed",
        "--signing-key",
        &key.display().to_string(),
        "--out",
        &sig_file.display().to_string(),
    ]);
    let signature = std::fs::read_to_string(&sig_file).expect("signature");
    let signature = signature.trim();
    let bytes = wasm("greeter");

    // The signature covers the name, the models and the priorities too: replayed as another
    // handler, with other models or with a higher priority, it is refused.
    for (name, query) in [
        ("signed-2", "tenant=signed"),
        ("signed-1", "tenant=signed&models=digits"),
        ("signed-1", "tenant=signed&priority=5"),
        ("signed-1", "tenant=signed&max_priority=9"),
    ] {
        let (status, body) = put(name, query, bytes.clone(), Some(signature)).await;
        assert_eq!(status, 403, "replayed as {name}?{query}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("as handler")), "{body}");
    }

    let (status, body) = put("signed-1", "tenant=signed", bytes.clone(), None).await;
    assert_eq!(status, 403, "unsigned: {body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("requires signed components")), "{body}");

    let mut tampered = bytes.clone();
    tampered.extend_from_slice(b"\0");
    let (status, body) = put("signed-1", "tenant=signed", tampered, Some(signature)).await;
    assert_eq!(status, 403, "tampered: {body}");

    let other = scratch().join("other");
    run_kiln(&["keygen", "--out", &other.display().to_string()]);
    let other_sig = scratch().join("other.sig");
    run_kiln(&[
        "sign",
        &component.display().to_string(),
        "--handler",
        "signed-1",
        "--tenant",
        "signed",
        "--signing-key",
        &other.with_extension("key").display().to_string(),
        "--out",
        &other_sig.display().to_string(),
    ]);
    let wrong = std::fs::read_to_string(&other_sig).expect("other signature");
    let (status, body) = put("signed-1", "tenant=signed", bytes.clone(), Some(wrong.trim())).await;
    assert_eq!(status, 403, "signed by another key: {body}");
    let (status, _) = put("signed-1", "tenant=signed", bytes.clone(), Some("not base64!")).await;
    assert_eq!(status, 400);
    assert_eq!(call("signed", "signed-1", "x").await.0, 404, "nothing refused may be deployed");
    assert_eq!(call("signed", "signed-2", "x").await.0, 404, "nothing refused may be deployed");

    // The real CLI, with the good signature.
    let out = run_kiln(&[
        "handler",
        "deploy",
        &component.display().to_string(),
        "--name",
        "signed-1",
        "--tenant",
        "signed",
        "--signature",
        &sig_file.display().to_string(),
        "--admin-url",
        &server().admin,
        "--admin-key",
        server().admin_key(),
    ]);
    let deployed: Value = serde_json::from_str(&out).expect("deploy prints JSON");
    assert_eq!(deployed["signed"], true, "{deployed}");
    assert_eq!(call("signed", "signed-1", "x").await, (200, "hello from greeter (1 bytes)".into()));

    let listing = run_kiln(&["handler", "ls", "--admin-url", &server().admin, "--admin-key", server().admin_key()]);
    assert!(listing.lines().any(|l| l.starts_with("signed-1") && l.contains("deployed")), "{listing}");
    run_kiln(&["handler", "undeploy", "signed-1", "--admin-url", &server().admin, "--admin-key", server().admin_key()]);
    assert_eq!(call("signed", "signed-1", "x").await.0, 404);
}

#[tokio::test]
async fn a_redeploy_swaps_atomically_and_no_request_fails() {
    let (misbehave, greeter) = (wasm("misbehave"), wasm("greeter"));
    let (status, body) = put("swap", "tenant=demo", misbehave.clone(), None).await;
    assert_eq!(status, 201, "{body}");

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let stop = Arc::clone(&stop);
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                seen.push(call("demo", "swap", "ping").await);
            }
            seen
        }));
    }
    let versions = [greeter.clone(), misbehave, greeter];
    for (i, bytes) in versions.into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, body) = put("swap", "tenant=demo", bytes, None).await;
        assert_eq!(status, 200, "swap {i}: {body}");
    }
    // Once the last deploy has answered, every new request runs the new version.
    let after = Instant::now();
    for _ in 0..20 {
        assert_eq!(call("demo", "swap", "ping").await, (200, "hello from greeter (4 bytes)".into()));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut results = Vec::new();
    for w in workers {
        results.extend(w.await.expect("worker"));
    }
    let failed: Vec<_> = results.iter().filter(|(s, _)| *s != 200).collect();
    assert!(failed.is_empty(), "{} of {} requests failed during swaps: {:?}", failed.len(), results.len(), &failed[..failed.len().min(5)]);
    let old = results.iter().filter(|(_, b)| b == "ping").count();
    let new = results.iter().filter(|(_, b)| b == "hello from greeter (4 bytes)").count();
    assert_eq!(old + new, results.len(), "every answer comes from one version or the other");
    assert!(old > 0 && new > 0, "both versions served: old {old}, new {new}");
    assert!(after.elapsed() < Duration::from_secs(30));
}
