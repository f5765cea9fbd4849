//! The handler author's tools: `kiln check` on real components.

use std::process::Command;

use kiln_tests::{artifact, kiln_bin};

/// `kiln check FILE`: its exit status and everything it printed.
fn check(path: &std::path::Path) -> (bool, String) {
    let output = Command::new(kiln_bin()).arg("check").arg(path).output().expect("run kiln check");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[test]
fn kiln_check_passes_a_handler_and_names_what_kiln_would_refuse() {
    let (ok, text) = check(&artifact("target/wasm32-wasip2/guest/digits.wasm"));
    assert!(ok, "{text}");
    assert!(text.contains("ok  wasi:nn/inference@") && text.contains("wasi:http/incoming-handler@0.2."), "{text}");
    assert!(text.contains("KiB") || text.contains("MiB"), "the size is printed: {text}");
    assert!(text.contains("ok: Kiln can serve this component"), "{text}");

    let (ok, text) = check(&artifact("target/wasm32-wasip2/guest/forbidden.wasm"));
    assert!(!ok, "{text}");
    assert!(text.contains("refused  wasi:filesystem/"), "the refused import is marked: {text}");
    assert!(text.contains("Kiln would refuse") && text.contains("wasi:sockets/"), "{text}");

    let dir = kiln_tests::TempDir::new("kiln-check").expect("temp dir");
    let core = dir.path.join("core.wasm");
    // An empty core module: the magic number and version 1.
    std::fs::write(&core, b"\0asm\x01\0\0\0").expect("write");
    let (ok, text) = check(&core);
    assert!(!ok && text.contains("core module; a handler must be a component"), "{text}");
    let (ok, text) = check(&dir.path.join("missing.wasm"));
    assert!(!ok && text.contains("cannot read") && text.contains("missing.wasm"), "{text}");
}

/// Runs `program` with `args` in `dir` with `env`, failing with everything it printed.
fn run(program: &std::path::Path, args: &[&str], env: &[(&str, &std::path::Path)]) -> String {
    let mut command = Command::new(program);
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{} {} failed:\n{text}", program.display(), args.join(" "));
    text
}

/// Runs `kiln ARGS` with `env`, expecting it to fail; everything it printed.
fn failing(args: &[&str], env: &[(&str, &std::path::Path)]) -> String {
    let output = Command::new(kiln_bin()).args(args).envs(env.iter().copied()).output().expect("run kiln");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(!output.status.success(), "kiln {} succeeded:\n{text}", args.join(" "));
    text
}

/// Where handler crates made by the tests build: kept between runs, so only the first compiles
/// their dependencies.
fn authors_target() -> std::path::PathBuf {
    kiln_tests::root().join("target/authors")
}

/// The environment that builds a handler crate offline into `target`.
fn offline(target: &std::path::Path) -> [(&'static str, &std::path::Path); 2] {
    [("CARGO_NET_OFFLINE", std::path::Path::new("true")), ("CARGO_TARGET_DIR", target)]
}

#[tokio::test]
async fn a_handler_goes_from_kiln_new_to_served_and_redeployed_offline() {
    let server = super::server();
    let dir = kiln_tests::TempDir::new("kiln-new").expect("temp dir");
    let folder = dir.path.display().to_string();
    let made = run(&kiln_bin(), &["new", "rows", "--template", "json", "--dir", &folder], &[]);
    assert!(made.contains("from the json template"), "{made}");
    let crate_dir = dir.path.join("rows");
    for file in ["Cargo.toml", ".cargo/config.toml", "README.md", "kiln.toml", "src/lib.rs"] {
        assert!(crate_dir.join(file).is_file(), "kiln new made no {file}");
    }
    // Offline: everything it needs is what building Kiln already fetched.
    let target = authors_target();
    let offline = offline(&target);
    let crate_path = crate_dir.display().to_string();
    let built = run(&kiln_bin(), &["build", &crate_path], &offline);
    assert!(built.contains("ok: Kiln can serve this component"), "{built}");
    let component = target.join("wasm32-wasip2/release/rows.wasm");
    assert!(built.contains(&component.display().to_string()), "{built}");
    // Its own tests, the whole handler among them, run in-process on the host.
    let manifest = crate_dir.join("Cargo.toml").display().to_string();
    let tested = run(std::path::Path::new("cargo"), &["test", "--release", "--manifest-path", &manifest], &offline);
    assert!(tested.contains("test result: ok. 3 passed"), "{tested}");

    let deploy = |component: &std::path::Path| {
        let path = component.display().to_string();
        run(
            &kiln_bin(),
            &["handler", "deploy", &path, "--name", "authored-rows", "--tenant", "demo", "--admin-url", &server.admin],
            &[("KILN_ADMIN_KEY", std::path::Path::new(server.admin_key()))],
        )
    };
    deploy(&component);
    let client = server.client("demo");
    let url = server.url("/v1/handlers/authored-rows/");
    let row: Vec<f32> = (0..64).map(|i| ((i * 7) % 16) as f32 / 16.0).collect();
    let two_rows = serde_json::json!({ "rows": [row, row] });
    let answer = client.post(&url).json(&two_rows).send().await.expect("call");
    let status = answer.status().as_u16();
    let body: serde_json::Value = answer.json().await.expect("JSON");
    assert_eq!(status, 200, "{body}");
    let predictions = body.as_array().expect("a list");
    assert_eq!(predictions.len(), 2);
    assert_eq!(predictions[0]["scores"].as_array().map(Vec::len), Some(10), "{body}");
    // The same class the model gives straight through the Open Inference Protocol.
    let oip = serde_json::json!({ "inputs": [{ "name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": row }] });
    let direct: serde_json::Value =
        client.post(server.url("/v2/models/digits/infer")).json(&oip).send().await.expect("OIP").json().await.expect("JSON");
    let logits: Vec<f64> = direct["outputs"][0]["data"].as_array().expect("data").iter().filter_map(|v| v.as_f64()).collect();
    let best = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).expect("scores");
    assert_eq!(predictions[0]["class"], serde_json::json!(best), "{body} against {direct}");

    // A changed handler, built and deployed again under the same name, answers as changed.
    let source = crate_dir.join("src/lib.rs");
    let text = std::fs::read_to_string(&source).expect("read lib.rs");
    std::fs::write(&source, text.replace("const MAX_ROWS: usize = 64;", "const MAX_ROWS: usize = 1;")).expect("edit");
    run(&kiln_bin(), &["build", &crate_path], &offline);
    deploy(&component);
    let answer = client.post(&url).json(&two_rows).send().await.expect("call");
    let status = answer.status().as_u16();
    let body = answer.text().await.expect("body");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("send 1 to 1 rows, got 2"), "{body}");
}

