//! TLS on the serving and admin listeners, with certificates this test makes (rcgen): a client
//! that trusts the CA is served on both, plain HTTP and a client trusting another CA are refused,
//! and the certificate files are replaced under load: new handshakes get the new certificate
//! within a couple of seconds, a connection made before keeps working, no request fails, and a
//! half-written replacement leaves the served certificate as it was.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_tests::{Server, TempDir, a_digit, examples_config, kiln};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A certificate authority of the test's own.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("CA");
        Ca { cert, key }
    }

    /// A certificate for 127.0.0.1 and localhost signed by this CA: (certificate PEM, key PEM).
    fn leaf(&self) -> (String, String) {
        let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).expect("params");
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }

    fn root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.cert.pem().as_bytes()).expect("root")
    }
}

/// A client that trusts `cas` only (not the system's roots), a new connection per request
/// unless `keep_alive`.
fn client(cas: &[&Ca], keep_alive: bool) -> reqwest::Client {
    let mut builder = reqwest::Client::builder().use_rustls_tls().tls_built_in_root_certs(false).timeout(Duration::from_secs(20));
    for ca in cas {
        builder = builder.add_root_certificate(ca.root());
    }
    if !keep_alive {
        builder = builder.pool_max_idle_per_host(0);
    }
    builder.build().expect("client")
}

/// Writes `pem` to `path` at once (a new file renamed over the old), as a certificate manager does.
fn replace(path: &std::path::Path, pem: &str) {
    let temp = path.with_extension("new");
    std::fs::write(&temp, pem).expect("write");
    std::fs::rename(&temp, path).expect("rename");
}

#[tokio::test]
async fn the_listeners_speak_tls_and_take_a_new_certificate_under_load() {
    let (first, second) = (Ca::new("kiln test CA 1"), Ca::new("kiln test CA 2"));
    let dir = TempDir::new("kiln-tls").expect("dir");
    let (cert, key) = (dir.path.join("cert.pem"), dir.path.join("key.pem"));
    let (cert_pem, key_pem) = first.leaf();
    replace(&cert, &cert_pem);
    replace(&key, &key_pem);

    // Half the pair is a config error naming the missing half.
    let half = dir.path.join("half.toml");
    std::fs::write(&half, format!("[server]\ntls_cert = \"{}\"\n", cert.display())).expect("config");
    let refused = kiln(&["config", "show", "--config", &half.display().to_string()]).expect_err("half a pair");
    assert!(refused.to_string().contains("tls_key"), "{refused:#}");

    let tls = format!("tls_cert = \"{}\"\ntls_key = \"{}\"", cert.display(), key.display());
    let server = Server::start(&examples_config(&tls, &[], ""), &["demo"]).expect("server");
    assert!(server.base.starts_with("https://"), "{}", server.base);
    let trusting = client(&[&first], false);
    let started = Instant::now();
    loop {
        match trusting.get(server.url("/v2/health/ready")).send().await {
            Ok(r) if r.status() == 200 => break,
            other => assert!(started.elapsed() < Duration::from_secs(120), "not ready over TLS: {other:?}\n{}", server.log_text()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Both listeners, with keys as usual.
    let png = a_digit();
    let answer = trusting.post(server.url("/v1/handlers/digits/")).bearer_auth(server.key("demo")).body(png.clone()).send().await.expect("digits");
    assert_eq!(answer.status(), 200);
    let stats = trusting.get(server.url("/v1/stats")).bearer_auth(server.admin_key()).send().await.expect("stats");
    assert_eq!(stats.status(), 200);
    let handlers = trusting.get(server.admin_url("/v1/handlers")).bearer_auth(server.admin_key()).send().await.expect("admin API");
    assert_eq!(handlers.status(), 200);
    // Plain HTTP on the TLS port gets no answer; a client trusting another CA is refused.
    let plain = reqwest::Client::new().get(server.url("/v2/health/ready").replacen("https://", "http://", 1)).send().await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200), "plain HTTP was served");
    let stranger = client(&[&second], false).get(server.url("/v2/health/ready")).send().await;
    let error = format!("{:?}", stranger.expect_err("another CA"));
    assert!(error.to_lowercase().contains("certificate") || error.contains("UnknownIssuer"), "{error}");

    // Under load from a client that trusts both CAs, the certificate is replaced by one from the
    // second CA; a connection made before keeps working.
    let kept = client(&[&first], true);
    assert_eq!(kept.get(server.url("/v2/health/live")).send().await.expect("kept").status(), 200);
    let (ok, failed, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (both, url, key, png) = (client(&[&first, &second], false), server.url("/v1/handlers/digits/"), server.key("demo").to_owned(), png.clone());
            let (ok, failed, stop) = (Arc::clone(&ok), Arc::clone(&failed), Arc::clone(&stop));
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    match both.post(&url).bearer_auth(&key).body(png.clone()).send().await {
                        Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::SeqCst),
                        _ => failed.fetch_add(1, Ordering::SeqCst),
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cert_pem, key_pem) = second.leaf();
    let rotated = Instant::now();
    replace(&key, &key_pem);
    replace(&cert, &cert_pem);
    let (new_ca, old_ca) = (client(&[&second], false), client(&[&first], false));
    loop {
        let new = new_ca.get(server.url("/v2/health/live")).send().await.is_ok_and(|r| r.status() == 200);
        if new {
            break;
        }
        assert!(rotated.elapsed() < Duration::from_secs(15), "the new certificate was not served:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("new certificate served {:.1} s after the files changed", rotated.elapsed().as_secs_f64());
    assert!(old_ca.get(server.url("/v2/health/live")).send().await.is_err(), "a new handshake still got the old certificate");
    assert_eq!(kept.get(server.url("/v2/health/live")).send().await.expect("kept connection").status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.expect("load");
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!("during the rotation: {ok} answered, {failed} failed");
    assert!(ok > 0 && failed == 0, "{ok} answered, {failed} failed");

    // A broken replacement (a certificate without its key) is not served: the last good one stays.
    let warnings = || server.log_text().matches("cannot be used yet").count();
    let before = warnings();
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n").expect("write");
    let warned = Instant::now();
    while warnings() == before {
        assert!(warned.elapsed() < Duration::from_secs(10), "no warning about the broken certificate:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(new_ca.get(server.url("/v2/health/live")).send().await.expect("still served").status(), 200);
}
