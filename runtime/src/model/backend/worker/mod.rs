//! Models run out of the server's process: each replica's module lives in a worker process of
//! its own (`kiln model-worker`), confined, and the replica's thread hands it one batch at a
//! time. Tenants' own models always run this way; an operator's model does when its config says
//! `worker = true`.
//!
//! A model file is code, and libtorch is C++ reading it: the load-time graph check
//! ([`crate::model::graph_check`]) refuses operators that reach out of the model, and the worker
//! is what holds if something gets past it. The worker confines itself before it loads the
//! module (Landlock: nothing to open but what libtorch reads about the machine; seccomp: no
//! exec, fork, sockets; a bounded address space; no file it can grow), so a module that gets
//! past the check reaches nothing of the server's: not its keys, config, state or other
//! tenants' files.
//!
//! The batching scheduler stays in the server; the worker runs `forward`. Tensors go through
//! shared memory the server makes ([`kiln_torchscan::shm`]): inputs are viewed in place, outputs
//! copied once. A worker that dies (a crash, an abort, a CUDA device-side assert), hangs past
//! its deadline or answers nonsense takes down its own model only: the batch it ran fails with
//! [`BackendError::Unavailable`] (503, not split apart as a bad input would be), and the next
//! batch starts a new worker, after a back-off that doubles with each failure in a row. Each
//! exit and restart is an event (`worker_exited`, `worker_restarted`).

mod child;
mod protocol;

use std::io::{self, BufRead as _, BufReader, Read as _};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_torchscan::shm::Region;
use kiln_wire::EventKind;

pub use child::serve_worker;
use protocol::{Channel, FailureKind, Reply, Request, Slot, Which, layout, layout_bytes};

use super::{Backend, BackendError, LoadedModel};
use crate::model::device::Device;
use crate::model::signature::warmup_inputs;
use crate::model::spec::{ModelConfig, OWNER_SEPARATOR};
use crate::model::tensor::HostTensor;
use crate::telemetry::{EventLog, MAX_LOGGED, loggable};
use crate::sync::MutexExt;

/// The hidden subcommand of `kiln` that runs one model worker.
pub const SUBCOMMAND: &str = "model-worker";

/// Address space a worker may map once confined, beyond what it has mapped then: room for
/// libtorch's working memory and thread stacks, plus a multiple of the module's file for its
/// weights as loading builds them.
const MEMORY_BASE_BYTES: u64 = 3 << 30;
const MEMORY_PER_FILE_BYTE: u64 = 4;

/// Shared memory a worker starts with, each way; it grows to the largest batch seen.
const INITIAL_REGION_BYTES: usize = 1 << 20;
/// The most output bytes a pass may return (a worker's claim is checked against it before anything
/// is allocated), and the largest a region grows to.
const MAX_OUTPUT_BYTES: usize = 256 << 20;

/// Back-off before restarting a worker that failed: doubled for each failure in a row, up to
/// the most; a worker that ran this long without failing starts the count afresh.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MOST_BACKOFF: Duration = Duration::from_secs(30);
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// The shortest deadline a pass gets, whatever the model's request timeout.
const MIN_PASS_DEADLINE: Duration = Duration::from_secs(2);
/// Stderr lines logged per worker; the rest are counted.
const MAX_LOGGED_LINES: u32 = 200;

/// Runs each replica in a confined worker process.
#[derive(Debug)]
pub struct Worker {
    executable: PathBuf,
    events: Arc<EventLog>,
    /// How long a worker may take to start and load, and its warm-up passes.
    load_timeout: Duration,
}

impl Worker {
    /// Workers run as this executable's [`SUBCOMMAND`].
    pub fn this_executable(events: Arc<EventLog>, load_timeout: Duration) -> io::Result<Worker> {
        Ok(Worker { executable: std::env::current_exe()?, events, load_timeout })
    }

    /// Workers run as `executable`'s [`SUBCOMMAND`] (tests give the `kiln` binary).
    pub fn with_executable(executable: PathBuf, events: Arc<EventLog>, load_timeout: Duration) -> Worker {
        Worker { executable, events, load_timeout }
    }
}

impl Backend for Worker {
    type Model = WorkerModel;

