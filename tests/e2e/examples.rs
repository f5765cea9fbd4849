//! Every example a reader is shown runs, against a server of this test's own: each line under
//! `Examples:` in every command's `--help` (as docs/reference/cli.md and kiln-top.md keep them;
//! the crates' unit tests hold those files equal to the binaries' help), and every ```sh block of
//! README.md but the two set-up commands (those are what CI itself runs).
//!
//! The examples are written for a checkout where `scripts/serve.sh` runs: its addresses and key
//! files, and names the reader fills in (KEY_ID, REQUEST_ID, SHA256). Here those become this
//! server's addresses and keys, and ids and digests that exist, made just before the example
//! that needs them. An example passes when it exits 0; `kiln serve` when the server it starts
//! gets ready and stops cleanly on SIGTERM, `kiln-top` when it has drawn the server's models on
//! a terminal and is still running after a few seconds. `kiln push` and `kiln pull` use a registry on loopback (Debian's
//! docker-registry; recorded as skipped where it is not installed).

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::files::{FileServer, sha256};
use kiln_tests::registry::Registry;
use kiln_tests::{Server, TempDir, artifact, examples_config, free_port, kiln_bin, root};
use serde_json::Value;

/// The examples of a CLI reference page: the command whose help shows each, and its line.
fn help_examples(markdown: &str) -> Vec<(String, String)> {
    let mut examples = Vec::new();
    let mut command = String::new();
    let mut listing = false;
    for line in markdown.lines() {
        if let Some(heading) = line.strip_prefix("## `") {
            command = heading.trim_end_matches('`').to_owned();
            listing = false;
        } else if line == "Examples:" {
            listing = true;
        } else if listing && line.starts_with("      ") {
            // What the example above does.
        } else if let Some(example) = line.strip_prefix("  ").filter(|e| listing && !e.starts_with(' ')) {
            examples.push((command.clone(), example.to_owned()));
        } else {
            listing = false;
        }
    }
    examples
}

