//! `kiln-top` in a real terminal (tmux): a server under `kiln bench` load with a model the
//! scaler grows, the dashboard started against it, and the screen read back: the model's queue,
//! a non-zero request rate and a scaling decision; then the model keys (`p` pauses and resumes,
//! `f` `y` flushes, `+`/`-` scale), checked through the admin API; then Space, `?` and `q`. And
//! two replicas of a fleet watched at once: a row each, one killed and shown as gone. And a
//! server over TLS: refused for another CA, watched with `--cacert`, its admin listener's model
//! keys working only with a client certificate.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::{Server, examples_config, kiln_bin, root};

/// A tmux server of our own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(test: &str) -> Tmux {
        let found = Command::new("tmux").arg("-V").output().is_ok_and(|o| o.status.success());
        assert!(found, "tmux is needed for this test (scripts/setup.sh installs it)");
        Tmux { socket: format!("kiln-top-test-{}-{test}", std::process::id()) }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().expect("tmux")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        assert!(self.run(&["send-keys", "-t", "top", keys]).status.success());
    }

    /// Waits for `check` to accept the screen, or fails showing the last one.
    fn until(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        loop {
            let screen = self.screen();
            if check(&screen) {
                return screen;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "{what}: not on screen:\n{screen}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", "top"]).status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

struct Load(Child);

impl Load {
    /// `kiln bench` for 180 s (longer than the waits for the screen) on `server`'s embeddings
    /// handler with `callers` callers, one sentence each (the body written into its folder).
    fn embeddings(server: &Server, callers: u32) -> Load {
        let body = server.dir.path.join("sentence.json");
        std::fs::write(&body, r#"{"sentences": ["A man is eating a piece of bread."]}"#).expect("body");
        let bench = Command::new(kiln_bin())
            .args(["bench", "--url", &server.base, "--handler", "embeddings", "--concurrency", &callers.to_string(), "--duration", "180s", "--body"])
            .arg(&body)
            .env("KILN_KEY", server.key("demo"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kiln bench");
        Load(bench)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The header's request rate.
fn rate(screen: &str) -> f64 {
    let header = screen.lines().next().unwrap_or("");
    let words: Vec<&str> = header.split_whitespace().collect();
    words.iter().position(|w| *w == "req/s").and_then(|i| words.get(i.wrapping_sub(1))).and_then(|n| n.parse().ok()).unwrap_or(0.0)
}

/// The tests here load their servers with `kiln bench` and read the screen within deadlines:
/// one at a time, so that they do not share the cores.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn kiln_top_shows_queues_rates_and_scaling_and_answers_its_keys() {
    let _one = one_at_a_time();
    let tmux = Tmux::new("keys");
    // The examples, with MiniLM free to grow to two replicas on a simulated GPU.
    let extra = "\n[scaler]\ninterval_ms = 300\nup_cooldown_ms = 600\ndown_cooldown_ms = 60000\n\n[[gpus.simulated]]\nname = \"Sim GPU\"\nmemory_mib = 16384\n";
    let mut config = String::new();
    for line in examples_config("", &[], extra).lines() {
        // MiniLM's fixed replica count gives way to the range below.
        if line.starts_with("instances = ") {
            continue;
        }
        config.push_str(line);
        config.push('\n');
        if line.starts_with("path = ") && line.contains("minilm") {
            config.push_str("instances = { min = 1, max = 2 }\nlatency_objective_ms = 1\n");
        }
    }
    let server = Server::start(&config, &["demo"]).expect("server");
    let _load = Load::embeddings(&server, 16);

    let top = root().join("target/release/kiln-top");
    assert!(top.exists(), "{} is missing: run scripts/setup.sh", top.display());
    let command = format!("{} --url {} --refresh 500ms --admin-url {}", top.display(), server.base, server.admin);
    let env = format!("KILN_ADMIN_KEY={}", server.admin_key());
    let started = tmux.run(&["new-session", "-d", "-s", "top", "-x", "120", "-y", "40", "-e", &env, &command]);
    assert!(started.status.success(), "tmux: {}", String::from_utf8_lossy(&started.stderr));

    let screen = tmux.until("the model queue, a request rate and a scale-up", |s| {
        s.contains("Model queues") && s.lines().any(|l| l.contains("minilm") && l.contains("/2")) && rate(s) > 0.0 && s.contains("minilm ↑ 1→2")
    });
    assert!(screen.contains("Sim GPU") && screen.contains("embeddings"), "{screen}");

    // The model keys act on the selected row (digits, the first) through the admin API.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let model = |name: &str| -> serde_json::Value {
        runtime.block_on(async {
            let response = server.admin_client().get(server.admin_url(&format!("/v1/models/{name}"))).send().await;
            response.expect("model info").json().await.expect("JSON")
        })
    };
    tmux.keys("p");
    tmux.until("digits paused", |s| s.contains("digits (paused)"));
    assert_eq!(model("digits")["paused"], true);
    tmux.keys("p");
    tmux.until("digits resumed", |s| s.contains("digits: resumed") && !s.contains("digits (paused)"));
    assert_eq!(model("digits")["paused"], false);
    tmux.keys("f");
    tmux.until("the flush prompt", |s| s.contains("flush the queue of digits?"));
    tmux.keys("y");
    tmux.until("the flush done", |s| s.contains("digits: flushed 0 queued requests"));
    // MiniLM, the second row: one replica more, then one fewer, as fixed counts.
    tmux.keys("j");
    let before = model("minilm")["replicas"].as_array().map_or(0, Vec::len) as u64;
    tmux.keys("+");
    tmux.until("minilm tuned up", |s| s.contains("minilm: tuned"));
    let up = model("minilm")["instances"].clone();
    assert!(up["min"] == up["max"] && up["max"].as_u64().is_some_and(|n| n > before && n >= 2), "{up} from {before}");
    // '-' asks for one fewer than the row shows: wait until the row shows the new count, or it
    // would take one off the count from before '+'.
    let grown = up["max"].as_u64().unwrap_or(0);
    tmux.until("minilm's row with the grown count", |s| s.lines().any(|l| l.contains("minilm") && l.contains(&format!("{grown}/{grown} "))));
    tmux.keys("-");
    let want = grown - 1;
    let started = Instant::now();
    while model("minilm")["instances"]["max"].as_u64() != Some(want) {
        assert!(started.elapsed() < Duration::from_secs(30), "minilm not tuned down to {want}: {}", model("minilm"));
        std::thread::sleep(Duration::from_millis(100));
    }
    tmux.until("minilm's row with the new count", |s| s.lines().any(|l| l.contains("minilm") && l.contains(&format!("/{want} "))));

    tmux.keys("Space");
    tmux.until("FROZEN", |s| s.lines().next().is_some_and(|h| h.contains("FROZEN")));
    tmux.keys("?");
    let help = tmux.until("the help overlay", |s| s.contains("Help") && s.contains("refresh faster / slower"));
    assert!(help.contains("FROZEN") && help.contains("pause / resume the selected model"), "{help}");
    tmux.keys("Escape");
    tmux.until("help closed", |s| !s.contains("refresh faster / slower"));
    tmux.keys("q");
    let started = Instant::now();
    while tmux.alive() {
        assert!(started.elapsed() < Duration::from_secs(10), "kiln-top did not quit on q:\n{}", tmux.screen());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn kiln_top_watches_the_replicas_of_a_fleet_at_once() {
    let _one = one_at_a_time();
    let tmux = Tmux::new("fleet");
    // Two replicas in cluster mode sharing one keys folder (as a mounted Secret): one admin key
    // reads both.
    let keys = kiln_tests::TempDir::new("kiln-top-keys").expect("keys");
    let replica = |name: &str| {
        let server = format!("cluster = true\nkeys_dir = \"{}\"", keys.path.display());
        Server::start_with_env(&examples_config(&server, &[], ""), &["demo"], &[("KILN_SERVER__REPLICA", name)]).expect("replica")
    };
    let (a, b) = (replica("kiln-a"), replica("kiln-b"));
    let _loads = (Load::embeddings(&a, 4), Load::embeddings(&b, 4));

    let top = root().join("target/release/kiln-top");
    // The previous release's spelling (URLs as arguments, --refresh-ms) still works.
    let command = format!("{} {} {} --refresh-ms 500", top.display(), a.base, b.base);
    let env = format!("KILN_ADMIN_KEY={}", a.admin_key());
    let started = tmux.run(&["new-session", "-d", "-s", "top", "-x", "120", "-y", "40", "-e", &env, &command]);
    assert!(started.status.success(), "tmux: {}", String::from_utf8_lossy(&started.stderr));
    // A row each, both serving; the header counts both.
    let row_rate = |screen: &str, name: &str| -> f64 {
        let line = screen.lines().find(|l| l.contains(name) && l.contains(" up ")).unwrap_or_default();
        let words: Vec<&str> = line.split(|c: char| c.is_whitespace() || c == '│').filter(|w| !w.is_empty()).collect();
        words.iter().position(|w| *w == "up").and_then(|i| words.get(i + 1)).and_then(|n| n.parse().ok()).unwrap_or(0.0)
    };
    let screen = tmux.until("both replicas serving", |s| {
        s.contains("Replicas: 2 of 2 answering") && row_rate(s, "kiln-a") > 0.0 && row_rate(s, "kiln-b") > 0.0
    });
    assert!(screen.lines().next().is_some_and(|h| h.contains("2 replicas")), "{screen}");
    assert!(rate(&screen) > 0.0, "{screen}");

    // One replica goes away: its row says so, the other goes on.
    b.kill().expect("kill");
    tmux.until("kiln-b gone", |s| s.contains("Replicas: 1 of 2 answering") && s.lines().any(|l| l.contains("kiln-b") && l.contains("cannot connect")));
    tmux.until("kiln-a still serving", |s| row_rate(s, "kiln-a") > 0.0);
    tmux.keys("q");
}

#[test]
fn kiln_top_speaks_tls_and_presents_its_client_certificate() {
    use kiln_tests::certs::Ca;
    let _one = one_at_a_time();
    let tmux = Tmux::new("tls");
    let (ca, stranger, clients) = (Ca::new("kiln test CA"), Ca::new("another CA"), Ca::new("kiln admin clients"));
    let dir = kiln_tests::TempDir::new("kiln-top-tls").expect("dir");
    let (cert, key) = ca.leaf().write(&dir.path, "server");
    let (ca_file, stranger_file, clients_file) =
        (ca.write(&dir.path.join("ca.pem")), stranger.write(&dir.path.join("stranger.pem")), clients.write(&dir.path.join("clients.pem")));
    let (operator_cert, operator_key) = clients.client("operator").write(&dir.path, "operator");
    let tls = format!("tls_cert = \"{}\"\ntls_key = \"{}\"\nadmin_client_ca = \"{}\"", cert.display(), key.display(), clients_file.display());
    let server = Server::start(&examples_config(&tls, &[], ""), &["demo"]).expect("server");
    let top = root().join("target/release/kiln-top");
    let env = format!("KILN_ADMIN_KEY={}", server.admin_key());
    let start = |flags: &str| {
        let _ = tmux.run(&["kill-session", "-t", "top"]);
        let command = format!("{} --url {} --refresh 300ms --admin-url {} {flags}", top.display(), server.base, server.admin);
        let started = tmux.run(&["new-session", "-d", "-s", "top", "-x", "160", "-y", "40", "-e", &env, &command]);
        assert!(started.status.success(), "tmux: {}", String::from_utf8_lossy(&started.stderr));
    };

    // Trusting another CA, it says why it cannot connect.
    start(&format!("--cacert {}", stranger_file.display()));
    tmux.until("the untrusted certificate", |s| s.contains("cannot connect: ") && (s.contains("UnknownIssuer") || s.contains("certificate")));
    // Trusting the server's CA it shows the server; without a client certificate the admin
    // listener refuses its model keys.
    start(&format!("--cacert {}", ca_file.display()));
    tmux.until("the server over TLS", |s| s.contains("Model queues") && s.contains("digits"));
    tmux.keys("p");
    tmux.until("the admin listener's refusal", |s| s.contains("digits: ") && s.contains("(admin API at"));
    // With one, they work.
    start(&format!("--cacert {} --client-cert {} --client-key {}", ca_file.display(), operator_cert.display(), operator_key.display()));
    tmux.until("the server over TLS", |s| s.contains("Model queues") && s.contains("digits"));
    tmux.keys("p");
    tmux.until("digits paused", |s| s.contains("digits (paused)"));
    tmux.keys("p");
    tmux.until("digits resumed", |s| s.contains("digits: resumed") && !s.contains("digits (paused)"));
}
