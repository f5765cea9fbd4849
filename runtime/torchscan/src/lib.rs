//! Reads what a TorchScript archive's code can do without running any of it, and confines the
//! process that reads it.
//!
//! `torch::jit::load` runs an archive's code while it loads it (each object's `__setstate__`), so
//! a server cannot load a file to look at it. [`scan`] reads the archive as libtorch does (its zip
//! reader, its source importer, its unpickler) but builds objects without their `__setstate__`,
//! then lists, for every function that loading or serving could run, the node kinds of its graph
//! with every call inlined. Deciding which kinds are acceptable is the caller's business.
//!
//! The reading is libtorch's C++ on untrusted bytes, so it belongs in a process of its own:
//! [`confine`] takes that process's file system, network, new processes and most of its memory
//! and CPU time away first.
//!
//! This crate holds the only unsafe code of the model check: the two calls into the C and C++
//! shims (`src/scan.cpp`, `src/confine.c`) and the buffers they hand back.

pub mod shm;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CStr, c_char, c_int};

// Named so that rustc links it, and with it libtorch, which the shim calls: a crate that no code
// uses is left off the link line.
use torch_sys as _;

unsafe extern "C" {
    fn torchscan_scan(data: *const u8, size: usize) -> *mut c_char;
    fn torchscan_free(buffer: *mut c_char);
    fn torchscan_confine(
        memory_bytes: u64,
        cpu_seconds: u64,
        file_bytes: u64,
        readable: *const *const c_char,
        readable_count: usize,
        devices: *const *const c_char,
        device_count: usize,
        report: *mut c_char,
        report_size: usize,
    ) -> c_int;
}

/// What an archive's code can run: each function checked (by qualified name, such as
/// `__torch__.Net.forward`) with the node kinds of its inlined graph.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Function → node kinds (`aten::linear`, `prim::If`, ...), from every block and subgraph.
    pub functions: BTreeMap<String, BTreeSet<String>>,
    /// Methods of classes the archive's pickles name that are C++ (custom classes such as
    /// quantized packed parameters): loading runs their `__setstate__`, and no graph shows it.
    pub cpp_methods: BTreeSet<String>,
}

impl Scan {
    /// Every node kind of every function.
    pub fn operators(&self) -> BTreeSet<String> {
        self.functions.values().flatten().cloned().collect()
    }
}

/// Why an archive could not be scanned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    /// libtorch could not read or compile it: not a TorchScript archive, a damaged one, code
    /// that does not compile, a graph too large once inlined.
    #[error("{0}")]
    Unreadable(String),
    /// The shim gave an answer this crate does not understand (a bug, not the archive's fault).
    #[error("the TorchScript scanner answered '{0}', which is not one of its lines")]
    Garbled(String),
    #[error("the TorchScript scanner could not allocate its answer")]
    OutOfMemory,
}

/// Lists what `archive` (the bytes of a `torch.jit.save` file) can run, without running it.
///
/// Reading builds the archive's tensors in memory (on the CPU) as loading it would; its code is
/// compiled, never run. Call it in a [`confine`]d process: the bytes are untrusted input to
/// libtorch's C++.
pub fn scan(archive: &[u8]) -> Result<Scan, ScanError> {
    // SAFETY: the shim reads `archive.len()` bytes from `archive.as_ptr()`, which the slice owns
    // for the call, and returns NULL or a NUL-terminated buffer from malloc that it hands over.
    let buffer = unsafe { torchscan_scan(archive.as_ptr(), archive.len()) };
    if buffer.is_null() {
        return Err(ScanError::OutOfMemory);
    }
    // SAFETY: `buffer` is the NUL-terminated string just returned, read before it is freed below.
    let text = unsafe { CStr::from_ptr(buffer) }.to_string_lossy().into_owned();
    // SAFETY: `buffer` came from torchscan_scan and is freed once, here.
    unsafe { torchscan_free(buffer) };
    parse(&text)
}

fn parse(text: &str) -> Result<Scan, ScanError> {
    let mut scan = Scan::default();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match line.split_once('\t') {
            Some(("E", message)) => return Err(ScanError::Unreadable(message.to_owned())),
            Some(("M", function)) => {
                scan.functions.entry(function.to_owned()).or_default();
                current = Some(function.to_owned());
            }
            Some(("O", kind)) => match &current {
                Some(function) => {
                    scan.functions.entry(function.clone()).or_default().insert(kind.to_owned());
                }
                None => return Err(ScanError::Garbled(line.to_owned())),
            },
            Some(("F", function)) => {
                scan.cpp_methods.insert(function.to_owned());
            }
            _ => return Err(ScanError::Garbled(line.to_owned())),
        }
    }
    Ok(scan)
}

