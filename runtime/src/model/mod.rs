//! Models: what a model takes and gives ([`signature`], [`tensor`]), how it is configured
//! ([`spec`]), where a replica runs ([`device`]), merging requests into batches ([`batch`]), the
//! [`backend`]s that run forward passes, the per-model [`scheduler`] (an actor: what it is told
//! is [`command`]), its [`replica`] threads, the [`shared`] state both sides publish and read,
//! the forward-time [`curve`] it learns, the machine's [`cores`] its CPU passes spread over, the
//! [`precision`] `precision = "auto"` picks by measuring, and the [`table`] of models being
//! served. Callers get outputs or an [`error::InferError`]. No HTTP and no wasm here: the
//! sandbox and the API reach a model through a [`handle::ModelHandle`]. Before a tenant's
//! TorchScript is loaded at all, [`graph_check`] reads what its code can run.

pub mod backend;
mod command;
pub mod cores;
pub mod curve;
pub mod device;
pub mod error;
pub mod graph_check;
pub mod handle;
pub mod precision;
pub mod replica;
pub mod scheduler;
pub mod shared;
pub mod spec;
pub mod table;
#[cfg(test)]
pub(crate) mod test_models;

// Decoders of untrusted input live in kiln-codec (no libtorch, so they can be fuzzed).
pub use kiln_codec::{batch, signature, tensor};
