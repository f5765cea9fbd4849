//! Compiles the WordPiece vocabulary into a sorted static table, so a fresh sandbox per request
//! pays nothing to set the tokenizer up: the table is part of the component's data segment.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=KILN_VOCAB");
    let vocab = std::env::var_os("KILN_VOCAB").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../build/models/minilm-vocab.txt")
    });
    println!("cargo:rerun-if-changed={}", vocab.display());
    let text = match std::fs::read_to_string(&vocab) {
        Ok(text) => text,
        Err(e) => {
            eprintln!(
                "cannot read the vocabulary {}: {e}\nrun scripts/setup.sh first (it exports the model and its vocabulary)",
                vocab.display()
            );
            std::process::exit(1);
        }
    };
    let mut entries: Vec<(&str, usize)> = text.lines().enumerate().map(|(id, w)| (w, id)).collect();
    entries.sort_unstable();
    entries.dedup_by(|a, b| a.0 == b.0);
    let mut out = String::with_capacity(text.len() * 3);
    writeln!(out, "/// (token, id), sorted by token for binary search.").ok();
    writeln!(out, "pub(crate) static VOCAB: [(&str, u32); {}] = [", entries.len()).ok();
    for (word, id) in &entries {
        writeln!(out, "    ({word:?}, {id}),").ok();
    }
    writeln!(out, "];").ok();
    let dest = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("vocab.rs");
    if let Err(e) = std::fs::write(&dest, out) {
        eprintln!("cannot write {}: {e}", dest.display());
        std::process::exit(1);
    }
}
