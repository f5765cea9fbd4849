//! A model's replicas at work: the replica thread (load, warm up, then run every batch it is
//! handed), the padding probe a load runs, and failure isolation (a merged batch that fails is
//! split until the request at fault is found, so other tenants' requests beside it succeed).

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use kiln_wire::{EventKind, ReplicaState};

use crate::model::backend::{Backend, BackendError, LoadedModel, forward_guarded};
use crate::model::batch;
use crate::model::cores;
use crate::model::command::{Batched, Command, Pending};
use crate::model::device::{Device, Placement};
use crate::model::error::InferError;
use crate::model::shared::{LoadTimes, ModelCounters, ReplicaSlot, Shared};
use crate::model::signature::{OutputMeta, output_meta, warmup_inputs};
use crate::model::spec::{ModelConfig, Precision};
use crate::model::tensor::HostTensor;
use crate::sync::MutexExt;

/// A pass expected to take less than this many microseconds runs on its replica's own threads:
/// more threads' hand-offs would cost more than the work they share (digits' pass takes about
/// 100 µs, MiniLM's 10 ms).
const SPREAD_FROM_US: f64 = 2_000.0;

impl ReplicaSlot {
    /// Runs one batch on `model`, keeping this replica's and the model's counters.
    /// A pass on the CPU holds a core while it runs; with spreading on, one long enough to gain
    /// from more threads, of a model that runs in this process, spreads over the cores nobody
    /// holds.
    pub(super) fn run<M: LoadedModel>(&self, model: &M, shared: &Shared, batch: Vec<Pending>) {
        let rows: u32 = batch.iter().map(|p| p.rows).sum();
        let configured = shared.config.threads;
        let cpu = model.on_cpu();
        let machine = cores::machine();
        let _core = cpu.then(|| machine.take());
        let worth_spreading = cpu
            && machine.spreading()
            && model.sets_threads()
            && shared.curve().estimate_us(rows).is_some_and(|us| us >= SPREAD_FROM_US);
        let threads = if worth_spreading { machine.threads_for_pass(configured) } else { configured };
        model.use_threads(threads);
        let started = Instant::now();
        run_batch(model, &shared.config, &shared.counters, batch);
        let elapsed = started.elapsed();
        shared.counters.forward.record(elapsed);
        // The curve decides whether a fuller batch pays when the cores are busy: a pass that
        // borrowed idle cores would teach it times a loaded server does not see.
        if threads == configured {
            shared.curve().record(rows, elapsed);
        }
        self.forward.record(elapsed);
        self.batch_sizes.record(rows);
    }
}

/// One replica's thread: load and warm up, then run every batch the scheduler sends until the
/// scheduler drops its sender (drained or shut down).
pub(super) fn run_replica<B: Backend>(
    backend: &B,
    slot: Arc<ReplicaSlot>,
    mut placement: Placement,
    shared: Arc<Shared>,
    batches: Receiver<Vec<Pending>>,
    commands: Sender<Command>,
) {
    let model = match load_replica(backend, &slot, &placement, &shared) {
        Ok((model, meta)) => {
            if let Some(reservation) = &mut placement.reservation {
                reservation.loaded();
            }
            if slot.state() == ReplicaState::Loading {
                slot.set_state(ReplicaState::Ready);
            }
            let _ = commands.send(Command::Loaded { replica: slot.id, result: Ok(meta) });
            model
        }
        Err(reason) => {
            let _ = commands.send(Command::Loaded { replica: slot.id, result: Err(reason) });
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
            slot.busy.store(true, Ordering::Relaxed);
            slot.run(&model, &shared, batch);
            slot.busy.store(false, Ordering::Relaxed);
        }
        if commands.send(Command::Done { replica: slot.id }).is_err() {
            return;
        }
    }
    tracing::info!(model = %shared.config.name, replica = slot.id, device = %slot.device, "replica stopped");
    shared.events.emit(EventKind::ModelUnloaded {
        model: shared.config.name.clone(),
        replica: slot.id,
        device: slot.device.to_string(),
    });
    // The model and the reservation go here, freeing the device's memory.
}

