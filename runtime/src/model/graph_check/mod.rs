//! The load-time check of a TorchScript model's code: every function its archive can run, while
//! loading (`__setstate__`) or serving (`forward` and all it calls), may use only the pure tensor
//! operators [`allowed`] lists. Anything else is refused by name before the file is loaded.
//!
//! TorchScript is code. `torch.from_file(path, shared=True)` maps (or creates) any file the server
//! may open, `print` writes to the server's output, and `torch::jit::load` calls each object's
//! `__setstate__` while unpickling: loading a file to look at it would already run it. So the
//! archive is read by a child process, this executable's hidden `scan-torchscript` subcommand
//! ([`serve_scan`]), which compiles the archive's classes without running `__setstate__` or
//! anything else (`kiln-torchscan`), after confining itself (no file system, network or new
//! processes; bounded memory and CPU time), as libtorch's reader is C++ reading untrusted bytes.
//! The child reports every function's operators; the policy is applied here, in the server.
//!
//! [`check_graph`] blocks (a child process runs for about a second): call it off the async
//! workers. Its error names the operators and the functions that use them, never the server's path
//! to the file, so it can go back to the tenant as it is.

pub mod allowed;
mod child;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use child::serve_scan;
use child::{Answer, Confined};
/// What an archive's code can run: each function's operators, and the methods of the C++ classes
/// its pickles name.
pub use kiln_torchscan::Scan;

/// The hidden subcommand of `kiln` that reads one archive from stdin and answers on stdout.
pub const SUBCOMMAND: &str = "scan-torchscript";

/// How long the checker may take before the file is refused: reading resnet18 takes well under a
/// second, so this is a file built to be slow to read (the child's CPU limit is lower still).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The most of the child's answer read: each function's operators, in JSON.
const MAX_ANSWER_BYTES: u64 = 64 << 20;
/// The most of the child's stderr kept, to say why it failed.
const MAX_STDERR_BYTES: u64 = 16 << 10;
/// Functions named per operator in a refusal; the rest are counted.
const FUNCTIONS_NAMED: usize = 3;

/// Why a model's TorchScript was refused, or could not be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GraphRefusal {
    /// Its code uses operators outside the allow-list: each with the functions that use it.
    #[error("its TorchScript uses {} outside Kiln's allow-list of pure tensor operators: {}", plural(.0.len(), "an operator", "operators"), offences(.0))]
    Operators(Vec<Offence>),
    /// Its pickles name C++ classes (custom classes, such as quantized packed parameters), whose
    /// `__setstate__` loading would run and which have no graph to check.
    #[error("its archive holds C++ classes, whose loading Kiln cannot check: {}", .0.join(", "))]
    CppClasses(Vec<String>),
    /// It is not a TorchScript archive libtorch can read and compile.
    #[error("it is not a TorchScript archive Kiln can check: {0}")]
    Unreadable(String),
    /// The checker died, or ran out of time or memory, reading it.
    #[error("checking its TorchScript failed: {0}")]
    CheckFailed(String),
    /// The server could not run the check (no checker, no file): not the model's fault.
    #[error("cannot check the model's TorchScript: {0}")]
    Unavailable(String),
}

impl GraphRefusal {
    /// Whether the model is at fault (an API answers 422), rather than the server (500).
    pub fn is_the_models_fault(&self) -> bool {
        !matches!(self, GraphRefusal::Unavailable(_))
    }
}

/// An operator outside the allow-list, and the functions (qualified names, such as
/// `__torch__.Net.forward`) whose inlined graphs use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offence {
    pub operator: String,
    pub functions: Vec<String>,
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 { one.to_owned() } else { many.to_owned() }
}

fn offences(list: &[Offence]) -> String {
    let each = list.iter().map(|o| {
        let mut named = o.functions.iter().take(FUNCTIONS_NAMED).cloned().collect::<Vec<_>>().join(", ");
        if o.functions.len() > FUNCTIONS_NAMED {
            named.push_str(&format!(" and {} more", o.functions.len() - FUNCTIONS_NAMED));
        }
        format!("{} (in {named})", o.operator)
    });
    each.collect::<Vec<_>>().join("; ")
}

/// Checks the TorchScript archive at `path` with a checker run as this executable's
/// [`SUBCOMMAND`]; right in `kiln` itself. Blocks until the checker answers.
pub fn check_graph(path: &Path) -> Result<(), GraphRefusal> {
    GraphCheck::this_executable().check(path)
}

