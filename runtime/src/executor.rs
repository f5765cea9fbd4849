//! Model executors: per model, one scheduler that owns the queue and merges concurrent requests
//! into batches, and one or more instances that run libtorch, each on its own thread.
//!
//! Callers (guests' `compute`, direct OIP calls) reach a model through a cloneable
//! [`ModelHandle`]. The scheduler is a dedicated thread, not an async task, so its batching
//! window has microsecond precision and libtorch never runs on an async worker.
//!
//! Batching never delays an idle model: a request that arrives while every instance is idle runs
//! at once. Requests accumulate only while a forward pass is running, and the next batch takes
//! them all (up to `max_batch_size`). `max_queue_delay` only holds a partial batch back while
//! another instance is busy.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::backend::{self, OutputMeta, TorchModel};
use crate::batch;
use crate::config::{MAX_PRIORITY, ModelConfig};
use crate::tensor::{HostTensor, TensorError};

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
    /// libtorch refused the inputs or failed while running.
    #[error("model '{model}': {message}")]
    Runtime { model: String, message: String },
    /// The executor is gone (the server is shutting down).
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

/// Per-request scheduling options.
#[derive(Debug, Clone, Copy, Default)]
pub struct InferOptions {
    /// 0 ..= [`MAX_PRIORITY`]; higher runs first.
    pub priority: u8,
    /// Shorter than the model's timeout, or `None` for the model's.
    pub timeout: Option<Duration>,
}

/// Batch sizes are counted in these buckets: 1, 2, 3-4, 5-8, ..., 65-128, more.
pub const BATCH_BUCKETS: [u32; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// Counters an operator (and the batching tests) read.
#[derive(Debug, Default)]
pub struct ModelCounters {
    /// Requests answered by a forward pass, successfully or not.
    pub inferences: AtomicU64,
    /// Forward passes run.
    pub executions: AtomicU64,
    /// Rows run, over all forward passes.
    pub rows: AtomicU64,
    /// Requests whose caller had gone before they ran; skipped, not executed.
    pub dropped: AtomicU64,
    /// Requests refused because the queue was full.
    pub overloaded: AtomicU64,
    /// Requests whose timeout passed.
    pub timeouts: AtomicU64,
    /// Requests waiting in the queue now.
    pub queued: AtomicUsize,
    /// Total microseconds requests spent queued, and in forward passes.
    pub queue_wait_us: AtomicU64,
    pub forward_us: AtomicU64,
    /// Forward passes by batch size bucket, see [`BATCH_BUCKETS`] (the last counts the rest).
    pub batch_sizes: [AtomicU64; BATCH_BUCKETS.len() + 1],
}

impl ModelCounters {
    fn count_batch(&self, requests: usize, rows: u32) {
        self.inferences.fetch_add(requests as u64, Ordering::Relaxed);
        self.executions.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(u64::from(rows), Ordering::Relaxed);
        let bucket = BATCH_BUCKETS
            .iter()
            .position(|&b| rows <= b)
            .unwrap_or(BATCH_BUCKETS.len());
        self.batch_sizes[bucket].fetch_add(1, Ordering::Relaxed);
    }
}

type Reply = oneshot::Sender<Result<Vec<HostTensor>, InferError>>;

/// One caller's work, waiting in the queue.
struct Pending {
    inputs: Vec<HostTensor>,
    rows: u32,
    ragged_len: Option<u32>,
    key: Vec<Vec<u32>>,
    priority: u8,
    enqueued: Instant,
    reply: Reply,
}

enum Event {
    Submit(Pending),
    Loaded {
        instance: usize,
        result: Result<Vec<OutputMeta>, String>,
    },
    Done {
        instance: usize,
    },
    Shutdown,
}

struct Shared {
    config: ModelConfig,
    state: Mutex<ModelState>,
    counters: ModelCounters,
}

/// Sends `Shutdown` when the last handle goes, which stops the scheduler and its instances.
struct Submitter {
    events: Sender<Event>,
}

impl Drop for Submitter {
    fn drop(&mut self) {
        let _ = self.events.send(Event::Shutdown);
    }
}

/// A cheap, cloneable reference to one model's executor.
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

impl ModelHandle {
    /// Starts the model's scheduler and instances; each instance loads and warms up its own
    /// copy of the module. Returns at once; [`ModelHandle::state`] says when the model is ready.
    pub fn spawn(config: ModelConfig) -> std::io::Result<ModelHandle> {
        let (events, inbox) = mpsc::channel();
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(ModelState::Loading),
            counters: ModelCounters::default(),
        });
        let name = &shared.config.name;
        let mut instances = Vec::new();
        // A single instance runs on the scheduler's own thread: one thread hand-off fewer per
        // request, which is most of a small model's latency.
        let threaded = if shared.config.instances > 1 { shared.config.instances } else { 0 };
        for index in 0..threaded as usize {
            let (work, batches) = mpsc::sync_channel(1);
            let owner = Arc::clone(&shared);
            let done = events.clone();
            thread::Builder::new()
                .name(format!("kiln-{name}-{index}"))
                .spawn(move || run_instance(index, owner, batches, done))?;
            instances.push(Instance { work, busy: false });
        }
        let owner = Arc::clone(&shared);
        thread::Builder::new()
            .name(format!("kiln-{name}-sched"))
            .spawn(move || {
                let mut scheduler = Scheduler::new(owner, instances);
                if threaded == 0 {
                    scheduler.load_inline();
                }
                scheduler.run(inbox);
            })?;
        Ok(ModelHandle {
            shared,
            submitter: Arc::new(Submitter { events }),
        })
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

    /// Checks `named` inputs against the declared inputs (by name, in declaration order) and
    /// returns them as `forward`'s positional arguments.
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
        let lens: Vec<(&str, u32)> = specs
            .iter()
            .zip(&ordered)
            .filter_map(|(s, t)| s.ragged.map(|r| (s.name.as_str(), t.shape[r.dim])))
            .collect();
        if let Some((name, len)) = lens.iter().find(|(_, len)| *len != lens[0].1) {
            return Err(TensorError(format!(
                "input '{name}': ragged length {len} differs from input '{}' ({})",
                lens[0].0, lens[0].1
            )));
        }
        Ok(ordered)
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
        let timeout = options
            .timeout
            .map_or(config.timeout, |t| t.min(config.timeout));
        let deadline = Instant::now() + timeout;
        let limit = config.batching.max_queue_size as usize;
        if counters.queued.fetch_add(1, Ordering::AcqRel) >= limit {
            counters.queued.fetch_sub(1, Ordering::AcqRel);
            counters.overloaded.fetch_add(1, Ordering::Relaxed);
            return Err(InferError::Overloaded(name()));
        }
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            rows: inputs.first().map_or(1, HostTensor::rows),
            ragged_len: batch::ragged_len(&config.inputs, &inputs),
            key: batch::compat_key(&config.inputs, &inputs),
            inputs,
            priority: options.priority.min(MAX_PRIORITY),
            enqueued: Instant::now(),
            reply,
        };
        if self.submitter.events.send(Event::Submit(pending)).is_err() {
            counters.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(InferError::Closed(name()));
        }
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(InferError::Closed(name())),
            Err(_) => {
                counters.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(InferError::Timeout {
                    model: name(),
                    after: timeout,
                })
            }
        }
    }
}

