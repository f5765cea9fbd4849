//! The Docker command line, for tests that run Kiln's image: a daemon check that turns into a
//! counted skip, the image built once per test binary, and containers and volumes removed when
//! a test ends, however it ends.

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The image under test: the tag `scripts/image.sh` gives by default, the one docs/operating.md runs.
pub(crate) const IMAGE: &str = "kiln:cpu";

/// Runs `docker args` and returns its standard output, failing with its standard error.
pub(crate) fn docker(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("docker").args(args).output().context("cannot run docker")?;
    if !output.status.success() {
        bail!(
            "docker {} failed ({}): {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `docker args` as it went: exit code, standard output and standard error.
pub(crate) fn docker_status(args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let output = Command::new("docker").args(args).output().context("cannot run docker")?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// Whether a Docker daemon answers here; when not, `test` is recorded as skipped and this
/// returns false.
pub(crate) fn daemon_or_skip(test: &str) -> bool {
    match docker(&["info", "--format", "{{.ServerVersion}}"]) {
        Ok(_) => true,
        Err(e) => {
            let first = format!("{e:#}").lines().next().unwrap_or_default().to_owned();
            kiln_tests::skip(test, &format!("needs a Docker daemon ({first})"));
            false
        }
    }
}

/// Builds the image with `scripts/image.sh`, once for every test in this binary (the script is
/// quick when nothing changed), from the binary and artifacts under test: set-up has run.
pub(crate) fn image() -> &'static str {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let script = kiln_tests::root().join("scripts/image.sh");
        let output = Command::new("bash").arg(&script).env("KILN_IMAGE_SKIP_SETUP", "1").output().map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "scripts/image.sh failed ({}):\n{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    });
    if let Err(e) = built {
        panic!("{e}");
    }
    IMAGE
}

/// The load balancer's image (`scripts/image.sh --lb`), built once for every test in this binary.
pub(crate) fn balancer_image() -> &'static str {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let output = Command::new("bash").arg(kiln_tests::root().join("scripts/image.sh")).arg("--lb").output().map_err(|e| e.to_string())?;
        if output.status.success() { Ok(()) } else { Err(format!("scripts/image.sh --lb: {}", String::from_utf8_lossy(&output.stderr))) }
    });
    if let Err(e) = built {
        panic!("{e}");
    }
    "kiln-lb:latest"
}

/// A name no other test run on this daemon uses.
pub(crate) fn unique(what: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("kiln-test-{what}-{}-{n}", std::process::id())
}

/// A named volume, removed on drop.
pub(crate) struct Volume(pub(crate) String);

impl Volume {
    pub(crate) fn new() -> anyhow::Result<Volume> {
        let name = unique("state");
        docker(&["volume", "create", &name])?;
        Ok(Volume(name))
    }

    /// `-v` for mounting it at `path`.
    pub(crate) fn at(&self, path: &str) -> String {
        format!("{}:{path}", self.0)
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = docker(&["volume", "rm", "--force", &self.0]);
    }
}

/// A container started with `docker run --detach`, removed (with force) on drop.
pub(crate) struct Container {
    pub(crate) name: String,
}

impl Container {
    /// `docker run --detach --name NAME args...` (`args` end with the image and its command).
    pub(crate) fn run(args: &[&str]) -> anyhow::Result<Container> {
        let name = unique("run");
        let mut all = vec!["run", "--detach", "--name", &name];
        all.extend_from_slice(args);
        docker(&all)?;
        Ok(Container { name })
    }

    /// The host address that the container's `port` is published on.
    pub(crate) fn published(&self, port: u16) -> anyhow::Result<String> {
        let out = docker(&["port", &self.name, &format!("{port}/tcp")])?;
        let line = out.lines().find(|l| l.starts_with("127.0.0.1:")).with_context(|| format!("port {port} is not published on 127.0.0.1: {out}"))?;
        Ok(line.trim().to_owned())
    }

    /// `docker inspect --format FORMAT` of this container.
    pub(crate) fn inspect(&self, format: &str) -> anyhow::Result<String> {
        Ok(docker(&["inspect", "--format", format, &self.name])?.trim().to_owned())
    }

    /// Waits until Docker's health check (the image's `kiln health`) says healthy.
    pub(crate) fn wait_healthy(&self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let health = self.inspect("{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}")?;
            if health == "running healthy" {
                return Ok(());
            }
            if !health.starts_with("running") || start.elapsed() > limit {
                bail!("container {} is {health} after {:?}; its log:\n{}", self.name, start.elapsed(), self.logs());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Everything the container printed.
    pub(crate) fn logs(&self) -> String {
        match docker_status(&["logs", &self.name]) {
            Ok((_, out, err)) => format!("{out}{err}"),
            Err(e) => format!("(no log: {e:#})"),
        }
    }

    /// `docker exec` in the container: exit code, standard output and standard error.
    pub(crate) fn exec(&self, command: &[&str]) -> anyhow::Result<(i32, String, String)> {
        let mut all = vec!["exec", &self.name];
        all.extend_from_slice(command);
        docker_status(&all)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "--force", "--volumes", &self.name]);
    }
}

/// Held by the tests that run several replicas at once (the Swarm service, the Compose file),
/// so that they take the machine's cores one after the other, not against each other.
pub(crate) async fn one_fleet_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static FLEET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    FLEET.lock().await
}
