//! Kiln: a model server whose request handlers are WebAssembly components, each request in a
//! fresh sandbox, calling Kiln's own `wasi:nn` on libtorch.
//!
//! The request path flows one way: [`api`] (HTTP) → [`sandbox`] (wasmtime, and its `wasi:nn`
//! host) → [`model`] (the per-model scheduler and the libtorch backend). Beside it: [`config`]
//! (the TOML schema), [`fleet`] (GPUs, placement, scaling), [`tenancy`] (keys, signatures,
//! quotas, audit), [`deploy`] (the state directory), [`telemetry`] and the operator [`cli`].
//! `docs/ARCHITECTURE.md` draws it.

// No unsafe code but the counting allocator's forwarding (`telemetry::alloc`) and the dlopen of
// libtorch's CUDA half (`model::backend::torch::cuda`), which say why.
#![deny(unsafe_code)]

pub mod api;
pub mod cli;
pub mod config;
pub mod deploy;
pub mod files;
pub mod fleet;
pub mod model;
pub mod sandbox;
pub mod serve;
pub mod server;
pub mod sync;
pub mod telemetry;
pub mod tenancy;
pub mod tls;

#[cfg(test)]
mod layering {
    //! The modules form layers: each may use only those below it, so there is no cycle and
    //! the model layer stays free of HTTP, wasm and configuration files.

    use std::path::Path;

