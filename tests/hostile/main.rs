//! The hostile-guest suite. Tenant `mallory` runs a guest that attacks the sandbox every way we
//! know of, one case at a time, while tenant `good` sends steady traffic through the digits
//! example. Each attack must be contained with a clear status and log line; afterwards both
//! tenants are served and none of `good`'s requests failed. `good`'s p99 latency during the
//! attacks and during the infinite loops, against its baseline, is measured and printed
//! (`-- --nocapture`); docs/BENCHMARKS.md records it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use kiln_tests::{Server, artifact, examples_config};
use serde_json::Value;

/// `good` owns the digits handler and a model no one else may load; `mallory` owns the
/// misbehaving guest under tight sandbox limits; `burst` and `narrow` exist to hit the rate and
/// concurrency quotas.
fn config() -> String {
    let misbehave = artifact("target/wasm32-wasip2/guest/misbehave.wasm").display().to_string();
    let secret = artifact("build/models/tokenwise.pt").display().to_string();
    let extra = format!(
        r#"
[[model]]
name = "secret"
path = "{secret}"
inputs = [
    {{ name = "ids", dtype = "INT64", shape = [-1, -1] }},
    {{ name = "mask", dtype = "INT64", shape = [-1, -1] }},
]
outputs = [{{ name = "hidden" }}, {{ name = "pooled" }}]

[[tenant]]
name = "good"
models = ["digits", "secret"]
quota = {{ requests_per_second = 1000000 }}

[[tenant]]
name = "burst"
models = ["digits"]
quota = {{ requests_per_second = 2, burst = 5 }}

[[tenant]]
name = "narrow"
models = ["digits"]
quota = {{ max_concurrent = 2 }}

[[handler]]
name = "good-digits"
tenant = "good"
component = "{digits}"

[[handler]]
name = "burst"
tenant = "burst"
component = "{misbehave}"

[[handler]]
name = "narrow"
tenant = "narrow"
component = "{misbehave}"
"#,
        digits = artifact("target/wasm32-wasip2/guest/digits.wasm").display(),
    );
    // mallory's limits are tightened here over the shared test config's.
    examples_config("", &[], &extra).replace(
        "quota = { requests_per_second = 1000000, max_concurrent = 1024, memory_limit_mib = 32, deadline_ms = 1000 }",
        "quota = { requests_per_second = 1000000, max_concurrent = 1024, memory_limit_mib = 32, deadline_ms = 500, \
         max_compute_calls = 16, max_compute_bytes = 1048576, max_response_bytes = 1048576 }",
    )
}

const QUIET: u8 = 0;
const ATTACK: u8 = 1;
/// The infinite loop, measured on its own (see the assertion at the end).
const LOOP: u8 = 2;

/// Steady traffic from `good`: a digit image posted every 5 ms (about 200 requests per second,
/// well below what the server can do, as a real tenant's traffic would be).
/// Each sample records whether an attack was under way when it started or ended.
struct Traffic {
    stop: Arc<AtomicBool>,
    /// What is under way now: [`QUIET`], [`ATTACK`] or [`LOOP`].
    phase: Arc<AtomicU8>,
    workers: Vec<tokio::task::JoinHandle<Vec<Sample>>>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    status: u16,
    latency: Duration,
    /// The most disruptive phase seen when the request started or ended.
    phase: u8,
}

impl Traffic {
    fn start(server: &Server) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicU8::new(QUIET));
        let png = std::fs::read(artifact("build/holdout/digits/0000_9.png")).expect("png");
        let workers = (0..1)
            .map(|_| {
                let (stop, phase, png) = (Arc::clone(&stop), Arc::clone(&phase), png.clone());
                let client = server.client("good");
                let url = server.url("/v1/handlers/good-digits/");
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut tick = tokio::time::interval(Duration::from_millis(5));
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let at_start = phase.load(Ordering::SeqCst);
                        let started = Instant::now();
                        let status = match client.post(&url).body(png.clone()).send().await {
                            Ok(r) => {
                                let status = r.status().as_u16();
                                let _ = r.bytes().await;
                                status
                            }
                            Err(_) => 0,
                        };
                        seen.push(Sample {
                            status,
                            latency: started.elapsed(),
                            phase: at_start.max(phase.load(Ordering::SeqCst)),
                        });
                    }
                    seen
                })
            })
            .collect();
        Traffic {
            stop,
            phase,
            workers,
        }
    }

    fn phase(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for w in self.workers {
            all.extend(w.await.expect("traffic worker"));
        }
        all
    }
}

