//! Models in confined worker processes, end to end: the real `kiln` binary as the worker, on the
//! models `scripts/setup.sh` exports. A worker answers as the in-process backend does, through
//! shared memory that grows with the batches; a module that reaches for files (what the load-time
//! graph check refuses, run here without it) reaches nothing; and a worker that hangs or dies
//! fails its own batch, says so, and is started again.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::model;
use kiln::model::backend::torch::Torch;
use kiln::model::backend::worker::{Worker, WorkerModel};
use kiln::model::backend::{Backend, BackendError, LoadedModel};
use kiln::model::device::Device;
use kiln::model::signature::{InputSpec, OutputSpec, Ragged};
use kiln::model::spec::{BatchPolicy, DeviceChoice, ModelConfig, Precision, Replicas};
use kiln::model::tensor::{DType, HostTensor};
use kiln::telemetry::EventLog;
use kiln_wire::EventKind;

fn config(name: &str, file: &str, inputs: Vec<InputSpec>, outputs: Vec<OutputSpec>) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        version: 1,
        path: model(file),
        source: None,
        sha256: None,
        device: DeviceChoice::Cpu,
        inputs,
        outputs,
        warmup_runs: 1,
        batching: BatchPolicy {
            max_batch_size: 64,
            max_queue_delay: Duration::ZERO,
            preferred_batch_sizes: Vec::new(),
            max_queue_size: 1000,
            max_rows: 8192,
        },
        replicas: Replicas::fixed(1),
        latency_objective: Duration::from_millis(50),
        memory_headroom_bytes: 0,
        threads: 1,
        timeout: Duration::from_secs(2),
        precision: Precision::Fp32,
        channels_last: false,
        auto_precision: None,
        worker: true,
    }
}

fn digits() -> ModelConfig {
    let image = InputSpec::new("image", DType::F32, vec![None, Some(1), Some(8), Some(8)], None);
    config("digits", "digits.pt", vec![image], vec![OutputSpec { name: "logits".into(), ragged_dim: None }])
}

fn minilm() -> ModelConfig {
    let ragged = Some(Ragged { dim: 1, pad: 0.0 });
    let inputs = vec![
        InputSpec::new("input_ids", DType::I64, vec![None, None], ragged),
        InputSpec::new("attention_mask", DType::I64, vec![None, None], ragged),
    ];
    config("minilm", "minilm.pt", inputs, vec![OutputSpec { name: "last_hidden_state".into(), ragged_dim: Some(1) }])
}

/// A model of one `[N, 4]` FP32 input `x` and one output `y`.
fn four_wide(name: &str, file: &str) -> ModelConfig {
    let x = InputSpec::new("x", DType::F32, vec![None, Some(4)], None);
    config(name, file, vec![x], vec![OutputSpec { name: "y".into(), ragged_dim: None }])
}

fn f32s(shape: Vec<u32>, values: impl Iterator<Item = f32>) -> HostTensor {
    HostTensor { dtype: DType::F32, shape, data: values.flat_map(f32::to_le_bytes).collect() }
}

fn i64s(shape: Vec<u32>, values: impl Iterator<Item = i64>) -> HostTensor {
    HostTensor { dtype: DType::I64, shape, data: values.flat_map(i64::to_le_bytes).collect() }
}

fn workers(events: &Arc<EventLog>, load_timeout: Duration) -> Worker {
    Worker::with_executable(PathBuf::from(env!("CARGO_BIN_EXE_kiln")), Arc::clone(events), load_timeout)
}

fn events_of(events: &EventLog) -> Vec<EventKind> {
    events.follow().0.into_iter().map(|e| e.kind).collect()
}

#[test]
fn a_worker_answers_as_the_server_s_own_backend_does_through_memory_that_grows_with_the_batch() {
    let events = Arc::new(EventLog::new(64));
    for (config, batches) in [
        // 5,000 images are 1.3 MB of inputs: more than a worker's first region holds.
        (digits(), vec![vec![f32s(vec![3, 1, 8, 8], (0..192).map(|i| i as f32 / 10.0))], vec![f32s(vec![5000, 1, 8, 8], (0..320_000).map(|i| (i % 17) as f32))]]),
        // 64 sentences of 16 tokens are 1.5 MB of hidden states: more than the outputs region
        // holds, so they come back after the reply once, and in the grown region after.
        (minilm(), {
            let batch = |rows: u32| vec![i64s(vec![rows, 16], (0..rows as i64 * 16).map(|i| 101 + i % 900)), i64s(vec![rows, 16], std::iter::repeat_n(1, rows as usize * 16))];
            vec![batch(2), batch(64), batch(64)]
        }),
    ] {
        let ours = Torch::default().load(&config, Device::Cpu).expect("in-process load");
        let theirs = workers(&events, Duration::from_secs(60)).load(&config, Device::Cpu).expect("worker load");
        assert!(theirs.pid().is_some());
        assert_eq!(theirs.parameters(), ours.parameters(), "{}", config.name);
        // Never less than the file holds, whatever the worker says.
        let file = std::fs::metadata(&config.path).expect("file").len();
        assert_eq!(theirs.weight_bytes(), ours.weight_bytes().max(file), "{}", config.name);
        for inputs in batches {
            let expected = ours.forward(&inputs).expect("in-process forward");
            let got = theirs.forward(&inputs).expect("worker forward");
            assert_eq!(got, expected, "{}: the worker's answer is the server's own", config.name);
        }
    }
    assert!(events_of(&events).is_empty(), "no worker failed: {:?}", events_of(&events));
}