struct Instance {
    work: SyncSender<Vec<Pending>>,
    busy: bool,
}

/// The owner of one model's queue.
struct Scheduler {
    shared: Arc<Shared>,
    /// The model, when the scheduler runs the only instance itself.
    inline: Option<TorchModel>,
    instances: Vec<Instance>,
    /// One queue per priority level, oldest first.
    queues: Vec<VecDeque<Pending>>,
    loaded: usize,
}

impl Scheduler {
    fn new(shared: Arc<Shared>, instances: Vec<Instance>) -> Scheduler {
        Scheduler {
            shared,
            inline: None,
            instances,
            queues: (0..=MAX_PRIORITY).map(|_| VecDeque::new()).collect(),
            loaded: 0,
        }
    }

    fn run(mut self, inbox: Receiver<Event>) {
        let mut wake: Option<Instant> = None;
        loop {
            let event = match wake {
                Some(at) => match inbox.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(event) => Some(event),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
                None => match inbox.recv() {
                    Ok(event) => Some(event),
                    Err(_) => return,
                },
            };
            if let Some(event) = event {
                if !self.handle(event) {
                    return;
                }
                // Take everything that has arrived meanwhile before forming a batch.
                while let Ok(event) = inbox.try_recv() {
                    if !self.handle(event) {
                        return;
                    }
                }
            }
            wake = self.dispatch(Instant::now());
        }
    }

