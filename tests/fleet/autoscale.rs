//! The autoscaling signal, end to end: Prometheus (Debian's package) scrapes the keyless metrics
//! listener of every replica of a Swarm service, the exact queries of
//! `deploy/kubernetes/components/keda/scaledobject.yaml` are evaluated against it under load,
//! and a loop applying the formula of the HPA that KEDA makes scales the service up under load
//! and back down once the load drops, failing no request either way.
//!
//! Where it differs from a cluster, on purpose: replicas between 1 and 3 (the manifest's 2 to 10
//! do not fit two cores), and the manifest's scale-down behaviour (a 300 s window, one pod a
//! minute) compressed to 10 s and one replica per 10 s, so the test takes minutes, not a quarter
//! of an hour. The queries and thresholds are the manifest's, read from it.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::docker::{Container, daemon_or_skip, docker, image, one_fleet_at_a_time};
use super::swarm::{Cleanup, Fleet, Load, cluster_config, service_tasks_running, wait_replicas, with_embeddings};

const MIN_REPLICAS: u32 = 1;
const MAX_REPLICAS: u32 = 3;
const SCALE_DOWN_WINDOW: Duration = Duration::from_secs(10);
/// How often the loop evaluates the queries (KEDA's pollingInterval, compressed).
const POLL: Duration = Duration::from_secs(2);
/// Callers while the load is on, and while it is light.
const HEAVY: u64 = 32;
const LIGHT: u64 = 1;

/// How a trigger's value becomes a replica count (the HPA's target types).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    /// `Value`: the query's value is compared with the threshold as it is.
    Value,
    /// `AverageValue`: the query's value is a total, compared with the threshold per replica.
    AverageValue,
}

#[derive(Debug, Clone)]
struct Trigger {
    name: String,
    query: String,
    threshold: f64,
    target: Target,
}

/// The HPA's tolerance: a ratio within 10 % of 1 changes nothing.
const TOLERANCE: f64 = 0.1;

/// The replicas the HPA asks for, from `current` and each trigger's value: per trigger,
/// `Value` → ceil(current × value / threshold) and `AverageValue` → ceil(value / threshold),
/// unchanged within the tolerance; the largest over triggers, within [min, max].
fn desired(current: u32, values: &[(Target, f64, f64)], min: u32, max: u32) -> u32 {
    let current_f = f64::from(current.max(1));
    let per_trigger = values.iter().map(|&(target, value, threshold)| {
        let ratio = match target {
            Target::Value => value / threshold,
            Target::AverageValue => value / (threshold * current_f),
        };
        if (ratio - 1.0).abs() <= TOLERANCE {
            f64::from(current)
        } else {
            (ratio * current_f).ceil()
        }
    });
    let wanted = per_trigger.fold(0.0_f64, f64::max);
    // Replica counts are small: the cast is exact.
    (wanted as u32).clamp(min, max)
}

#[test]
fn the_formula_is_the_hpas() {
    use Target::{AverageValue, Value};
    // A total of 20 in flight against 8 per replica: 3 replicas, whatever runs now.
    assert_eq!(desired(1, &[(AverageValue, 20.0, 8.0)], 1, 10), 3);
    assert_eq!(desired(5, &[(AverageValue, 20.0, 8.0)], 1, 10), 3);
    // Twice the wanted queue wait on 2 replicas: 4; within 10 % of it: unchanged.
    assert_eq!(desired(2, &[(Value, 0.1, 0.05)], 1, 10), 4);
    assert_eq!(desired(2, &[(Value, 0.054, 0.05)], 1, 10), 2);
    // The trigger asking for more wins; nothing below the minimum or above the maximum.
    assert_eq!(desired(2, &[(Value, 0.0, 0.05), (AverageValue, 40.0, 8.0)], 1, 10), 5);
    assert_eq!(desired(3, &[(Value, 0.0, 0.05), (AverageValue, 0.0, 8.0)], 1, 10), 1);
    assert_eq!(desired(3, &[(AverageValue, 400.0, 8.0)], 1, 10), 10);
}

/// The ScaledObject's triggers, as the manifest has them.
fn triggers() -> Vec<Trigger> {
    let path = kiln_tests::root().join("deploy/kubernetes/components/keda/scaledobject.yaml");
    let output = Command::new(kiln_tests::python())
        .args(["-c", "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)"])
        .arg(&path)
        .output()
        .expect("python");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let object: Value = serde_json::from_slice(&output.stdout).expect("json");
    object["spec"]["triggers"]
        .as_array()
        .expect("triggers")
        .iter()
        .map(|t| {
            assert_eq!(t["type"], "prometheus", "{t}");
            Trigger {
                name: t["name"].as_str().expect("name").to_owned(),
                query: t["metadata"]["query"].as_str().expect("query").to_owned(),
                threshold: t["metadata"]["threshold"].as_str().and_then(|v| v.parse().ok()).expect("threshold"),
                target: match t["metricType"].as_str() {
                    Some("Value") => Target::Value,
                    Some("AverageValue") | None => Target::AverageValue,
                    Some(other) => panic!("metricType {other}"),
                },
            }
        })
        .collect()
}

