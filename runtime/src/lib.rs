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

    /// The lower-case names (modules, or functions of the face) in folder `top` that a file's
    /// non-test code names: through
    /// `crate::top::x`, and, for a file directly in the folder, through `super::x`. The folder's
    /// `mod.rs` (its face: it declares the others, and holds what they share) is not a sibling.
    fn sibling_uses(top: &str, direct: bool, text: &str) -> Vec<String> {
        // Comment lines only point at a sibling (a doc link), they do not use it.
        let code: String = non_test_code(text)
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .flat_map(|line| [line, "\n"])
            .collect();
        let mut found = Vec::new();
        let mut prefixes = vec![format!("crate::{top}::")];
        if direct {
            prefixes.push("super::".to_owned());
        }
        for prefix in &prefixes {
            for (at, _) in code.match_indices(prefix.as_str()) {
                // `crate::model::...` must not also count as `super::` of something longer.
                if prefix == "super::" && code[..at].ends_with("::") {
                    continue;
                }
                let rest = &code[at + prefix.len()..];
                let names: Vec<&str> = match rest.strip_prefix('{') {
                    Some(list) => list.split('}').next().unwrap_or("").split(',').map(str::trim).collect(),
                    None => vec![rest],
                };
                for name in names {
                    let end = name.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(name.len());
                    // A module is lower case (`super::AppState` names what the face holds); the
                    // caller keeps the names that are siblings' (not a function of the face's).
                    if end > 0 && name[..end].starts_with(|c: char| c.is_ascii_lowercase()) {
                        found.push(name[..end].to_owned());
                    }
                }
            }
        }
        found
    }

    /// A circle in `edges` (module → modules it names), if there is one, as the path around it.
    fn circle(edges: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>) -> Option<Vec<String>> {
        fn visit(
            node: &str,
            edges: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut std::collections::BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(at) = path.iter().position(|n| n == node) {
                let mut around = path[at..].to_vec();
                around.push(node.to_owned());
                return Some(around);
            }
            if done.contains(node) {
                return None;
            }
            path.push(node.to_owned());
            for next in edges.get(node).into_iter().flatten() {
                if let Some(found) = visit(next, edges, path, done) {
                    return Some(found);
                }
            }
            path.pop();
            done.insert(node.to_owned());
            None
        }
        let mut done = std::collections::BTreeSet::new();
        edges.keys().find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
    }

    /// Inside each folder too, the files form layers: no two siblings (a file, or a subfolder
    /// taken whole) name each other, directly or around a longer circle.
    #[test]
    fn no_folder_has_a_circle_of_imports_among_its_files() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut all = Vec::new();
        files(&src, &mut all);
        let mut folders: std::collections::BTreeMap<String, std::collections::BTreeMap<String, std::collections::BTreeSet<String>>> =
            Default::default();
        for file in &all {
            let relative = file.strip_prefix(&src).expect("under src");
            let parts: Vec<String> = relative.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            // Files directly in src/ are the layers themselves; the first check covers them.
            let [top, child, rest @ ..] = parts.as_slice() else { continue };
            let sibling = child.trim_end_matches(".rs").to_owned();
            if sibling == "mod" || is_test_module(file) {
                continue;
            }
            let text = std::fs::read_to_string(file).expect("read a source file");
            let names = sibling_uses(top, rest.is_empty(), &text);
            let edges = folders.entry(top.clone()).or_default().entry(sibling.clone()).or_default();
            edges.extend(names.into_iter().filter(|n| *n != sibling));
        }
        // Only siblings are nodes: a name that is none (a function of the face's) draws no edge.
        for edges in folders.values_mut() {
            let siblings: std::collections::BTreeSet<String> = edges.keys().cloned().collect();
            for names in edges.values_mut() {
                names.retain(|n| siblings.contains(n));
            }
        }
        let circles: Vec<String> = folders
            .iter()
            .filter_map(|(top, edges)| circle(edges).map(|around| format!("{top}/: {}", around.join(" -> "))))
            .collect();
        assert!(circles.is_empty(), "files that import each other:\n{}", circles.join("\n"));
    }

    /// Past this many lines of non-test code a file holds more than one owner's work: split it
    /// by owner, as `api/` and `sandbox/` are.
    const MAX_FILE_LINES: usize = 800;

    #[test]
    fn no_file_has_more_than_800_lines_of_non_test_code() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut all = Vec::new();
        files(&src, &mut all);
        let mut long: Vec<String> = all
            .iter()
            .filter(|file| !is_test_module(file))
            .filter_map(|file| {
                let text = std::fs::read_to_string(file).expect("read a source file");
                let lines = non_test_code(&text).lines().filter(|l| !l.trim().is_empty()).count();
                (lines > MAX_FILE_LINES).then(|| format!("{} has {lines} lines of non-test code", file.strip_prefix(&src).unwrap_or(file).display()))
            })
            .collect();
        long.sort();
        assert!(long.is_empty(), "over {MAX_FILE_LINES} lines:\n{}", long.join("\n"));
    }

    #[test]
    fn the_folder_check_finds_circles_and_reads_sibling_paths() {
        assert_eq!(sibling_uses("api", true, "use super::{AppState, auth::AdminKey};\nuse crate::api::http::json;"), ["http", "auth"]);
        assert!(sibling_uses("api", false, "use super::x::Y;").is_empty(), "super:: of a nested file is inside its subfolder");
        assert!(sibling_uses("api", true, "//! See [`super::grpc`].\n").is_empty(), "a doc link is not a use");
        let edges = |pairs: &[(&str, &str)]| {
            let mut map = std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
            for (a, b) in pairs {
                map.entry((*a).to_owned()).or_default().insert((*b).to_owned());
            }
            map
        };
        assert_eq!(circle(&edges(&[("a", "b"), ("b", "c")])), None);
        assert_eq!(circle(&edges(&[("a", "b"), ("b", "c"), ("c", "a")])), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
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