    /// Loads the model on this thread, for the single-instance case.
    fn load_inline(&mut self) {
        let config = &self.shared.config;
        match load_instance(0, config) {
            Ok((model, meta)) => {
                self.inline = Some(model);
                self.loaded(0, Ok(meta));
            }
            Err(reason) => self.loaded(0, Err(reason)),
        }
    }

    /// Applies one event; `false` means shut down.
    fn handle(&mut self, event: Event) -> bool {
        match event {
            Event::Submit(pending) => {
                let level = pending.priority as usize;
                self.queues[level].push_back(pending);
            }
            Event::Done { instance } => self.instances[instance].busy = false,
            Event::Loaded { instance, result } => self.loaded(instance, result),
            Event::Shutdown => return false,
        }
        true
    }

    fn loaded(&mut self, instance: usize, result: Result<Vec<OutputMeta>, String>) {
        let mut state = self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match result {
            Err(reason) => {
                *state = ModelState::Failed(format!("instance {instance}: {reason}"));
            }
            Ok(meta) => {
                self.loaded += 1;
                let expected = self.instances.len().max(1);
                if self.loaded == expected && !matches!(*state, ModelState::Failed(_)) {
                    *state = ModelState::Ready(meta.into());
                }
            }
        }
    }

    /// Sends batches to idle instances; returns when to look again if a partial batch is held.
    fn dispatch(&mut self, now: Instant) -> Option<Instant> {
        let counters = &self.shared.counters;
        let policy = &self.shared.config.batching;
        loop {
            let idle = if self.inline.is_some() {
                usize::MAX
            } else {
                self.instances.iter().position(|i| !i.busy)?
            };
            // Callers that gave up are skipped before any work is done for them.
            for queue in &mut self.queues {
                let before = queue.len();
                queue.retain(|p| !p.reply.is_closed());
                let gone = before - queue.len();
                if gone > 0 {
                    counters.dropped.fetch_add(gone as u64, Ordering::Relaxed);
                    counters.queued.fetch_sub(gone, Ordering::AcqRel);
                }
            }
            let plan = self.plan()?;
            let rows: u32 = plan.iter().map(|&(l, i)| self.queues[l][i].rows).sum();
            let (seed_level, seed_index) = plan[0];
            let oldest = self.queues[seed_level][seed_index].enqueued;
            let under_load = self.instances.iter().any(|i| i.busy);
            if under_load
                && rows < policy.max_batch_size
                && now < oldest + policy.max_queue_delay
            {
                return Some(oldest + policy.max_queue_delay);
            }
            let mut batch = Vec::with_capacity(plan.len());
            // Remove from the back so earlier indices stay valid.
            let mut plan = plan;
            plan.sort_unstable_by(|a, b| b.cmp(a));
            for (level, index) in plan {
                if let Some(p) = self.queues[level].remove(index) {
                    batch.push(p);
                }
            }
            batch.sort_by_key(|p| p.enqueued);
            counters.queued.fetch_sub(batch.len(), Ordering::AcqRel);
            let wait: u64 = batch
                .iter()
                .map(|p| now.saturating_duration_since(p.enqueued).as_micros() as u64)
                .sum();
            counters.queue_wait_us.fetch_add(wait, Ordering::Relaxed);
            if let Some(model) = &self.inline {
                let started = Instant::now();
                run_batch(model, &self.shared.config, counters, batch);
                counters
                    .forward_us
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                // Requests that arrived during the forward pass are still in the inbox: take
                // them in before forming the next batch.
                return Some(Instant::now());
            }
            let instance = &mut self.instances[idle];
            instance.busy = true;
            if let Err(mpsc::SendError(batch)) = instance.work.send(batch) {
                // The instance thread is gone (it failed to load): answer instead of hanging.
                for p in batch {
                    let _ = p.reply.send(Err(InferError::Closed(self.shared.config.name.clone())));
                }
            }
        }
    }

