//! Handlers' response caches: answers the guest marks public are kept per handler (so never
//! across tenants), keyed by method, path and body; evicted past their limits; counted in
//! `/v1/stats` and `/metrics`; and dropped when the handler is deployed again.

use kiln_tests::{Server, artifact, examples_config};

/// A GET (no body) or POST of `body` to `handler`'s `path`: status, `kiln-cache`, body.
async fn call(server: &Server, tenant: &str, handler: &str, path: &str, body: Option<&str>) -> (u16, Option<String>, String) {
    let client = server.client(tenant);
    let url = server.url(&format!("/v1/handlers/{handler}{path}"));
    let request = match body {
        Some(b) => client.post(url).body(b.to_owned()),
        None => client.get(url),
    };
    let response = request.send().await.expect("call");
    let status = response.status().as_u16();
    let cache = response.headers().get("kiln-cache").and_then(|v| v.to_str().ok()).map(str::to_owned);
    (status, cache, response.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_s_response_cache_keeps_public_answers_per_handler_until_it_is_deployed_again() {
    let component = artifact("target/wasm32-wasip2/guest/misbehave.wasm");
    let extra = format!(
        "\n[[handler]]\nname = \"cached\"\ntenant = \"mallory\"\ncomponent = \"{c}\"\ncache = {{ ttl_ms = 60000, max_entries = 2, max_bytes = 4096 }}\n\
         \n[[handler]]\nname = \"cached-demo\"\ntenant = \"demo\"\ncomponent = \"{c}\"\ncache = {{ ttl_ms = 60000 }}\n",
        c = component.display()
    );
    let server = tokio::task::spawn_blocking(move || Server::start(&examples_config("", &[], &extra), &["demo", "mallory"]))
        .await
        .expect("start thread")
        .expect("server");
    let s = &server;

    // A public answer is kept: the second call gets the first one's answer, said to be a hit.
    let (status, cache, first) = call(s, "mallory", "cached", "/cacheable", None).await;
    assert_eq!((status, cache.as_deref()), (200, Some("miss")));
    let (status, cache, again) = call(s, "mallory", "cached", "/cacheable", None).await;
    assert_eq!((status, cache.as_deref(), &again), (200, Some("hit"), &first));

    // The method and the body are part of the key.
    let (_, cache, x) = call(s, "mallory", "cached", "/cacheable", Some("x")).await;
    assert_eq!(cache.as_deref(), Some("miss"));
    assert!(x.ends_with(" x") && x != first, "{x}");
    assert_eq!(call(s, "mallory", "cached", "/cacheable", Some("x")).await, (200, Some("hit".to_owned()), x.clone()));
    let (_, cache, y) = call(s, "mallory", "cached", "/cacheable", Some("y")).await;
    assert_eq!(cache.as_deref(), Some("miss"));
    assert!(y.ends_with(" y"), "{y}");

    // Answers the guest does not mark public (or marks private) are never kept.
    for path in ["/uncacheable", "/private"] {
        let (_, cache, one) = call(s, "mallory", "cached", path, None).await;
        let (_, _, two) = call(s, "mallory", "cached", path, None).await;
        assert_eq!(cache, None, "{path}");
        assert_ne!(one, two, "{path} answered twice alike");
    }

    // Another handler (another tenant's) has its own cache; and cannot be called by mallory.
    let (_, cache, theirs) = call(s, "demo", "cached-demo", "/cacheable", None).await;
    assert_eq!(cache.as_deref(), Some("miss"));
    assert_ne!(theirs, first);
    assert_eq!(call(s, "mallory", "cached-demo", "/cacheable", None).await.0, 404);

    // Counted: three keys stored with room for two, so one was evicted.
    let admin = s.admin_client();
    let stats: serde_json::Value = admin.get(s.url("/v1/stats")).send().await.expect("stats").json().await.expect("JSON");
    let ours = stats["caches"].as_array().and_then(|c| c.iter().find(|c| c["handler"] == "cached")).cloned().expect("cached's cache");
    assert_eq!((ours["hits"].as_u64(), ours["stores"].as_u64(), ours["evictions"].as_u64()), (Some(2), Some(3), Some(1)), "{ours}");
    assert_eq!(ours["entries"].as_u64(), Some(2), "{ours}");
    assert!(ours["misses"].as_u64().is_some_and(|m| m >= 3), "{ours}");
    let metrics = admin.get(s.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("kiln_response_cache_total{handler=\"cached\",outcome=\"hit\"} 2"), "{metrics}");

    // A handler deployed through the API gets a cache from the query; deploying it again
    // starts an empty one.
    let bytes = std::fs::read(&component).expect("component");
    let deploy = || admin.put(s.admin_url("/v1/handlers/fresh?tenant=mallory&cache_ttl_ms=30000")).body(bytes.clone()).send();
    assert_eq!(deploy().await.expect("deploy").status(), 201);
    assert_eq!(call(s, "mallory", "fresh", "/cacheable", None).await.1.as_deref(), Some("miss"));
    assert_eq!(call(s, "mallory", "fresh", "/cacheable", None).await.1.as_deref(), Some("hit"));
    assert_eq!(deploy().await.expect("redeploy").status(), 200);
    assert_eq!(call(s, "mallory", "fresh", "/cacheable", None).await.1.as_deref(), Some("miss"), "a redeploy empties the cache");
    let refused = admin.put(s.admin_url("/v1/handlers/fresh?tenant=mallory&cache_max_entries=0")).body(bytes.clone()).send().await.expect("deploy");
    let text = refused.text().await.unwrap_or_default();
    assert!(text.contains("cache.max_entries"), "{text}");
}
