//! Harness for the end-to-end tests: starts the real `kiln` binary on a loopback port with real
//! components and TorchScript models built by `scripts/setup.sh`, and talks to it over HTTP.

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

pub mod certs;
pub mod files;
pub mod registry;

/// The repository root: `$KILN_ROOT` (for a prebuilt test binary run elsewhere, as
/// `scripts/gpu-check.sh` does), or where this crate was built.
pub fn root() -> PathBuf {
    if let Some(root) = std::env::var_os("KILN_ROOT") {
        return PathBuf::from(root);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The `kiln` binary under test: `$KILN_BIN`, or the release build.
pub fn kiln_bin() -> PathBuf {
    std::env::var_os("KILN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/release/kiln"))
}

/// A built artifact under the repository root, with a clear message when set-up has not run.
pub fn artifact(relative: &str) -> PathBuf {
    let path = root().join(relative);
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup.sh (or scripts/test.sh) first",
        path.display()
    );
    path
}

/// The bundled examples (tenant `demo`) plus the `misbehave` test guest (tenant `mallory`), with
/// absolute paths, `server` lines added to `[server]`, `demo_models` more models for `demo`, and
/// `extra` TOML appended (more sections).
pub fn examples_config(server: &str, demo_models: &[&str], extra: &str) -> String {
    examples_config_in("fp32", server, demo_models, extra)
}

/// [`examples_config`] with both models in `precision` (`auto`, as examples/kiln.toml ships
/// them, searches at load: a few seconds, which most tests need not pay).
pub fn examples_config_in(precision: &str, server: &str, demo_models: &[&str], extra: &str) -> String {
    let demo_models: String = demo_models.iter().map(|m| format!(", \"{m}\"")).collect();
    let model = |p: &str| artifact(p).display().to_string();
    format!(
        r#"
[server]
{server}

[[model]]
name = "digits"
path = "{digits}"
inputs = [{{ name = "image", dtype = "FP32", shape = [-1, 1, 8, 8] }}]
outputs = [{{ name = "logits" }}]
precision = "{precision}"

[[model]]
name = "minilm"
path = "{minilm}"
inputs = [
    {{ name = "input_ids", dtype = "INT64", shape = [-1, -1], ragged_dim = 1, pad = 0 }},
    {{ name = "attention_mask", dtype = "INT64", shape = [-1, -1], ragged_dim = 1, pad = 0 }},
]
outputs = [{{ name = "last_hidden_state", ragged_dim = 1 }}]
batching = {{ max_batch_size = 64 }}
# As examples/kiln.toml ships it: two single-threaded replicas sharing one copy of the weights.
instances = 2
precision = "{precision}"

[[tenant]]
name = "demo"
models = ["digits", "minilm"{demo_models}]
quota = {{ requests_per_second = 1000000, max_concurrent = 1024 }}

[[tenant]]
name = "mallory"
models = ["digits"]
quota = {{ requests_per_second = 1000000, max_concurrent = 1024, memory_limit_mib = 32, deadline_ms = 1000 }}

[[handler]]
name = "digits"
tenant = "demo"
component = "{digits_wasm}"
models = ["digits"]

[[handler]]
name = "embeddings"
tenant = "demo"
component = "{embeddings_wasm}"
models = ["minilm"]

[[handler]]
name = "misbehave"
tenant = "mallory"
component = "{misbehave_wasm}"
{extra}
"#,
        digits = model("build/models/digits.pt"),
        minilm = model("build/models/minilm.pt"),
        digits_wasm = model("target/wasm32-wasip2/guest/digits.wasm"),
        embeddings_wasm = model("target/wasm32-wasip2/guest/embeddings.wasm"),
        misbehave_wasm = model("target/wasm32-wasip2/guest/misbehave.wasm"),
    )
}