    /// Picks the next batch: the oldest request of the highest priority, then every compatible
    /// request by priority and age while the rows fit, trimmed to a preferred size.
    /// Returns `(level, index)` pairs, seed first.
    fn plan(&self) -> Option<Vec<(usize, usize)>> {
        let policy = &self.shared.config.batching;
        let seed_level = (0..self.queues.len()).rev().find(|&l| !self.queues[l].is_empty())?;
        let seed = &self.queues[seed_level][0];
        let mut plan = vec![(seed_level, 0)];
        let mut rows = seed.rows;
        if policy.max_batch_size > 1 {
            'levels: for level in (0..self.queues.len()).rev() {
                for (index, p) in self.queues[level].iter().enumerate() {
                    if (level, index) == (seed_level, 0) || p.key != seed.key {
                        continue;
                    }
                    if rows + p.rows > policy.max_batch_size {
                        if rows == policy.max_batch_size {
                            break 'levels;
                        }
                        continue;
                    }
                    rows += p.rows;
                    plan.push((level, index));
                }
            }
        }
        if let Some(&target) = policy
            .preferred_batch_sizes
            .iter()
            .rev()
            .find(|&&size| size <= rows)
        {
            let mut kept = 0;
            let mut total = 0;
            for &(l, i) in &plan {
                let r = self.queues[l][i].rows;
                if kept > 0 && total + r > target {
                    break;
                }
                total += r;
                kept += 1;
            }
            plan.truncate(kept);
        }
        Some(plan)
    }
}

/// One instance: load and warm up, then run every batch the scheduler sends.
fn run_instance(
    index: usize,
    shared: Arc<Shared>,
    batches: Receiver<Vec<Pending>>,
    events: Sender<Event>,
) {
    let config = &shared.config;
    let model = match load_instance(index, config) {
        Ok((model, meta)) => {
            let _ = events.send(Event::Loaded {
                instance: index,
                result: Ok(meta),
            });
            model
        }
        Err(reason) => {
            let _ = events.send(Event::Loaded {
                instance: index,
                result: Err(reason),
            });
            return;
        }
    };
    let counters = &shared.counters;
    for mut batch in batches {
        // A caller may have gone while the batch waited for this thread.
        let before = batch.len();
        batch.retain(|p| !p.reply.is_closed());
        counters
            .dropped
            .fetch_add((before - batch.len()) as u64, Ordering::Relaxed);
        if !batch.is_empty() {
            let started = Instant::now();
            run_batch(&model, config, counters, batch);
            counters
                .forward_us
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        if events.send(Event::Done { instance: index }).is_err() {
            return;
        }
    }
}

/// Loads and warms up one instance on the calling thread, and logs the outcome.
fn load_instance(index: usize, config: &ModelConfig) -> Result<(TorchModel, Vec<OutputMeta>), String> {
    let started = Instant::now();
    // Applies to this thread's own parallel regions, so instances do not share one pool.
    tch::set_num_threads(config.threads as i32);
    let loaded = load_and_warm_up(config);
    match &loaded {
        Ok(_) => tracing::info!(
            model = %config.name,
            instance = index,
            device = %config.device,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "model ready"
        ),
        Err(reason) => {
            tracing::error!(model = %config.name, instance = index, "model failed to load: {reason}")
        }
    }
    loaded
}

fn run_batch(model: &TorchModel, config: &ModelConfig, counters: &ModelCounters, batch: Vec<Pending>) {
    let rows: Vec<u32> = batch.iter().map(|p| p.rows).collect();
    let lens: Vec<Option<u32>> = batch.iter().map(|p| p.ragged_len).collect();
    counters.count_batch(batch.len(), rows.iter().sum());
    let fail = |message: String| InferError::Runtime {
        model: config.name.clone(),
        message,
    };
    if let [single] = &batch[..] {
        // A lone request needs no merging or splitting.
        let result = forward_guarded(model, &single.inputs).map_err(fail);
        if let Some(p) = batch.into_iter().next() {
            let _ = p.reply.send(result);
        }
        return;
    }
    let parts: Vec<&[HostTensor]> = batch.iter().map(|p| p.inputs.as_slice()).collect();
    let merged = batch::merge(&config.inputs, &parts);
    let outputs = forward_guarded(model, &merged)
        .and_then(|outputs| batch::split(outputs, &config.outputs, &rows, &lens));
    match outputs {
        Ok(per_request) => {
            for (p, outputs) in batch.into_iter().zip(per_request) {
                let _ = p.reply.send(Ok(outputs));
            }
        }
        Err(message) => {
            // Every caller in a failed batch gets the model's message; the next batch runs.
            for p in batch {
                let _ = p.reply.send(Err(fail(message.clone())));
            }
        }
    }
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

/// A panic inside the backend must fail one batch, not kill the instance.
fn forward_guarded(model: &TorchModel, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.forward(inputs)))
        .unwrap_or_else(|_| Err("the backend panicked while running forward".into()))
}

#[cfg(test)]
mod tests {
    //! The scheduler against real TorchScript models (built by `scripts/setup.sh`).

