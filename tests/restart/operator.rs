//! Starting Kiln as an image or an orchestrator does: no `--config` and no flags, the config
//! found through `KILN_CONFIG`, `[server]` fields set by `KILN_SERVER__FIELD` variables,
//! `kiln config show` telling which set what, `kiln health` as the container's probe, and a
//! Prometheus without a key scraping the metrics listener.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::{TempDir, free_port, kiln_bin};

#[test]
fn a_server_found_through_its_environment_serves_reports_its_settings_and_answers_health() {
    let dir = TempDir::new("kiln-operator").expect("dir");
    let config = dir.path.join("deploy.toml");
    std::fs::write(&config, "[server]\nlisten = \"127.0.0.1:1\"\nmax_body_bytes = 1048576\n").expect("config");
    // The working directory has no kiln.toml, so only KILN_CONFIG can name the file.
    let cwd = dir.path.join("elsewhere");
    std::fs::create_dir_all(&cwd).expect("cwd");
    let (port, admin, metrics) = (free_port().expect("port"), free_port().expect("port"), free_port().expect("port"));
    let env = [
        ("KILN_CONFIG", config.display().to_string()),
        ("KILN_SERVER__LISTEN", format!("127.0.0.1:{port}")),
        ("KILN_SERVER__ADMIN_LISTEN", format!("127.0.0.1:{admin}")),
        ("KILN_SERVER__GRPC_LISTEN", "off".to_owned()),
        ("KILN_SERVER__METRICS_LISTEN", format!("127.0.0.1:{metrics}")),
        ("KILN_SERVER__STATE_DIR", dir.path.join("state").display().to_string()),
    ];
    let kiln = |args: &[&str]| {
        Command::new(kiln_bin()).args(args).current_dir(&cwd).envs(env.iter().map(|(k, v)| (k, v))).output().expect("run kiln")
    };

    let shown = kiln(&["config", "show"]);
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    let line = |field: &str| shown.lines().find(|l| l.starts_with(&format!("{field} ="))).unwrap_or_else(|| panic!("no {field} in:\n{shown}")).to_owned();
    assert!(shown.starts_with(&format!("# {} (found through $KILN_CONFIG)", config.display())), "{shown}");
    assert!(line("listen").contains(&format!("\"127.0.0.1:{port}\"")) && line("listen").ends_with("# KILN_SERVER__LISTEN"), "{shown}");
    assert!(line("grpc_listen").contains("\"off\""), "{shown}");
    assert!(line("max_body_bytes").contains("1048576") && line("max_body_bytes").ends_with("# file"), "{shown}");
    assert!(line("drain_timeout_ms").ends_with("# default"), "{shown}");

    let log = std::fs::File::create(dir.path.join("server.log")).expect("log");
    let mut server = Command::new(kiln_bin())
        .args(["serve", "--stop-on-stdin-close"])
        .current_dir(&cwd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("kiln serve");
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let healthy = loop {
        // No --url: the address comes from the config and KILN_SERVER__LISTEN, as in a container.
        let probe = kiln(&["health", "--timeout", "2s"]);
        if probe.status.success() {
            break probe;
        }
        let log = std::fs::read_to_string(dir.path.join("server.log")).unwrap_or_default();
        assert!(started.elapsed() < Duration::from_secs(60), "not healthy in time: {}\n{log}", String::from_utf8_lossy(&probe.stderr));
        assert!(server.try_wait().expect("wait").is_none(), "kiln serve exited:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(String::from_utf8_lossy(&healthy.stdout).trim(), "ready");
    assert!(dir.path.join("state").is_dir(), "KILN_SERVER__STATE_DIR was not used");

    // Prometheus without a key: the metrics listener answers /metrics and nothing else; the
    // serving listener still wants the admin key for it.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let get = |url: String| {
        runtime.block_on(async {
            let response = reqwest::get(&url).await.expect("GET");
            (response.status().as_u16(), response.text().await.expect("body"))
        })
    };
    let (status, text) = get(format!("http://127.0.0.1:{metrics}/metrics"));
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("kiln_sandbox_running") || text.contains("# TYPE kiln_"), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "not OpenMetrics text: {text}");
    let (status, text) = get(format!("http://127.0.0.1:{metrics}/v1/stats"));
    assert_eq!(status, 404, "the metrics listener serves /metrics only: {text}");
    let (status, _) = get(format!("{url}/metrics"));
    assert_eq!(status, 401, "the serving listener's /metrics still needs the admin key");

    server.kill().expect("kill");
    server.wait().expect("wait");
    let probe = kiln(&["health", "--url", &url, "--timeout", "2s"]);
    assert_eq!(probe.status.code(), Some(3), "a server that is gone is not healthy, and not there: exit code 3");
    let said = String::from_utf8_lossy(&probe.stderr);
    assert!(said.contains("cannot reach") && said.contains("/v2/health/ready"), "{said}");

    // A variable that names no field, or a value of the wrong type, stops the start and names it.
    let wrong = Command::new(kiln_bin())
        .args(["serve"])
        .current_dir(&cwd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("KILN_SERVER__MAX_INSTANCES", "lots")
        .output()
        .expect("kiln serve");
    assert!(!wrong.status.success());
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(said.contains("KILN_SERVER__MAX_INSTANCES: 'lots'"), "{said}");
}

/// Run from a folder without a kiln.toml and with no KILN_CONFIG, a binary built from a
/// checkout falls back to the bundled examples beside its sources, and says so. (Where there are
/// none either, the error lists every place looked: `config::layers`' own tests.)
#[test]
fn with_no_config_named_a_checkout_s_binary_falls_back_to_its_bundled_examples() {
    let dir = TempDir::new("kiln-noconfig").expect("dir");
    let output = Command::new(kiln_bin())
        .args(["config", "show"])
        .current_dir(&dir.path)
        .env("KILN_CONFIG", "")
        .output()
        .expect("kiln config show");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let first = stdout.lines().next().unwrap_or_default();
    assert!(first.ends_with("examples/kiln.toml (found through the bundled examples (no --config, $KILN_CONFIG or ./kiln.toml))"), "{first}");
    assert!(stdout.contains("# handlers: digits, embeddings"), "{stdout}");
}
