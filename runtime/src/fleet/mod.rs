//! The fleet: the GPUs Kiln manages ([`gpu`]), where a model's replicas go ([`placement`]),
//! and how many each model has ([`scaler`]). The fleet decides and places; each model's
//! scheduler starts and drains its own replicas when asked.

pub mod gpu;
pub mod placement;
pub mod scaler;

use std::sync::Arc;

use crate::model::backend::torch::Torch;
use crate::model::backend::worker::Worker;
use crate::model::handle::ModelHandle;
use crate::model::spec::ModelConfig;
use crate::telemetry::EventLog;
use placement::{PlacementError, Placer, Purpose};

/// Why a model could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("cannot run model workers: {0}")]
    Worker(String),
}

/// Places `config`'s first `replicas.min` replicas and starts the model on libtorch: in the
/// server's process, or, for a tenant's own model and one that asks for it, each replica in a
/// confined worker process (which may take `load_timeout` to start). A model that fits nowhere
/// is refused here.
pub fn start_model(
    config: &ModelConfig,
    placer: &Placer,
    log: Arc<EventLog>,
    load_timeout: std::time::Duration,
) -> Result<ModelHandle, StartError> {
    let weights = estimated_weights(config);
    let placements = (0..config.replicas.min)
        .map(|_| placer.place(config, weights, Purpose::Start))
        .collect::<Result<Vec<_>, _>>()?;
    if config.in_worker() {
        let workers = Worker::this_executable(Arc::clone(&log), load_timeout)
            .map_err(|e| StartError::Worker(format!("cannot find this executable: {e}")))?;
        return Ok(ModelHandle::spawn(config.clone(), placements, Arc::new(workers), log)?);
    }
    Ok(ModelHandle::spawn(config.clone(), placements, Arc::new(Torch::default()), log)?)
}

/// Starts or drains replicas of `handle` until its count is within the bounds an operator set
/// (`ModelHandle::tune`); the scaler moves it within them afterwards. Returns the replica target
/// reached, or why a replica could not be placed (those placed before stay).
pub fn fit_replicas(handle: &ModelHandle, placer: &Placer) -> Result<u32, String> {
    let bounds = handle.tuning().replicas;
    let weights = match handle.load().weights {
        0 => estimated_weights(handle.config()),
        measured => measured,
    };
    while handle.load().target < bounds.min {
        let placement = placer
            .place(handle.config(), weights, Purpose::ScaleUp)
            .map_err(|e| format!("cannot place another replica of '{}': {e}", handle.name()))?;
        let before = handle.load().target;
        if !handle.add_replica(placement) {
            return Err(format!("model '{}' is shut down", handle.name()));
        }
        // The scheduler raises the target once it has started the replica's thread.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while handle.load().target == before && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if handle.load().target == before {
            return Err(format!("model '{}' did not start another replica", handle.name()));
        }
    }
    while handle.load().target > bounds.max {
        if !handle.remove_replica() {
            break;
        }
    }
    Ok(handle.load().target)
}

/// One replica's weights before any has loaded: the file's size, halved in reduced precision.
pub fn estimated_weights(config: &ModelConfig) -> u64 {
    config.weights_of_file(std::fs::metadata(&config.path).map_or(0, |m| m.len()))
}
