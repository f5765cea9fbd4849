//! The Open Inference Protocol over gRPC, checked by the official Python client
//! `tritonclient[grpc]`, and by raw messages (grpcio's generic calls) where what matters is
//! whether the server decoded them.

use super::{server, served_precision};
use kiln_tests::{Server, artifact, python_checks};

#[test]
fn the_official_grpc_tritonclient_infers_and_manages_models() {
    let server = server();
    python_checks(
        "grpc_client.py",
        &[
            server.grpc.clone(),
            artifact("build/models/digits.pt").display().to_string(),
            artifact("build/models/minilm.pt").display().to_string(),
            artifact("build/models").display().to_string(),
        ],
        &[("KILN_KEY", server.key("demo")), ("KILN_ADMIN_KEY", server.admin_key()), ("SERVED_PRECISION", &served_precision("minilm"))],
        "grpc",
        || server.log_text(),
    );
}

/// A tenant whose `max_body_bytes` is far below the server's.
const TIGHT_LIMIT: usize = 4096;
/// The server's `max_body_bytes` for that test.
const SERVER_LIMIT: usize = 1 << 20;

/// A call's key is checked from its metadata before any of its message is read, and a tenant's
/// message is read only up to the tenant's own `max_body_bytes`: undecodable messages sent with a
/// wrong key, no key or the wrong kind of key are refused for the key (not with a decode error),
/// and a tenant's message over its limit is refused naming that limit, even past the server's.
/// Its own server, for the small limits.
#[test]
fn grpc_checks_the_key_before_reading_the_message_and_holds_it_to_the_tenants_limit() {
    let config = format!(
        r#"
[server]
max_body_bytes = {SERVER_LIMIT}

[[model]]
name = "digits"
path = "{digits}"
inputs = [{{ name = "image", dtype = "FP32", shape = [-1, 1, 8, 8] }}]
outputs = [{{ name = "logits" }}]

[[tenant]]
name = "demo"
models = ["digits"]

[[tenant]]
name = "tight"
models = ["digits"]
quota = {{ max_body_bytes = {TIGHT_LIMIT} }}
"#,
        digits = artifact("build/models/digits.pt").display(),
    );
    let server = Server::start(&config, &["demo", "tight"]).unwrap_or_else(|e| panic!("{e:#}"));
    python_checks(
        "grpc_auth_first.py",
        &[server.grpc.clone(), TIGHT_LIMIT.to_string(), SERVER_LIMIT.to_string()],
        &[("KILN_KEY", server.key("demo")), ("KILN_TIGHT_KEY", server.key("tight")), ("KILN_ADMIN_KEY", server.admin_key())],
        "grpc auth first",
        || format!("server log:\n{}", server.log_text()),
    );
    // Refused before the handlers ran, the calls were still audited with their peer's address.
    let audit = server.audit_log_with(|line| line.contains("tenant key used on the admin API"));
    let failures: Vec<&str> = audit.lines().filter(|l| l.contains("\"auth_failure\"")).collect();
    assert!(
        failures.len() >= 5 && failures.iter().all(|l| l.contains("\"source\":\"127.0.0.1\"")),
        "the refused gRPC calls are not all in the audit log with their source:\n{audit}"
    );
}
