//! The checker's side: `kiln scan-torchscript` reads one archive from stdin, confines itself,
//! compiles the archive's code without running it, and answers on stdout in JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};

use serde::{Deserialize, Serialize};

/// Address space the checker may map beyond what it holds once it has read the archive: room for
/// the archive's tensors, built as loading would build them, and for compiling its code.
const MEMORY_PER_ARCHIVE_BYTE: u64 = 2;
const MEMORY_BASE_BYTES: u64 = 2 << 30;
/// CPU time, below the server's wall-clock limit so that a slow file is killed here first.
const CPU_SECONDS: u64 = 30;

/// The checker's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub(super) enum Answer {
    Scanned {
        functions: BTreeMap<String, BTreeSet<String>>,
        cpp_methods: BTreeSet<String>,
        confinement: Confined,
    },
    Unreadable {
        reason: String,
        confinement: Confined,
    },
    /// The checker could not confine itself, so it read nothing.
    Unconfined { reason: String },
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Confined {
    /// Landlock and seccomp are both in place.
    pub(super) complete: bool,
    pub(super) report: String,
}

/// Runs the checker: the archive on stdin, the answer on stdout. An archive refused or unreadable
/// is an answer too; an error here is the checker's own failure (stdin or stdout broken).
///
/// Must run before the process starts any thread (see [`kiln_torchscan::confine`]).
pub fn serve_scan() -> std::io::Result<()> {
    let mut archive = Vec::new();
    std::io::stdin().lock().read_to_end(&mut archive)?;
    let answer = answer(&archive);
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &answer)?;
    out.flush()
}

fn answer(archive: &[u8]) -> Answer {
    let limits = kiln_torchscan::Limits {
        memory_bytes: (archive.len() as u64).saturating_mul(MEMORY_PER_ARCHIVE_BYTE).saturating_add(MEMORY_BASE_BYTES),
        cpu_seconds: Some(CPU_SECONDS),
        ..kiln_torchscan::Limits::default()
    };
    let confinement = match kiln_torchscan::confine(limits) {
        Ok(c) => Confined { complete: c.is_complete(), report: c.report },
        Err(e) => return Answer::Unconfined { reason: e.to_string() },
    };
    match kiln_torchscan::scan(archive) {
        Ok(scan) => Answer::Scanned { functions: scan.functions, cpp_methods: scan.cpp_methods, confinement },
        Err(e) => Answer::Unreadable { reason: e.to_string(), confinement },
    }
}