    fn load(&self, config: &ModelConfig, device: Device) -> Result<WorkerModel, BackendError> {
        let spec = Arc::new(Spec {
            config: config.clone(),
            device,
            executable: self.executable.clone(),
            events: Arc::clone(&self.events),
            load_timeout: self.load_timeout,
        });
        let (process, loaded) = Process::start(&spec)?;
        if !loaded.complete {
            if let Some(tenant) = spec.owner() {
                process.stop(false);
                return Err(BackendError::Load(format!(
                    "tenant '{tenant}''s model cannot run here: this kernel cannot confine its worker fully ({}); \
                     tenants' models need Landlock and seccomp",
                    loaded.confinement
                )));
            }
            tracing::warn!(model = %config.name, "model worker only partly confined: {}", loaded.confinement);
        }
        tracing::info!(model = %config.name, pid = process.pid, confinement = %loaded.confinement, "model worker started");
        Ok(WorkerModel {
            spec,
            weight_bytes: loaded.weight_bytes,
            parameters: loaded.parameters,
            state: Mutex::new(State { process: Some(process), failures: 0, restarts: 0, retry_at: Instant::now(), last_exit: String::new() }),
        })
    }
}

/// What a worker is started with, kept to start it again.
#[derive(Debug)]
struct Spec {
    config: ModelConfig,
    device: Device,
    executable: PathBuf,
    events: Arc<EventLog>,
    load_timeout: Duration,
}

impl Spec {
    /// The tenant that owns the model, for a tenant's own.
    fn owner(&self) -> Option<&str> {
        self.config.key().split_once(OWNER_SEPARATOR).map(|(owner, _)| owner)
    }
}

/// One replica's worker.
pub struct WorkerModel {
    spec: Arc<Spec>,
    weight_bytes: u64,
    parameters: u64,
    state: Mutex<State>,
}

struct State {
    /// The running worker; `None` after one failed, until the next batch starts another.
    process: Option<Process>,
    /// Failures in a row, for the back-off.
    failures: u32,
    restarts: u32,
    /// No new worker before this.
    retry_at: Instant,
    /// How the last worker ended.
    last_exit: String,
}

fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(MOST_BACKOFF)
}

impl WorkerModel {
    /// The running worker's process id (`None` between a failure and the restart).
    pub fn pid(&self) -> Option<u32> {
        self.state.locked().process.as_ref().map(|p| p.pid)
    }

    fn unavailable(&self, state: &State) -> BackendError {
        let wait = state.retry_at.saturating_duration_since(Instant::now());
        BackendError::Unavailable(format!(
            "model '{}' is restarting: its worker process {}; the next start is in {} ms",
            self.spec.config.model_name(),
            state.last_exit,
            wait.as_millis()
        ))
    }

    /// A worker failed: note it, wait before the next, and say so.
    fn failed(&self, state: &mut State, process: Process, how: String) -> BackendError {
        let lived = process.started.elapsed();
        let pid = process.pid;
        let exit = process.stop(false);
        if lived >= HEALTHY_AFTER {
            state.failures = 0;
        }
        state.failures += 1;
        let wait = backoff(state.failures);
        state.retry_at = Instant::now() + wait;
        state.last_exit = match exit {
            Some(status) => format!("{how} ({status})"),
            None => how,
        };
        let model = &self.spec.config.name;
        tracing::warn!(model = %model, pid, restart_in_ms = wait.as_millis() as u64, "model worker failed: {}", state.last_exit);
        self.spec.events.emit_for(
            self.spec.owner(),
            EventKind::WorkerExited {
                model: model.clone(),
                pid,
                reason: loggable(&state.last_exit, MAX_LOGGED),
                restart_in_ms: wait.as_millis() as u64,
            },
        );
        self.unavailable(state)
    }
}

impl LoadedModel for WorkerModel {
    /// Its worker's passes take a core like the server's own; their threads stay the worker's.
    fn on_cpu(&self) -> bool {
        self.spec.device == Device::Cpu
    }

