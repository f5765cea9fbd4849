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
pub mod telemetry;
pub mod tenancy;

#[cfg(test)]
mod layering {
    //! The modules form layers: each may use only those below it, so there is no cycle and
    //! the model layer stays free of HTTP, wasm and configuration files.

    use std::path::Path;

    /// Lowest first. A module may use modules of earlier layers only.
    const LAYERS: &[&[&str]] = &[
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

    /// Top-level modules a file's non-test code names through `crate::`.
    fn uses(text: &str) -> Vec<String> {
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
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
}