/// Applies the policy to what the checker found: every operator of every function must be
/// allowed, and no class may be C++.
pub fn judge(scan: &Scan) -> Result<(), GraphRefusal> {
    let mut outside: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (function, operators) in &scan.functions {
        for operator in operators.iter().filter(|op| !allowed::is_allowed(op)) {
            outside.entry(operator).or_default().push(function.clone());
        }
    }
    if !outside.is_empty() {
        return Err(GraphRefusal::Operators(
            outside.into_iter().map(|(operator, functions)| Offence { operator: operator.to_owned(), functions }).collect(),
        ));
    }
    if !scan.cpp_methods.is_empty() {
        let classes: BTreeSet<&str> = scan.cpp_methods.iter().map(|m| m.rsplit_once('.').map_or(m.as_str(), |(class, _)| class)).collect();
        return Err(GraphRefusal::CppClasses(classes.into_iter().map(str::to_owned).collect()));
    }
    Ok(())
}

/// How to run the checker.
#[derive(Debug, Clone)]
pub struct GraphCheck {
    scanner: PathBuf,
    timeout: Duration,
}

impl GraphCheck {
    /// The checker is this executable (`/proc/self/exe`, which is still the binary that runs even
    /// if its file was replaced since): for `kiln`.
    pub fn this_executable() -> GraphCheck {
        GraphCheck::with_scanner("/proc/self/exe")
    }

    /// The checker is `scanner`, a `kiln` binary: for tests and other executables.
    pub fn with_scanner(scanner: impl Into<PathBuf>) -> GraphCheck {
        GraphCheck { scanner: scanner.into(), timeout: DEFAULT_TIMEOUT }
    }

    /// How long the checker may take before the file is refused.
    pub fn timeout(mut self, timeout: Duration) -> GraphCheck {
        self.timeout = timeout;
        self
    }

    /// Checks the archive at `path` against the allow-list.
    pub fn check(&self, path: &Path) -> Result<(), GraphRefusal> {
        judge(&self.scan(path)?)
    }

    /// What the archive at `path` can run, unjudged.
    pub fn scan(&self, path: &Path) -> Result<Scan, GraphRefusal> {
        match self.ask(path)? {
            Answer::Scanned { functions, cpp_methods, confinement } => {
                warn_if_partial(&confinement);
                Ok(Scan { functions, cpp_methods })
            }
            Answer::Unreadable { reason, confinement } => {
                warn_if_partial(&confinement);
                Err(GraphRefusal::Unreadable(reason))
            }
            Answer::Unconfined { reason } => Err(GraphRefusal::Unavailable(reason)),
        }
    }

    /// Runs the checker on the file and reads its answer.
    fn ask(&self, path: &Path) -> Result<Answer, GraphRefusal> {
        let file = std::fs::File::open(path).map_err(|e| GraphRefusal::Unavailable(format!("cannot open the model file: {e}")))?;
        let mut child = Command::new(&self.scanner)
            .arg(SUBCOMMAND)
            // Nothing of the server's environment (keys among it) reaches the process reading
            // untrusted bytes but where libtorch is; one thread is all it needs.
            .env_clear()
            .envs(std::env::var_os("LD_LIBRARY_PATH").map(|path| ("LD_LIBRARY_PATH", path)))
            .env("OMP_NUM_THREADS", "1")
            .env("KILN_LOG", "warn")
            .stdin(Stdio::from(file))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| GraphRefusal::Unavailable(format!("cannot start the checker {}: {e}", self.scanner.display())))?;
        let stdout = child.stdout.take().map(|pipe| std::thread::spawn(move || read_bounded(pipe, MAX_ANSWER_BYTES)));
        let stderr = child.stderr.take().map(|pipe| std::thread::spawn(move || read_bounded(pipe, MAX_STDERR_BYTES)));
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(GraphRefusal::Unavailable(format!("cannot wait for the checker: {e}")));
                }
            }
        };
        let joined = |reader: Option<std::thread::JoinHandle<Vec<u8>>>| reader.and_then(|r| r.join().ok()).unwrap_or_default();
        let (answer, errors) = (joined(stdout), joined(stderr));
        let errors = String::from_utf8_lossy(&errors);
        let errors = errors.trim();
        let Some(status) = status else {
            return Err(GraphRefusal::CheckFailed(format!("the checker took more than {} s", self.timeout.as_secs_f64())));
        };
        if let Some(signal) = status.signal() {
            return Err(GraphRefusal::CheckFailed(format!(
                "the checker was killed by signal {signal} (its CPU or memory limit, or a crash in libtorch's reader)"
            )));
        }
        if !status.success() {
            return Err(GraphRefusal::Unavailable(format!("the checker failed ({status}): {errors}")));
        }
        serde_json::from_slice(&answer)
            .map_err(|e| GraphRefusal::Unavailable(format!("the checker's answer is not understood ({e}); its errors: {errors}")))
    }
}

