//! What a model's scheduler is told, and the work that waits in its queue: by handles (submit,
//! add or remove a replica, shut down) and by its own replicas' threads (loaded, done).

use std::sync::mpsc::SyncSender;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::model::backend::BackendError;
use crate::model::device::Placement;
use crate::model::error::InferError;
use crate::model::signature::OutputMeta;
use crate::model::tensor::HostTensor;

pub(super) type Reply = oneshot::Sender<Result<(Vec<HostTensor>, Batched), InferError>>;

/// The forward pass that answered a caller.
#[derive(Debug, Clone, Copy)]
pub(super) struct Batched {
    /// Requests in the pass (after any split that isolated a failing one).
    pub(super) requests: u32,
    /// When it started.
    pub(super) started: std::time::Instant,
}

/// One caller's work, waiting in the queue.
pub(super) struct Pending {
    pub(super) inputs: Vec<HostTensor>,
    pub(super) rows: u32,
    pub(super) ragged_len: Option<u32>,
    pub(super) key: Vec<Vec<u32>>,
    pub(super) priority: u8,
    pub(super) enqueued: Instant,
    pub(super) reply: Reply,
    /// Its caller's `compute` span, when traced: the forward pass links to it.
    pub(super) trace: Option<crate::telemetry::spans::SpanContext>,
}

/// What the scheduler is told: by handles (submit, add, remove, shut down) and by its own
/// replicas' threads (loaded, done).
pub(super) enum Command {
    Submit(Pending),
    AddReplica(Placement),
    /// Drain one replica if more than one is live; the answer says whether one was.
    RemoveReplica(SyncSender<bool>),
    Loaded {
        replica: u32,
        result: Result<Vec<OutputMeta>, BackendError>,
    },
    Done {
        replica: u32,
    },
    /// Look at the queue again: a guest the scheduler held a batch for ended without calling,
    /// or an operator resumed the model or changed its knobs.
    Wake,
    /// Answer every queued request with `Flushed`; the answer says how many.
    Flush(SyncSender<usize>),
    Shutdown,
}
