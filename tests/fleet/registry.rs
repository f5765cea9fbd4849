//! Handlers in an OCI registry: a real one on loopback (Debian's `docker-registry`, the CNCF
//! distribution server) with TLS and basic auth on, Kiln's push and pull checked against an
//! independent client (`tests/python/oci_client.py`), a server whose handler is pinned there,
//! and the ways a registry fails.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kiln_tests::registry::{PASSWORD, Registry, USER, base64};
use kiln_tests::{Server, TempDir, artifact, free_port, kiln};

/// The calls these tests make against a registry.
trait Calls {
    fn kiln(&self, args: &[&str], auth: &str) -> (bool, String, String);
    fn python(&self, args: &[&str]) -> String;
}

impl Calls for Registry {
    /// `kiln ARGS --registry-auth … --registry-ca …`: exit status, stdout, stderr.
    fn kiln(&self, args: &[&str], auth: &str) -> (bool, String, String) {
        let out = Command::new(kiln_tests::kiln_bin())
            .args(args)
            .args(["--registry-auth", &self.file(auth), "--registry-ca", &self.file("ca.pem")])
            .output()
            .expect("kiln");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// `tests/python/oci_client.py ARGS`, the independent client; its stdout.
    fn python(&self, args: &[&str]) -> String {
        let out = Command::new(kiln_tests::python())
            .arg(kiln_tests::root().join("tests/python/oci_client.py"))
            .args(args)
            .env("OCI_USER", USER)
            .env("OCI_PASSWORD", PASSWORD)
            .env("OCI_CA", self.file("ca.pem"))
            .output()
            .expect("python");
        assert!(out.status.success(), "oci_client.py {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}


fn digits_wasm() -> PathBuf {
    artifact("target/wasm32-wasip2/guest/digits.wasm")
}

/// The digits model, a tenant and one handler whose component is `component`, with the
/// registry's credentials and CA; `tenant_extra` goes into the tenant's section.
fn config(registry: &Registry, component: &str, tenant_extra: &str, server_extra: &str) -> String {
    format!(
        r#"
[server]
registry_auth = "{auth}"
registry_ca = "{ca}"
{server_extra}

[[model]]
name = "digits"
path = "{model}"
inputs = [{{ name = "image", dtype = "FP32", shape = [-1, 1, 8, 8] }}]
outputs = [{{ name = "logits" }}]

[[tenant]]
name = "demo"
models = ["digits"]
{tenant_extra}

[[handler]]
name = "digits"
tenant = "demo"
component = "{component}"
models = ["digits"]
"#,
        auth = registry.file("auth.json"),
        ca = registry.file("ca.pem"),
        model = artifact("build/models/digits.pt").display(),
    )
}

/// `kiln serve` on `config`, expected to stop at start: its stderr.
fn serve_refuses(config: &str) -> String {
    let dir = TempDir::new("kiln-refused").expect("dir");
    let path = dir.path.join("kiln.toml");
    std::fs::write(&path, config).expect("config");
    let port = free_port().expect("port").to_string();
    let mut child = Command::new(kiln_tests::kiln_bin())
        .args(["serve", "--config", &path.display().to_string(), "--listen", &format!("127.0.0.1:{port}"), "--admin-listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln serve");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("kiln serve did not stop at start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut err = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
    assert!(!child.wait().expect("status").success(), "{err}");
    err
}

async fn classify(server: &Server) -> u16 {
    let response = server.client("demo").post(server.url("/v1/handlers/digits/")).body(kiln_tests::a_digit()).send().await.expect("post");
    response.status().as_u16()
}

#[test]
fn kiln_and_an_independent_client_read_each_other_s_wasm_artifacts() {
    let Some(registry) = Registry::start("fleet::registry::kiln_and_an_independent_client_read_each_other_s_wasm_artifacts") else { return };
    let wasm = digits_wasm().display().to_string();
    // Kiln pushes; the Python client checks the layout wkg and Spin read.
    let (ok, pinned, err) = registry.kiln(&["push", &wasm, &format!("oci://{}/kiln/digits:v1", registry.addr)], "auth.json");
    assert!(ok, "{err}");
    let digest = pinned.rsplit_once('@').map(|(_, d)| d.to_owned()).unwrap_or_else(|| panic!("no pin in '{pinned}'"));
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{pinned}");
    let checked = registry.python(&["check", &registry.addr, "kiln/digits", &digest, &wasm]);
    assert!(checked.contains("all checks passed"), "{checked}");
    // The Python client pushes; Kiln pulls it by digest and by tag, byte for byte.
    let theirs = registry.python(&["push", &registry.addr, "kiln/digits-py", "v1", &wasm]);
    let out = TempDir::new("kiln-pulled").expect("dir");
    let file = out.path.join("pulled.wasm").display().to_string();
    let (ok, pin, err) = registry.kiln(&["pull", &format!("oci://{}/kiln/digits-py@{theirs}", registry.addr), "-o", &file], "auth.json");
    assert!(ok, "{err}");
    assert_eq!(pin, format!("oci://{}/kiln/digits-py@{theirs}", registry.addr));
    assert_eq!(std::fs::read(&file).expect("pulled"), std::fs::read(&wasm).expect("wasm"));
    let (ok, by_tag, err) = registry.kiln(&["pull", &format!("oci://{}/kiln/digits-py:v1", registry.addr), "-o", &file], "auth.json");
    assert!(ok && by_tag == pin, "{by_tag} {err}");
}

#[test]
fn registry_failures_are_named_and_leave_nothing_behind() {
    let Some(mut registry) = Registry::start("fleet::registry::registry_failures_are_named_and_leave_nothing_behind") else { return };
    let wasm = digits_wasm().display().to_string();
    let repo = format!("oci://{}/kiln/digits", registry.addr);
    let (ok, pinned, err) = registry.kiln(&["push", &wasm, &format!("{repo}:v1")], "auth.json");
    assert!(ok, "{err}");
    let out = TempDir::new("kiln-pull-fail").expect("dir");
    let file = out.path.join("h.wasm");
    let file_arg = file.display().to_string();
    let absent = format!("{repo}@sha256:{}", "0".repeat(64));
    for (what, reference, auth, says) in [
        ("a wrong digest", absent.as_str(), "auth.json", "not in"),
        ("a missing tag", &format!("{repo}:no-such-tag"), "auth.json", "not in"),
        ("a wrong password", pinned.as_str(), "wrong-auth.json", "refused the credentials (401)"),
    ] {
        let (ok, _, err) = registry.kiln(&["pull", reference, "-o", &file_arg], auth);
        assert!(!ok, "{what}: pulled");
        assert!(err.contains(says) && err.contains(&registry.addr), "{what}: {err}");
        assert!(!file.exists(), "{what}: left a file");
    }
    // A tag is refused where unpinned sources are not allowed; a wrong CA is not trusted.
    let refused = serve_refuses(&config(&registry, &format!("{repo}:v1"), "", ""));
    assert!(refused.contains("names tag 'v1'") && refused.contains("--allow-unpinned"), "{refused}");
    let out_wrong_ca = Command::new(kiln_tests::kiln_bin())
        .args(["pull", &pinned, "-o", &file_arg, "--registry-auth", &registry.file("auth.json")])
        .output()
        .expect("kiln");
    let err = String::from_utf8_lossy(&out_wrong_ca.stderr);
    assert!(!out_wrong_ca.status.success() && !file.exists(), "{err}");
    assert!(err.contains("certificate"), "not refused for its certificate: {err}");

    // A registry that goes away mid-pull: a proxy passes the TLS stream through and cuts every
    // connection once 256 KiB have come back, in the middle of a 4 MiB layer.
    let big = out.path.join("big.wasm");
    std::fs::write(&big, vec![7u8; 4 << 20]).expect("big");
    let big_digest = registry.python(&["push", &registry.addr, "kiln/big", "v1", &big.display().to_string()]);
    let proxy = CuttingProxy::start(&registry.addr, 256 << 10);
    let through = format!("oci://127.0.0.1:{}/kiln/big@{big_digest}", proxy.port);
    // The certificate names 127.0.0.1, so the proxy on another port of it is trusted.
    std::fs::write(registry.dir.path.join("proxy-auth.json"), format!(r#"{{"auths":{{"127.0.0.1:{}":{{"auth":"{}"}}}}}}"#, proxy.port, base64(&format!("{USER}:{PASSWORD}")))).expect("auth");
    let (ok, _, err) = registry.kiln(&["pull", &through, "-o", &file_arg], "proxy-auth.json");
    assert!(!ok, "pulled through a cut connection");
    assert!(proxy.cut.load(Ordering::SeqCst), "the proxy never cut: {err}");
    assert!(err.contains("cannot pull") && (err.contains("broke off") || err.contains("cannot reach") || err.contains("digest")), "{err}");
    assert!(!file.exists(), "a cut pull left a file");

    // A registry that is gone: a server with nothing cached stops at start, naming both.
    registry.stop();
    let refused = serve_refuses(&config(&registry, &pinned, "", ""));
    assert!(refused.contains("handler 'digits'") && refused.contains("cannot reach") && refused.contains(&registry.addr), "{refused}");
}

#[tokio::test]
async fn a_server_runs_a_handler_pinned_in_a_registry_and_restarts_without_the_registry() {
    let Some(mut registry) = Registry::start("fleet::registry::a_server_runs_a_handler_pinned_in_a_registry") else { return };
    let wasm = digits_wasm().display().to_string();
    let (ok, pinned, err) = registry.kiln(&["push", &wasm, &format!("oci://{}/kiln/digits:v1", registry.addr)], "auth.json");
    assert!(ok, "{err}");
    let server = Server::start(&config(&registry, &pinned, "", ""), &["demo"]).expect("server");
    assert_eq!(classify(&server).await, 200, "{}", server.log_text());
    assert!(server.log_text().contains(&pinned), "the log names the pinned component");
    // Fetched once: with the registry gone, a restart serves from the cache.
    registry.stop();
    server.restart().expect("restart");
    assert_eq!(classify(&server).await, 200, "{}", server.log_text());
}

#[tokio::test]
async fn a_tenant_with_a_signing_key_runs_only_a_component_signed_for_this_handler() {
    let Some(registry) = Registry::start("fleet::registry::a_tenant_with_a_signing_key") else { return };
    let wasm = digits_wasm().display().to_string();
    let keys = TempDir::new("kiln-oci-keys").expect("dir");
    let prefix = keys.path.join("acme").display().to_string();
    let line = kiln(&["keygen", "--out", &prefix]).expect("keygen");
    let key = keys.path.join("acme.key").display().to_string();
    let sig = keys.path.join("digits.sig").display().to_string();
    let repo = format!("oci://{}/kiln/signed", registry.addr);
    // Unsigned: refused at start.
    let (ok, unsigned, err) = registry.kiln(&["push", &wasm, &format!("{repo}:unsigned")], "auth.json");
    assert!(ok, "{err}");
    let refused = serve_refuses(&config(&registry, &unsigned, line.trim(), ""));
    assert!(refused.contains("requires signed components") && refused.contains("dev.kiln.signature"), "{refused}");
    // Signed for another handler name: refused.
    kiln(&["sign", &wasm, "--handler", "other", "--tenant", "demo", "--models", "digits", "--signing-key", &key, "--out", &sig]).expect("sign");
    let (ok, wrong, err) = registry.kiln(&["push", &wasm, &format!("{repo}:wrong"), "--signature", &sig], "auth.json");
    assert!(ok, "{err}");
    let refused = serve_refuses(&config(&registry, &wrong, line.trim(), ""));
    assert!(refused.contains("does not verify against tenant 'demo'"), "{refused}");
    // Signed for this handler as the config deploys it: served.
    kiln(&["sign", &wasm, "--handler", "digits", "--tenant", "demo", "--models", "digits", "--signing-key", &key, "--out", &sig]).expect("sign");
    let (ok, signed, err) = registry.kiln(&["push", &wasm, &format!("{repo}:v1"), "--signature", &sig], "auth.json");
    assert!(ok, "{err}");
    let server = Server::start(&config(&registry, &signed, line.trim(), ""), &["demo"]).expect("server");
    assert_eq!(classify(&server).await, 200, "{}", server.log_text());
}

/// A TCP proxy to `target` that passes bytes through both ways, and once `limit` bytes have come
/// back from the target over all its connections, closes every one and refuses new ones.
struct CuttingProxy {
    port: u16,
    cut: Arc<AtomicBool>,
}

impl CuttingProxy {
    fn start(target: &str, limit: usize) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let returned = Arc::new(AtomicUsize::new(0));
        let (target, flag) = (target.to_owned(), Arc::clone(&cut));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if flag.load(Ordering::SeqCst) {
                    continue; // dropped: the registry is gone
                }
                let Ok(upstream) = TcpStream::connect(&target) else { continue };
                let (c2, u2) = (client.try_clone().expect("clone"), upstream.try_clone().expect("clone"));
                std::thread::spawn(move || pipe(c2, u2, None));
                let (flag, returned) = (Arc::clone(&flag), Arc::clone(&returned));
                std::thread::spawn(move || pipe(upstream, client, Some((limit, returned, flag))));
            }
        });
        CuttingProxy { port, cut }
    }
}

/// Copies `from` to `to`; with a budget, stops (closing both) once the total passes it.
fn pipe(mut from: TcpStream, mut to: TcpStream, budget: Option<(usize, Arc<AtomicUsize>, Arc<AtomicBool>)>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((limit, total, cut)) = &budget
            && (cut.load(Ordering::SeqCst) || total.fetch_add(n, Ordering::SeqCst) + n > *limit)
        {
            cut.store(true, Ordering::SeqCst);
            break;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}