/// A handler that reports what it found in memory when its request began: what `warm` left
/// (with the answer wasi:nn gave it at build time), and how many requests its instance has seen.
const PROBE: &str = r#"
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use kiln_guest::{Error, Handler, Model, Request, Response};

static WARMED: OnceLock<String> = OnceLock::new();
static REQUESTS: AtomicU32 = AtomicU32::new(0);

struct Probe;

impl Handler for Probe {
    fn handle(_request: Request) -> Result<Response, Error> {
        let seen = REQUESTS.fetch_add(1, Ordering::Relaxed) + 1;
        Response::json(200, &serde_json::json!({ "warmed": WARMED.get(), "requests_seen": seen }))
    }
}

fn warm() {
    let model = match Model::load("digits") {
        Ok(_) => "loaded".to_owned(),
        Err(e) => format!("{:?}", e.code()),
    };
    WARMED.get_or_init(|| format!("model at build time: {model}"));
}

kiln_guest::export_handler!(Probe, init = warm);
"#;

#[tokio::test]
async fn kiln_build_pre_initialises_a_handler_that_opts_in() {
    let server = super::server();
    let dir = kiln_tests::TempDir::new("kiln-preinit").expect("temp dir");
    let folder = dir.path.display().to_string();
    run(&kiln_bin(), &["new", "probe", "--template", "json", "--dir", &folder], &[]);
    let crate_dir = dir.path.join("probe");
    std::fs::write(crate_dir.join("src/lib.rs"), PROBE).expect("write lib.rs");
    let target = authors_target();
    let offline = offline(&target);
    let crate_path = crate_dir.display().to_string();
    let built = run(&kiln_bin(), &["build", &crate_path], &offline);
    assert!(built.contains("pre-initialised: ran `wizer-initialize`"), "{built}");
    let plain = target.join("wasm32-wasip2/release/probe.wasm");
    let initialized = target.join("wasm32-wasip2/release/probe.initialized.wasm");
    assert!(built.contains(&format!("component: {}", initialized.display())), "{built}");

    let admin_key = [("KILN_ADMIN_KEY", std::path::Path::new(server.admin_key()))];
    let client = server.client("demo");
    for (name, component) in [("probe-plain", &plain), ("probe-initialized", &initialized)] {
        let path = component.display().to_string();
        run(&kiln_bin(), &["handler", "deploy", &path, "--name", name, "--tenant", "demo", "--admin-url", &server.admin], &admin_key);
    }
    for _ in 0..2 {
        let url = server.url("/v1/handlers/probe-initialized/");
        let body: serde_json::Value = client.get(&url).send().await.expect("call").json().await.expect("JSON");
        // What `warm` built is there from the start, wasi:nn had no model for it, and each
        // request still gets a fresh instance of the snapshot.
        assert_eq!(body, serde_json::json!({ "warmed": "model at build time: Some(NotFound)", "requests_seen": 1 }));
        let url = server.url("/v1/handlers/probe-plain/");
        let body: serde_json::Value = client.get(&url).send().await.expect("call").json().await.expect("JSON");
        assert_eq!(body, serde_json::json!({ "warmed": null, "requests_seen": 1 }), "cargo's own file is left as cargo made it");
    }

    // An initialisation that fails stops the build, and says where.
    std::fs::write(crate_dir.join("src/lib.rs"), PROBE.replace("WARMED.get_or_init", "panic!(\"no warm-up today\"); #[allow(unreachable_code)] WARMED.get_or_init"))
        .expect("write lib.rs");
    let text = failing(&["build", &crate_path], &offline);
    assert!(text.contains("no warm-up today") && text.contains("`wizer-initialize` failed"), "{text}");

    // One that never returns is stopped at the timeout.
    std::fs::write(crate_dir.join("src/lib.rs"), PROBE.replace("WARMED.get_or_init", "loop { std::hint::black_box(0); } #[allow(unreachable_code)] WARMED.get_or_init"))
        .expect("write lib.rs");
    let text = failing(&["build", &crate_path, "--init-timeout", "1s"], &offline);
    assert!(text.contains("`wizer-initialize` ran past 1 s"), "{text}");
}

