//! The Open Inference Protocol, checked by the official Python client `tritonclient[http]`.

use std::process::Command;

use super::server;
use kiln_tests::{artifact, python, root};

#[test]
fn the_official_tritonclient_reaches_every_oip_endpoint() {
    let server = server();
    let output = Command::new(python())
        .arg(root().join("tests/python/oip_client.py"))
        .arg(server.base.trim_start_matches("http://"))
        .arg(artifact("build/models/digits.pt"))
        .arg(artifact("build/models/minilm.pt"))
        .env("KILN_KEY", server.key("demo"))
        .output()
        .expect("run the Python OIP client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "oip_client.py failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("oip: all checks passed"), "{stdout}");
}