/// Loads and warms up one replica on the calling thread, records its weights, and logs the
/// outcome.
pub(super) fn load_replica<B: Backend>(
    backend: &B,
    slot: &ReplicaSlot,
    placement: &Placement,
    shared: &Shared,
) -> Result<(B::Model, Vec<OutputMeta>), BackendError> {
    let config = &shared.config;
    let started = Instant::now();
    // With `precision = "auto"`, the first replica on a kind of device searches first.
    let loaded = shared.form_on(backend, placement.run_on).and_then(|form| {
        let chosen = (form != config.form()).then(|| config.with_form(form));
        let config = chosen.as_ref().unwrap_or(config);
        load_and_warm_up_timed(backend, config, placement.run_on).map(|(model, meta, times)| (model, meta, times, form.precision))
    });
    match &loaded {
        Ok((model, _, times, precision)) => {
            if let Some(difference) = padding_changes_outputs(model, config, *precision) {
                shared.ragged_batching.store(false, Ordering::Relaxed);
                tracing::warn!(
                    model = %config.name,
                    difference,
                    "padding a request to a longer neighbour's length changes its outputs: the model \
                     does not mask padding, so requests of different lengths are never batched together \
                     (declare ragged_dim only for models that mask it)"
                );
            }
            let weights = model.weight_bytes();
            if weights > 0 {
                shared.weights.store(weights, Ordering::Relaxed);
            }
            shared.load_time.locked().get_or_insert(*times);
            shared.parameters.store(model.parameters(), Ordering::Relaxed);
            tracing::info!(
                model = %config.name,
                replica = slot.id,
                device = %placement.device,
                simulated = placement.run_on != placement.device,
                weights_mib = weights >> 20,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "model ready"
            );
            shared.events.emit(EventKind::ModelLoaded {
                model: config.name.clone(),
                replica: slot.id,
                device: placement.device.to_string(),
                elapsed_ms: started.elapsed().as_millis() as u64,
            });
        }
        Err(reason) => {
            tracing::error!(model = %config.name, replica = slot.id, device = %placement.device, "model failed to load: {reason}");
            shared.events.emit(EventKind::ModelFailed {
                model: config.name.clone(),
                replica: slot.id,
                device: placement.device.to_string(),
                reason: reason.to_string(),
            });
        }
    }
    loaded.map(|(model, meta, _, _)| (model, meta))
}

pub(super) fn run_batch<M: LoadedModel>(model: &M, config: &ModelConfig, counters: &ModelCounters, batch: Vec<Pending>) {
    counters.count_batch(batch.len(), batch.iter().map(|p| p.rows).sum());
    run_isolating(model, config, counters, batch);
}

/// Runs `batch` as one forward pass and answers every caller. Requests from different tenants
/// share a batch, so one caller's input that makes the model fail must not fail the others:
/// a failed merged pass is split in halves and each half run again, down to single requests.
/// The caller at fault gets the model's error and everyone else their own result, for
/// O(bad × log n) extra passes instead of n.
pub(super) fn run_isolating<M: LoadedModel>(model: &M, config: &ModelConfig, counters: &ModelCounters, mut batch: Vec<Pending>) {
    let batched = Batched { requests: u32::try_from(batch.len()).unwrap_or(u32::MAX), started: std::time::Instant::now() };
    let forward = forward_batch(model, config, &batch);
    trace_forward(config, &batch, batched.started, forward.as_ref().err());
    match forward {
        Ok(per_request) => {
            for (p, outputs) in batch.into_iter().zip(per_request) {
                let _ = p.reply.send(Ok((outputs, batched)));
            }
        }
        // No caller's fault, so no caller to find: every one gets it.
        Err(BackendError::Unavailable(message)) => {
            for p in batch {
                let _ = p.reply.send(Err(InferError::Unavailable { model: config.name.clone(), message: message.clone() }));
            }
        }
        Err(message) if batch.len() == 1 => {
            let error = InferError::Runtime { model: config.name.clone(), message: message.to_string() };
            if let Some(p) = batch.pop() {
                let _ = p.reply.send(Err(error));
            }
        }
        Err(message) => {
            counters.isolated.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                model = %config.name,
                requests = batch.len(),
                "a batch failed; running its halves apart so each caller gets its own result: {message}"
            );
            let mut second = batch.split_off(batch.len() / 2);
            // A caller that gave up meanwhile needs no second pass.
            batch.retain(|p| !p.reply.is_closed());
            second.retain(|p| !p.reply.is_closed());
            for half in [batch, second] {
                if !half.is_empty() {
                    run_isolating(model, config, counters, half);
                }
            }
        }
    }
}

/// The forward pass as one span, when any caller in `batch` is traced: a child of the first
/// traced caller's `compute` span, linked to every traced caller's.
fn trace_forward(config: &ModelConfig, batch: &[Pending], started: Instant, error: Option<&BackendError>) {
    use crate::telemetry::spans::{self, Finished, SpanContext, Value};
    let links: Vec<SpanContext> = batch.iter().filter_map(|p| p.trace).collect();
    let Some(first) = links.first().copied() else { return };
    let rows: u32 = batch.iter().map(|p| p.rows).sum();
    spans::record(Finished {
        context: SpanContext { trace_id: first.trace_id, span_id: spans::new_span_id() },
        parent: Some(first.span_id),
        name: "forward".to_owned(),
        server: false,
        start: started,
        end: Instant::now(),
        attributes: vec![
            ("kiln.model", Value::Text(config.name.clone())),
            ("kiln.batch.requests", Value::Int(batch.len() as i64)),
            ("kiln.batch.rows", Value::Int(i64::from(rows))),
        ],
        links,
        error: error.map(ToString::to_string),
    });
}