    fn forward(&self, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, BackendError> {
        let mut state = self.state.locked();
        let mut process = match state.process.take() {
            Some(process) => process,
            None if Instant::now() < state.retry_at => return Err(self.unavailable(&state)),
            None => match Process::start(&self.spec) {
                Ok((mut process, _)) => {
                    // Its model warmed up with the first worker: real batches get real deadlines.
                    process.passes = self.spec.config.warmup_runs.max(1) + 2;
                    state.restarts += 1;
                    tracing::info!(model = %self.spec.config.name, pid = process.pid, restarts = state.restarts, "model worker restarted");
                    self.spec.events.emit_for(
                        self.spec.owner(),
                        EventKind::WorkerRestarted { model: self.spec.config.name.clone(), pid: process.pid, restarts: state.restarts },
                    );
                    process
                }
                Err(e) => {
                    state.failures += 1;
                    let wait = backoff(state.failures);
                    state.retry_at = Instant::now() + wait;
                    state.last_exit = format!("could not start again: {e}");
                    tracing::warn!(model = %self.spec.config.name, retry_in_ms = wait.as_millis() as u64, "model worker {}", state.last_exit);
                    return Err(self.unavailable(&state));
                }
            },
        };
        let deadline = process.deadline(&self.spec);
        match process.pass(inputs, self.spec.config.outputs.len(), deadline) {
            Ok(Ok(outputs)) => {
                state.process = Some(process);
                Ok(outputs)
            }
            // The model's own error: the worker lives on.
            Ok(Err(e)) => {
                state.process = Some(process);
                Err(e)
            }
            Err(how) => Err(self.failed(&mut state, process, how)),
        }
    }

    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    fn parameters(&self) -> u64 {
        self.parameters
    }
}

/// What a worker said once loaded.
struct Loaded {
    weight_bytes: u64,
    parameters: u64,
    complete: bool,
    confinement: String,
}

/// A running worker and the memory it shares with the server.
struct Process {
    child: Child,
    pid: u32,
    channel: Channel,
    inputs: Region,
    outputs: Region,
    started: Instant,
    /// Passes run, to give the load's warm-up passes the load's deadline.
    passes: u32,
}

fn region(len: usize) -> io::Result<Region> {
    let region = Region::create("kiln-worker", len)?;
    region.seal()?;
    Ok(region)
}

impl Process {
    /// Starts a worker for `spec` and loads the model in it.
    fn start(spec: &Spec) -> Result<(Process, Loaded), BackendError> {
        let config = &spec.config;
        let load = |message: String| BackendError::Load(format!("model worker for '{}': {message}", config.model_name()));
        let archive = std::fs::read(&config.path).map_err(|e| load(format!("cannot read the model file: {e}")))?;
        // A restart reads the file again: it must still be the file that was checked at load.
        if config.sha256.as_ref().is_some_and(|pinned| crate::files::sha256_hex(&archive) != *pinned) {
            return Err(load("the model file changed since it was loaded".to_owned()));
        }
        let probe = warmup_inputs(&config.inputs);
        let inputs = region(INITIAL_REGION_BYTES.max(layout_bytes(&probe))).map_err(|e| load(format!("no shared memory: {e}")))?;
        let outputs = region(INITIAL_REGION_BYTES).map_err(|e| load(format!("no shared memory: {e}")))?;
        let (ours, theirs) = UnixStream::pair().map_err(|e| load(format!("no socket: {e}")))?;
        let mut command = Command::new(&spec.executable);
        command
            .arg(SUBCOMMAND)
            .arg(&config.name)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // No relative path of a module's means anything of the server's.
            .current_dir("/")
            // Nothing of the server's environment (keys, tokens) but where libraries and GPUs are.
            .env_clear()
            .env("MALLOC_ARENA_MAX", "2");
        for kept in ["LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "LANG"] {
            if let Some(value) = std::env::var_os(kept) {
                command.env(kept, value);
            }
        }
        let mut child = command.spawn().map_err(|e| load(format!("cannot start {}: {e}", spec.executable.display())))?;
        let pid = child.id();
        if let Some(stderr) = child.stderr.take() {
            log_stderr(config.name.clone(), pid, stderr);
        }
        let mut process = Process { child, pid, channel: Channel::new(ours), inputs, outputs, started: Instant::now(), passes: 0 };
        process.channel.set_deadline(Some(Instant::now() + spec.load_timeout));
        match process.load(spec, &archive, &probe) {
            Ok(Ok(loaded)) => Ok((process, loaded)),
            Ok(Err(e)) => {
                process.stop(true);
                Err(e)
            }
            Err(e) => {
                let how = if e.kind() == io::ErrorKind::TimedOut {
                    format!("did not load within {} s (load_timeout_s)", spec.load_timeout.as_secs())
                } else {
                    format!("ended while loading: {e}")
                };
                let how = match process.stop(false) {
                    Some(status) => format!("{how} ({status})"),
                    None => how,
                };
                Err(load(how))
            }
        }
    }

