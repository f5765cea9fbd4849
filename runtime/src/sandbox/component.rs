//! What a component must be to become a handler: the interfaces it may import (the wasi:http
//! proxy world's and wasi:nn), the handler it must export, read from its bytes before anything
//! is compiled.


/// Interfaces a handler may import, without version. The wasi:http proxy world's imports and
/// wasi:nn, plus the wasi:cli start-up interfaces Rust's std and wasi-libc always import, which a
/// Kiln sandbox answers with nothing (no environment, no terminals; exit ends the request).
const ALLOWED_IMPORTS: &[&str] = &[
    "wasi:io/poll",
    "wasi:io/error",
    "wasi:io/streams",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:random/random",
    // Rust's std seeds every HashMap from here: randomness, no capability.
    "wasi:random/insecure-seed",
    "wasi:random/insecure",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/stdin",
    "wasi:http/types",
    "wasi:http/outgoing-handler",
    "wasi:nn/tensor",
    "wasi:nn/errors",
    "wasi:nn/inference",
    "wasi:nn/graph",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
];

/// The export every handler must have (any 0.2 version).
pub(super) const HANDLER_EXPORT: &str = "wasi:http/incoming-handler@0.2.";

/// Why a component cannot be a handler.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ComponentError {
    #[error("not a valid WebAssembly component: {0}")]
    Invalid(String),
    #[error(
        "the component imports {}, which Kiln does not provide; handlers may import only the wasi:http proxy interfaces and wasi:nn",
        .0.join(", ")
    )]
    ForbiddenImports(Vec<String>),
    #[error("the component does not export wasi:http/incoming-handler@0.2.x")]
    NoHandlerExport,
    #[error("the component cannot be linked: {0}")]
    Link(String),
}

/// The imports of `names` that a handler may not have, in order.
pub fn forbidden_imports<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    names
        .into_iter()
        .filter(|name| {
            let base = name.split_once('@').map_or(*name, |(base, _)| base);
            !ALLOWED_IMPORTS.contains(&base)
        })
        .map(str::to_owned)
        .collect()
}

/// The names a component imports and exports at its top level (nested components and modules
/// are the component's own business).
pub(crate) fn component_interface(bytes: &[u8]) -> Result<(Vec<String>, Vec<String>), String> {
    use wasmparser::{Encoding, Parser, Payload};
    let mut imports = Vec::new();
    let mut exports = Vec::new();
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| e.to_string())? {
            Payload::Version { encoding, .. } => {
                if depth == 0 && encoding != Encoding::Component {
                    return Err("this is a core module; a handler must be a component".to_owned());
                }
                depth += 1;
            }
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(section) if depth == 1 => {
                for import in section {
                    imports.push(import.map_err(|e| e.to_string())?.name.name.to_owned());
                }
            }
            Payload::ComponentExportSection(section) if depth == 1 => {
                for export in section {
                    exports.push(export.map_err(|e| e.to_string())?.name.name.to_owned());
                }
            }
            _ => {}
        }
    }
    Ok((imports, exports))
}