/// One forward pass over `batch` merged, split back per request.
pub(super) fn forward_batch<M: LoadedModel>(model: &M, config: &ModelConfig, batch: &[Pending]) -> Result<Vec<Vec<HostTensor>>, BackendError> {
    if let [single] = batch {
        // A lone request needs no merging or splitting.
        return forward_guarded(model, &single.inputs).map(|outputs| vec![outputs]);
    }
    let rows: Vec<u32> = batch.iter().map(|p| p.rows).collect();
    let lens: Vec<Option<u32>> = batch.iter().map(|p| p.ragged_len).collect();
    let parts: Vec<&[HostTensor]> = batch.iter().map(|p| p.inputs.as_slice()).collect();
    let merged = batch::merge(&config.inputs, &parts);
    forward_guarded(model, &merged)
        .and_then(|outputs| batch::split(outputs, &config.outputs, &rows, &lens).map_err(BackendError::Output))
}

/// Loads `config`'s model on `device` with `backend` and runs its warm-up passes; returns the
/// outputs' types.
pub fn load_and_warm_up<B: Backend>(
    backend: &B,
    config: &ModelConfig,
    device: Device,
) -> Result<(B::Model, Vec<OutputMeta>), BackendError> {
    load_and_warm_up_timed(backend, config, device).map(|(model, meta, _)| (model, meta))
}

/// [`load_and_warm_up`], with how long the load and the warm-up each took.
pub(super) fn load_and_warm_up_timed<B: Backend>(
    backend: &B,
    config: &ModelConfig,
    device: Device,
) -> Result<(B::Model, Vec<OutputMeta>, LoadTimes), BackendError> {
    let started = Instant::now();
    let model = backend.load(config, device)?;
    let load = started.elapsed();
    let inputs = warmup_inputs(&config.inputs);
    let mut meta = Vec::new();
    for _ in 0..config.warmup_runs.max(1) {
        let outputs = forward_guarded(&model, &inputs).map_err(|e| match e {
            BackendError::Forward(message) => BackendError::Forward(format!("warm-up forward pass failed: {message}")),
            other => other,
        })?;
        meta = output_meta(&config.outputs, &outputs);
    }
    Ok((model, meta, LoadTimes { load, warmup: started.elapsed().saturating_sub(load) }))
}

/// Length of the probe row [`padding_changes_outputs`] pads, and of its longer neighbour.
const PROBE_LEN: u32 = 3;
const PROBE_NEIGHBOUR_LEN: u32 = 7;

/// Relative difference below which a padded row's outputs count as its own: float noise from
/// other matrix shapes is around 1e-6 in FP32, and up to ~1e-2 in FP16/BF16; a model that does
/// not mask padding is off by far more (tenths).
pub(super) fn padding_tolerance(precision: Precision) -> f64 {
    match precision {
        Precision::Fp32 => 1e-4,
        Precision::Fp16 | Precision::Bf16 | Precision::Bf16Autocast => 5e-2,
    }
}

/// For a model with ragged inputs: runs a probe row alone and then padded beside a longer
/// neighbour, and returns the largest relative difference between the two answers when it is
/// over [`padding_tolerance`] (the model does not mask padding), or `None` when padding leaves
/// the row's outputs alone. Probe values are 1 (or the nearest the declared range allows), so a
/// mask input marks every probe position as real.
pub(super) fn padding_changes_outputs<M: LoadedModel>(model: &M, config: &ModelConfig, precision: Precision) -> Option<f64> {
    if !config.inputs.iter().any(|s| s.ragged.is_some()) {
        return None;
    }
    let row = |len: u32| -> Vec<HostTensor> {
        config
            .inputs
            .iter()
            .map(|spec| {
                let shape: Vec<u32> = spec
                    .shape
                    .iter()
                    .enumerate()
                    .map(|(axis, d)| match d {
                        Some(d) => *d,
                        None if spec.ragged.is_some_and(|r| r.dim == axis) => len,
                        None => 1,
                    })
                    .collect();
                let value = spec.range.map_or(1.0, |r| {
                    let v = r.min.map_or(1.0, |lo| lo.max(1.0));
                    r.max.map_or(v, |hi| v.min(hi))
                });
                let count = crate::model::tensor::element_count(&shape).unwrap_or(0);
                let data = batch::scalar_bytes(spec.dtype, value).repeat(count);
                HostTensor { dtype: spec.dtype, shape, data }
            })
            .collect()
    };
    let probe = row(PROBE_LEN);
    let neighbour = row(PROBE_NEIGHBOUR_LEN);
    let alone = forward_guarded(model, &probe).ok()?;
    let merged = batch::merge(&config.inputs, &[&probe, &neighbour]);
    let lens = [batch::ragged_len(&config.inputs, &probe), batch::ragged_len(&config.inputs, &neighbour)];
    let padded = forward_guarded(model, &merged)
        .and_then(|outputs| batch::split(outputs, &config.outputs, &[1, 1], &lens).map_err(BackendError::Output))
        .ok()?
        .into_iter()
        .next()?;
    let mut worst = 0.0f64;
    for (a, b) in alone.iter().zip(&padded) {
        if a.shape != b.shape {
            return Some(f64::INFINITY);
        }
        let scale = a.values().fold(1.0f64, |m, v| m.max(v.abs()));
        for (x, y) in a.values().zip(b.values()) {
            let d = (x - y).abs() / scale;
            if d.is_nan() || d > worst {
                worst = if d.is_nan() { f64::INFINITY } else { d };
            }
        }
    }
    (worst > padding_tolerance(precision)).then_some(worst)
}

