//! The documentation's links lead somewhere: every relative link in a tracked Markdown file names
//! a file or folder of the repository, and every `#anchor` a heading of the page it points to.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kiln_tests::root;

/// Every Markdown file git tracks, relative to the repository root.
fn markdown_files() -> Vec<PathBuf> {
    let output = std::process::Command::new("git")
        .args(["ls-files", "-z", "*.md"])
        .current_dir(root())
        .output()
        .expect("git ls-files");
    assert!(output.status.success(), "git ls-files: {}", String::from_utf8_lossy(&output.stderr));
    let files: Vec<PathBuf> = output.stdout.split(|&b| b == 0).filter(|f| !f.is_empty()).map(|f| PathBuf::from(String::from_utf8_lossy(f).into_owned())).collect();
    assert!(files.iter().any(|f| f == Path::new("README.md")), "README.md is tracked: {files:?}");
    files
}

/// The lines outside fenced code blocks, with their numbers (a `[x](y)` or `# x` inside one is
/// code).
fn prose(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    text.lines()
        .enumerate()
        .filter(|(_, line)| {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .map(|(i, line)| (i + 1, line))
        .collect()
}

/// The anchor GitHub gives a heading: lower case, punctuation other than `-` and `_` dropped,
/// spaces turned into `-`; a repeated heading gets `-1`, `-2`, ...
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    for (_, line) in prose(text) {
        let Some(heading) = line.strip_prefix('#').map(|h| h.trim_start_matches('#')).filter(|h| h.starts_with(' ')) else {
            continue;
        };
        // Inline code and links keep their text.
        let plain: String = heading.trim().replace(['`', '*'], "");
        let slug: String = plain
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let count = seen.entry(slug.clone()).or_insert(0);
        anchors.insert(if *count == 0 { slug.clone() } else { format!("{slug}-{count}") });
        *count += 1;
    }
    anchors
}

/// The targets of the inline links `[text](target)` in `line`.
fn link_targets(line: &str) -> Vec<&str> {
    let mut targets = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        match after.find(')') {
            Some(end) => {
                // `[a](b "title")` keeps only b.
                targets.push(after[..end].split_whitespace().next().unwrap_or_default());
                rest = &after[end..];
            }
            None => break,
        }
    }
    targets
}

#[test]
fn every_relative_link_and_anchor_in_the_docs_exists() {
    let root = root();
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(root.join(&file)).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let folder = file.parent().unwrap_or(Path::new(""));
        for (number, line) in prose(&text) {
            for target in link_targets(line) {
                if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
                let linked = if path.is_empty() { file.clone() } else { folder.join(path) };
                let at = format!("{}:{number}: {target}", file.display());
                let on_disk = root.join(&linked);
                if !on_disk.exists() {
                    broken.push(format!("{at}: {} does not exist", linked.display()));
                    continue;
                }
                if !anchor.is_empty() {
                    let page = std::fs::read_to_string(&on_disk).unwrap_or_default();
                    if !anchors(&page).contains(anchor) {
                        broken.push(format!("{at}: {} has no heading #{anchor}", linked.display()));
                    }
                }
            }
        }
    }
    assert!(checked >= 10, "only {checked} relative links found: is the link syntax still read?");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn headings_become_the_anchors_github_gives_them() {
    let page = "# Kiln\n## Threads and replicas for MiniLM (issue 12)\n```\n# not a heading\n```\n## `kiln bench` & friends\n## Kiln\n";
    let anchors = anchors(page);
    let want: BTreeSet<String> =
        ["kiln", "threads-and-replicas-for-minilm-issue-12", "kiln-bench--friends", "kiln-1"].into_iter().map(String::from).collect();
    assert_eq!(anchors, want);
    assert_eq!(link_targets("see [a](x.md#y) and [b](z \"title\") or [c](https://e)"), ["x.md#y", "z", "https://e"]);
}

/// Where a repository path may start: the tracked top-level folders. A path under `build/` or
/// `target/` is made by the set-up, so the docs may name one that does not exist yet.
fn tracked_roots(files: &[String]) -> BTreeSet<String> {
    files.iter().filter_map(|f| f.split_once('/').map(|(top, _)| format!("{top}/"))).collect()
}

/// The inline code spans of `line` that name a repository path: they start with a tracked
/// top-level folder, and are a plain path (no spaces, placeholders, globs or variables, which
/// make them a pattern or a command rather than a file's name).
fn named_paths<'a>(line: &'a str, roots: &BTreeSet<String>) -> Vec<&'a str> {
    line.split('`')
        .skip(1)
        .step_by(2)
        .map(|span| span.trim_end_matches([':', ',', '.']))
        .filter(|span| roots.iter().any(|r| span.starts_with(r.as_str())))
        .filter(|span| !span.contains([' ', '*', '{', '<', '$', '…', '=', '(', '?', '|']) && !span.contains("..."))
        .map(|span| span.split_once('#').map_or(span, |(path, _)| path))
        .collect()
}

#[test]
fn every_repository_path_the_docs_name_exists() {
    let root = root();
    let output = std::process::Command::new("git").args(["ls-files", "-z"]).current_dir(&root).output().expect("git ls-files");
    let files: Vec<String> = output.stdout.split(|&b| b == 0).filter(|f| !f.is_empty()).map(|f| String::from_utf8_lossy(f).into_owned()).collect();
    let roots = tracked_roots(&files);
    let exists = |path: &str| {
        let path = path.trim_end_matches('/');
        files.iter().any(|f| f == path || f.starts_with(&format!("{path}/")))
    };
    let mut missing = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(root.join(&file)).unwrap_or_default();
        for (number, line) in prose(&text) {
            for path in named_paths(line, &roots) {
                checked += 1;
                if !exists(path) {
                    missing.push(format!("{}:{number}: `{path}` is not in the repository", file.display()));
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} repository paths named: is the notation still read?");
    assert!(missing.is_empty(), "paths the docs name that do not exist:\n{}", missing.join("\n"));
}

#[test]
fn only_plain_repository_paths_count_as_named() {
    let roots: BTreeSet<String> = ["docs/", "scripts/"].into_iter().map(String::from).collect();
    let line = "see `docs/SECURITY.md`, `scripts/test.sh --quick`, `docs/*.md`, `build/x`, `docs/NAME.md`: `scripts/serve.sh`.";
    assert_eq!(named_paths(line, &roots), ["docs/SECURITY.md", "docs/NAME.md", "scripts/serve.sh"]);
}