#[test]
fn a_module_that_reaches_for_files_gets_nothing_in_a_worker() {
    let events = Arc::new(EventLog::new(64));
    let x = [f32s(vec![1, 4], [0.0, 1.0, 2.0, 3.0].into_iter())];
    // Past the graph check (not run here), forward maps /etc/passwd: the server's own backend
    // would give it the file's bytes; the worker cannot open it, and lives on.
    let leak = four_wide("leak", "from-file.pt");
    let in_process = Torch::default().load(&leak, Device::Cpu).expect("load").forward(&x);
    assert!(in_process.is_ok(), "what the worker keeps out, the server's process lets in: {in_process:?}");
    let worker = workers(&events, Duration::from_secs(60));
    // Its warm-up pass is the first to reach for the file.
    let leaker = worker.load(&leak, Device::Cpu).expect("loads: nothing runs at load");
    let refused = leaker.forward(&x).expect_err("refused");
    assert!(matches!(&refused, BackendError::Forward(m) if m.contains("/etc/passwd")), "{refused}");
    let pid = leaker.pid();
    assert!(pid.is_some());
    assert!(leaker.forward(&x).is_err());
    assert_eq!(leaker.pid(), pid, "a model's error leaves its worker running");

    // Its __setstate__, run while loading, creates a file in the working directory (a worker's is
    // the root): nothing is created, and the load fails naming the model.
    let planted = Path::new("/kiln-setstate-from-file.created");
    let _ = std::fs::remove_file(planted);
    let setstate = four_wide("setstate", "setstate-from-file.pt");
    let err = worker.load(&setstate, Device::Cpu).map(|_| ()).expect_err("refused");
    assert!(matches!(&err, BackendError::Load(m) if m.contains("setstate")), "{err}");
    assert!(!planted.exists(), "the worker created a file");
    assert!(events_of(&events).is_empty(), "a model's errors are no worker failures");
}

fn wait_for_pid_change(model: &WorkerModel, was: Option<u32>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while model.pid() == was && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_worker_that_dies_or_hangs_fails_its_batch_as_unavailable_and_is_started_again_after_a_back_off() {
    let events = Arc::new(EventLog::new(64));
    let x = [f32s(vec![1, 4], [0.0, 1.0, 2.0, 3.0].into_iter())];
    let offset = four_wide("acme:offset", "offset-2.pt");
    let worker = workers(&events, Duration::from_secs(60)).load(&offset, Device::Cpu).expect("load");
    let first = worker.forward(&x).expect("forward");
    let pid = worker.pid().expect("running");
    let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill");
    assert!(killed.success());
    std::thread::sleep(Duration::from_millis(50));
    let err = worker.forward(&x).expect_err("its worker is gone");
    assert!(matches!(&err, BackendError::Unavailable(m) if m.contains("exited") && m.contains("SIGKILL")), "{err}");
    assert_eq!(worker.pid(), None);
    // Within the back-off, at once and without a new worker.
    let started = Instant::now();
    assert!(matches!(worker.forward(&x), Err(BackendError::Unavailable(_))));
    assert!(started.elapsed() < Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(worker.forward(&x).expect("a new worker"), first);
    let again = worker.pid().expect("running again");
    assert_ne!(again, pid);
    let seen = events_of(&events);
    assert!(
        matches!(&seen[..], [EventKind::WorkerExited { model, pid: p, reason, restart_in_ms: 100 }, EventKind::WorkerRestarted { pid: q, restarts: 1, .. }]
            if model == "acme:offset" && *p == pid && reason.contains("SIGKILL") && *q == again),
        "{seen:?}"
    );

    // A pass that never ends is stopped at its deadline (the load's, for the warm-up passes).
    let hang = four_wide("hang", "hang.pt");
    let hung = workers(&events, Duration::from_secs(2)).load(&hang, Device::Cpu).expect("loads: nothing runs yet");
    let was = hung.pid();
    let started = Instant::now();
    let err = hung.forward(&x).expect_err("stopped");
    assert!(matches!(&err, BackendError::Unavailable(m) if m.contains("deadline")), "{err}");
    assert!((Duration::from_secs(2)..Duration::from_secs(10)).contains(&started.elapsed()), "{:?}", started.elapsed());
    wait_for_pid_change(&hung, was);
    assert_eq!(hung.pid(), None);
    let gone = std::path::Path::new("/proc").join(was.expect("pid").to_string());
    assert!(!gone.exists() || std::fs::read_to_string(gone.join("stat")).is_ok_and(|s| s.contains(") Z")), "the hung worker was stopped");
}
