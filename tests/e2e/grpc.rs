//! The Open Inference Protocol over gRPC, checked by the official Python client
//! `tritonclient[grpc]`.

use std::process::Command;

use super::server;
use kiln_tests::{artifact, python, root};

#[test]
fn the_official_grpc_tritonclient_infers_and_manages_models() {
    let server = server();
    let output = Command::new(python())
        .arg(root().join("tests/python/grpc_client.py"))
        .arg(&server.grpc)
        .arg(artifact("build/models/digits.pt"))
        .arg(artifact("build/models/minilm.pt"))
        .arg(artifact("build/models"))
        .env("KILN_KEY", server.key("demo"))
        .env("KILN_ADMIN_KEY", server.admin_key())
        .output()
        .expect("run the Python gRPC client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "grpc_client.py failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("grpc: all checks passed"), "{stdout}");
}
