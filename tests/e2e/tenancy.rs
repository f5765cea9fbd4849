//! Tenants: keys, and the rule that a tenant sees only its own handlers and models.

use std::time::{Duration, Instant};

use super::{json_of, run_kiln, server};
use kiln_tests::bearer_client;

async fn status_and_body(client: &reqwest::Client, method: &str, path: &str) -> (u16, String, Option<String>) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let response = client.request(method, server().url(path)).body("x").send().await.expect("request");
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, response.text().await.expect("body"), challenge)
}

#[tokio::test]
async fn calls_without_a_valid_key_are_401_and_reveal_nothing() {
    let demo_key = server().key("demo").to_owned();
    let mut wrong = demo_key.clone();
    let last = wrong.pop().expect("key");
    wrong.push(if last == 'x' { 'y' } else { 'x' });
    let clients = [
        ("no key", reqwest::Client::new()),
        ("wrong secret", bearer_client(&wrong)),
        ("unknown id", bearer_client("kiln_0000000000000000_AAAA")),
        ("not a kiln key", bearer_client("hunter2")),
    ];
    let mut all_bodies = Vec::new();
    for (what, client) in &clients {
        let mut bodies = Vec::new();
        for (method, path) in [
            ("POST", "/v1/handlers/digits/"),
            ("POST", "/v1/handlers/no-such-handler/"),
            ("POST", "/v2/models/digits/infer"),
            ("GET", "/v2/models/digits"),
            ("GET", "/v2/models/no-such-model/ready"),
        ] {
            let (status, body, challenge) = status_and_body(client, method, path).await;
            assert_eq!(status, 401, "{what}: {method} {path}: {body}");
            assert_eq!(challenge.as_deref(), Some("Bearer"), "{what}: {path}");
            bodies.push(body);
        }
        // An existing and a missing handler get the very same answer.
        assert_eq!(bodies[0], bodies[1], "{what}");
        all_bodies.push(bodies);
    }
    // A wrong secret for a real key id reads exactly like a key id that was never issued.
    assert_eq!(all_bodies[1], all_bodies[2], "wrong secret vs unknown id");
    assert!(all_bodies[1][0].contains("invalid API key"), "{}", all_bodies[1][0]);
    // Health stays open for load balancers.
    assert_eq!(status_and_body(&reqwest::Client::new(), "GET", "/v2/health/ready").await.0, 200);

    let audited = |l: &str| l.contains("auth_failure") && l.contains("\"tenant\":\"demo\"") && l.contains("wrong API key");
    let audit = server().audit_log_with(audited);
    assert!(audit.lines().any(audited), "{audit}");
    // `kiln_<16 hex id>_<secret>`; the secret is URL-safe base64 and may itself hold `_`.
    let secret = &demo_key["kiln_".len() + 17..];
    assert!(!audit.contains(secret) && !audit.contains(&wrong), "the audit log must never hold keys");
    assert!(!server().log_text().contains(secret), "the server log must never hold keys");
}

#[tokio::test]
async fn another_tenants_handler_or_model_looks_exactly_like_a_missing_one() {
    let demo = server().client("demo");
    let (status, theirs, _) = status_and_body(&demo, "POST", "/v1/handlers/misbehave/echo").await;
    let (_, missing, _) = status_and_body(&demo, "POST", "/v1/handlers/no-such-handler/echo").await;
    assert_eq!(status, 404);
    assert_eq!(theirs.replace("misbehave", "NAME"), missing.replace("no-such-handler", "NAME"));

    let mallory = server().client("mallory");
    for path in ["/v2/models/minilm", "/v2/models/minilm/ready"] {
        let (status, theirs, _) = status_and_body(&mallory, "GET", path).await;
        let (_, missing, _) = status_and_body(&mallory, "GET", &path.replace("minilm", "nope")).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(theirs.replace("minilm", "NAME"), missing.replace("nope", "NAME"), "{path}");
    }
    let (status, body) = json_of(
        mallory
            .post(server().url("/v2/models/minilm/infer"))
            .json(&serde_json::json!({"inputs": []}))
            .send()
            .await
            .expect("infer"),
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (404, Some("model 'minilm' not found")));
    // Its own model answers.
    assert_eq!(status_and_body(&mallory, "GET", "/v2/models/digits").await.0, 200);

    // Admin keys manage handlers; they call neither handlers nor models (no quota applies to
    // them, so they must not reach a model at all).
    let admin = server().admin_client();
    for (method, path) in [
        ("POST", "/v1/handlers/digits/"),
        ("POST", "/v2/models/digits/infer"),
        ("GET", "/v2/models/digits"),
        ("GET", "/v2/models/digits/ready"),
    ] {
        let (status, body, _) = status_and_body(&admin, method, path).await;
        assert_eq!(status, 403, "{method} {path}: {body}");
        assert!(body.contains("admin keys are for the admin API"), "{body}");
    }
}

#[tokio::test]
async fn keys_added_and_removed_on_a_running_server_take_effect() {
    let config = server().config.display().to_string();
    let key = run_kiln(&["tenant", "add-key", "demo", "--config", &config]);
    let key = key.trim().to_owned();
    assert!(key.starts_with("kiln_"), "{key}");
    let client = bearer_client(&key);
    let expect_within = |want: u16| {
        let client = client.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let status = client
                    .get(server().url("/v2/models/digits/ready"))
                    .send()
                    .await
                    .expect("request")
                    .status()
                    .as_u16();
                if status == want {
                    return;
                }
                assert!(Instant::now() < deadline, "still {status}, expected {want}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    expect_within(200).await;

    let id = &key["kiln_".len().."kiln_".len() + 16];
    let listed = run_kiln(&["tenant", "keys", "demo", "--config", &config]);
    assert!(listed.lines().any(|l| l.starts_with(id)), "{listed}");
    assert!(!listed.contains(&key[22..]), "listing shows ids, never secrets");
    run_kiln(&["tenant", "remove-key", "demo", id, "--config", &config]);
    expect_within(401).await;

    // The other keys of the tenant are untouched.
    assert_eq!(
        server().client("demo").get(server().url("/v2/models/digits/ready")).send().await.expect("request").status().as_u16(),
        200
    );
    let unknown = kiln_tests::kiln(&["tenant", "add-key", "nobody", "--config", &config]).expect_err("unknown tenant");
    assert!(unknown.to_string().contains("tenant 'nobody' is not declared"), "{unknown}");
}
