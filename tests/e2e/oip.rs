//! The Open Inference Protocol, checked by the official Python client `tritonclient[http]`.

use super::{server, served_precision};
use kiln_tests::{artifact, python_checks};

#[test]
fn the_official_tritonclient_reaches_every_oip_endpoint() {
    let server = server();
    python_checks(
        "oip_client.py",
        &[
            server.base.replace("http://", ""),
            artifact("build/models/digits.pt").display().to_string(),
            artifact("build/models/minilm.pt").display().to_string(),
        ],
        &[("KILN_KEY", server.key("demo")), ("SERVED_PRECISION", &served_precision("minilm"))],
        "oip",
        || server.log_text(),
    );
}
