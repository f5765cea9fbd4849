//! Three replicas of the image as a single-node Docker Swarm service, in cluster mode, behind the
//! nginx load balancer of `deploy/docker` (this machine's Docker has no IPVS, so the Swarm routing
//! mesh cannot publish: the service runs in `--endpoint-mode dnsrr` and nginx spreads over
//! `tasks.SERVICE`). Under steady load: every replica answers; a start-first rolling update
//! loses no request; killing a replica's container fails at most the requests in flight on it
//! and the service heals; an image that cannot start is rolled back without a failed request.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::docker::{Container, balancer_image, daemon_or_skip, docker, docker_status, image, one_fleet_at_a_time, unique};
use kiln_tests::{TempDir, artifact, kiln};

const CONCURRENCY: u64 = 4;

/// Docker objects made by the test, removed in reverse order on drop (and the swarm left, if the
/// test made it).
#[derive(Default)]
pub(super) struct Cleanup {
    commands: Vec<Vec<String>>,
}

impl Cleanup {
    fn later(&mut self, args: &[&str]) {
        self.commands.push(args.iter().map(|s| (*s).to_owned()).collect());
    }

    /// After everything else (an object made after the service that uses it).
    fn last(&mut self, args: &[&str]) {
        self.commands.insert(0, args.iter().map(|s| (*s).to_owned()).collect());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for command in self.commands.iter().rev() {
            let args: Vec<&str> = command.iter().map(String::as_str).collect();
            let _ = docker_status(&args);
            // A service's containers drain before they go: wait, so that its volumes can go too.
            if let ["service", "rm", service] = args[..] {
                let start = Instant::now();
                let filter = format!("label=com.docker.swarm.service.name={service}");
                while docker(&["ps", "-aq", "--filter", &filter]).is_ok_and(|out| !out.trim().is_empty()) && start.elapsed() < Duration::from_secs(90) {
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }
}

/// Steady load on the load balancer: a number of callers, a new connection per request (as
/// `hey -disable-keepalive`: the balancer, not the client, picks the replica), counting answers.
pub(super) struct Load {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    prefixes: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub(super) fn start(url: String, key: String, body: Vec<u8>, callers: u64) -> Load {
        let load = Load {
            ok: Arc::default(),
            failed: Arc::default(),
            failures: Arc::default(),
            prefixes: Arc::default(),
            stop: Arc::default(),
            tasks: Vec::new(),
        };
        let client = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(30)).build().expect("client");
        let tasks = (0..callers)
            .map(|_| {
                let (client, url, key, body) = (client.clone(), url.clone(), key.clone(), body.clone());
                let (ok, failed, failures, prefixes, stop) = (
                    Arc::clone(&load.ok),
                    Arc::clone(&load.failed),
                    Arc::clone(&load.failures),
                    Arc::clone(&load.prefixes),
                    Arc::clone(&load.stop),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        match client.post(&url).bearer_auth(&key).body(body.clone()).send().await {
                            Ok(r) if r.status() == 200 => {
                                let id = r.headers().get("kiln-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default();
                                let prefix = id.rsplit_once('-').map_or("", |(p, _)| p).to_owned();
                                *prefixes.lock().expect("lock").entry(prefix).or_default() += 1;
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            other => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                let what = match other {
                                    Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
                                    Err(e) => format!("{e:?}"),
                                };
                                failures.lock().expect("lock").push(what);
                            }
                        }
                    }
                })
            })
            .collect();
        Load { tasks, ..load }
    }

    /// Answers and failures (with what they were) since the last call.
    pub(super) fn take(&self) -> (u64, u64, Vec<String>) {
        let failures = std::mem::take(&mut *self.failures.lock().expect("lock"));
        (self.ok.swap(0, Ordering::SeqCst), self.failed.swap(0, Ordering::SeqCst), failures)
    }

    /// The replicas that answered since the last call.
    pub(super) fn take_replicas(&self) -> Vec<String> {
        std::mem::take(&mut *self.prefixes.lock().expect("lock")).into_keys().collect()
    }

    pub(super) async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Waits until `count` replicas answer through the balancer (by their request ids' prefixes).
pub(super) async fn wait_replicas(load: &Load, count: usize, limit: Duration) -> Vec<String> {
    let start = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        seen.extend(load.take_replicas());
        if seen.len() >= count {
            return seen.into_iter().collect();
        }
        assert!(start.elapsed() < limit, "only {seen:?} answered within {limit:?}");
    }
}

pub(super) fn service_tasks_running(service: &str) -> usize {
    let out = docker(&["service", "ps", service, "--filter", "desired-state=running", "--format", "{{.CurrentState}}"]).unwrap_or_default();
    out.lines().filter(|l| l.starts_with("Running")).count()
}

/// MiniLM and the embeddings handler as `deploy/docker/kiln.toml` serves them, one model
/// replica each.
const EMBEDDINGS: &str = r#"
[[model]]
name = "minilm"
path = "/usr/share/kiln/examples/models/minilm.pt"
device = "cpu"
inputs = [
    { name = "input_ids", dtype = "INT64", shape = [-1, -1], ragged_dim = 1, pad = 0, min = 0, max = 30521, max_dims = [-1, 512] },
    { name = "attention_mask", dtype = "INT64", shape = [-1, -1], ragged_dim = 1, pad = 0, min = 0, max = 1, max_dims = [-1, 512] },
]
outputs = [{ name = "last_hidden_state", ragged_dim = 1 }]
batching = { max_batch_size = 64 }
threads = 1

[[handler]]
name = "embeddings"
tenant = "demo"
component = "/usr/share/kiln/examples/handlers/embeddings.wasm"
models = ["minilm"]
"#;

/// `config` with MiniLM and the embeddings handler beside digits, for tenant demo.
pub(super) fn with_embeddings(config: &str) -> String {
    let with = config.replacen("models = [\"digits\"]\nquota", "models = [\"digits\", \"minilm\"]\nquota", 1) + EMBEDDINGS;
    assert!(with.contains("\"minilm\"]\nquota"), "the tenant's models line moved: {config}");
    with
}

/// `deploy/docker/cluster.toml`, the replicas' config.
pub(super) fn cluster_config() -> String {
    std::fs::read_to_string(kiln_tests::root().join("deploy/docker/cluster.toml")).expect("cluster.toml")
}

/// A Swarm service of the image in cluster mode, from `config` (a Swarm config; paths as the
/// image has them) and key hashes kiln made (a Swarm secret), on its own overlay network, behind
/// the nginx balancer published on loopback. Its Docker objects go with `cleanup`.
pub(super) struct Fleet {
    pub(super) service: String,
    pub(super) network: String,
    /// The balancer, `http://127.0.0.1:PORT`.
    pub(super) lb: String,
    /// The digits handler, through the balancer.
    pub(super) lb_url: String,
    /// Tenant demo's key.
    pub(super) key: String,
    pub(super) dir: TempDir,
    /// When `service create` ran.
    pub(super) started: Instant,
    _balancer: Container,
}

impl Fleet {
    /// Creates the service with `replicas` replicas (state volumes for up to 3 slots) and its
    /// balancer; returns without waiting for the replicas.
    pub(super) fn start(cleanup: &mut Cleanup, replicas: u32, config: &str) -> Fleet {
        let (image, balancer_image) = (image(), balancer_image());
        let state = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]).expect("swarm state");
        if state.trim() != "active" {
            docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]).expect("swarm init");
            cleanup.later(&["swarm", "leave", "--force"]);
        }

        // The tenant's key hashes, made by kiln itself, as a Swarm secret; the config as a Swarm config.
        let dir = TempDir::new("kiln-swarm").expect("dir");
        let service = unique("svc");
        let local = config
            .replace("/usr/share/kiln/examples/models/", &format!("{}/", artifact("build/models").display()))
            .replace("/usr/share/kiln/examples/handlers/", &format!("{}/", artifact("target/wasm32-wasip2/guest").display()))
            .replace("/run/secrets/kiln-keys", &dir.path.join("keys").display().to_string())
            .replace("/var/lib/kiln", &dir.path.join("state").display().to_string());
        std::fs::write(dir.path.join("local.toml"), local).expect("local config");
        std::fs::write(dir.path.join("kiln.toml"), config).expect("config");
        let key = kiln(&["tenant", "add-key", "demo", "--config", &dir.path.join("local.toml").display().to_string()]).expect("key");
        let (secret, kiln_config, network) = (format!("{service}-keys"), format!("{service}-config"), format!("{service}-net"));
        docker(&["secret", "create", &secret, &dir.path.join("keys/tenant-keys/demo.keys").display().to_string()]).expect("secret");
        cleanup.later(&["secret", "rm", &secret]);
        docker(&["config", "create", &kiln_config, &dir.path.join("kiln.toml").display().to_string()]).expect("config");
        cleanup.later(&["config", "rm", &kiln_config]);
        let nginx = std::fs::read_to_string(kiln_tests::root().join("deploy/docker/nginx.conf")).expect("nginx.conf").replace("tasks.kiln;", &format!("tasks.{service};"));
        std::fs::write(dir.path.join("nginx.conf"), nginx).expect("nginx.conf");
        docker(&["network", "create", "--driver", "overlay", "--attachable", &network]).expect("network");
        cleanup.later(&["network", "rm", &network]);

        let volume = format!("type=volume,source={service}-state-{{{{.Task.Slot}}}},destination=/var/lib/kiln");
        for slot in 1..=3 {
            cleanup.later(&["volume", "rm", "--force", &format!("{service}-state-{slot}")]);
        }
        let started = Instant::now();
        docker(&[
            "service", "create", "--detach", "--no-resolve-image", "--name", &service, "--replicas", &replicas.to_string(), "--endpoint-mode", "dnsrr", "--network", &network,
            "--read-only", "--mount", &volume,
            "--config", &format!("source={kiln_config},target=/etc/kiln/kiln.toml,mode=0444"),
            "--secret", &format!("source={secret},target=/run/secrets/kiln-keys/tenant-keys/demo.keys,uid=10001,mode=0400"),
            "--env", "KILN_CONFIG=/etc/kiln/kiln.toml",
            "--update-order", "start-first", "--update-parallelism", "1", "--update-failure-action", "rollback",
            "--update-monitor", "10s", "--rollback-order", "start-first", "--stop-grace-period", "35s",
            image,
        ])
        .expect("service create");
        cleanup.later(&["service", "rm", &service]);
        // The balancer, on the service's network, published on loopback only.
        let nginx_conf = format!("{}:/etc/kiln-lb/nginx.conf:ro", dir.path.join("nginx.conf").display());
        let balancer = Container::run(&[
            "--network", &network, "--read-only", "--tmpfs", "/tmp:uid=10001", "-v", &nginx_conf, "-p", "127.0.0.1::8080", balancer_image,
        ])
        .expect("balancer");
        let lb = format!("http://{}", balancer.published(8080).expect("port"));
        let lb_url = format!("{lb}/v1/handlers/digits/");
        Fleet { service, network, lb, lb_url, key: key.trim().to_owned(), dir, started, _balancer: balancer }
    }
}