/// Limits for [`confine`].
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Address space the process may map beyond what it has mapped already (libtorch's own
    /// libraries are mapped by then); `u64::MAX` for no limit.
    pub memory_bytes: u64,
    /// CPU time, after which the kernel kills the process; `None` for no limit (a server's
    /// worker runs for as long as its model is served).
    pub cpu_seconds: Option<u64>,
    /// The largest file the process may write or grow (`RLIMIT_FSIZE`); `None` for no limit. 0
    /// keeps it from growing shared memory it was handed.
    pub file_bytes: Option<u64>,
    /// Files and folders (with everything beneath them) that stay readable, where they exist:
    /// what libtorch reads about the machine (`/proc/cpuinfo`, `/sys/devices/system/cpu`).
    pub readable: Vec<std::ffi::CString>,
    /// Device files that stay readable, writable and open to ioctls, where they exist: a GPU's
    /// (`/dev/nvidiactl`, `/dev/nvidia0`, ...).
    pub devices: Vec<std::ffi::CString>,
}

/// What [`confine`] put in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// Landlock: no file may be opened, executed or made, no TCP port bound or connected to, no
    /// signal sent out of the process. Absent where the kernel lacks Landlock.
    pub landlock: bool,
    /// The seccomp filter: no exec, fork, socket, ptrace, mount, namespaces, BPF, keyrings; and
    /// signals, resource limits, scheduling and CPU affinity for this process only.
    pub seccomp: bool,
    /// What was applied and what is missing, and why, in words.
    pub report: String,
}

impl Confinement {
    /// Whether every layer is in place.
    pub fn is_complete(&self) -> bool {
        self.landlock && self.seccomp
    }
}

/// Why the process could not be confined at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot confine the TorchScript checker: {0}")]
pub struct ConfineError(pub String);

const LANDLOCK: c_int = 4;
const SECCOMP: c_int = 8;

/// Confines this process for good: address space (beyond what is mapped now), CPU time and file
/// size limits, no core dumps, no new privileges, killed with its parent (the thread that
/// started it), then Landlock (nothing but `limits.readable` to read) and seccomp where the
/// kernel has them (the answer says which).
///
/// The process must be single-threaded: the kernel confines the calling thread and the threads
/// it makes later, not threads already running. Read every input (stdin) before calling this,
/// as no file can be opened after.
pub fn confine(limits: Limits) -> Result<Confinement, ConfineError> {
    let mut report = vec![0u8; 1024];
    let readable: Vec<*const c_char> = limits.readable.iter().map(|path| path.as_ptr()).collect();
    let devices: Vec<*const c_char> = limits.devices.iter().map(|path| path.as_ptr()).collect();
    // SAFETY: `report` is a writable buffer of `report.len()` bytes that the C side leaves
    // NUL-terminated; `readable` and `devices` hold their `len()` pointers to NUL-terminated
    // strings that `limits` owns for the call, which the C side only reads.
    let layers = unsafe {
        torchscan_confine(
            limits.memory_bytes,
            limits.cpu_seconds.unwrap_or(0),
            limits.file_bytes.unwrap_or(u64::MAX),
            readable.as_ptr(),
            readable.len(),
            devices.as_ptr(),
            devices.len(),
            report.as_mut_ptr().cast::<c_char>(),
            report.len(),
        )
    };
    let end = report.iter().position(|&b| b == 0).unwrap_or(report.len());
    let report = String::from_utf8_lossy(&report[..end]).into_owned();
    if layers < 0 {
        return Err(ConfineError(report));
    }
    Ok(Confinement { landlock: layers & LANDLOCK != 0, seccomp: layers & SECCOMP != 0, report })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_that_are_no_archive_are_unreadable_and_name_the_formats_accepted() {
        let err = scan(b"definitely not a zip file").expect_err("refused");
        assert!(matches!(&err, ScanError::Unreadable(m) if m.contains("zip")), "{err}");
        let err = scan(b"").expect_err("refused");
        assert!(matches!(err, ScanError::Unreadable(_)));
    }

    #[test]
    fn a_zip_that_is_no_torchscript_archive_is_unreadable() {
        // An empty zip archive: the end-of-central-directory record alone, after a local header's
        // magic so that the format check passes and libtorch's reader is the one refusing.
        let mut bytes = b"PK\x03\x04".to_vec();
        bytes.extend_from_slice(&[0; 26]);
        let err = scan(&bytes).expect_err("refused");
        assert!(matches!(err, ScanError::Unreadable(_)), "{err}");
    }

    #[test]
    fn the_answer_is_read_per_function() {
        let scan = parse("M\ta.f\nO\taten::add\nO\tprim::If\nM\ta.g\nF\tb.__setstate__\n").expect("parses");
        assert_eq!(scan.functions["a.f"], BTreeSet::from(["aten::add".to_owned(), "prim::If".to_owned()]));
        assert!(scan.functions["a.g"].is_empty());
        assert_eq!(scan.cpp_methods, BTreeSet::from(["b.__setstate__".to_owned()]));
        assert!(matches!(parse("O\taten::add\n"), Err(ScanError::Garbled(_))));
        assert!(matches!(parse("E\tbroken\n"), Err(ScanError::Unreadable(m)) if m == "broken"));
    }
}
