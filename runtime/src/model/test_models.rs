//! Real TorchScript models (built by `scripts/setup.sh`) and requests for them, shared by the
//! scheduler's and the Torch backend's tests.

use std::path::PathBuf;
use std::time::Duration;

use crate::model::signature::{InputSpec, OutputSpec, Ragged};
use crate::model::spec::{BatchPolicy, DeviceChoice, ModelConfig, Precision, Replicas};
use crate::model::tensor::{DType, HostTensor};

pub(crate) fn model_path(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/models").join(name);
    assert!(path.exists(), "{} is missing: run scripts/setup.sh", path.display());
    path
}

pub(crate) fn policy(max_batch_size: u32, delay_us: u64) -> BatchPolicy {
    BatchPolicy {
        max_batch_size,
        max_queue_delay: Duration::from_micros(delay_us),
        preferred_batch_sizes: Vec::new(),
        max_queue_size: 100_000,
        max_rows: 4096,
    }
}

pub(crate) fn tokenwise(batching: BatchPolicy, instances: u32) -> ModelConfig {
    let ragged = Some(Ragged { dim: 1, pad: 0.0 });
    ModelConfig {
        worker: false,
        name: "tokenwise".into(),
        path: model_path("tokenwise.pt"),
        source: None,
        sha256: None,
        version: 1,
        device: DeviceChoice::Cpu,
        inputs: vec![
            InputSpec::new("ids", DType::I64, vec![None, None], ragged),
            InputSpec::new("mask", DType::I64, vec![None, None], ragged),
        ],
        outputs: vec![
            OutputSpec { name: "hidden".into(), ragged_dim: Some(1) },
            OutputSpec { name: "pooled".into(), ragged_dim: None },
        ],
        warmup_runs: 1,
        batching,
        replicas: Replicas::fixed(instances),
        threads: 1,
        timeout: Duration::from_secs(60),
        precision: Precision::Fp32,
        channels_last: false,
        auto_precision: None,
        latency_objective: Duration::from_millis(50),
        memory_headroom_bytes: 0,
    }
}

pub(crate) fn digits(batching: BatchPolicy) -> ModelConfig {
    ModelConfig {
        worker: false,
        name: "digits".into(),
        path: model_path("digits.pt"),
        source: None,
        sha256: None,
        version: 1,
        device: DeviceChoice::Cpu,
        inputs: vec![InputSpec::new("image", DType::F32, vec![None, Some(1), Some(8), Some(8)], None)],
        outputs: vec![OutputSpec { name: "logits".into(), ragged_dim: None }],
        warmup_runs: 1,
        batching,
        replicas: Replicas::fixed(1),
        threads: 1,
        timeout: Duration::from_secs(60),
        precision: Precision::Fp32,
        channels_last: false,
        auto_precision: None,
        latency_objective: Duration::from_millis(50),
        memory_headroom_bytes: 0,
    }
}

/// xorshift64*: deterministic, seedable, enough for arrival patterns and data.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub(crate) fn i64_tensor(shape: Vec<u32>, values: &[i64]) -> HostTensor {
    HostTensor { dtype: DType::I64, shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
}

pub(crate) fn f32s(t: &HostTensor) -> Vec<f32> {
    t.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A random tokenwise request: `rows` sentences of `len` ids, all positions real.
pub(crate) fn token_request(rng: &mut Rng, rows: u32, len: u32) -> Vec<HostTensor> {
    let n = (rows * len) as usize;
    let ids: Vec<i64> = (0..n).map(|_| rng.below(1000) as i64).collect();
    vec![i64_tensor(vec![rows, len], &ids), i64_tensor(vec![rows, len], &vec![1; n])]
}

pub(crate) fn assert_close(got: &[HostTensor], want: &[HostTensor], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: output count");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.shape, w.shape, "{what}: shape");
        for (a, b) in f32s(g).iter().zip(f32s(w)) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{what}: {a} vs {b}");
        }
    }
}

pub(crate) fn one_input_model(file: &str, input: InputSpec, output: &str, precision: Precision) -> ModelConfig {
    let mut config = digits(policy(1, 0));
    config.name = file.trim_end_matches(".pt").into();
    config.path = model_path(file);
    config.inputs = vec![input];
    config.outputs = vec![OutputSpec { name: output.into(), ragged_dim: None }];
    config.precision = precision;
    config
}

pub(crate) fn f32_values(t: &HostTensor) -> Vec<f32> {
    assert_eq!(t.dtype, DType::F32, "outputs come back as FP32 at every precision");
    t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}
