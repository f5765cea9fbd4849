//! The handler author's tools: `kiln check` on real components.

use std::process::Command;

use kiln_tests::{artifact, kiln_bin};

/// `kiln check FILE`: its exit status and everything it printed.
fn check(path: &std::path::Path) -> (bool, String) {
    let output = Command::new(kiln_bin()).arg("check").arg(path).output().expect("run kiln check");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[test]
fn kiln_check_passes_a_handler_and_names_what_kiln_would_refuse() {
    let (ok, text) = check(&artifact("target/wasm32-wasip2/guest/digits.wasm"));
    assert!(ok, "{text}");
    assert!(text.contains("ok  wasi:nn/inference@") && text.contains("wasi:http/incoming-handler@0.2."), "{text}");
    assert!(text.contains("KiB") || text.contains("MiB"), "the size is printed: {text}");
    assert!(text.contains("ok: Kiln can serve this component"), "{text}");

    let (ok, text) = check(&artifact("target/wasm32-wasip2/guest/forbidden.wasm"));
    assert!(!ok, "{text}");
    assert!(text.contains("refused  wasi:filesystem/"), "the refused import is marked: {text}");
    assert!(text.contains("Kiln would refuse") && text.contains("wasi:sockets/"), "{text}");

    let dir = kiln_tests::TempDir::new("kiln-check").expect("temp dir");
    let core = dir.path.join("core.wasm");
    // An empty core module: the magic number and version 1.
    std::fs::write(&core, b"\0asm\x01\0\0\0").expect("write");
    let (ok, text) = check(&core);
    assert!(!ok && text.contains("core module; a handler must be a component"), "{text}");
    let (ok, text) = check(&dir.path.join("missing.wasm"));
    assert!(!ok && text.contains("cannot read") && text.contains("missing.wasm"), "{text}");
}
