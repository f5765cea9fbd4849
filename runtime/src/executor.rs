//! Model executors: one queue per model, owned by the model's own thread, reached through a
//! cloneable [`ModelHandle`].
//!
//! Callers on the async side validate their tensors and `submit` them; the owning thread takes
//! work off the queue and runs libtorch. Because the queue has a single owner, the owner sees all
//! pending work at once, which is where cross-request batching plugs in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use tokio::sync::{mpsc, oneshot};

use crate::backend::{self, OutputMeta, TorchModel};
use crate::config::ModelConfig;
use crate::tensor::{HostTensor, TensorError};

/// Jobs waiting beyond this are refused as overloaded instead of queueing without bound.
const QUEUE_CAPACITY: usize = 4096;

/// Why an inference did not produce outputs.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum InferError {
    /// The inputs do not match the model's declared inputs.
    #[error("{0}")]
    InvalidInput(#[from] TensorError),
    /// The model is still loading or failed to load.
    #[error("model '{model}' is not ready: {reason}")]
    NotReady { model: String, reason: String },
    /// The queue is full.
    #[error("model '{0}' is overloaded; retry later")]
    Overloaded(String),
    /// libtorch refused the inputs or failed while running.
    #[error("model '{model}': {message}")]
    Runtime { model: String, message: String },
    /// The executor thread is gone (the server is shutting down).
    #[error("model '{0}' is shut down")]
    Closed(String),
}

/// Where a model is in its life.
#[derive(Debug, Clone)]
pub enum ModelState {
    Loading,
    Ready(Arc<[OutputMeta]>),
    Failed(String),
}

struct Job {
    inputs: Vec<HostTensor>,
    reply: oneshot::Sender<Result<Vec<HostTensor>, InferError>>,
}

/// Counters an operator (and the batching tests) read.
#[derive(Debug, Default)]
pub struct ModelCounters {
    /// Inference requests answered, successfully or not.
    pub inferences: AtomicU64,
    /// Forward passes run.
    pub executions: AtomicU64,
    /// Requests whose caller had gone before they ran; skipped, not executed.
    pub dropped: AtomicU64,
}

struct Shared {
    config: ModelConfig,
    state: Mutex<ModelState>,
    counters: ModelCounters,
}

/// A cheap, cloneable reference to one model's executor.
#[derive(Clone)]
pub struct ModelHandle {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Job>,
}

impl std::fmt::Debug for ModelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelHandle")
            .field("name", &self.shared.config.name)
            .finish()
    }
}