/// The text template builds its vocabulary at build time; served both ways, the pre-initialised
/// component answers exactly as cargo's own build of it.
#[tokio::test]
async fn the_pre_initialised_text_template_answers_like_its_plain_build() {
    let server = super::server();
    let dir = kiln_tests::TempDir::new("kiln-preinit-text").expect("temp dir");
    let folder = dir.path.display().to_string();
    run(&kiln_bin(), &["new", "words", "--template", "text", "--dir", &folder], &[]);
    let target = authors_target();
    let offline = offline(&target);
    let built = run(&kiln_bin(), &["build", &dir.path.join("words").display().to_string()], &offline);
    assert!(built.contains("pre-initialised"), "{built}");
    let config = std::fs::read_to_string(dir.path.join("words/kiln.toml")).expect("kiln.toml");
    assert!(config.contains("words.initialized.wasm"), "the sample config serves the pre-initialised file: {config}");
    let admin_key = [("KILN_ADMIN_KEY", std::path::Path::new(server.admin_key()))];
    let texts = serde_json::json!({ "texts": ["A man is eating food.", "Playing the guitar, loudly!"] });
    let mut answers = Vec::new();
    for (name, file) in [("words-plain", "words.wasm"), ("words-initialized", "words.initialized.wasm")] {
        let path = target.join("wasm32-wasip2/release").join(file).display().to_string();
        run(&kiln_bin(), &["handler", "deploy", &path, "--name", name, "--tenant", "demo", "--admin-url", &server.admin], &admin_key);
        let answer = server.client("demo").post(server.url(&format!("/v1/handlers/{name}/"))).json(&texts).send().await.expect("call");
        let status = answer.status().as_u16();
        let body: serde_json::Value = answer.json().await.expect("JSON");
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(body["vectors"].as_array().map(Vec::len), Some(2), "{name}: {body}");
        assert_eq!(body["vectors"][0].as_array().map(Vec::len), Some(384), "{name}: {body}");
        answers.push(body);
    }
    assert_eq!(answers[0], answers[1]);
}