#[tokio::test]
async fn three_replicas_roll_heal_and_roll_back_under_load_without_losing_requests() {
    if !daemon_or_skip("fleet::swarm::three_replicas_roll_heal_and_roll_back_under_load") {
        return;
    }
    let _fleet = one_fleet_at_a_time().await;
    let image = image();
    let mut cleanup = Cleanup::default();
    let fleet = Fleet::start(&mut cleanup, 3, &cluster_config());
    let (service, started) = (fleet.service.clone(), fleet.started);
    let png = kiln_tests::a_digit();

    // Every replica answers.
    let load = Load::start(fleet.lb_url.clone(), fleet.key.clone(), png, CONCURRENCY);
    let first = wait_replicas(&load, 3, Duration::from_secs(240)).await;
    eprintln!("3 replicas answering {:.0} s after service create: {first:?}", started.elapsed().as_secs_f64());
    // Before every replica listened, the balancer had nowhere to send some: count from here.
    load.take();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ok, failed, failures) = load.take();
    assert!(ok > 0, "no answers under steady load");
    eprintln!("steady: {ok} answered, {failed} failed {failures:?}");
    assert_eq!(failed, 0, "{failures:?}");

    // A new release of the handlers (a new config: the embeddings handler and its model beside
    // digits), rolled start-first one replica at a time as docs/DEPLOY.md says, loses no request.
    let release = format!("{service}-config-2");
    std::fs::write(fleet.dir.path.join("release.toml"), with_embeddings(&cluster_config())).expect("release");
    docker(&["config", "create", &release, &fleet.dir.path.join("release.toml").display().to_string()]).expect("config");
    cleanup.last(&["config", "rm", &release]);
    let rolled = Instant::now();
    docker(&[
        "service", "update", "--detach=false", "--config-rm", &format!("{service}-config"),
        "--config-add", &format!("source={release},target=/etc/kiln/kiln.toml,mode=0444"), &service,
    ])
    .expect("rolling update");
    // The old replicas may still finish what they had; then only the new ones answer.
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.take_replicas();
    let after = wait_replicas(&load, 3, Duration::from_secs(120)).await;
    let (ok, failed, failures) = load.take();
    eprintln!("rolling update in {:.0} s: {ok} answered, {failed} failed {failures:?}; replicas now {after:?}", rolled.elapsed().as_secs_f64());
    assert_eq!(failed, 0, "{failures:?}");
    assert!(after.iter().all(|r| !first.contains(r)), "every replica is new: {first:?} -> {after:?}");
    // Every replica serves the new handler.
    let embeddings = Load::start(format!("{}/v1/handlers/embeddings/", fleet.lb), fleet.key.clone(), br#"{"sentences": ["A new release."]}"#.to_vec(), 1);
    let serving = wait_replicas(&embeddings, 3, Duration::from_secs(60)).await;
    let (_, failed, failures) = embeddings.take();
    embeddings.stop().await;
    assert_eq!(failed, 0, "the new handler failed: {failures:?}");
    assert!(serving.iter().all(|r| after.contains(r)), "{serving:?} are not the new replicas {after:?}");

    // Killing a replica's container fails at most the requests in flight on it; the service heals.
    let victim = docker(&["ps", "-q", "--filter", &format!("label=com.docker.swarm.service.name={service}")]).expect("ps");
    let victim = victim.lines().next().expect("a container").to_owned();
    docker(&["kill", &victim]).expect("kill");
    let killed = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if service_tasks_running(&service) == 3 && killed.elapsed() > Duration::from_secs(3) {
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(180), "the service did not heal");
    }
    load.take_replicas();
    let healed = wait_replicas(&load, 3, Duration::from_secs(120)).await;
    let (ok, failed, failures) = load.take();
    eprintln!("killed one: healed in {:.0} s, {ok} answered, {failed} failed {failures:?}; replicas {healed:?}", killed.elapsed().as_secs_f64());
    assert!(failed <= CONCURRENCY, "{failed} failed, more than the {CONCURRENCY} that can be in flight: {failures:?}");

    // An image that cannot start is rolled back, and no request fails meanwhile.
    let broken = format!("kiln:{service}-broken");
    let dockerfile = fleet.dir.path.join("broken");
    std::fs::create_dir_all(&dockerfile).expect("dir");
    // A release whose replicas cannot start: its entry point names a config that is not there.
    std::fs::write(
        dockerfile.join("Dockerfile"),
        format!("FROM {image}\nENTRYPOINT [\"kiln\", \"serve\", \"--config\", \"/no/such/kiln.toml\"]\nCMD []\n"),
    )
    .expect("Dockerfile");
    let built = Command::new("docker").args(["build", "--quiet", "--tag", &broken, &dockerfile.display().to_string()]).env("DOCKER_BUILDKIT", "0").output().expect("build");
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    cleanup.later(&["image", "rm", "--force", &broken]);
    let bad = Instant::now();
    // The image is local: without --no-resolve-image the CLI first asks a registry for its
    // digest, which on a machine without one can take minutes before the update even starts.
    let (code, out, err) = docker_status(&["service", "update", "--detach=false", "--no-resolve-image", "--image", &broken, &service]).expect("docker");
    let update = format!("`service update --image {broken}` exited {code} after {:.0} s: {}{}", bad.elapsed().as_secs_f64(), out.trim(), err.trim());
    let waiting = Instant::now();
    loop {
        let state = docker(&["service", "inspect", "--format", "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}", &service]).unwrap_or_default();
        if state.trim() == "rollback_completed" {
            break;
        }
        if waiting.elapsed() > Duration::from_secs(240) {
            let tasks = docker(&["service", "ps", "--no-trunc", &service]).unwrap_or_else(|e| e.to_string());
            panic!("not rolled back: '{}'\n{update}\n{tasks}", state.trim());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let image_now = docker(&["service", "inspect", "--format", "{{.Spec.TaskTemplate.ContainerSpec.Image}}", &service]).expect("inspect");
    assert!(image_now.trim().starts_with(image), "{image_now}");
    load.take_replicas();
    wait_replicas(&load, 3, Duration::from_secs(120)).await;
    let (ok, failed, failures) = load.take();
    eprintln!("bad image rolled back in {:.0} s: {ok} answered, {failed} failed {failures:?}", bad.elapsed().as_secs_f64());
    assert_eq!(failed, 0, "{failures:?}");
    load.stop().await;
}

#[tokio::test]
async fn the_compose_file_runs_three_replicas_behind_the_balancer() {
    if !daemon_or_skip("fleet::swarm::the_compose_file_runs_three_replicas_behind_the_balancer") {
        return;
    }
    let _fleet = one_fleet_at_a_time().await;
    let image = image();
    balancer_image(); // compose.yaml names it
    assert_eq!(image, "kiln:cpu", "compose.yaml runs kiln:cpu");
    // The compose folder as a user has it: the file, the config, nginx's, and the key hashes.
    let dir = TempDir::new("kiln-compose").expect("dir");
    for file in ["compose.yaml", "cluster.toml", "nginx.conf"] {
        std::fs::copy(kiln_tests::root().join("deploy/docker").join(file), dir.path.join(file)).expect("copy");
    }
    let local = TempDir::new("kiln-compose-local").expect("dir");
    let local_config = local.path.join("kiln.toml");
    std::fs::write(&local_config, format!("[server]\nstate_dir = \"{}\"\nkeys_dir = \"{}\"\n\n[[tenant]]\nname = \"demo\"\n", local.path.join("state").display(), dir.path.join("keys").display())).expect("config");
    let key = kiln(&["tenant", "add-key", "demo", "--config", &local_config.display().to_string()]).expect("key");
    // The replicas run as uid 10001: the mounted hashes must be readable by it.
    let _ = Command::new("chmod").args(["-R", "a+rX"]).arg(dir.path.join("keys")).status();
    let port = kiln_tests::free_port().expect("port").to_string();
    let project = unique("compose");
    let compose = |args: &[&str]| {
        Command::new("docker-compose")
            .args(["-p", &project, "-f", &dir.path.join("compose.yaml").display().to_string()])
            .args(args)
            .env("KILN_PORT", &port)
            .output()
            .expect("docker-compose")
    };
    let up = compose(&["up", "-d"]);
    struct Down<F: Fn(&[&str]) -> std::process::Output>(F);
    impl<F: Fn(&[&str]) -> std::process::Output> Drop for Down<F> {
        fn drop(&mut self) {
            let _ = (self.0)(&["down", "-v", "--timeout", "40"]);
        }
    }
    let _down = Down(compose);
    assert!(up.status.success(), "docker-compose up: {}", String::from_utf8_lossy(&up.stderr));
    let png = kiln_tests::a_digit();
    let load = Load::start(format!("http://127.0.0.1:{port}/v1/handlers/digits/"), key.trim().to_owned(), png, CONCURRENCY);
    let replicas = wait_replicas(&load, 3, Duration::from_secs(180)).await;
    load.take();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, failed, failures) = load.take();
    load.stop().await;
    eprintln!("compose: {replicas:?}, {ok} answered, {failed} failed");
    assert!(ok > 0 && failed == 0, "{failures:?}");
}