fn p99<'a>(samples: impl Iterator<Item = &'a Sample>) -> Duration {
    let mut latencies: Vec<Duration> = samples.map(|s| s.latency).collect();
    latencies.sort();
    latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)]
}

struct Attack<'a> {
    server: &'a Server,
    client: reqwest::Client,
}

impl Attack<'_> {
    async fn get(&self, path: &str) -> (u16, Value, String) {
        let response = self
            .client
            .get(self.server.url(&format!("/v1/handlers/misbehave{path}")))
            .send()
            .await
            .expect("attack request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, value, text)
    }

    /// Waits for a server log line that contains every needle.
    async fn logged(&self, what: &str, needles: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.server.log_text();
            if log.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: no log line with {needles:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Every attack once, each checked for its status, its answer and its log line.
async fn attack_round(attack: &Attack<'_>, traffic: &Traffic) {
    // Infinite loop: stopped at the deadline.
    traffic.phase(LOOP);
    let (status, body, _) = attack.get("/loop").await;
    traffic.phase(ATTACK);
    assert_eq!((status, body["error"].as_str()), (504, Some("handler 'misbehave' exceeded its deadline of 500 ms")));
    attack.logged("loop", &["handler=misbehave", "tenant=mallory", "deadline"]).await;

    // Memory bomb: trapped at the limit.
    let (status, body, _) = attack.get("/memory").await;
    assert_eq!((status, body["error"].as_str()), (500, Some("handler 'misbehave' exceeded its memory limit of 32 MiB")));
    attack.logged("memory", &["tenant=mallory", "memory limit"]).await;

    // Unbounded recursion: a stack overflow trap.
    let (status, body, _) = attack.get("/recurse").await;
    assert_eq!((status, body["error"].as_str()), (500, Some("handler 'misbehave' trapped: stack overflow")));
    attack.logged("recurse", &["tenant=mallory", "stack overflow"]).await;

    // No environment, no outgoing HTTP.
    let (status, body, _) = attack.get("/env").await;
    assert_eq!((status, body), (200, serde_json::json!([])));
    let (status, _, text) = attack.get("/outgoing").await;
    assert_eq!(status, 200);
    assert!(text.starts_with("denied: ") && text.contains("HttpRequestDenied"), "{text}");
    attack.logged("outgoing", &["handler=misbehave", "tenant=mallory", "outgoing HTTP request denied"]).await;

    // Files and sockets: a component that imports them is refused at deploy, naming them.
    let forbidden = std::fs::read(artifact("target/wasm32-wasip2/guest/forbidden.wasm")).expect("forbidden");
    for (bytes, needles) in [
        (forbidden, vec!["wasi:filesystem/preopens", "wasi:sockets/tcp"]),
        (b"\0asm\x0d\0\x01\0garbage".to_vec(), vec!["not a valid WebAssembly component"]),
    ] {
        let response = attack.server
            .admin_client()
            .put(attack.server.admin_url("/v1/handlers/evil?tenant=mallory"))
            .body(bytes)
            .send()
            .await
            .expect("deploy");
        assert_eq!(response.status().as_u16(), 400);
        let error: Value = response.json().await.expect("json");
        let error = error["error"].as_str().unwrap_or_default();
        assert!(needles.iter().all(|n| error.contains(n)), "{error}");
    }
    attack.logged("deploy", &["kiln::audit", "deploy_refused", "tenant=mallory", "handler=evil", "wasi:sockets/tcp"]).await;

    // wasi:nn: raw bytes are a security error; another tenant's model is simply not there, and
    // path-like names are refused by their form before any lookup.
    let (_, body, _) = attack.get("/nn/load-bytes").await;
    assert_eq!(body["code"], "Security", "{body}");
    for name in ["secret", "secret@1", "digits@7"] {
        let (_, body, _) = attack.get(&format!("/nn/load?{name}")).await;
        assert_eq!(body["code"], "NotFound", "{name}: {body}");
        assert_eq!(body["message"], format!("model '{name}' not found"), "{name}");
    }
    for name in ["../secret", "/etc/passwd", "a/../../b", "digits/../secret", "..", "digits@", "digits@x", "digits@0"] {
        let (_, body, _) = attack.get(&format!("/nn/load?{name}")).await;
        assert_eq!(body["code"], "InvalidArgument", "{name}: {body}");
        assert!(body["message"].as_str().unwrap_or_default().contains("is not a model name"), "{name}: {body}");
    }
    attack.logged("nn", &["tenant=mallory", "wasi:nn refused", "model 'secret' not found"]).await;

    // Tensors over the byte limit: too-large, and the 1 TiB one is never allocated.
    let before = rss_kib(attack.server.pid().expect("pid"));
    let (_, body, _) = attack.get("/nn/big-tensor?2000000").await;
    assert_eq!(body["code"], "TooLarge", "{body}");
    assert_eq!(body["message"], "tensor 'image' needs 2000000 bytes, over the limit of 1048576 bytes per compute");
    let (_, body, _) = attack.get("/nn/huge-dims").await;
    assert_eq!(body["code"], "TooLarge", "{body}");
    assert_eq!(body["message"], "tensor 'image' needs 1099511627776 bytes, over the limit of 1048576 bytes per compute");
    attack.logged("tensor", &["tenant=mallory", "over the limit of 1048576 bytes"]).await;

    // 10,000 computes in one request: stopped at the limit.
    let (status, body, _) = attack.get("/compute-flood").await;
    assert_eq!((status, body["error"].as_str()), (500, Some("handler 'misbehave' exceeded its limit of 16 compute calls per request")));
    attack.logged("compute-flood", &["tenant=mallory", "16 compute calls"]).await;

    // A 1 GiB response body: cut off at 1 MiB, and the server's memory stays put.
    let response = attack
        .client
        .get(attack.server.url("/v1/handlers/misbehave/big-response"))
        .send()
        .await
        .expect("big response");
    let (received, cut) = kiln_tests::read_until_cut(response).await;
    assert!(cut, "the body must end in an error, not look complete ({received} bytes)");
    assert!(received <= 1 << 20, "received {received} bytes past the 1 MiB limit");
    attack.logged("big-response", &["tenant=mallory", "cut off at its limit of 1048576 bytes"]).await;
    let grown = rss_kib(attack.server.pid().expect("pid")).saturating_sub(before);
    assert!(grown < 64 * 1024, "server memory grew by {grown} KiB during the tensor and response attacks");

    // A panic: 500.
    let (status, body, _) = attack.get("/panic").await;
    assert_eq!((status, body["error"].as_str()), (500, Some("handler 'misbehave' trapped: unreachable instruction (a guest panic)")));

}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attack_is_contained_while_the_other_tenant_is_served() {
    let server = Server::start(&config(), &["good", "mallory", "burst", "narrow"]).expect("server");
    let attack = Attack {
        server: &server,
        client: server.client("mallory"),
    };
    // Warm both paths.
    for _ in 0..20 {
        assert_eq!(attack.get("/echo").await.0, 200);
    }
    let warm = Traffic::start(&server);
    tokio::time::sleep(Duration::from_secs(1)).await;
    warm.finish().await;

    // good's traffic runs throughout. Quiet stretches (the baseline) alternate with rounds of
    // attacks, so both are sampled under the same conditions of this shared machine. A round of
    // attacks lasts only tens of milliseconds (less as the server gets faster), so passes of five
    // rounds go on until there are enough samples for stable p99s: four at least, ten at most.
    let mut passes: Vec<Vec<Sample>> = Vec::new();
    let during = |passes: &[Vec<Sample>], phase: u8| passes.iter().flatten().filter(|s| s.phase == phase).count();
    while passes.len() < 4 || (passes.len() < 10 && (during(&passes, ATTACK) < 150 || during(&passes, LOOP) < 1000)) {
        passes.push(measure_pass(&server, &attack).await);
    }

    // Over the rate quota (2/s, burst 5) → 429 with Retry-After.
    let burst = server.client("burst");
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let r = burst.post(server.url("/v1/handlers/burst/echo")).body("x").send().await.expect("burst");
        statuses.push((r.status().as_u16(), r.headers().get("retry-after").cloned()));
    }
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    let refused: Vec<_> = statuses.iter().filter(|(s, _)| *s == 429).collect();
    assert!((5..=7).contains(&ok), "burst of 5 at 2/s: {statuses:?}");
    assert_eq!(ok + refused.len(), statuses.len(), "{statuses:?}");
    assert!(refused.iter().all(|(_, retry)| retry.as_ref().is_some_and(|v| v == "1")), "{statuses:?}");

    // Over the concurrency quota (2 in flight) → 429 while two sleep.
    let narrow = server.client("narrow");
    let sleeper = |client: reqwest::Client, url: String| async move {
        client.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
    };
    let url = server.url("/v1/handlers/narrow/sleep?400");
    let holders: Vec<_> = (0..2).map(|_| tokio::spawn(sleeper(narrow.clone(), url.clone()))).collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (status, body) = {
        let r = narrow.get(url.clone()).send().await.expect("third");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    };
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("already has 2 requests in flight"), "{body}");
    for h in holders {
        assert_eq!(h.await.expect("holder"), 200);
    }
    assert_eq!(sleeper(narrow, server.url("/v1/handlers/narrow/sleep?1")).await, 200, "slots come back");
    for tenant in ["burst", "narrow"] {
        let refused = |l: &str| l.contains("quota_refused") && l.contains(&format!("\"tenant\":\"{tenant}\""));
        let audit = server.audit_log_with(refused);
        assert!(audit.lines().any(refused), "{tenant} refusal not audited:\n{audit}");
    }

    // Afterwards both tenants are served.
    assert_eq!(attack.get("/echo").await.0, 200);
    let png = std::fs::read(artifact("build/holdout/digits/0000_9.png")).expect("png");
    let good = server.client("good").post(server.url("/v1/handlers/good-digits/")).body(png).send().await.expect("good");
    assert_eq!(good.status().as_u16(), 200);

    let samples: Vec<Sample> = passes.into_iter().flatten().collect();
    let of = |phase: u8| samples.iter().filter(move |s| s.phase == phase);
    let (quiet, attacked, looped) = (of(QUIET).count(), of(ATTACK).count(), of(LOOP).count());
    assert!(attacked >= 150 && looped >= 1000, "too few samples: {attacked} during attacks, {looped} during loops");
    let baseline = p99(of(QUIET));
    let (during_attacks, during_loops) = (p99(of(ATTACK)), p99(of(LOOP)));
    let ratio = |d: Duration| d.as_secs_f64() / baseline.as_secs_f64();
    eprintln!(
        "good's p99: {baseline:?} quiet ({quiet} requests); {during_attacks:?} during attacks ({attacked}, {:.2}x); \
         {during_loops:?} during infinite loops ({looped}, {:.2}x)",
        ratio(during_attacks),
        ratio(during_loops)
    );
    // The latency itself is a measurement, not a pass/fail check: the project measures speed with
    // benchmarks, never timed tests, and this shared two-core VM varies too much for a hard
    // bound. The figures are recorded in docs/BENCHMARKS.md ("Tenant isolation").
}

/// One pass of five attack rounds, each after a quiet stretch, with good's traffic throughout.
async fn measure_pass(server: &Server, attack: &Attack<'_>) -> Vec<Sample> {
    let traffic = Traffic::start(server);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        traffic.phase(ATTACK);
        attack_round(attack, &traffic).await;
        traffic.phase(QUIET);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let samples = traffic.finish().await;
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.status != 200).collect();
    assert!(failed.is_empty(), "{} of good's {} requests failed: {failed:?}", failed.len(), samples.len());
    samples
}