    use super::*;
    use crate::config::{BatchPolicy, Device, InputSpec, OutputSpec, Precision, Ragged};
    use crate::tensor::DType;
    use std::path::PathBuf;

    fn model_path(name: &str) -> PathBuf {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/models").join(name);
        assert!(path.exists(), "{} is missing: run scripts/setup.sh", path.display());
        path
    }

    fn policy(max_batch_size: u32, delay_us: u64) -> BatchPolicy {
        BatchPolicy {
            max_batch_size,
            max_queue_delay: Duration::from_micros(delay_us),
            preferred_batch_sizes: Vec::new(),
            max_queue_size: 100_000,
        }
    }

    fn tokenwise(batching: BatchPolicy, instances: u32) -> ModelConfig {
        let ragged = Some(Ragged { dim: 1, pad: 0.0 });
        ModelConfig {
            name: "tokenwise".into(),
            path: model_path("tokenwise.pt"),
            device: Device::Cpu,
            inputs: vec![
                InputSpec { name: "ids".into(), dtype: DType::I64, shape: vec![None, None], ragged },
                InputSpec { name: "mask".into(), dtype: DType::I64, shape: vec![None, None], ragged },
            ],
            outputs: vec![
                OutputSpec { name: "hidden".into(), ragged_dim: Some(1) },
                OutputSpec { name: "pooled".into(), ragged_dim: None },
            ],
            warmup_runs: 1,
            batching,
            instances,
            threads: 1,
            timeout: Duration::from_secs(60),
            precision: Precision::Fp32,
        }
    }

    fn digits(batching: BatchPolicy) -> ModelConfig {
        ModelConfig {
            name: "digits".into(),
            path: model_path("digits.pt"),
            device: Device::Cpu,
            inputs: vec![InputSpec {
                name: "image".into(),
                dtype: DType::F32,
                shape: vec![None, Some(1), Some(8), Some(8)],
                ragged: None,
            }],
            outputs: vec![OutputSpec { name: "logits".into(), ragged_dim: None }],
            warmup_runs: 1,
            batching,
            instances: 1,
            threads: 1,
            timeout: Duration::from_secs(60),
            precision: Precision::Fp32,
        }
    }

