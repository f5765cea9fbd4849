//! Backends: what runs a model's forward pass on host tensors.
//!
//! The scheduler is generic over [`Backend`], so it knows nothing of libtorch: [`torch`] is the
//! one Kiln serves with, and the scheduler's own tests run on a scripted fake. A backend's calls
//! block; the scheduler makes them on a replica's own thread, never on an async worker.

pub mod torch;
pub mod worker;

use crate::model::device::Device;
use crate::model::spec::ModelConfig;
use crate::model::tensor::HostTensor;

/// Why a backend could not load a model or run it. The message is for people (logs, the
/// caller's error); the variant is for code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The device is missing or this backend cannot use it.
    #[error("{0}")]
    Device(String),
    /// The model could not be loaded or prepared (its file, its parameters, its precision).
    #[error("{0}")]
    Load(String),
    /// The model refused the inputs or failed while running them.
    #[error("{0}")]
    Forward(String),
    /// The model returned something Kiln cannot carry back to a caller.
    #[error("{0}")]
    Output(String),
    /// The backend panicked; the batch fails, the replica lives on.
    #[error("the backend panicked while running forward")]
    Panicked,
    /// The model cannot run now, through no fault of the batch's inputs: its worker process
    /// died or hung and is being restarted. Every caller of the batch gets this as it is,
    /// without the batch being split to find a culprit.
    #[error("{0}")]
    Unavailable(String),
}

/// Loads models. One value serves every replica of every model it is given.
pub trait Backend: Send + Sync + 'static {
    type Model: LoadedModel;

    /// Loads `config`'s model onto `device`, on the calling thread (the replica's own, whose
    /// thread-local settings the backend may change), ready for its first forward pass.
    fn load(&self, config: &ModelConfig, device: Device) -> Result<Self::Model, BackendError>;
}

/// One replica's copy of a model.
pub trait LoadedModel: Send + 'static {
    /// Runs `forward` with `inputs` as positional arguments; returns one tensor per configured
    /// output, in order.
    fn forward(&self, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, BackendError>;

    /// Bytes of weights the replica holds on its device (0 when unknown).
    fn weight_bytes(&self) -> u64;

    /// Elements of the module's parameters (0 when unknown).
    fn parameters(&self) -> u64;

    /// Whether its passes run on this machine's CPU (in this process or in a worker): each then
    /// holds a core while it runs ([`crate::model::cores`]).
    fn on_cpu(&self) -> bool {
        false
    }

    /// Whether [`LoadedModel::use_threads`] changes anything (a model in a worker process keeps
    /// the worker's threads).
    fn sets_threads(&self) -> bool {
        false
    }

    /// Runs its next passes on `threads` libtorch threads, where it can: called on the thread
    /// that runs them.
    fn use_threads(&self, _threads: u32) {}
}

/// Runs `model`'s forward pass; a panic inside the backend fails this pass (one batch), not the
/// replica's thread.
pub fn forward_guarded<M: LoadedModel>(model: &M, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, BackendError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.forward(inputs))).unwrap_or(Err(BackendError::Panicked))
}

#[cfg(test)]
pub(crate) mod fake;
