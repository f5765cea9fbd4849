//! [`ModelHandle`]: how everything outside a model reaches it. Callers (guests' `compute`,
//! direct OIP calls) queue inputs and await their outputs; the scaler and the admin API send
//! commands (add a replica, drain one) and read what the scheduler publishes. Nothing here
//! changes the model's replicas or its queue: the scheduler alone does.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kiln_wire::{ReplicaInfo, ReplicaState};
use tokio::sync::oneshot;

use crate::model::backend::Backend;
use crate::model::batch;
use crate::model::device::Placement;
use crate::model::command::{Command, Pending};
use crate::model::error::InferError;
use crate::model::scheduler::Scheduler;
use crate::model::shared::{LoadTimes, ModelCounters, ModelState, Shared};
use crate::model::signature;
use crate::model::spec::{MAX_PRIORITY, ModelConfig, OutOfRange, Replicas, Tuning, range};
use crate::model::tensor::{HostTensor, TensorError};
use crate::telemetry::EventLog;
use crate::telemetry::access::Record;
use crate::telemetry::spans::{self, SpanContext, Value};
use crate::sync::MutexExt;

/// Per-request scheduling options.
#[derive(Debug, Clone, Copy, Default)]
pub struct InferOptions {
    /// 0 ..= [`MAX_PRIORITY`]; higher runs first.
    pub priority: u8,
    /// Shorter than the model's timeout, or `None` for the model's.
    pub timeout: Option<Duration>,
}

/// Why [`ModelHandle::tune`] refused a change (none of it is applied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TuneError {
    #[error(transparent)]
    OutOfRange(#[from] OutOfRange),
    #[error(
        "instances: model '{0}' was loaded with instances.max = 1, so its one replica runs on its scheduler's \
         thread; load it again with a larger instances.max to scale it"
    )]
    SingleReplica(String),
}

/// Knobs to change with [`ModelHandle::tune`]; `None` leaves one as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct TuningChange {
    pub max_batch_size: Option<u32>,
    pub max_queue_delay: Option<Duration>,
    pub timeout: Option<Duration>,
    pub replicas: Option<Replicas>,
}

/// One replica's histograms, as the metrics export them.
#[derive(Debug, Clone)]
pub struct ReplicaMetrics {
    pub device: String,
    /// Forward passes per [`kiln_wire::BATCH_BOUNDS`] bucket, and rows over all of them.
    pub batch_sizes: Vec<u64>,
    pub rows: u64,
    pub forward: kiln_wire::Histogram,
}

/// What the scaler reads of a model: a snapshot, never a lever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLoad {
    /// Replicas asked for and not drained, loading ones included.
    pub target: u32,
    /// Replicas ready to take batches.
    pub ready: u32,
    /// Requests waiting now.
    pub queued: usize,
    /// One replica's weights as measured at load; 0 until one has loaded.
    pub weights: u64,
}

/// A running guest that may call a model and has not yet: while it is held, the model's
/// scheduler counts one row on its way (see [`crate::model::curve`]). Given up by
/// [`Expectation::arrived`] just before the guest's first request is queued, or when dropped.
pub struct Expectation {
    shared: Arc<Shared>,
    submitter: Arc<Submitter>,
    pending: bool,
}

impl std::fmt::Debug for Expectation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Expectation")
            .field("model", &self.shared.config.name)
            .field("pending", &self.pending)
            .finish()
    }
}

impl Expectation {
    /// The guest is calling `model` now (a no-op for another model, or after the first call).
    pub fn arrived(&mut self, model: &ModelHandle) {
        if self.pending && Arc::ptr_eq(&self.shared, &model.shared) {
            self.pending = false;
            self.shared.expected.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Expectation {
    fn drop(&mut self) {
        // The last guest a held batch waited for is not coming: wake the scheduler so the
        // batch goes now, not when the hold runs out.
        if self.pending
            && self.shared.expected.fetch_sub(1, Ordering::AcqRel) == 1
            && self.shared.holding.load(Ordering::Acquire)
        {
            let _ = self.submitter.commands.send(Command::Wake);
        }
    }
}

/// Sends `Shutdown` when the last handle goes, which stops the scheduler and its replicas.
struct Submitter {
    commands: Sender<Command>,
}

impl Drop for Submitter {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
    }
}

/// A cheap, cloneable reference to one model's scheduler.
#[derive(Clone)]
pub struct ModelHandle {
    shared: Arc<Shared>,
    submitter: Arc<Submitter>,
}

impl std::fmt::Debug for ModelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelHandle")
            .field("name", &self.shared.config.name)
            .finish()
    }
}