impl ModelHandle {
    /// Starts the model's thread, which loads and warms up the module, then serves its queue.
    /// Returns at once; [`ModelHandle::state`] says when the model is ready.
    pub fn spawn(config: ModelConfig) -> std::io::Result<ModelHandle> {
        let (queue, jobs) = mpsc::channel(QUEUE_CAPACITY);
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(ModelState::Loading),
            counters: ModelCounters::default(),
        });
        let owner = Arc::clone(&shared);
        thread::Builder::new()
            .name(format!("kiln-model-{}", shared.config.name))
            .spawn(move || run(owner, jobs))?;
        Ok(ModelHandle { shared, queue })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.shared.config
    }

    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    pub fn state(&self) -> ModelState {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn counters(&self) -> &ModelCounters {
        &self.shared.counters
    }

    /// Checks `inputs` against the declared inputs (by name, in declaration order) and returns
    /// them as `forward`'s positional arguments.
    pub fn arrange_inputs(
        &self,
        mut named: Vec<(String, HostTensor)>,
    ) -> Result<Vec<HostTensor>, TensorError> {
        let specs = &self.shared.config.inputs;
        if let Some((name, _)) = named
            .iter()
            .find(|(name, _)| !specs.iter().any(|s| &s.name == name))
        {
            let expected: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            return Err(TensorError(format!(
                "input '{name}' is not an input of model '{}' (expected {expected:?})",
                self.name()
            )));
        }
        let mut ordered = Vec::with_capacity(specs.len());
        for spec in specs {
            let at = named.iter().position(|(name, _)| name == &spec.name);
            let Some(at) = at else {
                return Err(TensorError(format!("input '{}' is missing", spec.name)));
            };
            let (_, tensor) = named.swap_remove(at);
            tensor.check(spec)?;
            ordered.push(tensor);
        }
        if !named.is_empty() {
            return Err(TensorError(format!(
                "input '{}' was given more than once",
                named[0].0
            )));
        }
        let rows = ordered[0].rows();
        if let Some((spec, t)) = specs.iter().zip(&ordered).find(|(_, t)| t.rows() != rows) {
            return Err(TensorError(format!(
                "input '{}': batch dimension is {} but input '{}' has {rows}",
                spec.name,
                t.rows(),
                specs[0].name
            )));
        }
        Ok(ordered)
    }

    /// Queues validated inputs (from [`ModelHandle::arrange_inputs`]) and waits for the outputs.
    ///
    /// Dropping the returned future withdraws the request: the executor skips it.
    pub async fn infer(&self, inputs: Vec<HostTensor>) -> Result<Vec<HostTensor>, InferError> {
        match self.state() {
            ModelState::Ready(_) => {}
            ModelState::Loading => {
                return Err(InferError::NotReady {
                    model: self.name().to_owned(),
                    reason: "still loading".into(),
                });
            }
            ModelState::Failed(reason) => {
                return Err(InferError::NotReady {
                    model: self.name().to_owned(),
                    reason,
                });
            }
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Job { inputs, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => InferError::Overloaded(self.name().into()),
                mpsc::error::TrySendError::Closed(_) => InferError::Closed(self.name().into()),
            })?;
        answer
            .await
            .unwrap_or_else(|_| Err(InferError::Closed(self.name().into())))
    }
}

/// The model thread: load, warm up, then serve the queue until every handle is dropped.
fn run(shared: Arc<Shared>, mut jobs: mpsc::Receiver<Job>) {
    let name = shared.config.name.clone();
    let set_state = |state| {
        *shared.state.lock().unwrap_or_else(PoisonError::into_inner) = state;
    };
    let started = std::time::Instant::now();
    let model = match load_and_warm_up(&shared.config) {
        Ok((model, meta)) => {
            tracing::info!(
                model = %name,
                device = %shared.config.device,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "model ready"
            );
            set_state(ModelState::Ready(meta.into()));
            model
        }
        Err(reason) => {
            tracing::error!(model = %name, "model failed to load: {reason}");
            set_state(ModelState::Failed(reason));
            return;
        }
    };
    let counters = &shared.counters;
    while let Some(job) = jobs.blocking_recv() {
        if job.reply.is_closed() {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let result = forward_guarded(&model, &job.inputs).map_err(|message| InferError::Runtime {
            model: name.clone(),
            message,
        });
        counters.executions.fetch_add(1, Ordering::Relaxed);
        counters.inferences.fetch_add(1, Ordering::Relaxed);
        // The caller may have gone while we ran; nothing else is owed to it.
        let _ = job.reply.send(result);
    }
    tracing::debug!(model = %name, "executor stopped");
}

fn load_and_warm_up(config: &ModelConfig) -> Result<(TorchModel, Vec<OutputMeta>), String> {
    let model = TorchModel::load(config)?;
    let inputs = backend::warmup_inputs(config);
    let mut meta = Vec::new();
    for _ in 0..config.warmup_runs.max(1) {
        let outputs = forward_guarded(&model, &inputs)
            .map_err(|e| format!("warm-up forward pass failed: {e}"))?;
        meta = backend::output_meta(config, &outputs);
    }
    Ok((model, meta))
}

/// A panic inside the backend must fail one batch, not kill the executor.
fn forward_guarded(model: &TorchModel, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.forward(inputs)))
        .unwrap_or_else(|_| Err("the backend panicked while running forward".into()))
}
