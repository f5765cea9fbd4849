//! A scripted backend for the scheduler's tests: no model file, no libtorch, milliseconds.
//!
//! Its model doubles every value of its single F32 input. A pass takes `forward_delay`, fails
//! when any value is negative (a caller's bad input), and is recorded; a load takes
//! `load_delay`, and the next `fail_loads` loads fail. For the precision search, a precision
//! can be given its own pass time, an error it adds to every other output value, or a failing
//! load, or passes that fail after a number of them; and every pass that starts before a given
//! moment takes longer, as on a machine that something outside the server loads for a while.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Backend, BackendError, LoadedModel};
use crate::model::device::Device;
use crate::model::signature::{InputSpec, OutputSpec};
use crate::model::spec::{BatchPolicy, DeviceChoice, ModelConfig, Precision, Replicas};
use crate::model::tensor::{DType, HostTensor};
use crate::sync::MutexExt;

#[derive(Debug, Default)]
pub(crate) struct Script {
    pub(crate) load_delay: Duration,
    pub(crate) forward_delay: Duration,
    pub(crate) fail_loads: AtomicU32,
    /// Every pass's input values, in the order they ran, warm-up passes included.
    pub(crate) passes: Mutex<Vec<Vec<f32>>>,
    /// Per precision: its pass time instead of `forward_delay`, the error added to (and taken
    /// from) alternate output values, and whether it fails to load.
    pub(crate) precisions: Vec<(Precision, Duration, f32, bool)>,
    /// Every load's precision, in order.
    pub(crate) loads: Mutex<Vec<Precision>>,
    /// Until when passes are slowed, and by how much each (outside load).
    pub(crate) busy: Mutex<Option<(Instant, Duration)>>,
    /// A model loaded in this precision fails every pass after its first N.
    pub(crate) fail_after: Option<(Precision, usize)>,
    /// Models loaded and not yet dropped, now and at most.
    pub(crate) alive: AtomicU32,
    pub(crate) most_alive: AtomicU32,
}

impl Script {
    pub(crate) fn passes(&self) -> Vec<Vec<f32>> {
        self.passes.locked().clone()
    }

    pub(crate) fn loads(&self) -> Vec<Precision> {
        self.loads.locked().clone()
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Fake(pub(crate) Arc<Script>);

pub(crate) struct FakeModel {
    script: Arc<Script>,
    delay: Duration,
    error: f32,
    /// Passes that still succeed, for a precision scripted to fail after some.
    passes_left: Option<AtomicUsize>,
}

impl Drop for FakeModel {
    fn drop(&mut self) {
        self.script.alive.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Backend for Fake {
    type Model = FakeModel;

    fn load(&self, config: &ModelConfig, _device: Device) -> Result<FakeModel, BackendError> {
        std::thread::sleep(self.0.load_delay);
        self.0.loads.locked().push(config.precision);
        let failing = self.0.fail_loads.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        let own = self.0.precisions.iter().find(|p| p.0 == config.precision);
        if failing.is_ok() || own.is_some_and(|p| p.3) {
            return Err(BackendError::Load("scripted load failure".into()));
        }
        let (delay, error) = own.map_or((self.0.forward_delay, 0.0), |p| (p.1, p.2));
        let passes_left = self.0.fail_after.filter(|(p, _)| *p == config.precision).map(|(_, n)| AtomicUsize::new(n));
        let alive = self.0.alive.fetch_add(1, Ordering::AcqRel) + 1;
        self.0.most_alive.fetch_max(alive, Ordering::AcqRel);
        Ok(FakeModel { script: Arc::clone(&self.0), delay, error, passes_left })
    }
}

impl LoadedModel for FakeModel {
    fn forward(&self, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, BackendError> {
        let [input] = inputs else {
            return Err(BackendError::Forward(format!("expected one input, got {}", inputs.len())));
        };
        let values = f32_values(input);
        self.script.passes.locked().push(values.clone());
        if let Some(left) = &self.passes_left
            && left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_err()
        {
            return Err(BackendError::Forward("scripted pass failure".into()));
        }
        let busy = self.script.busy.locked().filter(|(until, _)| Instant::now() < *until).map_or(Duration::ZERO, |(_, extra)| extra);
        std::thread::sleep(self.delay + busy);
        if values.iter().any(|v| *v < 0.0) {
            return Err(BackendError::Forward("negative input".into()));
        }
        let error = |i: usize| if i.is_multiple_of(2) { self.error } else { -self.error };
        let doubled: Vec<f32> = values.iter().enumerate().map(|(i, v)| v * 2.0 + error(i)).collect();
        Ok(vec![f32_tensor(input.shape.clone(), &doubled)])
    }

    fn weight_bytes(&self) -> u64 {
        1 << 20
    }

    fn parameters(&self) -> u64 {
        1 << 18
    }
}

pub(crate) fn f32_tensor(shape: Vec<u32>, values: &[f32]) -> HostTensor {
    HostTensor { dtype: DType::F32, shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
}

pub(crate) fn f32_values(t: &HostTensor) -> Vec<f32> {
    t.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A model of the fake's: one F32 input `x` of `[rows, 1]`, one output `y`.
pub(crate) fn config(max_batch_size: u32, replicas: Replicas) -> ModelConfig {
    ModelConfig {
        worker: false,
        name: "fake".into(),
        path: PathBuf::from("fake.pt"),
        source: None,
        sha256: None,
        version: 1,
        device: DeviceChoice::Cpu,
        inputs: vec![InputSpec::new("x", DType::F32, vec![None, Some(1)], None)],
        outputs: vec![OutputSpec { name: "y".into(), ragged_dim: None }],
        warmup_runs: 1,
        batching: BatchPolicy {
            max_batch_size,
            max_queue_delay: Duration::ZERO,
            preferred_batch_sizes: Vec::new(),
            max_queue_size: 1000,
            max_rows: max_batch_size,
        },
        replicas,
        latency_objective: Duration::from_millis(50),
        memory_headroom_bytes: 0,
        threads: 1,
        timeout: Duration::from_secs(10),
        precision: Precision::Fp32,
        channels_last: false,
        auto_precision: None,
    }
}
