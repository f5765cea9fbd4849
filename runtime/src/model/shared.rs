//! The state a model's scheduler and its callers both read: what the scheduler (and its replica
//! threads) publish, and the counters and histograms they keep. Written by the scheduler's side
//! only, except where a field says otherwise; read by [`crate::model::handle`] and the exporters.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kiln_wire::{EventKind, ReplicaInfo, ReplicaState};

use crate::model::backend::{Backend, BackendError};
use crate::model::curve::ForwardCurve;
use crate::model::device::Device;
use crate::model::precision::{self, Decision};
use crate::model::signature::OutputMeta;
use crate::model::spec::{Form, ModelConfig, Tuning};
use crate::telemetry::EventLog;
use crate::telemetry::histogram::{AtomicHistogram, BatchSizes};
use crate::sync::MutexExt;

/// Where a model is in its life.
#[derive(Debug, Clone)]
pub enum ModelState {
    Loading,
    Ready(Arc<[OutputMeta]>),
    Failed(String),
}

/// Counters an operator (and the batching tests) read.
#[derive(Debug, Default)]
pub struct ModelCounters {
    /// Requests answered by a forward pass, successfully or not.
    pub inferences: AtomicU64,
    /// Forward passes run.
    pub executions: AtomicU64,
    /// Requests whose caller had gone before they ran; skipped, not executed.
    pub dropped: AtomicU64,
    /// Requests refused because the queue was full.
    pub overloaded: AtomicU64,
    /// Requests whose timeout passed.
    pub timeouts: AtomicU64,
    /// Merged forward passes that failed and were split to find the request at fault.
    pub isolated: AtomicU64,
    /// Requests waiting in the queue now.
    pub queued: AtomicUsize,
    /// Forward passes by rows.
    pub batch_sizes: BatchSizes,
    /// Time from enqueue to the start of the request's forward pass.
    pub queue_wait: AtomicHistogram,
    /// Forward passes over every replica there has been (replicas' own come and go with them).
    pub forward: AtomicHistogram,
}

impl ModelCounters {
    /// Back to zero (`queued` is live state, not a statistic: it stays).
    pub(super) fn reset(&self) {
        for counter in [&self.inferences, &self.executions, &self.dropped, &self.overloaded, &self.timeouts, &self.isolated] {
            counter.store(0, Ordering::Relaxed);
        }
        self.batch_sizes.reset();
        self.queue_wait.reset();
        self.forward.reset();
    }

    pub(super) fn count_batch(&self, requests: usize, rows: u32) {
        self.inferences.fetch_add(requests as u64, Ordering::Relaxed);
        self.executions.fetch_add(1, Ordering::Relaxed);
        self.batch_sizes.record(rows);
    }
}

/// One replica as operators see it; the scheduler and the replica's thread update it.
#[derive(Debug)]
pub(super) struct ReplicaSlot {
    pub(super) id: u32,
    pub(super) device: Device,
    state: Mutex<ReplicaState>,
    pub(super) busy: AtomicBool,
    pub(super) forward: AtomicHistogram,
    pub(super) batch_sizes: BatchSizes,
}

impl ReplicaSlot {
    pub(super) fn new(id: u32, device: Device) -> Arc<ReplicaSlot> {
        Arc::new(ReplicaSlot {
            id,
            device,
            state: Mutex::new(ReplicaState::Loading),
            busy: AtomicBool::new(false),
            forward: AtomicHistogram::new(),
            batch_sizes: BatchSizes::default(),
        })
    }

    pub(super) fn state(&self) -> ReplicaState {
        *self.state.locked()
    }

    pub(super) fn set_state(&self, state: ReplicaState) {
        *self.state.locked() = state;
    }

    pub(super) fn info(&self) -> ReplicaInfo {
        ReplicaInfo {
            id: self.id,
            device: self.device.to_string(),
            state: self.state(),
            busy: self.busy.load(Ordering::Relaxed),
            batches: self.batch_sizes.passes(),
            rows: self.batch_sizes.rows(),
            busy_seconds: self.forward.sum_us() as f64 / 1e6,
        }
    }
}