#[test]
fn every_template_builds_passes_kiln_check_and_its_own_tests() {
    let dir = kiln_tests::TempDir::new("kiln-templates").expect("temp dir");
    let folder = dir.path.display().to_string();
    let target = authors_target();
    let offline = offline(&target);
    for template in ["image", "text"] {
        let name = format!("made-{template}");
        run(&kiln_bin(), &["new", &name, "--template", template, "--dir", &folder], &[]);
        let crate_dir = dir.path.join(&name);
        let built = run(&kiln_bin(), &["build", &crate_dir.display().to_string()], &offline);
        assert!(built.contains("ok: Kiln can serve this component"), "{template}: {built}");
        // The crate's own tests, on this machine, with cargo alone.
        let manifest = crate_dir.join("Cargo.toml").display().to_string();
        let tested = run(std::path::Path::new("cargo"), &["test", "--release", "--manifest-path", &manifest], &offline);
        assert!(tested.contains("test result: ok. 3 passed"), "{template}: {tested}");
    }
    // Its sample config is one `kiln serve` accepts.
    let config = dir.path.join("made-text/kiln.toml").display().to_string();
    let key = run(&kiln_bin(), &["tenant", "add-key", "demo", "-c", &config], &[]);
    assert!(key.starts_with("kiln_"), "{key}");
    // A name that cannot be a handler's is refused before anything is written.
    let output = Command::new(kiln_bin()).args(["new", "Bad Name", "--dir", &folder]).output().expect("run");
    assert!(!output.status.success() && String::from_utf8_lossy(&output.stderr).contains("cannot name a handler"));
    assert!(!dir.path.join("Bad Name").exists());
}

#[test]
fn kiln_guest_packages_for_the_registry_and_builds_from_its_package() {
    // The SDK must carry its wasi:nn WIT and name kiln-wire by version, or a handler outside
    // this repository could not depend on it: package both, then build kiln-guest from exactly
    // what would be uploaded. (Not `cargo package`'s own verify: cargo keeps the first copy of a
    // locally packaged crate it extracts, so a changed kiln-wire of the same version would be
    // built from a stale copy on every later run.)
    let target = authors_target();
    let offline = offline(&target);
    let manifest = kiln_tests::root().join("Cargo.toml").display().to_string();
    let cargo = std::path::Path::new("cargo");
    run(cargo, &["package", "--allow-dirty", "--no-verify", "--manifest-path", &manifest, "-p", "kiln-wire", "-p", "kiln-guest"], &offline);
    let dir = kiln_tests::TempDir::new("kiln-package").expect("temp dir");
    for krate in ["kiln-wire-0.1.0", "kiln-guest-0.1.0"] {
        let file = target.join("package").join(format!("{krate}.crate"));
        assert!(file.is_file(), "cargo package made no {}", file.display());
        run(std::path::Path::new("tar"), &["-xzf", &file.display().to_string(), "-C", &dir.path.display().to_string()], &[]);
    }
    // The packaged SDK names kiln-wire by version, as from the registry: that version is the
    // packaged kiln-wire beside it.
    let guest = dir.path.join("kiln-guest-0.1.0");
    let patch = format!("patch.crates-io.kiln-wire.path={:?}", dir.path.join("kiln-wire-0.1.0").display().to_string());
    let built = run(cargo, &["build", "--config", &patch, "--manifest-path", &guest.join("Cargo.toml").display().to_string()], &offline);
    assert!(built.contains("Compiling kiln-guest v0.1.0") && built.contains("kiln-guest-0.1.0)"), "{built}");
    let listed = run(cargo, &["package", "--allow-dirty", "--list", "--manifest-path", &manifest, "-p", "kiln-guest"], &offline);
    assert!(listed.lines().any(|l| l == "wit/wasi-nn.wit") && listed.lines().any(|l| l == "README.md"), "{listed}");
}