    fn load(&mut self, spec: &Spec, archive: &[u8], probe: &[HostTensor]) -> io::Result<Result<Loaded, BackendError>> {
        let config = &spec.config;
        self.channel.send(&Request::Region { which: Which::Inputs, len: self.inputs.len() }, &[], Some(self.inputs.fd()))?;
        self.channel.send(&Request::Region { which: Which::Outputs, len: self.outputs.len() }, &[], Some(self.outputs.fd()))?;
        let probe = self.write_inputs(probe)?;
        // CUDA reserves far more address space than it uses, so a GPU worker's host memory is not
        // bounded this way (its GPU memory is, by placement).
        let memory_bytes = match spec.device {
            Device::Cpu => (archive.len() as u64).saturating_mul(MEMORY_PER_FILE_BYTE).saturating_add(MEMORY_BASE_BYTES),
            Device::Cuda(_) => u64::MAX,
        };
        let request = Request::Load(protocol::Load {
            model: config.name.clone(),
            device: spec.device.to_string(),
            precision: config.precision.to_string(),
            channels_last: config.channels_last,
            threads: config.threads,
            outputs: config.outputs.len(),
            probe,
            bytes: archive.len() as u64,
            memory_bytes,
        });
        self.channel.send(&request, archive, None)?;
        Ok(match self.channel.receive::<Reply>()? {
            Reply::Loaded { weight_bytes, parameters, complete, confinement } => {
                // What the worker says its weights take places replicas beside other tenants':
                // never less than the file holds (halved in reduced precision), whatever it says.
                let weight_bytes = weight_bytes.max(config.weights_of_file(archive.len() as u64));
                Ok(Loaded { weight_bytes, parameters, complete, confinement: loggable(&confinement, MAX_LOGGED) })
            }
            Reply::Failed { kind, reason, .. } => Err(backend_error(kind, reason)),
            Reply::Outputs { .. } => return Err(protocol::invalid("outputs where the load's answer was due".into())),
        })
    }

    /// The deadline of the next pass: the load's for warm-up, then the model's request timeout
    /// (every caller of a pass that long has been answered already).
    fn deadline(&self, spec: &Spec) -> Instant {
        let warming_up = self.passes <= spec.config.warmup_runs.max(1) + 1;
        let limit = if warming_up { spec.load_timeout } else { spec.config.timeout.max(MIN_PASS_DEADLINE) };
        Instant::now() + limit
    }

    /// Writes `tensors` into the inputs region, replacing it with a larger one first when they
    /// do not fit; returns their slots.
    fn write_inputs(&mut self, tensors: &[HostTensor]) -> io::Result<Vec<Slot>> {
        let (slots, end) = layout(tensors.iter().map(|t| (t.dtype, t.shape.as_slice())));
        if end > self.inputs.len() {
            let larger = region(end.max(self.inputs.len().saturating_mul(2)))?;
            self.channel.send(&Request::Region { which: Which::Inputs, len: larger.len() }, &[], Some(larger.fd()))?;
            self.inputs = larger;
        }
        for (slot, t) in slots.iter().zip(tensors) {
            self.inputs.write(slot.offset, &t.data)?;
        }
        Ok(slots)
    }

