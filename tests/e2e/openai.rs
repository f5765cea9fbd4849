//! The embeddings handler's OpenAI-compatible route, checked by the official `openai` client.

use super::server;
use kiln_tests::python_checks;

#[test]
fn the_official_openai_client_gets_embeddings_from_the_handler() {
    let server = server();
    python_checks(
        "openai_client.py",
        &[server.url("/v1/handlers/embeddings")],
        &[("KILN_KEY", server.key("demo"))],
        "openai",
        || server.log_text(),
    );
}