    async fn ready(config: ModelConfig) -> ModelHandle {
        let handle = ModelHandle::spawn(config).expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match handle.state() {
                ModelState::Ready(_) => return handle,
                ModelState::Failed(e) => panic!("model failed to load: {e}"),
                ModelState::Loading => {
                    assert!(Instant::now() < deadline, "model not ready in time");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Starts a request that keeps the single instance busy for well over 100 ms, and returns
    /// once it is running.
    async fn occupy(handle: &ModelHandle, rng: &mut Rng) -> tokio::task::JoinHandle<Result<(), InferError>> {
        let before = handle.counters().executions.load(Ordering::Relaxed);
        let (h, inputs) = (handle.clone(), token_request(rng, 512, 2048));
        let task = tokio::spawn(async move { h.infer(inputs, InferOptions::default()).await.map(|_| ()) });
        while handle.counters().executions.load(Ordering::Relaxed) == before {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        task
    }

    async fn until_queued(handle: &ModelHandle, n: usize) {
        while handle.counters().queued.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
    }

    /// xorshift64*: deterministic, seedable, enough for arrival patterns and data.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn i64_tensor(shape: Vec<u32>, values: &[i64]) -> HostTensor {
        HostTensor { dtype: DType::I64, shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }

    fn f32s(t: &HostTensor) -> Vec<f32> {
        t.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// A random tokenwise request: `rows` sentences of `len` ids, all positions real.
    fn token_request(rng: &mut Rng, rows: u32, len: u32) -> Vec<HostTensor> {
        let n = (rows * len) as usize;
        let ids: Vec<i64> = (0..n).map(|_| rng.below(1000) as i64).collect();
        vec![i64_tensor(vec![rows, len], &ids), i64_tensor(vec![rows, len], &vec![1; n])]
    }

    fn assert_close(got: &[HostTensor], want: &[HostTensor], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: output count");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.shape, w.shape, "{what}: shape");
            for (a, b) in f32s(g).iter().zip(f32s(w)) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{what}: {a} vs {b}");
            }
        }
    }

    /// Plans batches over a queue without any model: rows per request in arrival order.
    fn planned_rows(policy: BatchPolicy, queued: &[(u32, u8, u32)]) -> Vec<u32> {
        let shared = Arc::new(Shared {
            config: tokenwise(policy, 1),
            state: Mutex::new(ModelState::Loading),
            counters: ModelCounters::default(),
        });
        let mut scheduler = Scheduler::new(shared, Vec::new());
        let mut keep = Vec::new();
        for &(rows, priority, width) in queued {
            let (reply, answer) = oneshot::channel();
            keep.push(answer);
            scheduler.queues[priority as usize].push_back(Pending {
                inputs: Vec::new(),
                rows,
                ragged_len: None,
                key: vec![vec![width]],
                priority,
                enqueued: Instant::now(),
                reply,
            });
        }
        let plan = scheduler.plan().expect("a plan");
        plan.iter().map(|&(l, i)| scheduler.queues[l][i].rows).collect()
    }

    #[test]
    fn plans_fill_to_max_trim_to_preferred_sizes_and_keep_shapes_apart() {
        let mut p = policy(8, 0);
        // Greedy fill up to max_batch_size, skipping what does not fit.
        assert_eq!(planned_rows(p.clone(), &[(3, 0, 1), (4, 0, 1), (2, 0, 1), (1, 0, 1)]), vec![3, 4, 1]);
        // Incompatible shapes never share a batch.
        assert_eq!(planned_rows(p.clone(), &[(1, 0, 1), (1, 0, 2), (1, 0, 1)]), vec![1, 1]);
        // The highest priority seeds the batch.
        assert_eq!(planned_rows(p.clone(), &[(1, 0, 1), (2, 5, 2), (1, 0, 2)]), vec![2, 1]);
        // A request larger than max_batch_size runs alone.
        assert_eq!(planned_rows(p.clone(), &[(20, 0, 1), (1, 0, 1)]), vec![20]);
        // Trimmed to the largest preferred size that fits: 7 rows -> 4.
        p.preferred_batch_sizes = vec![2, 4];
        assert_eq!(planned_rows(p.clone(), &[(1, 0, 1), (2, 0, 1), (1, 0, 1), (3, 0, 1)]), vec![1, 2, 1]);
        // Batching off: one request per forward pass.
        assert_eq!(planned_rows(policy(1, 0), &[(1, 0, 1), (1, 0, 1)]), vec![1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batched_results_equal_unbatched_ones_for_random_arrivals() {
        let batched = ready(tokenwise(policy(16, 300), 2)).await;
        let single = ready(tokenwise(policy(1, 0), 1)).await;
        let digits_batched = ready(digits(policy(16, 300))).await;
        let digits_single = ready(digits(policy(1, 0))).await;
        for seed in 1..=4u64 {
            let mut rng = Rng(seed * 0x9E37_79B9_7F4A_7C15);
            let mut tasks = Vec::new();
            for _ in 0..48 {
                let rows = 1 + rng.below(3) as u32;
                let len = 1 + rng.below(12) as u32;
                let delay = Duration::from_micros(rng.below(3000));
                let inputs = token_request(&mut rng, rows, len);
                let pixels: Vec<f32> = (0..rows * 64).map(|_| rng.below(1000) as f32 / 1000.0).collect();
                let image = HostTensor {
                    dtype: DType::F32,
                    shape: vec![rows, 1, 8, 8],
                    data: pixels.iter().flat_map(|v| v.to_le_bytes()).collect(),
                };
                let (b, d) = (batched.clone(), digits_batched.clone());
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let tokens = b.infer(inputs.clone(), InferOptions::default()).await;
                    let digits = d.infer(vec![image.clone()], InferOptions::default()).await;
                    (inputs, tokens, image, digits)
                }));
            }
            for task in tasks {
                let (inputs, tokens, image, digits) = task.await.expect("task");
                let tokens = tokens.expect("batched tokenwise");
                let alone = single.infer(inputs, InferOptions::default()).await.expect("single");
                assert_close(&tokens, &alone, "tokenwise");
                let digits = digits.expect("batched digits");
                let alone = digits_single.infer(vec![image], InferOptions::default()).await.expect("single");
                assert_close(&digits, &alone, "digits");
            }
        }
        let c = batched.counters();
        let (inferences, executions) = (c.inferences.load(Ordering::Relaxed), c.executions.load(Ordering::Relaxed));
        assert_eq!(inferences, 4 * 48);
        assert!(executions < inferences, "no batch formed: {executions} executions for {inferences} requests");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_request_is_lost_or_misdelivered_under_stress_with_cancellations() {
        let batched = ready(tokenwise(policy(32, 200), 2)).await;
        let single = ready(tokenwise(policy(1, 0), 1)).await;
        let mut rng = Rng(42);
        let mut tasks = Vec::new();
        let mut expected = Vec::new();
        for i in 0..1000u32 {
            let len = 1 + rng.below(16) as u32;
            let inputs = token_request(&mut rng, 1, len);
            expected.push(inputs.clone());
            let cancel = (i % 10 == 3).then(|| Duration::from_micros(rng.below(2000)));
            let handle = batched.clone();
            tasks.push(tokio::spawn(async move {
                let call = handle.infer(inputs, InferOptions::default());
                match cancel {
                    Some(after) => tokio::time::timeout(after, call).await.ok(),
                    None => Some(call.await),
                }
            }));
        }
        let mut answered = 0;
        let mut cancelled = 0;
        for (task, inputs) in tasks.into_iter().zip(expected) {
            match task.await.expect("task") {
                Some(result) => {
                    let got = result.expect("inference");
                    let want = single.infer(inputs, InferOptions::default()).await.expect("single");
                    assert_close(&got, &want, "stress");
                    answered += 1;
                }
                None => cancelled += 1,
            }
        }
        assert!(answered >= 900, "every request that was not cancelled is answered: {answered}");
        let c = batched.counters();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let settled = c.inferences.load(Ordering::Relaxed) + c.dropped.load(Ordering::Relaxed);
            if c.queued.load(Ordering::Relaxed) == 0 && settled == 1000 {
                break;
            }
            assert!(Instant::now() < deadline, "queue did not drain: {settled} settled, {} queued", c.queued.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(cancelled > 0 && cancelled <= 100);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_batch_fails_all_its_callers_and_the_next_batch_runs() {
        let config = tokenwise(policy(8, 0), 1);
        let model = TorchModel::load(&config).expect("load");
        let counters = ModelCounters::default();
        let mut rng = Rng(7);
        let mut pending = Vec::new();
        let mut answers = Vec::new();
        for bad in [false, true, false] {
            let mut inputs = token_request(&mut rng, 1, 4);
            if bad {
                inputs[0] = i64_tensor(vec![1, 4], &[1, 2, 5000, 3]);
            }
            let (reply, answer) = oneshot::channel();
            pending.push(Pending {
                rows: 1,
                ragged_len: Some(4),
                key: batch::compat_key(&config.inputs, &inputs),
                inputs,
                priority: 0,
                enqueued: Instant::now(),
                reply,
            });
            answers.push(answer);
        }
        run_batch(&model, &config, &counters, pending);
        for answer in answers {
            match answer.await.expect("answered") {
                Err(InferError::Runtime { message, .. }) => {
                    assert!(message.contains("index out of range"), "{message}");
                }
                other => panic!("expected the model's error, got {other:?}"),
            }
        }
        let handle = ready(config).await;
        let mut rng = Rng(8);
        handle.infer(token_request(&mut rng, 2, 3), InferOptions::default()).await.expect("next batch runs");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn higher_priority_runs_first_and_a_lone_request_never_waits() {
        let mut rng = Rng(9);
        // An idle model answers a lone request without waiting for its 500 ms batching window
        // (the bound is loose because other tests load the same two cores).
        let eager = ready(tokenwise(policy(16, 500_000), 2)).await;
        for _ in 0..3 {
            let started = Instant::now();
            eager.infer(token_request(&mut rng, 1, 4), InferOptions::default()).await.expect("lone");
            assert!(started.elapsed() < Duration::from_millis(250), "lone request waited {:?}", started.elapsed());
        }

        let handle = ready(tokenwise(policy(1, 0), 1)).await;

        let blocker = occupy(&handle, &mut rng).await;
        let mut tasks = Vec::new();
        for (label, priority) in [("low-1", 0), ("low-2", 0), ("low-3", 0), ("high", 9)] {
            // Each runs for about a millisecond, well apart from task wake-up noise.
            let (h, inputs) = (handle.clone(), token_request(&mut rng, 64, 512));
            tasks.push(tokio::spawn(async move {
                h.infer(inputs, InferOptions { priority, timeout: None }).await.expect("infer");
                (Instant::now(), label)
            }));
        }
        until_queued(&handle, 4).await;
        blocker.await.expect("task").expect("blocker");
        let mut order = Vec::new();
        for t in tasks {
            order.push(t.await.expect("task"));
        }
        order.sort();
        let order: Vec<&str> = order.into_iter().map(|(_, label)| label).collect();
        assert_eq!(order[0], "high", "completion order {order:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_quickly_and_a_short_timeout_is_honoured() {
        let mut config = tokenwise(policy(1, 0), 1);
        config.batching.max_queue_size = 2;
        let handle = ready(config).await;
        let mut rng = Rng(10);
        let blocker = occupy(&handle, &mut rng).await;
        let mut waiting = Vec::new();
        for _ in 0..2 {
            let (h, inputs) = (handle.clone(), token_request(&mut rng, 1, 4));
            waiting.push(tokio::spawn(async move { h.infer(inputs, InferOptions::default()).await.map(|_| ()) }));
        }
        until_queued(&handle, 2).await;
        let started = Instant::now();
        let refused = handle.infer(token_request(&mut rng, 1, 4), InferOptions::default()).await;
        assert!(matches!(refused, Err(InferError::Overloaded(_))), "{refused:?}");
        // Refused at once, not after the 170 ms+ forward pass ahead of it.
        assert!(started.elapsed() < Duration::from_millis(100), "{:?}", started.elapsed());
        blocker.await.expect("task").expect("blocker");
        for w in waiting {
            w.await.expect("task").expect("queued requests still run");
        }
        // A request may shorten the model's 60 s timeout.
        let blocker = occupy(&handle, &mut rng).await;
        let short = InferOptions { priority: 0, timeout: Some(Duration::from_millis(1)) };
        let timed_out = handle.infer(token_request(&mut rng, 1, 4), short).await;
        assert!(matches!(timed_out, Err(InferError::Timeout { .. })), "{timed_out:?}");
        blocker.await.expect("task").expect("blocker");
    }

    fn f32_values(t: &HostTensor) -> Vec<f32> {
        assert_eq!(t.dtype, DType::F32, "outputs come back as FP32 at every precision");
        t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    /// Reduced precision on the CPU: the same inputs and output dtypes as FP32, values within the
    /// type's rounding, and the same predicted digit.
    #[test]
    fn reduced_precision_casts_model_and_inputs_and_returns_fp32() {
        let mut rng = Rng(11);
        let images: Vec<f32> = (0..8 * 64).map(|_| (rng.next() % 1000) as f32 / 1000.0).collect();
        let input = HostTensor {
            dtype: DType::F32,
            shape: vec![8, 1, 8, 8],
            data: images.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let full = TorchModel::load(&digits(policy(1, 0))).expect("fp32");
        let reference = f32_values(&full.forward(std::slice::from_ref(&input)).expect("fp32 forward")[0]);
        let argmax = |v: &[f32]| -> Vec<usize> {
            v.chunks(10)
                .map(|row| row.iter().enumerate().fold(0, |best, (i, x)| if *x > row[best] { i } else { best }))
                .collect()
        };
        for (precision, tolerance) in [(Precision::Bf16, 0.25f32), (Precision::Fp16, 0.05)] {
            let mut config = digits(policy(1, 0));
            config.precision = precision;
            let model = TorchModel::load(&config).expect("load");
            match model.forward(std::slice::from_ref(&input)) {
                Ok(outputs) => {
                    let values = f32_values(&outputs[0]);
                    assert_eq!(outputs[0].shape, vec![8, 10], "{precision}");
                    let worst = values.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                    assert!(worst < tolerance, "{precision}: logits differ by up to {worst}");
                    let agree = argmax(&values).iter().zip(argmax(&reference)).filter(|(a, b)| **a == *b).count();
                    assert!(agree >= 7, "{precision}: only {agree} of 8 predictions agree with fp32");
                }
                // FP16 kernels are optional on the CPU; where libtorch lacks one it must say so.
                Err(e) => {
                    assert_eq!(precision, Precision::Fp16, "bf16 must run on the CPU: {e}");
                    assert!(e.contains("Half"), "an unsupported fp16 kernel must be named: {e}");
                }
            }
        }
        // Integer inputs stay integers: the token model runs in bf16 with INT64 ids.
        let mut config = tokenwise(policy(1, 0), 1);
        config.precision = Precision::Bf16;
        let model = TorchModel::load(&config).expect("tokenwise bf16");
        let outputs = model.forward(&token_request(&mut rng, 2, 5)).expect("tokenwise forward");
        assert_eq!(outputs[1].dtype, DType::F32);
        assert_eq!(outputs[1].shape, vec![2, 16]);
    }
}
