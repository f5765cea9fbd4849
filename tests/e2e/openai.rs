//! The embeddings handler's OpenAI-compatible route, checked by the official `openai` client.

use std::process::Command;

use super::server;
use kiln_tests::{python, root};

#[test]
fn the_official_openai_client_gets_embeddings_from_the_handler() {
    let server = server();
    let output = Command::new(python())
        .arg(root().join("tests/python/openai_client.py"))
        .arg(server.url("/v1/handlers/embeddings"))
        .env("KILN_KEY", server.key("demo"))
        .output()
        .expect("run the Python OpenAI client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "openai_client.py failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("openai: all checks passed"), "{stdout}");
}