/// What the scheduler publishes and callers read. Every field is written by the scheduler (or
/// its replicas) only, except the queue count callers take a place in before they send.
pub(super) struct Shared {
    pub(super) config: ModelConfig,
    pub(super) state: Mutex<ModelState>,
    pub(super) counters: ModelCounters,
    /// Every replica alive, in id order.
    pub(super) replicas: Mutex<Vec<Arc<ReplicaSlot>>>,
    /// The scheduler's replica target, as last published.
    pub(super) target: AtomicU32,
    /// One replica's weights as measured at load; 0 until one has loaded.
    pub(super) weights: AtomicU64,
    /// Whether requests of different lengths may share a batch: false once a load found that
    /// padding changes the model's outputs.
    pub(super) ragged_batching: AtomicBool,
    pub(super) events: Arc<EventLog>,
    /// Forward time by batch rows, learned while serving.
    pub(super) curve: Mutex<ForwardCurve>,
    /// Guests running now that may call this model and have not yet: the rows on their way.
    pub(super) expected: AtomicUsize,
    /// Whether the scheduler is holding a partial batch for them.
    pub(super) holding: AtomicBool,
    /// What an operator may change while serving; the config's values until then.
    pub(super) tuning: Mutex<Tuning>,
    /// While set, requests queue (up to the queue limit) and no batch runs.
    pub(super) paused: AtomicBool,
    /// How long its first replica took to load, and to warm up.
    pub(super) load_time: Mutex<Option<LoadTimes>>,
    /// The module's parameters (elements), as the first replica to load counted them.
    pub(super) parameters: AtomicU64,
    /// `precision = "auto"`'s choices, one per kind of device (the CPU, GPUs) searched on.
    pub(super) precisions: Mutex<Vec<Decision>>,
    /// Held while a search runs, so that replicas loading together search once.
    pub(super) searching: Mutex<()>,
}

impl Shared {
    /// A model's state before its scheduler starts: loading, with a replica target of `initial`.
    pub(super) fn new(config: ModelConfig, initial: u32, events: Arc<EventLog>) -> Arc<Shared> {
        let max_rows = config.batching.max_batch_size;
        let tuning = Tuning::of(&config);
        Arc::new(Shared {
            config,
            state: Mutex::new(ModelState::Loading),
            counters: ModelCounters::default(),
            replicas: Mutex::new(Vec::new()),
            target: AtomicU32::new(initial),
            weights: AtomicU64::new(0),
            ragged_batching: AtomicBool::new(true),
            events,
            curve: Mutex::new(ForwardCurve::new(max_rows)),
            expected: AtomicUsize::new(0),
            holding: AtomicBool::new(false),
            tuning: Mutex::new(tuning),
            paused: AtomicBool::new(false),
            load_time: Mutex::new(None),
            parameters: AtomicU64::new(0),
            precisions: Mutex::new(Vec::new()),
            searching: Mutex::new(()),
        })
    }

    /// What a replica on `device` loads as: the config's form, or for `precision = "auto"`
    /// what the search chose for that kind of device, searching first if none has.
    pub(super) fn form_on<B: Backend>(&self, backend: &B, device: Device) -> Result<Form, BackendError> {
        let Some(auto) = &self.config.auto_precision else {
            return Ok(self.config.form());
        };
        let chosen = || self.precisions.locked().iter().find(|d| d.on_gpu() == device.is_gpu()).map(|d| d.form);
        let _one_search = self.searching.locked();
        if let Some(form) = chosen() {
            return Ok(form);
        }
        let decision = precision::search(backend, &self.config, auto, device)?;
        tracing::info!(model = %self.config.name, "precision chosen: {}", decision.report.summary());
        self.events.emit_for(self.config.owner(), EventKind::PrecisionChosen(decision.report.clone()));
        let form = decision.form;
        self.precisions.locked().push(decision);
        Ok(form)
    }

    #[cfg(test)]
    pub(super) fn for_tests(config: ModelConfig) -> Arc<Shared> {
        Shared::new(config, 1, Arc::new(EventLog::new(16)))
    }

    pub(super) fn tuning(&self) -> Tuning {
        *self.tuning.locked()
    }

    pub(super) fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Arc<ReplicaSlot>>> {
        self.replicas.locked()
    }

    pub(super) fn curve(&self) -> std::sync::MutexGuard<'_, ForwardCurve> {
        self.curve.locked()
    }
}

/// How long a replica took to load its model, and then to run its warm-up passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadTimes {
    pub load: std::time::Duration,
    pub warmup: std::time::Duration,
}
