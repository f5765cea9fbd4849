//! An OCI registry for tests: Debian's `docker-registry` (the CNCF distribution server) on a
//! loopback port, with TLS (a CA of its own) and basic auth on. Used by the fleet's registry tests
//! and by the e2e examples of `kiln push` and `kiln pull`.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::{TempDir, free_port, skip};

pub const USER: &str = "kiln";
pub const PASSWORD: &str = "s3cret-registry";

/// A `docker-registry` serving TLS with basic auth on a loopback port, its storage in a
/// temporary folder; stopped on drop.
pub struct Registry {
    child: Option<Child>,
    pub dir: TempDir,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

fn run(program: &str, args: &[&str], dir: &Path) {
    let out = Command::new(program).args(args).current_dir(dir).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Registry {
    /// Starts one, or records `test` as skipped where the package is not installed.
    pub fn start(test: &str) -> Option<Registry> {
        if Command::new("docker-registry").arg("--version").output().is_err() {
            skip(test, "needs Debian's docker-registry package (scripts/setup.sh installs it)");
            return None;
        }
        let dir = TempDir::new("kiln-registry").expect("dir");
        let d = &dir.path;
        // A CA of the test's own, and a certificate for 127.0.0.1 signed by it.
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        run("openssl", &[&["req", "-x509"], &ec[..], &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=kiln test CA"]].concat(), d);
        run("openssl", &[&["req"], &ec[..], &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]].concat(), d);
        std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
        run(
            "openssl",
            &["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext"],
            d,
        );
        run("htpasswd", &["-Bbc", "htpasswd", USER, PASSWORD], d);
        let port = free_port().expect("port");
        let addr = format!("127.0.0.1:{port}");
        std::fs::write(
            d.join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}/data\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n  secret: kiln-test\n  tls:\n    certificate: {root}/server.pem\n    key: {root}/server.key\n\
                 auth:\n  htpasswd:\n    realm: kiln-test\n    path: {root}/htpasswd\n",
                root = d.display()
            ),
        )
        .expect("config");
        let log = std::fs::File::create(d.join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .args(["serve", "config.yml"])
            .current_dir(d)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("docker-registry");
        let registry = Registry { child: Some(child), dir, addr };
        registry.wait_listening();
        // Credentials as `docker login` writes them, and one with the wrong password.
        for (file, password) in [("auth.json", PASSWORD), ("wrong-auth.json", "not-it")] {
            let auth = base64(&format!("{USER}:{password}"));
            std::fs::write(registry.dir.path.join(file), format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, registry.addr)).expect("auth");
        }
        Some(registry)
    }

    fn wait_listening(&self) {
        let start = Instant::now();
        while TcpStream::connect(&self.addr).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "docker-registry did not listen: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path.join("registry.log")).unwrap_or_default()
    }

    pub fn file(&self, name: &str) -> String {
        self.dir.path.join(name).display().to_string()
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn base64(text: &str) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, text)
}
