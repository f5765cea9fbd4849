//! Why an inference did not produce outputs: what every caller of a model (a guest's `compute`,
//! a direct OIP call) may get back instead of tensors.

use std::time::Duration;

/// Why an inference did not produce outputs.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum InferError {
    /// The model is still loading or failed to load.
    #[error("model '{model}' is not ready: {reason}")]
    NotReady { model: String, reason: String },
    /// The queue is full.
    #[error("model '{0}' is overloaded; retry later")]
    Overloaded(String),
    /// The request's timeout passed before its result was ready.
    #[error("model '{model}' did not answer within {} ms", after.as_millis())]
    Timeout { model: String, after: Duration },
    /// The backend refused the inputs or failed while running.
    #[error("model '{model}': {message}")]
    Runtime { model: String, message: String },
    /// The scheduler is gone (the server is shutting down).
    #[error("model '{0}' is shut down")]
    Closed(String),
    /// The model cannot run for now: its worker process ended and is being restarted.
    #[error("model '{model}' is unavailable: {message}")]
    Unavailable { model: String, message: String },
    /// An operator flushed the model's queue while the request waited in it.
    #[error("model '{0}': the queue was flushed by an operator; retry later")]
    Flushed(String),
}