/// Runs `kiln` with `args` and returns its standard output, failing with its standard error.
pub fn kiln(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(kiln_bin())
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", kiln_bin().display()))?;
    if !output.status.success() {
        bail!(
            "kiln {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A running `kiln serve`. Killed on drop; it also exits by itself if the test process dies.
pub struct Server {
    process: Mutex<Option<Process>>,
    pub base: String,
    addr: String,
    /// The admin API's base URL.
    pub admin: String,
    admin_addr: String,
    /// The gRPC API's address, `127.0.0.1:PORT`.
    pub grpc: String,
    pub config: PathBuf,
    pub log: PathBuf,
    keys: std::collections::HashMap<String, String>,
    /// Environment the server runs with, beyond the test's own.
    env: Vec<(String, String)>,
    /// Its config sets `tls_cert`: the serving and admin URLs are https.
    tls: bool,
    pub dir: TempDir,
}

struct Process {
    child: Child,
    // Holding the write end open keeps the server alive; closing it (our exit) stops it.
    _lifeline: ChildStdin,
}

impl Server {
    /// Writes `config`, makes one API key for each of `tenants` and one admin key with the real
    /// `kiln tenant add-key` / `kiln admin add-key`, starts `kiln serve` and waits until it is
    /// ready.
    pub fn start(config: &str, tenants: &[&str]) -> anyhow::Result<Server> {
        Server::start_with_env(config, tenants, &[])
    }

    /// [`Server::start`], with `env` set for the server (every start of it).
    pub fn start_with_env(config: &str, tenants: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Server> {
        let dir = TempDir::new("kiln-test")?;
        let config_path = dir.path.join("kiln.toml");
        std::fs::write(&config_path, config)?;
        let config_arg = config_path.display().to_string();
        let mut keys = std::collections::HashMap::new();
        for tenant in tenants {
            let key = kiln(&["tenant", "add-key", tenant, "--config", &config_arg])?;
            keys.insert((*tenant).to_owned(), key.trim().to_owned());
        }
        let admin_key = kiln(&["admin", "add-key", "--config", &config_arg])?;
        keys.insert(String::new(), admin_key.trim().to_owned());
        let mut server = Server {
            process: Mutex::new(None),
            base: String::new(),
            addr: String::new(),
            admin: String::new(),
            admin_addr: String::new(),
            grpc: String::new(),
            config: config_path,
            log: dir.path.join("server.log"),
            keys,
            env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            tls: config.contains("\ntls_cert ="),
            dir,
        };
        // A port found free can be taken before kiln binds it (another test's server or one of
        // the many client connections the tests open): then start again on new ports.
        let mut tries = 0;
        loop {
            server.set_ports(free_port()?, free_port()?, free_port()?);
            match server.launch() {
                Err(e) if tries < 5 && e.to_string().contains("Address already in use") => {
                    tries += 1;
                    server.kill()?;
                    std::fs::write(&server.log, "")?;
                }
                result => return result.map(|()| server),
            }
        }
    }

    fn set_ports(&mut self, port: u16, admin_port: u16, grpc_port: u16) {
        self.grpc = format!("127.0.0.1:{grpc_port}");
        let scheme = if self.tls { "https" } else { "http" };
        self.base = format!("{scheme}://127.0.0.1:{port}");
        self.addr = format!("127.0.0.1:{port}");
        self.admin = format!("{scheme}://127.0.0.1:{admin_port}");
        self.admin_addr = format!("127.0.0.1:{admin_port}");
    }

    /// Starts the process (again) on the same config, state and ports, and waits until ready.
    fn launch(&self) -> anyhow::Result<()> {
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut child = Command::new(kiln_bin())
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .arg("--listen")
            .arg(&self.addr)
            .arg("--admin-listen")
            .arg(&self.admin_addr)
            .arg("--grpc-listen")
            .arg(&self.grpc)
            .arg("--stop-on-stdin-close")
            .env("KILN_LOG", "info,kiln=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {}", kiln_bin().display()))?;
        let lifeline = child.stdin.take().context("no stdin pipe")?;
        *self.lock()? = Some(Process {
            child,
            _lifeline: lifeline,
        });
        self.wait_ready(Duration::from_secs(180))
    }

    fn lock(&self) -> anyhow::Result<std::sync::MutexGuard<'_, Option<Process>>> {
        self.process.lock().map_err(|_| anyhow::anyhow!("server lock poisoned"))
    }

    /// Kills the server at once (SIGKILL: no shutdown work runs), as a crash would.
    pub fn kill(&self) -> anyhow::Result<()> {
        if let Some(mut p) = self.lock()?.take() {
            p.child.kill()?;
            p.child.wait()?;
        }
        Ok(())
    }

    /// Kills the server and starts it again on the same state.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.kill()?;
        self.launch()
    }

    /// Sends a signal (`TERM`, `INT`, ...) with the system's `kill`.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.pid()?.to_string();
        let status = Command::new("kill").args(["-s", name, &pid]).status()?;
        anyhow::ensure!(status.success(), "kill -s {name} {pid} failed: {status}");
        Ok(())
    }

    /// Waits up to `limit` for the server to exit by itself, and returns its exit status.
    pub fn wait_exit(&self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let started = Instant::now();
        loop {
            let mut guard = self.lock()?;
            let Some(p) = guard.as_mut() else { bail!("kiln is not running") };
            if let Some(status) = p.child.try_wait()? {
                *guard = None;
                return Ok(status);
            }
            drop(guard);
            if started.elapsed() > limit {
                bail!("kiln did not exit within {limit:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.lock()?.as_ref().map(|p| p.child.id()).context("server not running")
    }

    /// The API key made for `tenant` at start.
    pub fn key(&self, tenant: &str) -> &str {
        self.keys.get(tenant).map_or("", String::as_str)
    }

    /// The admin key made at start.
    pub fn admin_key(&self) -> &str {
        self.key("")
    }

    /// A client that sends `tenant`'s key with every request.
    pub fn client(&self, tenant: &str) -> reqwest::Client {
        bearer_client(self.key(tenant))
    }

    /// A client that sends the admin key with every request.
    pub fn admin_client(&self) -> reqwest::Client {
        bearer_client(self.admin_key())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("{}{path}", self.admin)
    }

    fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let exited = match self.lock()?.as_mut() {
                Some(p) => p.child.try_wait()?,
                None => bail!("kiln is not running"),
            };
            if let Some(status) = exited {
                bail!("kiln exited with {status} before it was ready:\n{}", self.log_text());
            }
            // Over TLS the probe here cannot speak to it: listening is enough, and the test
            // asks for readiness with a client that trusts its certificate.
            let ready = if self.tls {
                self.log_text().contains("listening on https://")
            } else {
                http_status(&self.addr, "/v2/health/ready") == Some(200)
            };
            if ready {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!("kiln was not ready after {limit:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The audit log once some line satisfies `want`, or as it is after 5 s: a thread of its own
    /// writes it, a moment after the request that caused a line has been answered.
    pub fn audit_log_with(&self, want: impl Fn(&str) -> bool) -> String {
        let path = self.dir.path.join("state/audit.log");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().any(&want) || Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the server logged so far.
    /// The event history as a follower of `/v1/events` reads it first: the stream stays open, so
    /// it is read until no event has come for `quiet`.
    pub async fn events_text(&self, quiet: Duration) -> String {
        let mut response = self.admin_client().get(self.url("/v1/events")).send().await.expect("events");
        let mut text = String::new();
        while let Ok(Ok(Some(chunk))) = tokio::time::timeout(quiet, response.chunk()).await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        text
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// A reqwest client that sends `Authorization: Bearer KEY`.
pub fn bearer_client(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(value) = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")) {
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap_or_default()
}

/// Reads a response body to its end: the bytes received, and whether it ended in an error (a
/// body cut off at a limit) rather than looking complete.
pub async fn read_until_cut(mut response: reqwest::Response) -> (usize, bool) {
    let mut received = 0usize;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => received += chunk.len(),
            Ok(None) => return (received, false),
            Err(_) => return (received, true),
        }
    }
}

/// The status of a plain GET, or `None` if the server does not answer (yet).
fn http_status(addr: &str, path: &str) -> Option<u16> {
    use std::io::Read as _;
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// A loopback port that is free now, picked below the kernel's ephemeral range so that the
/// outgoing connections of tests running beside this one cannot be given it.
pub fn free_port() -> anyhow::Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_001));
    for _ in 0..200 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        let port = low + (hasher.finish() % u64::from(high - low)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A temporary folder removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<TempDir> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// One held-out digit's PNG, for the tests that need a request to send.
pub fn a_digit() -> Vec<u8> {
    holdout(1).swap_remove(0).0
}

/// Whether the digits handler's answer `got` is `want`: the same digit, and ten probabilities
/// each within 1e-5 of `want`'s.
pub fn same_digits_answer(got: &serde_json::Value, want: &serde_json::Value) -> bool {
    let p = |v: &serde_json::Value| -> Vec<f64> { v["probabilities"].as_array().map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect()).unwrap_or_default() };
    got["digit"] == want["digit"] && p(got).len() == 10 && p(got).iter().zip(p(want)).all(|(a, b)| (a - b).abs() < 1e-5)
}

/// The held-out digits as (PNG, label), the first `n` by name.
pub fn holdout(n: usize) -> Vec<(Vec<u8>, u64)> {
    let mut paths: Vec<_> = std::fs::read_dir(artifact("build/holdout/digits"))
        .expect("holdout dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .take(n)
        .map(|p| {
            let label = p.file_stem().and_then(|s| s.to_str()).and_then(|s| s.rsplit('_').next()).and_then(|l| l.parse().ok());
            (std::fs::read(&p).expect("png"), label.expect("label in the name"))
        })
        .collect()
}

/// Says that `test` did not run here, and why: on stderr, and as a line of the file named by
/// `KILN_SKIP_LOG` (which `scripts/test.sh` sets, to count skips in its last line). A test that
/// skips returns right after; Rust's harness counts it as passed, so this is what tells them apart.
pub fn skip(test: &str, reason: &str) {
    eprintln!("skipped: {test}: {reason}");
    if let Some(log) = std::env::var_os("KILN_SKIP_LOG") {
        let line = format!("{test}: {}\n", reason.replace('\n', " "));
        let written = std::fs::OpenOptions::new().create(true).append(true).open(&log).and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!("cannot record the skip in {}: {e}", std::path::Path::new(&log).display());
        }
    }
}

/// Runs the Python client `tests/python/SCRIPT` (an official client library checking Kiln) with
/// `args` and `env`, and returns its stdout once it has exited successfully and printed
/// `"{marker}: all checks passed"`. Otherwise it panics with the client's stdout and stderr, and
/// `context()` (a server log, for one).
pub fn python_checks(
    script: &str,
    args: &[String],
    env: &[(&str, &str)],
    marker: &str,
    context: impl FnOnce() -> String,
) -> String {
    let mut command = Command::new(python());
    command.arg(root().join("tests/python").join(script));
    for arg in args {
        command.arg(arg);
    }
    command.envs(env.iter().copied());
    let output = command.output().unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let passed = format!("{marker}: all checks passed");
    if !output.status.success() || !stdout.contains(&passed) {
        panic!("{script} failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}\n{}", output.status, context());
    }
    stdout
}

/// The project's Python (the venv with torch and tritonclient).
pub fn python() -> PathBuf {
    root().join(".venv/bin/python")
}