    /// Lowest first. A module may use modules of earlier layers only.
    const LAYERS: &[&[&str]] = &[
        &["sync"],
        &["telemetry", "files"],
        &["tls"],
        &["model"],
        &["fleet", "sandbox"],
        &["tenancy"],
        &["deploy"],
        &["config"],
        &["api"],
        &["cli", "server"],
        &["serve"],
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

    /// `code` without its comments (`//` to the end of the line, `/* ... */`); strings and
    /// character literals are read as such, so a `//` inside one is kept.
    fn without_comments(code: &str) -> String {
        let bytes = code.as_bytes();
        let mut out = String::with_capacity(code.len());
        let mut i = 0;
        let mut kept = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'"' => {
                    i += 1;
                    while i < bytes.len() && bytes[i] != b'"' {
                        i += if bytes[i] == b'\\' { 2 } else { 1 };
                    }
                    i += 1;
                }
                b'\'' if bytes.get(i + 2) == Some(&b'\'') => i += 3,
                b'/' if matches!(bytes.get(i + 1), Some(b'/') | Some(b'*')) => {
                    out.push_str(&code[kept..i]);
                    let end = if bytes[i + 1] == b'/' { code[i..].find('\n').map_or(bytes.len(), |n| i + n) } else { code[i..].find("*/").map_or(bytes.len(), |n| i + n + 2) };
                    i = end;
                    kept = end;
                }
                _ => i += 1,
            }
        }
        out.push_str(&code[kept.min(code.len())..]);
        out
    }

    /// Every path `code` names from `crate::`, `super::` or `self::`, as its segments, with a
    /// `use` tree expanded: `super::{a::{X, Y}, b}` is `super::a::X`, `super::a::Y`, `super::b`.
    fn paths(code: &str) -> Vec<Vec<String>> {
        fn ident(c: char) -> bool {
            c.is_ascii_alphanumeric() || c == '_'
        }
        fn skip(chars: &[char], mut i: usize) -> usize {
            while chars.get(i).is_some_and(|c| c.is_whitespace()) {
                i += 1;
            }
            i
        }
        /// The paths of the tree starting at `i`, and where it ends.
        fn tree(chars: &[char], i: usize) -> (Vec<Vec<String>>, usize) {
            let mut i = skip(chars, i);
            if chars.get(i) == Some(&'{') {
                i += 1;
                let mut out = Vec::new();
                loop {
                    i = skip(chars, i);
                    match chars.get(i) {
                        None => break,
                        Some('}') => {
                            i += 1;
                            break;
                        }
                        Some(',') => i += 1,
                        Some(_) => {
                            let (sub, end) = tree(chars, i);
                            out.extend(sub);
                            i = end.max(i + 1);
                        }
                    }
                }
                return (out, i);
            }
            let start = i;
            while chars.get(i).is_some_and(|c| ident(*c)) {
                i += 1;
            }
            if start == i {
                return (vec![Vec::new()], i);
            }
            let segment: String = chars[start..i].iter().collect();
            if chars.get(i) == Some(&':') && chars.get(i + 1) == Some(&':') {
                let (rest, end) = tree(chars, i + 2);
                return (rest.into_iter().map(|r| [vec![segment.clone()], r].concat()).collect(), end);
            }
            (vec![vec![segment]], i)
        }
        let chars: Vec<char> = code.chars().collect();
        let mut found = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let at_start = i == 0 || !(ident(chars[i - 1]) || chars[i - 1] == ':');
            let rest: String = chars[i..chars.len().min(i + 7)].iter().collect();
            if at_start && (rest.starts_with("crate::") || rest.starts_with("super::") || rest.starts_with("self::")) {
                let (trees, end) = tree(&chars, i);
                found.extend(trees);
                i = end.max(i + 1);
            } else {
                i += 1;
            }
        }
        found
    }

    /// The module a path names from module `own`, down to its last lower-case segment (a module,
    /// or a function of one): `None` when it leaves the crate.
    fn resolve(own: &[String], path: &[String]) -> Option<Vec<String>> {
        let (base, rest): (Vec<String>, &[String]) = match path.first().map(String::as_str) {
            Some("crate") => (Vec::new(), &path[1..]),
            Some("self") => (own.to_vec(), &path[1..]),
            Some("super") => {
                let ups = path.iter().take_while(|s| *s == "super").count();
                (own.get(..own.len().checked_sub(ups)?)?.to_vec(), &path[ups..])
            }
            _ => return None,
        };
        let modules = rest.iter().take_while(|s| s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_'));
        Some(base.into_iter().chain(modules.cloned()).collect())
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

    /// Inside each folder too, at every depth, the files form layers: no two siblings (a file,
    /// or a subfolder taken whole) name each other, directly or around a longer circle. A
    /// folder's `mod.rs` is its face (it declares the others and holds what they share), not a
    /// sibling; what passes through it (a re-export, `use super::*`, an `impl` in another file)
    /// is not seen.
    #[test]
    fn no_folder_has_a_circle_of_imports_among_its_files() {
        use std::collections::{BTreeMap, BTreeSet};
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut all = Vec::new();
        files(&src, &mut all);
        // Each file's module path: `api/grpc.rs` is [api, grpc], `deploy/models/mod.rs` [deploy, models].
        let module = |file: &Path| -> Vec<String> {
            let relative = file.strip_prefix(&src).expect("under src").with_extension("");
            let mut parts: Vec<String> = relative.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            parts
        };
        let mut children: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
        for file in &all {
            let m = module(file);
            for depth in 1..m.len() {
                children.entry(m[..depth].to_vec()).or_default().insert(m[depth].clone());
            }
        }
        let mut folders: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
        for file in &all {
            let own = module(file);
            // lib.rs and main.rs are the crates' roots; the first check covers the top level.
            if own.len() < 2 || own.first().is_some_and(|m| m == "lib" || m == "main") || is_test_module(file) {
                continue;
            }
            let text = std::fs::read_to_string(file).expect("read a source file");
            for path in paths(&without_comments(&non_test_code(&text))) {
                let Some(target) = resolve(&own, &path) else { continue };
                let shared = own.iter().zip(&target).take_while(|(a, b)| a == b).count();
                // Within the same folder (not the top level), between two of its children.
                let (Some(from), Some(to)) = (own.get(shared), target.get(shared)) else { continue };
                let folder = own[..shared].to_vec();
                if shared == 0 || !children.get(&folder).is_some_and(|c| c.contains(to)) {
                    continue;
                }
                folders.entry(folder).or_default().entry(from.clone()).or_default().insert(to.clone());
            }
        }
        let circles: Vec<String> = folders
            .iter()
            .filter_map(|(folder, edges)| circle(edges).map(|around| format!("{}/: {}", folder.join("/"), around.join(" -> "))))
            .collect();
        assert!(circles.is_empty(), "files that import each other:\n{}", circles.join("\n"));
    }

    /// Past this many lines of non-test code a file holds more than one owner's work: split it
    /// by owner, as `api/` and `sandbox/` are.
    const MAX_FILE_LINES: usize = 800;

    #[test]
    fn no_file_has_more_than_800_lines_of_non_test_code() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut all = Vec::new();
        for crate_src in ["runtime/src", "runtime/torchscan/src", "codec/src", "wire/src", "tui/src", "guest-sdk/src"] {
            files(&root.join(crate_src), &mut all);
        }
        let src = root;
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
    fn the_folder_check_reads_use_trees_resolves_paths_and_finds_circles() {
        let p = |text: &str| paths(text).into_iter().map(|p| p.join("::")).collect::<Vec<_>>();
        assert_eq!(p("use super::{a::{X, Y}, b::Z};"), ["super::a::X", "super::a::Y", "super::b::Z"]);
        assert_eq!(p("let x = crate::api::http::json(1); f(self::m::g())"), ["crate::api::http::json", "self::m::g"]);
        assert!(p("use std::super_thing;").is_empty());
        let code = without_comments("let a = 1; // crate::x\nlet s = \"//kept\"; /* super::y */ z");
        assert_eq!(code, "let a = 1; \nlet s = \"//kept\";  z");
        let own: Vec<String> = ["model", "backend", "worker"].map(String::from).to_vec();
        let path = |t: &str| t.split("::").map(String::from).collect::<Vec<_>>();
        assert_eq!(resolve(&own, &path("super::torch::Torch")), Some(path("model::backend::torch")));
        assert_eq!(resolve(&own, &path("super::super::spec::parse")), Some(path("model::spec::parse")));
        assert_eq!(resolve(&own, &path("crate::api::AppState")), Some(path("api")));
        assert_eq!(resolve(&own, &path("super::super::super::super::x")), None);
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