/// A query's value now; no sample is 0, as KEDA takes it (`ignoreNullValues`).
async fn evaluate(client: &reqwest::Client, prometheus: &str, query: &str) -> f64 {
    let response: Value = client
        .get(format!("http://{prometheus}/api/v1/query"))
        .query(&[("query", query)])
        .send()
        .await
        .expect("query")
        .json()
        .await
        .expect("json");
    assert_eq!(response["status"], "success", "{query}: {response}");
    let result = &response["data"]["result"];
    match result.as_array().and_then(|r| r.first()) {
        Some(sample) => sample["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{query}: {response}")),
        None => 0.0,
    }
}

fn replicas(service: &str) -> u32 {
    docker(&["service", "inspect", "--format", "{{.Spec.Mode.Replicated.Replicas}}", service]).expect("inspect").trim().parse().expect("replicas")
}

/// The autoscaler: evaluates every trigger each [`POLL`], applies [`desired`] with the
/// scale-down window and at most one replica fewer per window, and scales the service. Stops
/// when `done` says so of the replica count (or panics past `limit`). Returns the largest value
/// each trigger had.
struct Autoscaler<'a> {
    client: reqwest::Client,
    prometheus: String,
    service: &'a str,
    triggers: Vec<Trigger>,
    /// Recent recommendations, for the scale-down window.
    recent: Vec<(Instant, u32)>,
    last_down: Option<Instant>,
}

impl Autoscaler<'_> {
    async fn run_until(&mut self, done: impl Fn(u32) -> bool, limit: Duration) -> Vec<f64> {
        let start = Instant::now();
        let mut highest = vec![0.0_f64; self.triggers.len()];
        loop {
            let current = replicas(self.service);
            let mut values = Vec::new();
            for (i, trigger) in self.triggers.iter().enumerate() {
                let value = evaluate(&self.client, &self.prometheus, &trigger.query).await;
                highest[i] = highest[i].max(value);
                values.push((trigger.target, value, trigger.threshold));
            }
            let recommended = desired(current, &values, MIN_REPLICAS, MAX_REPLICAS);
            let now = Instant::now();
            self.recent.retain(|(at, _)| now.duration_since(*at) < SCALE_DOWN_WINDOW);
            self.recent.push((now, recommended));
            // Down only to the highest recommendation of the window, one replica at a time.
            let mut next = recommended;
            if recommended < current {
                next = self.recent.iter().map(|(_, r)| *r).max().unwrap_or(current).min(current);
                if next < current {
                    if self.last_down.is_some_and(|at| now.duration_since(at) < SCALE_DOWN_WINDOW) {
                        next = current;
                    } else {
                        next = current - 1;
                    }
                }
            }
            let shown: Vec<String> = self.triggers.iter().zip(&values).map(|(t, (_, v, _))| format!("{} {v:.3}", t.name)).collect();
            eprintln!("{:>5.1} s: {} -> recommended {recommended}, replicas {current} -> {next}", start.elapsed().as_secs_f64(), shown.join(", "));
            if next != current {
                docker(&["service", "scale", "--detach", &format!("{}={next}", self.service)]).expect("scale");
                if next < current {
                    self.last_down = Some(now);
                }
            }
            if done(next) && service_tasks_running(self.service) == next as usize {
                return highest;
            }
            assert!(start.elapsed() < limit, "replicas {current}, not done within {limit:?}");
            tokio::time::sleep(POLL).await;
        }
    }
}