fn read_bounded(mut pipe: impl std::io::Read, limit: u64) -> Vec<u8> {
    let mut kept = Vec::new();
    let _ = pipe.by_ref().take(limit).read_to_end(&mut kept);
    // The rest is drained, so that the child never blocks on a full pipe.
    let _ = std::io::copy(&mut pipe, &mut std::io::sink());
    kept
}

/// A kernel without Landlock or seccomp still gets the check (the archive's code is compiled, not
/// run), with less between libtorch's reader and the host; said once, not per model.
fn warn_if_partial(confinement: &Confined) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !confinement.complete && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(report = %confinement.report, "the TorchScript checker runs only partly confined");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(list: &[(&str, &[&str])]) -> Scan {
        let functions = list.iter().map(|(f, ops)| ((*f).to_owned(), ops.iter().map(|o| (*o).to_owned()).collect())).collect();
        Scan { functions, cpp_methods: BTreeSet::new() }
    }

    #[test]
    fn pure_tensor_code_passes() {
        let scan = ops(&[("__torch__.Net.forward", &["prim::GetAttr", "aten::linear", "aten::relu", "prim::If"])]);
        assert_eq!(judge(&scan), Ok(()));
    }

    #[test]
    fn a_refusal_names_each_operator_and_the_functions_using_it() {
        let scan = ops(&[
            ("__torch__.Net.forward", &["aten::linear", "aten::from_file", "prim::Print"]),
            ("__torch__.Net.__setstate__", &["aten::from_file", "prim::SetAttr"]),
        ]);
        let refusal = judge(&scan).expect_err("refused");
        assert!(refusal.is_the_models_fault());
        assert_eq!(
            refusal.to_string(),
            "its TorchScript uses operators outside Kiln's allow-list of pure tensor operators: aten::from_file (in \
             __torch__.Net.__setstate__, __torch__.Net.forward); prim::Print (in __torch__.Net.forward)"
        );
    }

    #[test]
    fn many_functions_are_counted_past_the_first_few() {
        let names: Vec<String> = (0..5).map(|i| format!("__torch__.M{i}.forward")).collect();
        let functions = names.iter().map(|n| (n.clone(), BTreeSet::from(["prim::Print".to_owned()]))).collect();
        let message = judge(&Scan { functions, cpp_methods: BTreeSet::new() }).expect_err("refused").to_string();
        assert!(
            message.ends_with(
                "an operator outside Kiln's allow-list of pure tensor operators: prim::Print (in __torch__.M0.forward, \
                 __torch__.M1.forward, __torch__.M2.forward and 2 more)"
            ),
            "{message}"
        );
    }

    #[test]
    fn cpp_classes_are_refused_by_name() {
        let cpp_methods = BTreeSet::from([
            "__torch__.torch.classes.quantized.LinearPackedParamsBase.__getstate__".to_owned(),
            "__torch__.torch.classes.quantized.LinearPackedParamsBase.__setstate__".to_owned(),
        ]);
        let refusal = judge(&Scan { functions: BTreeMap::new(), cpp_methods }).expect_err("refused");
        assert_eq!(
            refusal,
            GraphRefusal::CppClasses(vec!["__torch__.torch.classes.quantized.LinearPackedParamsBase".to_owned()])
        );
    }

    #[test]
    fn a_checker_that_cannot_start_is_the_servers_fault() {
        let check = GraphCheck::with_scanner("/nonexistent/kiln");
        let model = std::env::temp_dir();
        // A folder opens (and then reads as nothing), so the spawn is what fails.
        let refusal = check.check(&model).expect_err("no checker");
        assert!(!refusal.is_the_models_fault(), "{refusal}");
        assert!(refusal.to_string().contains("/nonexistent/kiln"), "{refusal}");
    }
}
