//! TLS with certificates the tests make (rcgen).
//!
//! The serving and admin listeners: a client that trusts the CA is served on both, plain HTTP
//! and a client trusting another CA are refused, and the certificate files are replaced under
//! load: new handshakes get the new certificate within a couple of seconds, a connection made
//! before keeps working, no request fails, and a half-written replacement leaves the served
//! certificate as it was.
//!
//! Every listener and every client Kiln ships: gRPC and metrics over TLS, client certificates
//! on the admin listener, `kiln health`, the admin commands and `kiln bench` (HTTP and gRPC)
//! with `--cacert`, refusing a wrong CA and an expired certificate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_tests::certs::{Ca, client, replace};
use kiln_tests::{Server, TempDir, a_digit, examples_config, kiln};

#[tokio::test]
async fn the_listeners_speak_tls_and_take_a_new_certificate_under_load() {
    let (first, second) = (Ca::new("kiln test CA 1"), Ca::new("kiln test CA 2"));
    let dir = TempDir::new("kiln-tls").expect("dir");
    let (cert, key) = first.leaf().write(&dir.path, "server");

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
    eprintln!("plain gRPC to the TLS port: {plain:?}");
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
    let renewed = second.leaf();
    let rotated = Instant::now();
    replace(&key, &renewed.key);
    replace(&cert, &renewed.cert);
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

/// Runs `kiln ARGS` with `env`; its stdout, or its stderr as the error.
fn kiln_with(args: &[&str], env: &[(&str, &str)]) -> Result<String, String> {
    let output = std::process::Command::new(kiln_tests::kiln_bin())
        .args(args)
        .envs(env.iter().copied())
        .env_remove("KILN_CACERT")
        .output()
        .map_err(|e| e.to_string())?;
    match output.status.success() {
        true => Ok(String::from_utf8_lossy(&output.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&output.stderr).into_owned()),
    }
}

#[tokio::test]
async fn every_listener_and_every_client_speak_tls() {
    let (ca, stranger, clients) = (Ca::new("kiln test CA"), Ca::new("another CA"), Ca::new("kiln admin clients"));
    let dir = TempDir::new("kiln-tls-all").expect("dir");
    let (cert, key) = ca.leaf().write(&dir.path, "server");
    let (ca_file, stranger_file, clients_file) =
        (ca.write(&dir.path.join("ca.pem")), stranger.write(&dir.path.join("stranger.pem")), clients.write(&dir.path.join("clients.pem")));
    let (operator_cert, operator_key) = clients.client("operator").write(&dir.path, "operator");
    let (intruder_cert, intruder_key) = stranger.client("intruder").write(&dir.path, "intruder");
    let metrics_port = kiln_tests::free_port().expect("port");
    let tls = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\nadmin_client_ca = \"{}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"",
        cert.display(),
        key.display(),
        clients_file.display()
    );
    let server = Server::start(&examples_config(&tls, &[], ""), &["demo"]).expect("server");
    let path = |p: &std::path::Path| p.display().to_string();
    let (ca_arg, stranger_arg) = (path(&ca_file), path(&stranger_file));

    // `kiln health` trusting the CA answers once the models are warm; trusting the system's
    // roots or another CA, it is refused for the certificate.
    let started = Instant::now();
    while let Err(e) = kiln_with(&["health", "--url", &server.base, "--cacert", &ca_arg], &[]) {
        assert!(started.elapsed() < Duration::from_secs(120), "not ready over TLS: {e}\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for refused in [kiln_with(&["health", "--url", &server.base], &[]), kiln_with(&["health", "--url", &server.base, "--cacert", &stranger_arg], &[])] {
        let error = refused.expect_err("an untrusted certificate");
        assert!(error.contains("certificate") || error.contains("UnknownIssuer"), "{error}");
    }
    // Without --url it probes the server of the config it finds, over https as that config says,
    // without checking the certificate (it names the server, not the address probed).
    let addr = server.base.trim_start_matches("https://");
    let local = kiln_with(&["health"], &[("KILN_CONFIG", &path(&server.config)), ("KILN_SERVER__LISTEN", addr)]);
    assert_eq!(local.as_deref().map(str::trim), Ok("ready"), "{local:?}");

    // The admin listener asks for a client certificate from its CA, besides the admin key.
    let admin = ["handler", "ls", "--admin-url", &server.admin, "--admin-key", server.admin_key(), "--cacert", &ca_arg];
    let listed = kiln_with(&[&admin[..], &["--client-cert", &path(&operator_cert), "--client-key", &path(&operator_key)]].concat(), &[]);
    assert!(listed.as_ref().is_ok_and(|out| out.contains("digits")), "{listed:?}");
    let without = kiln_with(&admin, &[]).expect_err("no client certificate");
    eprintln!("without a client certificate: {without}");
    assert!(without.contains("the admin API") && without.contains("CertificateRequired"), "{without}");
    let intruder = kiln_with(&[&admin[..], &["--client-cert", &path(&intruder_cert), "--client-key", &path(&intruder_key)]].concat(), &[]);
    eprintln!("a client certificate from another CA: {intruder:?}");
    assert!(intruder.is_err(), "a client certificate from another CA was taken: {intruder:?}");
    let wrong_ca = kiln_with(&["handler", "ls", "--admin-url", &server.admin, "--admin-key", server.admin_key(), "--cacert", &stranger_arg, "--client-cert", &path(&operator_cert), "--client-key", &path(&operator_key)], &[]);
    assert!(wrong_ca.is_err_and(|e| e.contains("certificate") || e.contains("UnknownIssuer")), "the admin command trusted another CA");
    // The serving listener asks for none.
    let live = client(&[&ca], false).get(server.url("/v2/health/live")).send().await.expect("serving listener");
    assert_eq!(live.status(), 200);

    // Metrics without a key, over TLS.
    let metrics = client(&[&ca], false).get(format!("https://127.0.0.1:{metrics_port}/metrics")).send().await.expect("metrics over TLS");
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.expect("body").contains("kiln_requests_in_flight"));

    // `kiln bench` over https and over gRPC with TLS, trusting the CA: every request answered.
    let png = dir.path.join("seven.png");
    std::fs::write(&png, a_digit()).expect("png");
    let oip = dir.path.join("oip.json");
    let pixels = vec![0.0f32; 64];
    std::fs::write(&oip, serde_json::json!({ "inputs": [{ "name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": pixels }] }).to_string()).expect("oip");
    let bench = |extra: &[&str], cacert: &str| {
        let args = [&["bench", "--url", &server.base, "--tenant-key", server.key("demo"), "--requests", "20", "--concurrency", "4", "--json", "--cacert", cacert][..], extra].concat();
        let out = kiln_with(&args, &[]).unwrap_or_else(|e| format!("{{\"failed\": {}}}", serde_json::Value::String(e)));
        serde_json::from_str::<serde_json::Value>(&out).expect("bench JSON")
    };
    let grpc_url = format!("https://{}", server.grpc);
    let handler = ["--handler", "digits", "--body", &path(&png)];
    let grpc = ["--model", "digits", "--body", &path(&oip), "--grpc", &grpc_url];
    for (what, args) in [("HTTPS", &handler[..]), ("gRPC over TLS", &grpc[..])] {
        let report = bench(args, &ca_arg);
        assert_eq!(report["ok"], 20, "{what}: {report}");
        let refused = bench(args, &stranger_arg);
        eprintln!("{what} trusting another CA: {refused}");
        assert_eq!(refused["ok"].as_u64().unwrap_or(0), 0, "{what} trusted another CA: {refused}");
        assert!(refused.to_string().contains("certificate") || refused.to_string().contains("UnknownIssuer"), "{what}: {refused}");
    }
    // Plain gRPC to the TLS port is not served.
    let plain = kiln_with(&[&["bench", "--tenant-key", server.key("demo"), "--requests", "2", "--json"][..], &["--model", "digits", "--body", &path(&oip), "--grpc", &server.grpc]].concat(), &[]);
    eprintln!("plain gRPC to the TLS port: {plain:?}");
    assert!(plain.is_err() || plain.as_deref().is_ok_and(|out| out.contains("\"ok\":0") || out.contains("\"ok\": 0")), "plain gRPC was served: {plain:?}");

    // An expired certificate (as one left to lapse) is served once written, and every client
    // refuses it; a renewed one is taken again.
    let expired = ca.expired_leaf();
    replace(&key, &expired.key);
    replace(&cert, &expired.cert);
    let changed = Instant::now();
    let error = loop {
        match kiln_with(&["health", "--url", &server.base, "--cacert", &ca_arg], &[]) {
            Err(e) => break e,
            Ok(_) => assert!(changed.elapsed() < Duration::from_secs(15), "the expired certificate was not served"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("kiln health, an expired certificate: {error}");
    assert!(error.to_lowercase().contains("expired"), "{error}");
    let report = bench(&handler, &ca_arg);
    assert!(report["ok"].as_u64().unwrap_or(0) == 0 && report.to_string().to_lowercase().contains("expired"), "{report}");
    let admin_expired = kiln_with(&[&admin[..], &["--client-cert", &path(&operator_cert), "--client-key", &path(&operator_key)]].concat(), &[]);
    assert!(admin_expired.is_err_and(|e| e.to_lowercase().contains("expired")), "the admin command took an expired certificate");
    let error = format!("{:?}", client(&[&ca], false).get(server.url("/v2/health/live")).send().await.expect_err("expired"));
    assert!(error.contains("Expired"), "{error}");

    ca.leaf().write(&dir.path, "server");
    let renewed = Instant::now();
    while kiln_with(&["health", "--url", &server.base, "--cacert", &ca_arg], &[]).is_err() {
        assert!(renewed.elapsed() < Duration::from_secs(15), "the renewed certificate was not served:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(bench(&grpc, &ca_arg)["ok"], 20);
}