#[tokio::test]
async fn the_keda_queries_scale_a_swarm_service_up_under_load_and_back_down() {
    if !daemon_or_skip("fleet::autoscale::the_keda_queries_scale_a_swarm_service_up_under_load_and_back_down") {
        return;
    }
    // Debian's package, unpacked by scripts/setup.sh.
    let prometheus_bin = kiln_tests::artifact("build/tools/prometheus/usr/bin/prometheus");
    let _fleet = one_fleet_at_a_time().await;
    let triggers = triggers();
    assert!(triggers.iter().any(|t| t.target == Target::AverageValue) && triggers.iter().any(|t| t.target == Target::Value), "{triggers:?}");
    let mut cleanup = Cleanup::default();
    // The replicas' config with MiniLM and the embeddings handler beside digits: a load the
    // model bounds, as a fleet that needs more replicas has.
    let fleet = Fleet::start(&mut cleanup, MIN_REPLICAS, &with_embeddings(&cluster_config()));

    // Prometheus on the service's network, finding the replicas as nginx does (tasks.SERVICE),
    // under the job name the queries select. It runs from Debian's binary (it needs only libc)
    // in kiln's image, whose base is the same Debian.
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: kiln\n    dns_sd_configs:\n      - names: [tasks.{}]\n        type: A\n        port: 9090\n        refresh_interval: 1s\n",
        fleet.service
    );
    std::fs::write(fleet.dir.path.join("prometheus.yml"), config).expect("prometheus.yml");
    let prometheus = Container::run(&[
        "--network", &fleet.network, "--read-only", "--tmpfs", "/prometheus:uid=10001",
        "-v", &format!("{}:/usr/local/bin/prometheus:ro", prometheus_bin.display()),
        "-v", &format!("{}:/etc/prometheus.yml:ro", fleet.dir.path.join("prometheus.yml").display()),
        "-p", "127.0.0.1::9090", "--entrypoint", "/usr/local/bin/prometheus", image(),
        "--config.file=/etc/prometheus.yml", "--storage.tsdb.path=/prometheus", "--web.listen-address=0.0.0.0:9090",
    ])
    .expect("prometheus");
    let prometheus_addr = prometheus.published(9090).expect("port");

    let url = format!("{}/v1/handlers/embeddings/", fleet.lb);
    let sentence = br#"{"sentences": ["A man is eating a piece of bread."]}"#.to_vec();
    let heavy = Load::start(url.clone(), fleet.key.clone(), sentence.clone(), HEAVY);
    wait_replicas(&heavy, 1, Duration::from_secs(180)).await;
    heavy.take();
    // Prometheus sees the replica before the loop starts.
    let client = reqwest::Client::new();
    let seen = Instant::now();
    while evaluate(&client, &prometheus_addr, "count(up{job=\"kiln\"} == 1)").await < 1.0 {
        assert!(seen.elapsed() < Duration::from_secs(60), "Prometheus scraped no replica; its log:\n{}", prometheus.logs());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let mut autoscaler = Autoscaler { client, prometheus: prometheus_addr, service: &fleet.service, triggers: triggers.clone(), recent: Vec::new(), last_down: None };
    let up = Instant::now();
    let highest = autoscaler.run_until(|n| n == MAX_REPLICAS, Duration::from_secs(240)).await;
    heavy.take_replicas();
    let answering = wait_replicas(&heavy, MAX_REPLICAS as usize, Duration::from_secs(120)).await;
    // What each replica costs under this load, for docs/DEPLOY.md's sizing.
    let usage = docker(&["stats", "--no-stream", "--format", "{{.Name}}: CPU {{.CPUPerc}}, memory {{.MemUsage}}"]).unwrap_or_default();
    for line in usage.lines().filter(|l| l.starts_with(&fleet.service)) {
        eprintln!("under load: {line}");
    }
    let (ok, failed, failures) = heavy.take();
    eprintln!("scaled up to {MAX_REPLICAS} in {:.0} s under {HEAVY} callers: {ok} answered, {failed} failed; highest values {highest:?}", up.elapsed().as_secs_f64());
    assert_eq!(failed, 0, "{failures:?}");
    // The signal that moved it: some trigger rose past what MAX_REPLICAS - 1 replicas carry.
    let moved = triggers.iter().zip(&highest).any(|(t, v)| match t.target {
        Target::AverageValue => *v > t.threshold * f64::from(MAX_REPLICAS - 1),
        Target::Value => *v > t.threshold,
    });
    assert!(moved, "no trigger rose enough: {highest:?} for {triggers:?}");
    assert_eq!(answering.len(), MAX_REPLICAS as usize, "{answering:?}");
    heavy.stop().await;

    // The load drops to one caller: back down to one replica, one at a time, none failing.
    let light = Load::start(url, fleet.key.clone(), sentence, LIGHT);
    let down = Instant::now();
    autoscaler.run_until(|n| n == MIN_REPLICAS, Duration::from_secs(300)).await;
    // The replicas that left drained: let what they had finish before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ok, failed, failures) = light.take();
    eprintln!("scaled down to {MIN_REPLICAS} in {:.0} s under {LIGHT} caller: {ok} answered, {failed} failed", down.elapsed().as_secs_f64());
    assert!(ok > 0);
    assert_eq!(failed, 0, "{failures:?}");
    light.stop().await;
}
