//! A scripted backend for the scheduler's tests: no model file, no libtorch, milliseconds.
//!
//! Its model doubles every value of its single F32 input. A pass takes `forward_delay`, fails
//! when any value is negative (a caller's bad input), and is recorded; a load takes
//! `load_delay`, and the next `fail_loads` loads fail.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Backend, BackendError, LoadedModel};
use crate::model::device::Device;
use crate::model::spec::ModelConfig;
use crate::model::tensor::{DType, HostTensor};
use crate::sync::MutexExt;

#[derive(Debug, Default)]
pub(crate) struct Script {
    pub(crate) load_delay: Duration,
    pub(crate) forward_delay: Duration,
    pub(crate) fail_loads: AtomicU32,
    /// Every pass's input values, in the order they ran, warm-up passes included.
    pub(crate) passes: Mutex<Vec<Vec<f32>>>,
}

impl Script {
    pub(crate) fn passes(&self) -> Vec<Vec<f32>> {
        self.passes.locked().clone()
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Fake(pub(crate) Arc<Script>);

pub(crate) struct FakeModel(Arc<Script>);

impl Backend for Fake {
    type Model = FakeModel;

    fn load(&self, _config: &ModelConfig, _device: Device) -> Result<FakeModel, BackendError> {
        std::thread::sleep(self.0.load_delay);
        let failing = self.0.fail_loads.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(BackendError::Load("scripted load failure".into()));
        }
        Ok(FakeModel(Arc::clone(&self.0)))
    }
}

impl LoadedModel for FakeModel {
    fn forward(&self, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, BackendError> {
        let [input] = inputs else {
            return Err(BackendError::Forward(format!("expected one input, got {}", inputs.len())));
        };
        let values = f32_values(input);
        self.0.passes.locked().push(values.clone());
        std::thread::sleep(self.0.forward_delay);
        if values.iter().any(|v| *v < 0.0) {
            return Err(BackendError::Forward("negative input".into()));
        }
        let doubled: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
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