    /// Runs one pass. The outer error means the worker is done for (it died, hung or broke the
    /// protocol), in words; the inner one is the model's own.
    fn pass(&mut self, inputs: &[HostTensor], outputs: usize, deadline: Instant) -> Result<Result<Vec<HostTensor>, BackendError>, String> {
        self.passes += 1;
        let broken = |e: io::Error| match e.kind() {
            io::ErrorKind::TimedOut => "ran a pass past its deadline and was stopped".to_owned(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => "exited".to_owned(),
            _ => format!("broke the protocol: {e}"),
        };
        let slots = self.write_inputs(inputs).map_err(broken)?;
        self.channel.set_deadline(Some(deadline));
        self.channel.send(&Request::Forward { inputs: slots }, &[], None).map_err(broken)?;
        match self.channel.receive::<Reply>().map_err(broken)? {
            Reply::Outputs { outputs: slots, inline } => self.read_outputs(&slots, inline, outputs).map(Ok).map_err(broken),
            Reply::Failed { kind, reason, fatal: false } => Ok(Err(backend_error(kind, reason))),
            Reply::Failed { reason, fatal: true, .. } => Err(format!("failed for good: {}", loggable(&reason, MAX_LOGGED))),
            Reply::Loaded { .. } => Err("broke the protocol: a load's answer to a pass".to_owned()),
        }
    }

    /// The outputs a reply names. The worker is not trusted: its slots must lie one after another
    /// exactly as [`layout`] places them (no overlap, no gap to make the server allocate), and
    /// all of them within [`MAX_OUTPUT_BYTES`], before a byte is allocated for them.
    fn read_outputs(&mut self, slots: &[Slot], inline: bool, expected: usize) -> io::Result<Vec<HostTensor>> {
        if slots.len() != expected {
            return Err(protocol::invalid(format!("{} outputs where the model has {expected}", slots.len())));
        }
        let extents = slots.iter().map(Slot::extent).collect::<io::Result<Vec<_>>>()?;
        let (placed, end) = layout(slots.iter().zip(&extents).map(|(slot, (dtype, _))| (*dtype, slot.shape.as_slice())));
        if placed.iter().zip(slots).any(|(want, got)| want.offset != got.offset) {
            return Err(protocol::invalid("outputs not laid out one after another".into()));
        }
        if end > MAX_OUTPUT_BYTES || (!inline && end > self.outputs.len()) {
            return Err(protocol::invalid(format!("{end} bytes of outputs, more than a pass may return")));
        }
        let mut outputs = Vec::with_capacity(slots.len());
        let mut read = 0;
        for (slot, (dtype, bytes)) in slots.iter().zip(extents) {
            let mut data = vec![0u8; bytes];
            if inline {
                // Skip the alignment gap before this output, then read it.
                let mut gap = vec![0u8; slot.offset - read];
                self.channel.read_exact(&mut gap)?;
                self.channel.read_exact(&mut data)?;
                read = slot.offset + bytes;
            } else {
                self.outputs.read(slot.offset, &mut data)?;
            }
            outputs.push(HostTensor { dtype, shape: slot.shape.clone(), data });
        }
        if inline {
            // The worker sends up to the end it laid out; nothing after.
            let mut rest = vec![0u8; end - read];
            self.channel.read_exact(&mut rest)?;
            if end > self.outputs.len() {
                // Room for outputs this large next time.
                let larger = region(end.max(self.outputs.len().saturating_mul(2)).min(MAX_OUTPUT_BYTES))?;
                self.channel.send(&Request::Region { which: Which::Outputs, len: larger.len() }, &[], Some(larger.fd()))?;
                self.outputs = larger;
            }
        }
        Ok(outputs)
    }

    /// Stops the worker (if it has not stopped) and says how it ended: at once, or, `graceful`,
    /// after a moment to exit on its own (a worker that answered a failed load exits).
    fn stop(mut self, graceful: bool) -> Option<String> {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => status,
            _ => {
                // Closing the socket ends a healthy worker; one that does not end is killed.
                self.channel.hang_up();
                let wait = if graceful { Duration::from_millis(200) } else { Duration::ZERO };
                let deadline = Instant::now() + wait;
                loop {
                    match self.child.try_wait() {
                        Ok(Some(status)) => break status,
                        Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                        _ => {
                            let _ = self.child.kill();
                            match self.child.wait() {
                                Ok(status) => break status,
                                Err(_) => return None,
                            }
                        }
                    }
                }
            }
        };
        Some(match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}{}", signal_name(signal)),
            _ => status.to_string(),
        })
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // A replica that stops takes its worker with it.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        4 => " (SIGILL)",
        6 => " (SIGABRT)",
        7 => " (SIGBUS)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        24 => " (SIGXCPU)",
        25 => " (SIGXFSZ)",
        31 => " (SIGSYS)",
        _ => "",
    }
}

fn backend_error(kind: FailureKind, reason: String) -> BackendError {
    let reason = loggable(&reason, MAX_LOGGED);
    match kind {
        FailureKind::Device => BackendError::Device(reason),
        FailureKind::Load => BackendError::Load(reason),
        FailureKind::Forward => BackendError::Forward(reason),
        FailureKind::Output => BackendError::Output(reason),
    }
}

/// Logs what a worker writes to stderr (libtorch's warnings, a crash's last words), escaped and
/// bounded, on a thread of its own that ends with the worker.
fn log_stderr(model: String, pid: u32, stderr: std::process::ChildStderr) {
    let spawned = std::thread::Builder::new().name("worker-stderr".into()).spawn(move || {
        let mut lines = 0u32;
        let mut reader = BufReader::new(stderr);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.by_ref().take(MAX_LOGGED as u64 * 4).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            lines += 1;
            if lines <= MAX_LOGGED_LINES {
                let text = String::from_utf8_lossy(&line);
                tracing::warn!(model = %model, pid, "model worker: {}", loggable(text.trim_end(), MAX_LOGGED));
            }
        }
        if lines > MAX_LOGGED_LINES {
            tracing::warn!(model = %model, pid, "model worker wrote {} more lines to stderr, not logged", lines - MAX_LOGGED_LINES);
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start a thread for a model worker's stderr: {e}");
    }
}