/// The ```sh blocks of a Markdown page.
fn shell_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut block: Option<String> = None;
    for line in markdown.lines() {
        match (&mut block, line.trim_start()) {
            (None, "```sh") => block = Some(String::new()),
            (Some(_), "```") => blocks.extend(block.take()),
            (Some(text), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// The set-up commands README.md gives: run by CI, not by this test.
const SET_UP: [&str; 2] = ["scripts/serve.sh", "scripts/test.sh"];

struct Bench {
    server: Server,
    /// For `kiln push` and `kiln pull`, where Debian's docker-registry is installed.
    registry: Option<Registry>,
    /// The key files and the scratch folder the examples' `/tmp` becomes.
    _dir: TempDir,
    /// Text as the examples write it, and what it is here.
    replace: Vec<(String, String)>,
    env: Vec<(String, String)>,
}

impl Bench {
    fn new() -> Bench {
        let server = Server::start(&examples_config("", &[], ""), &["demo"]).expect("server");
        let dir = TempDir::new("kiln-examples").expect("temp dir");
        let digits = std::fs::read(artifact("build/models/digits.pt")).expect("digits.pt");
        let digest = sha256(&digits);
        let files = FileServer::start(HashMap::from([("digits.pt".to_owned(), digits)]));
        let demo_key = dir.path.join("demo.key");
        let admin_key = dir.path.join("admin.key");
        std::fs::write(&demo_key, server.key("demo")).expect("demo.key");
        std::fs::write(&admin_key, server.admin_key()).expect("admin.key");
        let address = |url: &str| url.split_once("://").map_or(url, |(_, a)| a).to_owned();
        let scratch = dir.path.join("tmp");
        std::fs::create_dir_all(&scratch).expect("scratch folder");
        // In this order: the paths put in for the key files are under /tmp themselves.
        let replace = vec![
            ("/tmp".to_owned(), scratch.display().to_string()),
            ("http://127.0.0.1:8080".to_owned(), server.base.clone()),
            ("http://127.0.0.1:8081".to_owned(), server.admin.clone()),
            ("127.0.0.1:8001".to_owned(), server.grpc.clone()),
            ("build/demo.key".to_owned(), demo_key.display().to_string()),
            ("build/admin.key".to_owned(), admin_key.display().to_string()),
            ("https://models.example/".to_owned(), files.url("/files/")),
            ("SHA256".to_owned(), digest),
            // The fleet example's two replicas are this server twice.
            ("http://10.0.0.5:8080".to_owned(), server.base.clone()),
            ("http://10.0.0.6:8080".to_owned(), server.base.clone()),
            ("http://10.0.0.5:8081".to_owned(), server.admin.clone()),
        ];
        let registry = Registry::start("e2e::examples: kiln push and kiln pull");
        let mut replace = replace;
        let mut env_registry = Vec::new();
        if let Some(registry) = &registry {
            replace.push(("registry.example:5000".to_owned(), registry.addr.clone()));
            env_registry.push(("KILN_REGISTRY_AUTH".to_owned(), registry.file("auth.json")));
            env_registry.push(("KILN_REGISTRY_CA".to_owned(), registry.file("ca.pem")));
        }
        let bin = kiln_bin().parent().expect("the binaries' folder").display().to_string();
        let env = vec![
            ("PATH".to_owned(), format!("{bin}:{}", std::env::var("PATH").unwrap_or_default())),
            ("KILN_CONFIG".to_owned(), server.config.display().to_string()),
            ("KILN_URL".to_owned(), server.base.clone()),
            ("KILN_ADMIN_URL".to_owned(), server.admin.clone()),
            ("KILN_KEY".to_owned(), server.key("demo").to_owned()),
            ("KILN_ADMIN_KEY".to_owned(), server.admin_key().to_owned()),
            // `kiln health` without --url finds the server through its config's listen address.
            ("KILN_SERVER__LISTEN".to_owned(), address(&server.base)),
            // `kiln build` as the authoring tests build: offline, into a kept target folder.
            ("CARGO_NET_OFFLINE".to_owned(), "true".to_owned()),
            ("CARGO_TARGET_DIR".to_owned(), root().join("target/authors").display().to_string()),
        ];
        let env = [env, env_registry].concat();
        Bench { server, registry, _dir: dir, replace, env }
    }

    fn shell(&self, script: &str) -> Command {
        let mut command = Command::new("bash");
        // An HTTP error fails a curl example as it would fail its reader.
        let prelude = "set -euo pipefail\ncurl() { command curl --fail-with-body \"$@\"; }\n";
        command.args(["-c", &format!("{prelude}{script}")]).current_dir(root()).envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// `example` with this server's addresses, keys and the file digest, and a key id made for
    /// it where it revokes one.
    fn prepare(&self, command: &str, example: &str) -> String {
        let mut text = example.to_owned();
        for (from, to) in &self.replace {
            text = text.replace(from, to);
        }
        if text.contains("KEY_ID") {
            let (add, list) = if command.starts_with("kiln admin") {
                ("kiln admin add-key", "kiln admin keys --json")
            } else {
                ("kiln tenant add-key demo", "kiln tenant keys demo --json")
            };
            self.must(&format!("{add} > /dev/null"));
            let keys: Value = serde_json::from_str(&self.must(list)).expect("keys as JSON");
            let id = keys.as_array().and_then(|k| k.last()).and_then(|k| k["id"].as_str()).expect("a key id").to_owned();
            text = text.replace("KEY_ID", &id);
        }
        text
    }

    /// Runs `script` here, failing the test unless it exits 0; its standard output.
    fn must(&self, script: &str) -> String {
        let output = self.shell(script).output().expect("bash");
        assert!(
            output.status.success(),
            "`{script}` failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `kiln serve ...` on free ports and its own state: ready, then drained by SIGTERM.
    fn serve(&self, example: &str) {
        let state = TempDir::new("kiln-examples-serve").expect("state dir");
        let (port, admin, grpc) = (free_port().expect("port"), free_port().expect("port"), free_port().expect("port"));
        let mut command = self.shell(&format!("exec {example}"));
        command
            .env("KILN_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("KILN_SERVER__ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("KILN_SERVER__GRPC_LISTEN", format!("127.0.0.1:{grpc}"))
            .env("KILN_SERVER__STATE_DIR", state.path.display().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("kiln serve");
        let probe = format!("kiln health --url http://127.0.0.1:{port} --timeout 1s > /dev/null 2>&1");
        let started = Instant::now();
        while !self.shell(&probe).status().is_ok_and(|s| s.success()) {
            if let Ok(Some(status)) = child.try_wait() {
                let mut why = String::new();
                std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut why).ok();
                panic!("`{example}` exited ({status}) before it was ready:\n{why}");
            }
            assert!(started.elapsed() < Duration::from_secs(180), "`{example}` was not ready within 180 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        let pid = child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
        let status = child.wait().expect("wait");
        assert!(status.success(), "`{example}` did not stop cleanly on SIGTERM: {status}");
    }

    /// `kiln-top ...` on a terminal (script(1) gives it one): still running after 4 s, having
    /// drawn this server's models.
    fn top(&self, example: &str) {
        let output = self
            // script's terminal starts with no size: give it one to draw on.
            // Its input stays open and silent (a closed one reads as keys).
            .shell(&format!("sleep 5 | timeout 4 script -qec {} /dev/null", shell_quote(&format!("stty cols 140 rows 45; exec {example}"))))
            .env("TERM", "xterm")
            .output()
            .expect("script");
        let screen = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(124), "`{example}` should still run after 4 s:\n{screen}{}", String::from_utf8_lossy(&output.stderr));
        assert!(screen.contains("minilm") && !screen.contains("DISCONNECTED"), "`{example}` did not show the server's models:\n{screen}");
    }
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `kiln request cancel REQUEST_ID`: a request held in a paused model's queue, cancelled by its
/// id; it answers 503.
async fn cancel_a_request(bench: &Bench, example: &str) {
    let admin = bench.server.admin_client();
    // An example before this one set a 2 s timeout: long enough for a paused queue to hold the
    // request while a slow machine starts the cancelling command.
    let patient = admin.patch(bench.server.admin_url("/v1/models/digits")).json(&serde_json::json!({ "timeout_ms": 120_000 })).send().await.expect("timeout");
    assert!(patient.status().is_success(), "timeout: {}", patient.status());
    let pause = admin.post(bench.server.admin_url("/v1/models/digits/pause")).send().await.expect("pause");
    assert!(pause.status().is_success(), "pause: {}", pause.status());
    let client = bench.server.client("demo");
    let held = tokio::spawn(client.post(bench.server.url("/v1/handlers/digits/")).body(kiln_tests::a_digit()).send());
    let started = Instant::now();
    let id = loop {
        let listed: Value = admin.get(bench.server.admin_url("/v1/requests")).send().await.expect("requests").json().await.expect("JSON");
        let found = listed["requests"].as_array().and_then(|r| {
            r.iter().find(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/v1/handlers/digits/"))).and_then(|r| r["id"].as_str().map(str::to_owned))
        });
        if let Some(id) = found {
            break id;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the held request never showed in /v1/requests: {listed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let line = bench.prepare("kiln request cancel", example).replace("REQUEST_ID", &id);
    bench.must(&line);
    let answer = held.await.expect("task").expect("answer");
    assert_eq!(answer.status(), 503, "the cancelled request answers 503");
    let resume = admin.post(bench.server.admin_url("/v1/models/digits/resume")).send().await.expect("resume");
    assert!(resume.status().is_success(), "resume: {}", resume.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_in_the_help_and_the_readme_runs() {
    // The shared server first: its precision search times passes at start, and this test's
    // load (kiln bench, a second kiln serve) must not skew those timings into another choice.
    tokio::task::spawn_blocking(super::server).await.expect("the shared server");
    let bench = tokio::task::spawn_blocking(Bench::new).await.expect("set-up");
    let docs = root().join("docs/reference");
    let mut examples = Vec::new();
    for page in ["cli.md", "kiln-top.md"] {
        let text = std::fs::read_to_string(docs.join(page)).unwrap_or_else(|e| panic!("docs/reference/{page}: {e}"));
        examples.extend(help_examples(&text));
    }
    let count = |prefix: &str| examples.iter().filter(|(c, _)| c.starts_with(prefix)).count();
    assert!(count("kiln ") > 40 && count("kiln-top") >= 2, "the examples were found: {examples:#?}");
    let bench = std::sync::Arc::new(bench);
    for (command, example) in examples {
        let b = std::sync::Arc::clone(&bench);
        if example.contains("registry.example") && bench.registry.is_none() {
            continue;
        }
        if example.contains("REQUEST_ID") {
            cancel_a_request(&bench, &example).await;
            continue;
        }
        tokio::task::spawn_blocking(move || {
            let line = b.prepare(&command, &example);
            if line.starts_with("kiln serve") {
                b.serve(&line);
            } else if line.starts_with("kiln health") {
                // Without --url it finds the server through the config, not KILN_URL.
                let output = b.shell(&line).env_remove("KILN_URL").output().expect("bash");
                assert!(output.status.success(), "`{line}` failed: {}", String::from_utf8_lossy(&output.stderr));
            } else if line.starts_with("kiln-top") {
                b.top(&line);
            } else {
                b.must(&line);
            }
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }

    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let blocks = shell_blocks(&readme);
    let (set_up, runnable): (Vec<_>, Vec<_>) = blocks.into_iter().partition(|b| SET_UP.iter().any(|s| b.contains(s)));
    for block in &set_up {
        let commands: Vec<&str> = block.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
        assert!(commands.iter().all(|c| SET_UP.contains(c)), "a README block mixes a set-up command with others: {block}");
    }
    assert!(!runnable.is_empty(), "README.md has examples to run");
    for block in runnable {
        let b = std::sync::Arc::clone(&bench);
        tokio::task::spawn_blocking(move || {
            let script = b.prepare("README.md", &block);
            b.must(&script);
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }
}

#[test]
fn examples_are_found_in_a_help_page() {
    let page = "## `kiln model`\n\n```text\nUsage\n\nExamples:\n  kiln model ls\n      Every model.\n  kiln model ls --json\n\nMore text\n  not an example\n```\n";
    assert_eq!(
        help_examples(page),
        [("kiln model".to_owned(), "kiln model ls".to_owned()), ("kiln model".to_owned(), "kiln model ls --json".to_owned())]
    );
}

#[test]
fn shell_blocks_are_found_in_markdown() {
    let page = "text\n```sh\necho one\n```\n```toml\nx = 1\n```\n```sh\necho two\n```\n";
    assert_eq!(shell_blocks(page), ["echo one\n", "echo two\n"]);
}

/// The exit codes `kiln --help` documents: 1 when the server says no, 2 for a wrong command
/// line, 3 when there is no server to ask.
#[test]
fn exit_codes_tell_a_refusal_from_a_usage_error_from_no_server() {
    let server = super::server();
    let code = |args: &[&str]| {
        let output = Command::new(kiln_bin()).args(args).env_remove("KILN_ADMIN_KEY").env_remove("KILN_URL").output().expect("kiln");
        (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (refused, said) = code(&["handler", "ls", "--admin-url", &server.admin, "--admin-key", "not-a-key"]);
    assert_eq!(refused, Some(1), "{said}");
    assert!(said.contains("401"), "the refusal is named: {said}");
    let (usage, said) = code(&["handler", "ls", "--no-such-flag"]);
    assert_eq!(usage, Some(2), "{said}");
    let closed = format!("http://127.0.0.1:{}", free_port().expect("port"));
    for args in [
        &["handler", "ls", "--admin-url", &closed, "--admin-key", "k"][..],
        &["health", "--url", &closed],
        &["bench", "--url", &closed, "--endpoint", "/v2/health/live", "--requests", "3"],
    ] {
        let (unreachable, said) = code(args);
        assert_eq!(unreachable, Some(3), "kiln {}: {said}", args.join(" "));
        assert!(said.contains("cannot reach"), "kiln {}: {said}", args.join(" "));
    }
}