/// A handle that does not keep the model alive (the scaler's): the scheduler shuts down when
/// the last [`ModelHandle`] goes, whoever else watches it.
#[derive(Clone)]
pub struct WeakModelHandle {
    shared: std::sync::Weak<Shared>,
    submitter: std::sync::Weak<Submitter>,
}

impl WeakModelHandle {
    pub fn upgrade(&self) -> Option<ModelHandle> {
        Some(ModelHandle { shared: self.shared.upgrade()?, submitter: self.submitter.upgrade()? })
    }

    /// Whether this is a handle to `model` (not to another model of the same name).
    pub fn refers_to(&self, model: &ModelHandle) -> bool {
        std::ptr::eq(self.shared.as_ptr(), Arc::as_ptr(&model.shared))
    }
}

impl ModelHandle {
    /// Whether both are handles to one model (a reloaded model is a new one).
    pub fn same(&self, other: &ModelHandle) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    pub fn downgrade(&self) -> WeakModelHandle {
        WeakModelHandle { shared: Arc::downgrade(&self.shared), submitter: Arc::downgrade(&self.submitter) }
    }

    /// Starts the model's scheduler with one replica per placement (the fleet placed them);
    /// each loads and warms up its own copy of the model on `backend`. Returns at once;
    /// [`ModelHandle::state`] says when the model is ready.
    pub fn spawn<B: Backend>(
        config: ModelConfig,
        placements: Vec<Placement>,
        backend: Arc<B>,
        log: Arc<EventLog>,
    ) -> std::io::Result<ModelHandle> {
        let (commands, inbox) = mpsc::channel();
        let initial = placements.len() as u32;
        let shared = Shared::new(config, initial, log);
        let mut scheduler = Scheduler::new(Arc::clone(&shared), backend, commands.clone(), initial);
        // A model that never has more than one replica runs it on the scheduler's own thread:
        // one thread hand-off fewer per request, which is most of a small model's latency.
        let inline = shared.config.replicas.max == 1;
        let mut placements = placements.into_iter();
        let inline_placement = if inline { placements.next() } else { None };
        for placement in placements {
            scheduler.start_replica(placement)?;
        }
        let name = shared.config.name.clone();
        thread::Builder::new()
            .name(format!("kiln-{name}-sched"))
            .spawn(move || {
                if let Some(placement) = inline_placement {
                    scheduler.load_inline(placement);
                }
                scheduler.run(inbox);
            })?;
        Ok(ModelHandle {
            shared,
            submitter: Arc::new(Submitter { commands }),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.shared.config
    }

    /// Says that a guest that may call this model is running: see [`Expectation`].
    pub fn expect(&self) -> Expectation {
        self.shared.expected.fetch_add(1, Ordering::AcqRel);
        Expectation {
            shared: Arc::clone(&self.shared),
            submitter: Arc::clone(&self.submitter),
            pending: true,
        }
    }

    /// Guests running now that may call this model and have not yet.
    pub fn expected(&self) -> usize {
        self.shared.expected.load(Ordering::Acquire)
    }

    /// The forward time learned so far, by batch rows: `(rows, mean µs, samples)`.
    pub fn forward_curve(&self) -> Vec<(u32, f64, u64)> {
        self.shared.curve().points()
    }

    /// Whether requests of different lengths are padded into one batch (false for a model whose
    /// outputs change with padding; see the scheduler's padding probe).
    pub fn ragged_batching(&self) -> bool {
        self.shared.ragged_batching.load(Ordering::Relaxed)
    }

    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    pub fn state(&self) -> ModelState {
        self.shared
            .state
            .locked()
            .clone()
    }

    pub fn counters(&self) -> &ModelCounters {
        &self.shared.counters
    }

    /// Every replica alive (loading, ready or draining).
    pub fn replicas(&self) -> Vec<ReplicaInfo> {
        self.shared.slots().iter().map(|s| s.info()).collect()
    }

    /// Every replica's batch sizes and forward times, for the metrics.
    pub fn replica_metrics(&self) -> Vec<(String, ReplicaMetrics)> {
        self.shared
            .slots()
            .iter()
            .map(|s| {
                let metrics = ReplicaMetrics {
                    device: s.device.to_string(),
                    batch_sizes: s.batch_sizes.counts(),
                    rows: s.batch_sizes.rows(),
                    forward: s.forward.snapshot(),
                };
                (s.id.to_string(), metrics)
            })
            .collect()
    }

    /// The model's load as the scheduler last published it.
    pub fn load(&self) -> ModelLoad {
        let ready = self.shared.slots().iter().filter(|s| s.state() == ReplicaState::Ready).count();
        ModelLoad {
            target: self.shared.target.load(Ordering::Acquire),
            ready: ready as u32,
            queued: self.shared.counters.queued.load(Ordering::Relaxed),
            weights: self.shared.weights.load(Ordering::Relaxed),
        }
    }

    /// Asks the scheduler to start one more replica where the fleet placed it; the model keeps
    /// serving meanwhile. `false` when the scheduler is gone.
    pub fn add_replica(&self, placement: Placement) -> bool {
        self.submitter.commands.send(Command::AddReplica(placement)).is_ok()
    }

    /// Asks the scheduler to drain one replica (a loading one first, then an idle one, then the
    /// newest): it takes no new batch, finishes the one it runs, and is then removed. Returns
    /// whether one was: the last replica stays. Blocks until the scheduler has decided.
    pub fn remove_replica(&self) -> bool {
        let (reply, decided) = mpsc::sync_channel(1);
        if self.submitter.commands.send(Command::RemoveReplica(reply)).is_err() {
            return false;
        }
        decided.recv().unwrap_or(false)
    }

    /// The knobs as they are now (the config's, unless an operator changed them).
    pub fn tuning(&self) -> Tuning {
        self.shared.tuning()
    }

    /// Changes the knobs while serving; the scheduler uses them from its next batch. Replica
    /// bounds are only recorded here: the fleet starts or drains replicas to fit them. An error
    /// names the knob and its range; nothing changed then.
    pub fn tune(&self, change: TuningChange) -> Result<Tuning, TuneError> {
        let mut tuning = self.shared.tuning.locked();
        let mut next = *tuning;
        if let Some(n) = change.max_batch_size {
            next.max_batch_size = range::max_batch_size(n)?;
        }
        if let Some(delay) = change.max_queue_delay {
            next.max_queue_delay = range::max_queue_delay_us(u64::try_from(delay.as_micros()).unwrap_or(u64::MAX))?;
        }
        if let Some(timeout) = change.timeout {
            next.timeout = range::timeout_ms(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))?;
        }
        if let Some(Replicas { min, max }) = change.replicas {
            let replicas = range::replicas(min, max)?;
            if self.shared.config.replicas.max == 1 && max > 1 {
                return Err(TuneError::SingleReplica(self.name().to_owned()));
            }
            next.replicas = replicas;
        }
        *tuning = next;
        drop(tuning);
        self.shared.curve().grow(next.max_batch_size);
        // The scheduler may be holding a batch under the old limits.
        let _ = self.submitter.commands.send(Command::Wake);
        Ok(next)
    }

    /// Stops running batches: requests queue, up to the queue limit, until [`ModelHandle::resume`].
    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::Release);
    }

    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::Release);
        let _ = self.submitter.commands.send(Command::Wake);
    }

    pub fn paused(&self) -> bool {
        self.shared.paused.load(Ordering::Acquire)
    }

    /// Answers every queued request with [`InferError::Flushed`]; returns how many there were.
    /// Batches already running finish.
    pub fn flush(&self) -> usize {
        let (reply, flushed) = mpsc::sync_channel(1);
        if self.submitter.commands.send(Command::Flush(reply)).is_err() {
            return 0;
        }
        flushed.recv().unwrap_or(0)
    }

    /// Zeroes the model's counters and histograms (its learned forward curve stays: that is
    /// how it batches, not a statistic).
    pub fn reset_stats(&self) {
        self.shared.counters.reset();
        for slot in self.shared.slots().iter() {
            slot.forward.reset();
            slot.batch_sizes.reset();
        }
    }

    /// How long the model's first replica took to load, and to warm up, once it has.
    pub fn load_time(&self) -> Option<LoadTimes> {
        *self.shared.load_time.locked()
    }

    /// What `precision = "auto"` chose so far, one per kind of device searched on.
    pub fn precision_search(&self) -> Vec<kiln_wire::PrecisionChoice> {
        self.shared.precisions.locked().iter().map(|d| d.report.clone()).collect()
    }

    /// The precision it serves in: the config's, or `precision = "auto"`'s choice with its
    /// speed-up (`bf16 2.9×`, `fp32`; both where CPU and GPU chose apart), `auto` until the
    /// search has run.
    pub fn precision(&self) -> String {
        if self.shared.config.auto_precision.is_none() {
            return self.shared.config.form().to_string();
        }
        let decisions = self.shared.precisions.locked();
        let label = |d: &crate::model::precision::Decision| {
            // Where the CPU and GPUs chose apart, each says which it is.
            let kind = if decisions.len() < 2 { "" } else if d.on_gpu() { "gpu " } else { "cpu " };
            if d.report.speedup > 1.0 { format!("{kind}{} {:.1}×", d.form, d.report.speedup) } else { format!("{kind}{}", d.form) }
        };
        let chosen: Vec<String> = decisions.iter().map(label).collect();
        if chosen.is_empty() { "auto".to_owned() } else { chosen.join(", ") }
    }

    /// The module's parameters (elements); 0 until a replica has loaded, and for a frozen module
    /// (its weights are constants, not parameters).
    pub fn parameters(&self) -> u64 {
        self.shared.parameters.load(Ordering::Relaxed)
    }

    /// Checks `named` inputs against the declared inputs (by name, in declaration order) and
    /// returns them as `forward`'s positional arguments ([`signature::arrange_inputs`]).
    pub fn arrange_inputs(&self, named: Vec<(String, HostTensor)>) -> Result<Vec<HostTensor>, TensorError> {
        let config = &self.shared.config;
        signature::arrange_inputs(self.name(), &config.inputs, config.batching.max_rows, named)
    }

    /// Queues inputs from [`ModelHandle::arrange_inputs`] and waits for this caller's outputs.
    ///
    /// Dropping the returned future withdraws the request: the scheduler skips it.
    pub async fn infer(
        &self,
        inputs: Vec<HostTensor>,
        options: InferOptions,
    ) -> Result<Vec<HostTensor>, InferError> {
        let name = || self.name().to_owned();
        // The access line names the model whatever becomes of the call.
        let record = Record::current();
        if let Some(record) = &record {
            record.note_model(self.name());
        }
        match self.state() {
            ModelState::Ready(_) => {}
            ModelState::Loading => {
                return Err(InferError::NotReady {
                    model: name(),
                    reason: "still loading".into(),
                });
            }
            ModelState::Failed(reason) => {
                return Err(InferError::NotReady {
                    model: name(),
                    reason,
                });
            }
        }
        let config = &self.shared.config;
        let counters = &self.shared.counters;
        let most = self.shared.tuning().timeout;
        let timeout = options.timeout.map_or(most, |t| t.min(most));
        let deadline = Instant::now() + timeout;
        let limit = config.batching.max_queue_size as usize;
        if counters.queued.fetch_add(1, Ordering::AcqRel) >= limit {
            counters.queued.fetch_sub(1, Ordering::AcqRel);
            counters.overloaded.fetch_add(1, Ordering::Relaxed);
            return Err(InferError::Overloaded(name()));
        }
        let (reply, answer) = oneshot::channel();
        let ragged_len = batch::ragged_len(&config.inputs, &inputs);
        let mut key = batch::compat_key(&config.inputs, &inputs);
        if let Some(len) = ragged_len.filter(|_| !self.ragged_batching()) {
            // Padding would change this model's answers: only equal lengths share a batch.
            key.push(vec![len]);
        }
        let enqueued = Instant::now();
        // Traced, this call is a span (`compute`) the batch's forward pass is linked to.
        let traced = record.as_ref().and_then(|r| r.span()).map(|own| SpanContext { trace_id: own.trace_id, span_id: spans::new_span_id() });
        let pending = Pending {
            rows: inputs.first().map_or(1, HostTensor::rows),
            ragged_len,
            key,
            inputs,
            priority: options.priority.min(MAX_PRIORITY),
            enqueued,
            reply,
            trace: traced,
        };
        if self.submitter.commands.send(Command::Submit(pending)).is_err() {
            counters.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(InferError::Closed(name()));
        }
        let answered = match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(InferError::Closed(name())),
            Err(_) => {
                counters.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(InferError::Timeout {
                    model: name(),
                    after: timeout,
                })
            }
        };
        if let Some(record) = &record {
            let batch = answered.as_ref().ok().map(|(_, batched)| *batched);
            if let Some(batched) = batch {
                record.note_batch(batched.started.saturating_duration_since(enqueued), batched.requests);
            }
            if let Some(compute) = traced {
                let done = Instant::now();
                let mut what = vec![("kiln.model", Value::Text(self.name().to_owned()))];
                if let Some(batched) = batch {
                    what.push(("kiln.batch.requests", Value::Int(i64::from(batched.requests))));
                    let model = vec![("kiln.model", Value::Text(self.name().to_owned()))];
                    record.child(spans::new_span_id(), "queue wait", Some(compute.span_id), (enqueued, batched.started.max(enqueued)), model, None);
                }
                let error = answered.as_ref().err().map(ToString::to_string);
                record.child(compute.span_id, "compute", record.compute_parent(), (enqueued, done), what, error);
            }
        }
        answered.map(|(outputs, _)| outputs)
    }
}
