//! Harness for the end-to-end tests: starts the real `kiln` binary on a loopback port with real
//! components and TorchScript models built by `scripts/setup.sh`, and talks to it over HTTP.

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The repository root.
pub fn root() -> PathBuf {
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

/// The bundled examples plus the `misbehave` test guest, with absolute paths, and `extra` TOML
/// appended (more sections) and `server` lines added to `[server]`.
pub fn examples_config(server: &str, extra: &str) -> String {
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

[[model]]
name = "minilm"
path = "{minilm}"
inputs = [
    {{ name = "input_ids", dtype = "INT64", shape = [-1, -1], ragged_dim = 1, pad = 0 }},
    {{ name = "attention_mask", dtype = "INT64", shape = [-1, -1], ragged_dim = 1, pad = 0 }},
]
outputs = [{{ name = "last_hidden_state", ragged_dim = 1 }}]

[[handler]]
name = "digits"
component = "{digits_wasm}"
models = ["digits"]

[[handler]]
name = "embeddings"
component = "{embeddings_wasm}"
models = ["minilm"]

[[handler]]
name = "misbehave"
component = "{misbehave_wasm}"
models = ["digits"]
memory_limit_mib = 32
deadline_ms = 1000
{extra}
"#,
        digits = model("build/models/digits.pt"),
        minilm = model("build/models/minilm.pt"),
        digits_wasm = model("target/wasm32-wasip2/guest/digits.wasm"),
        embeddings_wasm = model("target/wasm32-wasip2/guest/embeddings.wasm"),
        misbehave_wasm = model("target/wasm32-wasip2/guest/misbehave.wasm"),
    )
}

/// A running `kiln serve`. Killed on drop; it also exits by itself if the test process dies.
pub struct Server {
    child: Mutex<Child>,
    // Holding the write end open keeps the server alive; closing it (our exit) stops it.
    _lifeline: ChildStdin,
    pub base: String,
    addr: String,
    pub log: PathBuf,
    _dir: TempDir,
}

impl Server {
    /// Starts `kiln serve` on `config` and waits until it reports ready.
    pub fn start(config: &str) -> anyhow::Result<Server> {
        let dir = TempDir::new("kiln-test")?;
        let config_path = dir.path.join("kiln.toml");
        std::fs::write(&config_path, config)?;
        let port = free_port()?;
        let log = dir.path.join("server.log");
        let log_file = std::fs::File::create(&log)?;
        let mut child = Command::new(kiln_bin())
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--stop-on-stdin-close")
            .env("KILN_LOG", "info,kiln=debug")
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {}", kiln_bin().display()))?;
        let lifeline = child.stdin.take().context("no stdin pipe")?;
        let server = Server {
            child: Mutex::new(child),
            _lifeline: lifeline,
            base: format!("http://127.0.0.1:{port}"),
            addr: format!("127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        server.wait_ready(Duration::from_secs(180))?;
        Ok(server)
    }

    fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.try_wait()? {
                bail!("kiln exited with {status} before it was ready:\n{}", self.log_text());
            }
            if http_status(&self.addr, "/v2/health/ready") == Some(200) {
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

    /// Everything the server logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(mut child) = self.child.lock() {
            let _ = child.kill();
            let _ = child.wait();
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

fn free_port() -> anyhow::Result<u16> {
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

/// The project's Python (the venv with torch and tritonclient).
pub fn python() -> PathBuf {
    root().join(".venv/bin/python")
}
