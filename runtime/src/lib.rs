//! Kiln: a model server whose request handlers are WebAssembly components, each request in a
//! fresh sandbox, calling Kiln's own `wasi:nn` on libtorch.
//!
//! The request path flows one way: [`api`] (HTTP) → [`sandbox`] (wasmtime, and its `wasi:nn`
//! host) → [`model`] (the per-model scheduler and the libtorch backend). Beside it: [`config`]
//! (the TOML schema), [`fleet`] (GPUs, placement, scaling), [`tenancy`] (keys, signatures,
//! quotas, audit), [`deploy`] (the state directory), [`telemetry`] and the operator [`cli`].
//! `docs/ARCHITECTURE.md` draws it.

// No unsafe code but the counting allocator's forwarding (`telemetry::alloc`), which says why.
#![deny(unsafe_code)]

pub mod api;
pub mod cli;
pub mod config;
pub mod deploy;
pub mod files;
pub mod fleet;
pub mod model;
pub mod sandbox;
pub mod server;
pub mod sync;
pub mod telemetry;
pub mod tenancy;

#[cfg(test)]
mod layering {
    //! The modules form layers: each may use only those below it, so there is no cycle and
    //! the model layer stays free of HTTP, wasm and configuration files.

    use std::path::Path;

    /// Lowest first. A module may use modules of earlier layers only.
    const LAYERS: &[&[&str]] = &[
        &["sync"],
        &["telemetry", "files"],
        &["model"],
        &["fleet", "sandbox"],
        &["tenancy"],
        &["deploy"],
        &["config"],
        &["api"],
        &["cli", "server"],
    ];

    fn layer(module: &str) -> Option<usize> {
        LAYERS.iter().position(|l| l.contains(&module))
    }

    /// `text` without its `#[cfg(test)]` items (test modules, test-only imports and functions),
    /// which may reach anywhere. Strings, characters and comments are read as such, so a brace
    /// inside one does not end an item.
    fn non_test_code(text: &str) -> String {
        const MARK: &str = "#[cfg(test)]";
        let bytes = text.as_bytes();
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        while let Some(found) = text[at..].find(MARK) {
            let start = at + found;
            out.push_str(&text[at..start]);
            // The item runs to its first `;` outside braces, or to the brace closing its first `{`.
            let mut depth = 0usize;
            let mut i = start + MARK.len();
            while i < bytes.len() {
                match bytes[i] {
                    b'/' if bytes.get(i + 1) == Some(&b'/') => i = text[i..].find('\n').map_or(bytes.len(), |n| i + n),
                    b'/' if bytes.get(i + 1) == Some(&b'*') => i = text[i..].find("*/").map_or(bytes.len(), |n| i + n + 1),
                    b'"' => {
                        i += 1;
                        while i < bytes.len() && bytes[i] != b'"' {
                            i += if bytes[i] == b'\\' { 2 } else { 1 };
                        }
                    }
                    // A character literal (`'{'`, `'\''`), not a lifetime (`'a`).
                    b'\'' if bytes.get(i + 2) == Some(&b'\'') => i += 2,
                    b'\'' if bytes.get(i + 1) == Some(&b'\\') => i = text.get(i + 3..).and_then(|t| t.find('\'')).map_or(bytes.len(), |n| i + 3 + n),
                    b'{' => depth += 1,
                    b'}' => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            break;
                        }
                    }
                    b';' if depth == 0 => break,
                    _ => {}
                }
                i += 1;
            }
            at = (i + 1).min(bytes.len());
        }
        out.push_str(&text[at..]);
        out
    }

    /// Top-level modules a file's non-test code names through `crate::`.
    fn uses(text: &str) -> Vec<String> {
        let code = non_test_code(text);
        let mut found = Vec::new();
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                // `crate::{a, b::c}`: the first segment of each item.
                Some(list) => list.split('}').next().unwrap_or("").split(',').map(|item| item.trim()).collect(),
                None => vec![rest],
            };
            for name in names {
                let end = name.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(name.len());
                if end > 0 {
                    found.push(name[..end].to_owned());
                }
            }
        }
        found
    }

    fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// Whether `file` is a module its parent declares under `#[cfg(test)]` (a test module kept in
    /// a file of its own, such as `model/scheduler/tests.rs`): test code may reach anywhere.
    fn is_test_module(file: &Path) -> bool {
        let (Some(dir), Some(name)) = (file.parent(), file.file_stem().and_then(|n| n.to_str())) else { return false };
        let parents = [dir.with_extension("rs"), dir.join("mod.rs")];
        parents.iter().filter_map(|parent| std::fs::read_to_string(parent).ok()).any(|text| {
            text.contains(&format!("#[cfg(test)]\nmod {name};")) || text.contains(&format!("#[cfg(test)]\npub(crate) mod {name};"))
        })
    }

    #[test]
    fn every_module_uses_only_the_layers_below_it() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut all = Vec::new();
        files(&src, &mut all);
        let mut wrong = Vec::new();
        for file in &all {
            let relative = file.strip_prefix(&src).expect("under src");
            let first = relative.components().next().expect("a component").as_os_str().to_string_lossy();
            let module = first.trim_end_matches(".rs");
            if module == "lib" || module == "main" {
                continue;
            }
            let Some(own) = layer(module) else {
                wrong.push(format!("{module} is in no layer: add it to LAYERS"));
                continue;
            };
            if is_test_module(file) {
                continue;
            }
            let text = std::fs::read_to_string(file).expect("read a source file");
            for used in uses(&text) {
                match layer(&used) {
                    _ if used == module => {}
                    Some(l) if l < own => {}
                    _ => wrong.push(format!("{} uses crate::{used}", relative.display())),
                }
            }
        }
        wrong.sort();
        wrong.dedup();
        assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
    }

    #[test]
    fn the_check_sees_grouped_and_nested_paths() {
        assert_eq!(uses("use crate::{model::x, fleet};\nlet a = crate::api::f();"), ["model", "fleet", "api"]);
        assert!(uses("#[cfg(test)]\nuse crate::api;").is_empty(), "test code may reach anywhere");
    }

    #[test]
    fn the_check_reads_past_test_items_to_the_end_of_the_file() {
        let text = "use crate::model;\n#[cfg(test)]\nfn f() { let c = '{'; let q = '\\''; let s = \"}}\"; crate::api::x(); }\n\
                    #[cfg(test)]\nmod tests {\n    // }\n    use crate::cli;\n}\nuse crate::fleet;\n";
        assert_eq!(uses(text), ["model", "fleet"]);
    }
}
