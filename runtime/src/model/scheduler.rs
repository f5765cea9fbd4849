//! The per-model scheduler: one thread that alone owns the model's queue, its replicas and
//! its replica target, and merges concurrent requests into batches; and the replicas, each on
//! its own thread and device, running forward passes on a [`Backend`].
//!
//! Callers reach it through a [`ModelHandle`](crate::model::handle::ModelHandle), which sends
//! [`Command`]s. The scheduler is a dedicated thread, not an async task, so its batching window
//! has microsecond precision and the backend never runs on an async worker.
//!
//! Batching never delays a lone request: one that arrives at an idle replica with nothing on its
//! way runs at once. Requests accumulate while forward passes run, and the next batch takes them
//! all (up to `max_batch_size`). A partial batch is held back only while guests that may call
//! the model are still running and the learned forward curve says a fuller batch pays (see
//! [`crate::model::curve`]), or, with `max_queue_delay` set, while another replica is busy.
//!
//! Replicas come and go while requests flow (the scaler sends [`Command::AddReplica`] and
//! [`Command::RemoveReplica`]). The queue is the model's, not a replica's: a replica that is
//! removed first finishes the batch it runs, and nothing queued is lost.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use kiln_wire::{EventKind, ReplicaState};
use tokio::sync::oneshot;

use crate::model::backend::{Backend, BackendError, LoadedModel};
use crate::model::batch;
use crate::model::device::{Device, Placement, Reservation};
use crate::model::handle::{InferError, ModelCounters, ModelState, ReplicaSlot, Shared};
use crate::model::signature::{OutputMeta, output_meta, warmup_inputs};
use crate::model::spec::{MAX_PRIORITY, ModelConfig, Precision, Tuning};
use crate::model::tensor::HostTensor;

pub(super) type Reply = oneshot::Sender<Result<Vec<HostTensor>, InferError>>;

/// One caller's work, waiting in the queue.
pub(super) struct Pending {
    pub(super) inputs: Vec<HostTensor>,
    pub(super) rows: u32,
    pub(super) ragged_len: Option<u32>,
    pub(super) key: Vec<Vec<u32>>,
    pub(super) priority: u8,
    pub(super) enqueued: Instant,
    pub(super) reply: Reply,
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

impl ReplicaSlot {
    /// Runs one batch on `model`, keeping this replica's and the model's counters.
    fn run<M: LoadedModel>(&self, model: &M, shared: &Shared, batch: Vec<Pending>) {
        let started = Instant::now();
        let rows: u32 = batch.iter().map(|p| p.rows).sum();
        run_batch(model, &shared.config, &shared.counters, batch);
        let elapsed = started.elapsed();
        shared.counters.forward.record(elapsed);
        shared.curve().record(rows, elapsed);
        self.forward.record(elapsed);
        self.batch_sizes.record(rows);
    }
}

/// A replica as the scheduler sees it.
struct Replica {
    slot: Arc<ReplicaSlot>,
    /// Batches to the replica's thread; `None` for the inline replica and once draining.
    work: Option<SyncSender<Vec<Pending>>>,
    ready: bool,
    busy: bool,
    draining: bool,
}

/// The only replica, run on the scheduler's own thread: the model, its slot, and what the fleet
/// reserved for it.
type InlineReplica<M> = (M, Arc<ReplicaSlot>, Option<Box<dyn Reservation>>);

/// The owner of one model's queue, replica set and replica target.
pub(super) struct Scheduler<B: Backend> {
    shared: Arc<Shared>,
    backend: Arc<B>,
    /// For new replicas' threads to report to.
    commands: Sender<Command>,
    /// The model, when the scheduler runs the only replica itself.
    inline: Option<InlineReplica<B::Model>>,
    replicas: Vec<Replica>,
    /// Replicas asked for and not drained, published in `shared.target`.
    target: u32,
    next_id: u32,
    /// Replicas started with the model: it is ready when they have all loaded.
    initial: u32,
    loaded: u32,
    /// One queue per priority level, oldest first.
    queues: Vec<VecDeque<Pending>>,
}

impl<B: Backend> Scheduler<B> {
    pub(super) fn new(shared: Arc<Shared>, backend: Arc<B>, commands: Sender<Command>, initial: u32) -> Scheduler<B> {
        Scheduler {
            shared,
            backend,
            commands,
            inline: None,
            replicas: Vec::new(),
            target: initial,
            next_id: 0,
            initial,
            loaded: 0,
            queues: (0..=MAX_PRIORITY).map(|_| VecDeque::new()).collect(),
        }
    }

    fn set_target(&mut self, target: u32) {
        self.target = target;
        self.shared.target.store(target, Ordering::Release);
    }

    fn new_slot(&mut self, device: Device) -> Arc<ReplicaSlot> {
        let slot = ReplicaSlot::new(self.next_id, device);
        self.next_id += 1;
        self.shared.slots().push(Arc::clone(&slot));
        slot
    }

    /// Starts a replica's thread, which loads the model and then runs batches.
    pub(super) fn start_replica(&mut self, placement: Placement) -> std::io::Result<()> {
        let slot = self.new_slot(placement.device);
        let (work, batches) = mpsc::sync_channel(1);
        let (owner, done, thread_slot) = (Arc::clone(&self.shared), self.commands.clone(), Arc::clone(&slot));
        let backend = Arc::clone(&self.backend);
        let name = format!("kiln-{}-{}", self.shared.config.name, slot.id);
        let spawned = thread::Builder::new()
            .name(name)
            .spawn(move || run_replica(&*backend, thread_slot, placement, owner, batches, done));
        if let Err(e) = spawned {
            self.forget(slot.id);
            return Err(e);
        }
        self.replicas.push(Replica { slot, work: Some(work), ready: false, busy: false, draining: false });
        Ok(())
    }

    fn forget(&mut self, id: u32) {
        self.replicas.retain(|r| r.slot.id != id);
        self.shared.slots().retain(|s| s.id != id);
    }

    pub(super) fn run(mut self, inbox: Receiver<Command>) {
        let mut wake: Option<Instant> = None;
        loop {
            let command = match wake {
                Some(at) => match inbox.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(command) => Some(command),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
                None => match inbox.recv() {
                    Ok(command) => Some(command),
                    Err(_) => return,
                },
            };
            if let Some(command) = command {
                if !self.handle(command) {
                    return;
                }
                // Take everything that has arrived meanwhile before forming a batch.
                while let Ok(command) = inbox.try_recv() {
                    if !self.handle(command) {
                        return;
                    }
                }
            }
            wake = self.dispatch(Instant::now());
        }
    }

    /// Loads the model on this thread, for the single-replica case.
    pub(super) fn load_inline(&mut self, mut placement: Placement) {
        let slot = self.new_slot(placement.device);
        match load_replica(&*self.backend, &slot, &placement, &self.shared) {
            Ok((model, meta)) => {
                if let Some(reservation) = &mut placement.reservation {
                    reservation.loaded();
                }
                slot.set_state(ReplicaState::Ready);
                self.inline = Some((model, slot, placement.reservation));
                self.loaded(0, Ok(meta));
            }
            Err(reason) => self.loaded(0, Err(reason)),
        }
    }

    /// Applies one command; `false` means shut down.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Submit(pending) => {
                let level = pending.priority as usize;
                self.queues[level].push_back(pending);
            }
            Command::Done { replica } => {
                if let Some(r) = self.replicas.iter_mut().find(|r| r.slot.id == replica) {
                    r.busy = false;
                    if r.draining {
                        self.forget(replica);
                    }
                }
            }
            Command::Loaded { replica, result } => self.loaded(replica, result),
            Command::AddReplica(placement) => match self.start_replica(placement) {
                Ok(()) => self.set_target(self.target + 1),
                Err(e) => tracing::error!(model = %self.shared.config.name, "cannot start a replica: {e}"),
            },
            Command::RemoveReplica(reply) => {
                let removed = self.drain_one();
                let _ = reply.send(removed);
            }
            Command::Wake => {}
            Command::Flush(reply) => {
                let flushed = self.flush();
                let _ = reply.send(flushed);
            }
            Command::Shutdown => return false,
        }
        true
    }

    /// Drops the queued requests whose callers have gone.
    fn skip_withdrawn(&mut self) {
        let counters = &self.shared.counters;
        for queue in &mut self.queues {
            let before = queue.len();
            queue.retain(|p| !p.reply.is_closed());
            let gone = before - queue.len();
            if gone > 0 {
                counters.dropped.fetch_add(gone as u64, Ordering::Relaxed);
                counters.queued.fetch_sub(gone, Ordering::AcqRel);
            }
        }
    }

    /// Answers every queued request with `Flushed`.
    fn flush(&mut self) -> usize {
        let mut flushed = 0;
        for queue in &mut self.queues {
            for p in queue.drain(..) {
                let _ = p.reply.send(Err(InferError::Flushed(self.shared.config.name.clone())));
                flushed += 1;
            }
        }
        self.shared.counters.queued.fetch_sub(flushed, Ordering::AcqRel);
        self.shared.holding.store(false, Ordering::Release);
        if flushed > 0 {
            tracing::info!(model = %self.shared.config.name, flushed, "queue flushed by an operator");
        }
        flushed
    }

    /// Stops one replica from taking work: a loading one first, then an idle one, then the
    /// newest. One that runs a batch is removed when it is done. The last one stays.
    fn drain_one(&mut self) -> bool {
        let live_count = self.replicas.iter().filter(|r| !r.draining).count();
        if live_count <= 1 {
            // A scale-up that failed to load was already taken off the target; the model keeps
            // its last replica, and the target says so.
            self.set_target(live_count.max(1) as u32);
            return false;
        }
        let live = |r: &&mut Replica| !r.draining;
        let pick = self
            .replicas
            .iter_mut()
            .filter(live)
            .rev()
            .min_by_key(|r| match (r.ready, r.busy) {
                (false, _) => 0,
                (true, false) => 1,
                (true, true) => 2,
            });
        let Some(replica) = pick else {
            return false;
        };
        replica.draining = true;
        // Closing the channel ends the thread after its current batch (or its load).
        replica.work = None;
        replica.slot.set_state(ReplicaState::Draining);
        tracing::info!(model = %self.shared.config.name, replica = replica.slot.id, device = %replica.slot.device, busy = replica.busy, "replica draining");
        if !replica.busy {
            let id = replica.slot.id;
            self.forget(id);
        }
        self.set_target(self.target.saturating_sub(1).max(1));
        true
    }

    fn loaded(&mut self, replica: u32, result: Result<Vec<OutputMeta>, BackendError>) {
        let mut state = self
            .shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let initial = replica < self.initial;
        match result {
            Err(reason) => {
                if initial {
                    *state = ModelState::Failed(format!("replica {replica}: {reason}"));
                    drop(state);
                    // The model's state says why; no replica stays listed as loading.
                    self.forget(replica);
                } else {
                    // A scale-up that failed: the model keeps serving on the replicas it has.
                    drop(state);
                    if self.replicas.iter().any(|r| r.slot.id == replica && !r.draining) {
                        self.set_target(self.target.saturating_sub(1).max(1));
                    }
                    self.forget(replica);
                }
            }
            Ok(meta) => {
                if let Some(r) = self.replicas.iter_mut().find(|r| r.slot.id == replica) {
                    r.ready = !r.draining;
                }
                if initial {
                    self.loaded += 1;
                    if self.loaded == self.initial && !matches!(*state, ModelState::Failed(_)) {
                        *state = ModelState::Ready(meta.into());
                    }
                }
            }
        }
    }

    /// The idle replica to run the next batch: on the device with the least outstanding work of
    /// this model, then the oldest replica.
    fn idle_replica(&self) -> Option<usize> {
        let busy_on = |device: Device| self.replicas.iter().filter(|r| r.busy && r.slot.device == device).count();
        self.replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| r.ready && !r.busy && !r.draining)
            .min_by_key(|(i, r)| (busy_on(r.slot.device), *i))
            .map(|(i, _)| i)
    }

    /// Sends batches to idle replicas; returns when to look again if a partial batch is held.
    fn dispatch(&mut self, now: Instant) -> Option<Instant> {
        let shared = Arc::clone(&self.shared);
        let counters = &shared.counters;
        if self.shared.paused.load(Ordering::Acquire) {
            // Callers that give up while paused leave the queue (looked for now and then);
            // resuming wakes the scheduler.
            self.skip_withdrawn();
            return Some(now + PAUSED_POLL);
        }
        let tuning = self.shared.tuning();
        loop {
            let idle = if self.inline.is_some() {
                usize::MAX
            } else {
                self.idle_replica()?
            };
            // Callers that gave up are skipped before any work is done for them.
            self.skip_withdrawn();
            let plan = self.plan(tuning.max_batch_size)?;
            let rows: u32 = plan.iter().map(|&(l, i)| self.queues[l][i].rows).sum();
            let (seed_level, seed_index) = plan[0];
            let oldest = self.queues[seed_level][seed_index].enqueued;
            let under_load = self.replicas.iter().any(|r| r.busy);
            if under_load
                && rows < tuning.max_batch_size
                && now < oldest + tuning.max_queue_delay
            {
                return Some(oldest + tuning.max_queue_delay);
            }
            if let Some(until) = self.hold_until(rows, oldest, &tuning)
                && now < until
            {
                self.shared.holding.store(true, Ordering::Release);
                return Some(until);
            }
            self.shared.holding.store(false, Ordering::Release);
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
            for p in &batch {
                counters.queue_wait.record(now.saturating_duration_since(p.enqueued));
            }
            if let Some((model, slot, _)) = &self.inline {
                slot.busy.store(true, Ordering::Relaxed);
                slot.run(model, &self.shared, batch);
                slot.busy.store(false, Ordering::Relaxed);
                // Requests that arrived during the forward pass are still in the inbox: take
                // them in before forming the next batch.
                return Some(Instant::now());
            }
            let replica = &mut self.replicas[idle];
            let Some(work) = &replica.work else {
                continue;
            };
            replica.busy = true;
            if let Err(mpsc::SendError(batch)) = work.send(batch) {
                // The replica's thread is gone: answer instead of hanging.
                replica.busy = false;
                replica.ready = false;
                for p in batch {
                    let _ = p.reply.send(Err(InferError::Closed(self.shared.config.name.clone())));
                }
            }
        }
    }

    /// Until when a partial batch of `rows` (its oldest request queued at `oldest`) waits for the
    /// rows on their way, if the learned curve says a fuller batch pays (see
    /// [`crate::model::curve`]). Capped by `max_queue_delay` when one is set, and by half the
    /// latency objective. `None` when nothing is on its way: a lone request never waits.
    fn hold_until(&self, rows: u32, oldest: Instant, tuning: &Tuning) -> Option<Instant> {
        let coming = self.shared.expected.load(Ordering::Acquire);
        if coming == 0 || rows >= tuning.max_batch_size {
            return None;
        }
        let coming = u32::try_from(coming).unwrap_or(u32::MAX);
        let mut hold = self.shared.curve().hold(rows, coming, tuning.max_batch_size)?;
        if !tuning.max_queue_delay.is_zero() {
            hold = hold.min(tuning.max_queue_delay);
        }
        Some(oldest + hold.min(self.shared.config.latency_objective / 2))
    }

    /// Picks the next batch: the oldest request of the highest priority, then every compatible
    /// request by priority and age while the rows fit, trimmed to a preferred size.
    /// Returns `(level, index)` pairs, seed first.
    fn plan(&self, max_batch_size: u32) -> Option<Vec<(usize, usize)>> {
        let policy = &self.shared.config.batching;
        let seed_level = (0..self.queues.len()).rev().find(|&l| !self.queues[l].is_empty())?;
        let seed = &self.queues[seed_level][0];
        let mut plan = vec![(seed_level, 0)];
        let mut rows = seed.rows;
        if max_batch_size > 1 {
            'levels: for level in (0..self.queues.len()).rev() {
                for (index, p) in self.queues[level].iter().enumerate() {
                    if (level, index) == (seed_level, 0) || p.key != seed.key {
                        continue;
                    }
                    if rows + p.rows > max_batch_size {
                        if rows == max_batch_size {
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

/// How often a paused model's queue is cleared of callers that gave up.
const PAUSED_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// One replica's thread: load and warm up, then run every batch the scheduler sends until the
/// scheduler drops its sender (drained or shut down).
fn run_replica<B: Backend>(
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
fn load_replica<B: Backend>(
    backend: &B,
    slot: &ReplicaSlot,
    placement: &Placement,
    shared: &Shared,
) -> Result<(B::Model, Vec<OutputMeta>), BackendError> {
    let config = &shared.config;
    let started = Instant::now();
    let loaded = load_and_warm_up_timed(backend, config, placement.run_on);
    match &loaded {
        Ok((model, _, times)) => {
            if let Some(difference) = padding_changes_outputs(model, config) {
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
            shared.load_time.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(*times);
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
    loaded.map(|(model, meta, _)| (model, meta))
}

fn run_batch<M: LoadedModel>(model: &M, config: &ModelConfig, counters: &ModelCounters, batch: Vec<Pending>) {
    counters.count_batch(batch.len(), batch.iter().map(|p| p.rows).sum());
    run_isolating(model, config, counters, batch);
}

/// Runs `batch` as one forward pass and answers every caller. Requests from different tenants
/// share a batch, so one caller's input that makes the model fail must not fail the others:
/// a failed merged pass is split in halves and each half run again, down to single requests.
/// The caller at fault gets the model's error and everyone else their own result, for
/// O(bad × log n) extra passes instead of n.
fn run_isolating<M: LoadedModel>(model: &M, config: &ModelConfig, counters: &ModelCounters, mut batch: Vec<Pending>) {
    match forward_batch(model, config, &batch) {
        Ok(per_request) => {
            for (p, outputs) in batch.into_iter().zip(per_request) {
                let _ = p.reply.send(Ok(outputs));
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

/// One forward pass over `batch` merged, split back per request.
fn forward_batch<M: LoadedModel>(model: &M, config: &ModelConfig, batch: &[Pending]) -> Result<Vec<Vec<HostTensor>>, BackendError> {
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
fn load_and_warm_up_timed<B: Backend>(
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

/// How long a replica took to load its model, and then to run its warm-up passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadTimes {
    pub load: std::time::Duration,
    pub warmup: std::time::Duration,
}

/// Length of the probe row [`padding_changes_outputs`] pads, and of its longer neighbour.
const PROBE_LEN: u32 = 3;
const PROBE_NEIGHBOUR_LEN: u32 = 7;

/// Relative difference below which a padded row's outputs count as its own: float noise from
/// other matrix shapes is around 1e-6 in FP32, and up to ~1e-2 in FP16/BF16; a model that does
/// not mask padding is off by far more (tenths).
fn padding_tolerance(precision: Precision) -> f64 {
    match precision {
        Precision::Fp32 => 1e-4,
        Precision::Fp16 | Precision::Bf16 => 5e-2,
    }
}

/// For a model with ragged inputs: runs a probe row alone and then padded beside a longer
/// neighbour, and returns the largest relative difference between the two answers when it is
/// over [`padding_tolerance`] (the model does not mask padding), or `None` when padding leaves
/// the row's outputs alone. Probe values are 1 (or the nearest the declared range allows), so a
/// mask input marks every probe position as real.
fn padding_changes_outputs<M: LoadedModel>(model: &M, config: &ModelConfig) -> Option<f64> {
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
    (worst > padding_tolerance(config.precision)).then_some(worst)
}

/// A panic inside the backend must fail one batch, not kill the instance.
fn forward_guarded<M: LoadedModel>(model: &M, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, BackendError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.forward(inputs)))
        .unwrap_or(Err(BackendError::Panicked))
}

#[cfg(test)]
mod tests {
    //! The scheduler against real TorchScript models (built by `scripts/setup.sh`).

    use super::*;
    use crate::fleet::placement::{Placer, Purpose};
    use crate::model::backend::torch::{Cast, Torch, TorchModel};
    use crate::model::handle::{InferOptions, ModelHandle};
    use crate::model::signature::{InputSpec, OutputSpec, Ragged};
    use crate::model::spec::{BatchPolicy, DeviceChoice, Replicas};
    use crate::model::tensor::DType;
    use crate::telemetry::EventLog;
    use std::path::PathBuf;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

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
            max_rows: 4096,
        }
    }

    fn tokenwise(batching: BatchPolicy, instances: u32) -> ModelConfig {
        let ragged = Some(Ragged { dim: 1, pad: 0.0 });
        ModelConfig {
            worker: false,
            name: "tokenwise".into(),
            path: model_path("tokenwise.pt"),
            source: None,
            sha256: None,
            version: 1,
            device: DeviceChoice::Cpu,
            inputs: vec![
                InputSpec::new("ids", DType::I64, vec![None, None], ragged),
                InputSpec::new("mask", DType::I64, vec![None, None], ragged),
            ],
            outputs: vec![
                OutputSpec { name: "hidden".into(), ragged_dim: Some(1) },
                OutputSpec { name: "pooled".into(), ragged_dim: None },
            ],
            warmup_runs: 1,
            batching,
            replicas: Replicas::fixed(instances),
            threads: 1,
            timeout: Duration::from_secs(60),
            precision: Precision::Fp32,
            latency_objective: Duration::from_millis(50),
            memory_headroom_bytes: 0,
        }
    }

    fn digits(batching: BatchPolicy) -> ModelConfig {
        ModelConfig {
            worker: false,
            name: "digits".into(),
            path: model_path("digits.pt"),
            source: None,
            sha256: None,
            version: 1,
            device: DeviceChoice::Cpu,
            inputs: vec![InputSpec::new("image", DType::F32, vec![None, Some(1), Some(8), Some(8)], None)],
            outputs: vec![OutputSpec { name: "logits".into(), ragged_dim: None }],
            warmup_runs: 1,
            batching,
            replicas: Replicas::fixed(1),
            threads: 1,
            timeout: Duration::from_secs(60),
            precision: Precision::Fp32,
            latency_objective: Duration::from_millis(50),
            memory_headroom_bytes: 0,
        }
    }

    async fn ready(config: ModelConfig) -> ModelHandle {
        let placements = (0..config.replicas.min).map(|_| Placement::cpu()).collect();
        let handle = ModelHandle::spawn(config, placements, Arc::new(Torch::default()), Arc::new(EventLog::new(16))).expect("spawn");
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
        let mut scheduler = Scheduler::new(test_shared(tokenwise(policy, 1)), Arc::new(Torch::default()), mpsc::channel().0, 1);
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
        let plan = scheduler.plan(scheduler.shared.tuning().max_batch_size).expect("a plan");
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
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
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

    fn queued(config: &ModelConfig, inputs: Vec<HostTensor>) -> (Pending, oneshot::Receiver<Result<Vec<HostTensor>, InferError>>) {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            rows: inputs[0].rows(),
            ragged_len: batch::ragged_len(&config.inputs, &inputs),
            key: batch::compat_key(&config.inputs, &inputs),
            inputs,
            priority: 0,
            enqueued: Instant::now(),
            reply,
        };
        (pending, answer)
    }

    fn minilm() -> ModelConfig {
        let ragged = Some(Ragged { dim: 1, pad: 0.0 });
        let mut config = tokenwise(policy(16, 0), 1);
        config.name = "minilm".into();
        config.path = model_path("minilm.pt");
        config.inputs = vec![
            InputSpec::new("input_ids", DType::I64, vec![None, None], ragged),
            InputSpec::new("attention_mask", DType::I64, vec![None, None], ragged),
        ];
        config.outputs = vec![OutputSpec { name: "last_hidden_state".into(), ragged_dim: Some(1) }];
        config
    }

    /// MiniLM masks padding: a sentence padded to a longer neighbour's length, beside a shorter
    /// one, gets the hidden states it gets alone.
    #[test]
    fn a_minilm_row_padded_beside_longer_and_shorter_neighbours_matches_it_alone() {
        let config = minilm();
        let model = TorchModel::load(&config, Device::Cpu, Cast::Parameters).expect("load");
        let reference = model_path("../reference/embeddings.json");
        let reference: serde_json::Value =
            serde_json::from_slice(&std::fs::read(reference).expect("reference")).expect("json");
        let mut sentences: Vec<Vec<i64>> = reference["input_ids"]
            .as_array()
            .expect("input_ids")
            .iter()
            .map(|ids| ids.as_array().expect("ids").iter().map(|v| v.as_i64().expect("id")).collect())
            .collect();
        sentences.sort_by_key(Vec::len);
        let (short, long) = (sentences[0].clone(), sentences[sentences.len() - 1].clone());
        let middle = sentences[sentences.len() / 2].clone();
        assert!(short.len() < middle.len() && middle.len() < long.len(), "three lengths");
        let request = |ids: &[i64]| {
            let shape = vec![1, ids.len() as u32];
            vec![i64_tensor(shape.clone(), ids), i64_tensor(shape, &vec![1; ids.len()])]
        };
        let alone = model.forward(&request(&middle)).expect("alone");
        assert!(padding_changes_outputs(&model, &config).is_none(), "the load-time probe agrees");
        let batch = [request(&short), request(&middle), request(&long)];
        let parts: Vec<&[HostTensor]> = batch.iter().map(Vec::as_slice).collect();
        let merged = batch::merge(&config.inputs, &parts);
        let lens: Vec<Option<u32>> = batch.iter().map(|r| batch::ragged_len(&config.inputs, r)).collect();
        let outputs = model.forward(&merged).expect("batched");
        let split = batch::split(outputs, &config.outputs, &[1, 1, 1], &lens).expect("split");
        assert_eq!(split[1][0].shape, alone[0].shape);
        let worst = f32s(&split[1][0])
            .iter()
            .zip(f32s(&alone[0]))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-5, "padded row differs from the row alone by {worst}");
        // The sentence embedding (mean over positions, L2-normalised, as the guest computes it).
        let embed = |hidden: &HostTensor| -> Vec<f32> {
            let values = f32s(hidden);
            let dim = hidden.shape[2] as usize;
            let positions = values.len() / dim;
            let mut mean: Vec<f32> = (0..dim).map(|d| (0..positions).map(|p| values[p * dim + d]).sum::<f32>() / positions as f32).collect();
            let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt();
            mean.iter_mut().for_each(|v| *v /= norm);
            mean
        };
        let embedding_difference = embed(&split[1][0])
            .iter()
            .zip(embed(&alone[0]))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(embedding_difference <= 1e-6, "embeddings differ by {embedding_difference}");

        eprintln!("MiniLM padded vs alone: hidden states within {worst:e}, embedding within {embedding_difference:e}");
    }

    /// A model that averages over padding is found out at load, and then never gets requests
    /// of different lengths in one batch: every answer equals the request's answer alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_that_does_not_mask_padding_never_batches_different_lengths() {
        let masked = ready(tokenwise(policy(8, 0), 1)).await;
        assert!(masked.ragged_batching(), "tokenwise masks padding");
        let mut config = tokenwise(policy(32, 2_000), 1);
        config.name = "unmasked".into();
        config.path = model_path("unmasked.pt");
        config.inputs = vec![InputSpec::new("ids", DType::I64, vec![None, None], Some(Ragged { dim: 1, pad: 0.0 }))];
        config.outputs = vec![OutputSpec { name: "pooled".into(), ragged_dim: None }];
        let model = TorchModel::load(&config, Device::Cpu, Cast::Parameters).expect("load");
        let difference = padding_changes_outputs(&model, &config).expect("padding changes its outputs");
        assert!(difference > 1e-3, "{difference}");
        // In reduced precision the noise is larger; the probe still tells the two apart.
        for (mut reduced, masks) in [(tokenwise(policy(8, 0), 1), true), (config.clone(), false)] {
            reduced.precision = Precision::Bf16;
            let (model, _) = load_and_warm_up(&Torch::default(), &reduced, Device::Cpu).expect("bf16 load");
            assert_eq!(padding_changes_outputs(&model, &reduced).is_none(), masks, "{} in bf16", reduced.name);
        }
        let handle = ready(config).await;
        assert!(!handle.ragged_batching());
        let mut rng = Rng(21);
        let requests: Vec<Vec<HostTensor>> = (0..24)
            .map(|i| {
                let len = 2 + (i % 5);
                let ids: Vec<i64> = (0..len).map(|_| 1 + rng.below(999) as i64).collect();
                vec![i64_tensor(vec![1, len], &ids)]
            })
            .collect();
        let alone: Vec<Vec<HostTensor>> = requests.iter().map(|r| model.forward(r).expect("alone")).collect();
        // Everything queues behind one long pass, so the scheduler has all 24 to batch at once.
        let (h, big) = (handle.clone(), vec![i64_tensor(vec![512, 4096], &vec![1; 512 * 4096])]);
        let busy = tokio::spawn(async move { h.infer(big, InferOptions::default()).await });
        while handle.counters().executions.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        let calls: Vec<_> = requests
            .into_iter()
            .map(|r| {
                let handle = handle.clone();
                tokio::spawn(async move { handle.infer(r, InferOptions::default()).await })
            })
            .collect();
        until_queued(&handle, 24).await;
        busy.await.expect("task").expect("long pass");
        for (i, (answer, want)) in futures::future::join_all(calls).await.into_iter().zip(alone).enumerate() {
            let got = answer.expect("task").expect("answer");
            assert_close(&got, &want, &format!("request {i}"));
        }
        let passes = handle.counters().executions.load(Ordering::Relaxed) - 1;
        assert!(passes <= 10, "equal lengths were still batched together ({passes} passes for 24 requests)");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_that_fails_the_model_fails_alone_and_its_neighbours_get_their_own_results() {
        let config = tokenwise(policy(8, 0), 1);
        let model = TorchModel::load(&config, Device::Cpu, Cast::Parameters).expect("load");
        let counters = ModelCounters::default();
        let mut rng = Rng(7);
        let mut pending = Vec::new();
        let mut answers = Vec::new();
        // Two bad requests among six, one of them also the longest (every neighbour padded to it).
        for (i, bad) in [false, true, false, false, true, false].into_iter().enumerate() {
            let mut inputs = token_request(&mut rng, 1 + (i as u32 % 2), 3 + i as u32);
            if bad {
                let len = inputs[0].shape[1] as usize;
                let mut ids = vec![1i64; inputs[0].rows() as usize * len];
                ids[len - 1] = 5000;
                inputs[0] = i64_tensor(inputs[0].shape.clone(), &ids);
            }
            let alone = (!bad).then(|| model.forward(&inputs).expect("alone"));
            let (p, answer) = queued(&config, inputs);
            pending.push(p);
            answers.push((answer, alone));
        }
        run_batch(&model, &config, &counters, pending);
        for (i, (answer, alone)) in answers.into_iter().enumerate() {
            match (answer.await.expect("answered"), alone) {
                (Ok(got), Some(want)) => assert_close(&got, &want, &format!("request {i}")),
                (Err(InferError::Runtime { message, .. }), None) => {
                    assert!(message.contains("index out of range"), "{message}");
                }
                (other, alone) => panic!("request {i} (bad: {}): unexpected {other:?}", alone.is_none()),
            }
        }
        assert!(counters.isolated.load(Ordering::Relaxed) >= 2, "the failed batch was split");
        assert_eq!(counters.executions.load(Ordering::Relaxed), 1, "one batch, counted once");
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

    pub(crate) fn test_shared(config: ModelConfig) -> Arc<Shared> {
        Shared::for_tests(config)
    }

    #[test]
    fn the_next_batch_goes_to_the_device_with_the_least_outstanding_work() {
        let mut scheduler = Scheduler::new(test_shared(tokenwise(policy(8, 0), 3)), Arc::new(Torch::default()), mpsc::channel().0, 3);
        for (id, device, busy) in [(0, Device::Cuda(0), true), (1, Device::Cuda(0), false), (2, Device::Cuda(1), false)] {
            scheduler.replicas.push(Replica { slot: ReplicaSlot::new(id, device), work: None, ready: true, busy, draining: false });
        }
        // cuda:0 already runs a batch, cuda:1 nothing: replica 2.
        assert_eq!(scheduler.idle_replica(), Some(2));
        scheduler.replicas[2].busy = true;
        assert_eq!(scheduler.idle_replica(), Some(1));
        // Loading and draining replicas take no work.
        scheduler.replicas[1].ready = false;
        assert_eq!(scheduler.idle_replica(), None);
        scheduler.replicas[1].ready = true;
        scheduler.replicas[1].draining = true;
        assert_eq!(scheduler.idle_replica(), None);
    }

    /// A scale-up that fails to load while the scaler removes a replica: both lower the target,
    /// but the last replica stays and the target says one.
    #[test]
    fn a_failed_scale_up_racing_a_removal_never_drains_the_last_replica() {
        let shared = test_shared(tokenwise(policy(8, 0), 1));
        let mut scheduler = Scheduler::new(Arc::clone(&shared), Arc::new(Torch::default()), mpsc::channel().0, 1);
        for (id, ready) in [(0, true), (1, false)] {
            let slot = ReplicaSlot::new(id, Device::Cpu);
            shared.slots().push(Arc::clone(&slot));
            scheduler.replicas.push(Replica { slot, work: None, ready, busy: false, draining: false });
        }
        scheduler.set_target(2);
        // The scale-up fails to load just before the scaler's removal arrives.
        scheduler.loaded(1, Err(BackendError::Load("out of memory".into())));
        let (reply, removed) = mpsc::sync_channel(1);
        scheduler.handle(Command::RemoveReplica(reply));
        assert!(!removed.recv().expect("an answer"), "the last replica was reported drained");
        assert_eq!(scheduler.replicas.len(), 1);
        assert!(!scheduler.replicas[0].draining, "the last replica was drained");
        assert_eq!(shared.target.load(Ordering::Acquire), 1);
        assert_eq!(shared.slots().len(), 1);
    }

    /// Replicas placed on simulated GPUs, added and drained while four clients keep sending:
    /// every request is answered correctly, the work spreads over the replicas, and removed
    /// replicas give their GPU memory back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_added_and_drained_under_load_lose_nothing() {
        let gpus = crate::fleet::placement::tests::simulated(&[(4096, 0, 0), (4096, 0, 0)]);
        let mut config = tokenwise(policy(4, 0), 1);
        config.replicas = Replicas { min: 1, max: 3 };
        config.device = DeviceChoice::Auto;
        config.memory_headroom_bytes = 256 << 20;
        let placer = Placer::new(Arc::clone(&gpus), 95);
        let handle = crate::fleet::start_model(&config, &placer, Arc::new(EventLog::new(16)), std::time::Duration::from_secs(60)).expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !matches!(handle.state(), ModelState::Ready(_)) {
            assert!(Instant::now() < deadline, "not ready: {:?}", handle.state());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(handle.replicas()[0].device, "cuda:0");
        // cuda:1 has more free memory now that cuda:0 holds a replica.
        let weights = handle.load().weights;
        let second = placer.place(handle.config(), weights, Purpose::ScaleUp).expect("second");
        assert_eq!(second.device, Device::Cuda(1));
        assert!(handle.add_replica(second));
        assert!(handle.add_replica(placer.place(handle.config(), weights, Purpose::ScaleUp).expect("third")));
        while handle.load().target < 3 {
            assert!(Instant::now() < deadline, "target stays at {}", handle.load().target);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        while handle.replicas().iter().filter(|r| r.state == ReplicaState::Ready).count() < 3 {
            assert!(Instant::now() < deadline, "replicas not ready: {:?}", handle.replicas());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let booked = gpus.ledger.loaded(0) + gpus.ledger.loaded(1);
        assert!(booked >= 3 * (256 << 20), "{booked}");

        let single = ready(tokenwise(policy(1, 0), 1)).await;
        let sent = Arc::new(AtomicU64::new(0));
        let mut clients = Vec::new();
        for client in 0..4u64 {
            let (h, single, sent) = (handle.clone(), single.clone(), Arc::clone(&sent));
            clients.push(tokio::spawn(async move {
                let mut rng = Rng(client + 100);
                for _ in 0..150 {
                    let len = 1 + rng.below(24) as u32;
                    let rows = 1 + rng.below(2) as u32;
                    let inputs = token_request(&mut rng, rows, len);
                    sent.fetch_add(1, Ordering::Relaxed);
                    let got = h.infer(inputs.clone(), InferOptions::default()).await.expect("no request fails");
                    let want = single.infer(inputs, InferOptions::default()).await.expect("reference");
                    assert_close(&got, &want, "scaled");
                }
            }));
        }
        while sent.load(Ordering::Relaxed) < 200 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let worked = handle.replicas().iter().filter(|r| r.batches > 0).count();
        assert!(worked >= 2, "work did not spread: {:?}", handle.replicas());
        assert!(handle.remove_replica());
        assert!(handle.remove_replica());
        // The last replica always stays.
        assert!(!handle.remove_replica());
        for c in clients {
            c.await.expect("client");
        }
        assert_eq!(handle.counters().inferences.load(Ordering::Relaxed), 600);
        while handle.replicas().len() > 1 {
            assert!(Instant::now() < deadline, "drained replicas linger: {:?}", handle.replicas());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Give the stopped threads a moment to drop their bookings.
        let mut left = u64::MAX;
        while Instant::now() < deadline {
            left = gpus.ledger.loaded(0) + gpus.ledger.loaded(1);
            if left < 2 * (256 << 20) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!((256 << 20..2 * (256 << 20)).contains(&left), "one replica's memory stays booked: {left}");
    }

    fn one_input_model(file: &str, input: InputSpec, output: &str, precision: Precision) -> ModelConfig {
        let mut config = digits(policy(1, 0));
        config.name = file.trim_end_matches(".pt").into();
        config.path = model_path(file);
        config.inputs = vec![input];
        config.outputs = vec![OutputSpec { name: output.into(), ragged_dim: None }];
        config.precision = precision;
        config
    }

    /// What libtorch's whole-module cast gets wrong, and what no cast can do.
    #[test]
    fn cpu_replicas_share_one_copy_of_the_weights_and_run_it_from_two_threads_at_once() {
        let torch = Torch::default();
        let config = tokenwise(policy(8, 0), 2);
        let first = torch.load(&config, Device::Cpu).expect("first replica");
        let second = torch.load(&config, Device::Cpu).expect("second replica");
        assert!(first.shares_weights_with(&second), "a second CPU replica loaded the weights again");
        let mut rng = Rng(7);
        let requests: Vec<Vec<HostTensor>> = (0..8u32).map(|i| token_request(&mut rng, 1 + i % 3, 4 + i % 9)).collect();
        let alone: Vec<Vec<HostTensor>> = requests.iter().map(|r| first.forward(r).expect("forward")).collect();
        std::thread::scope(|scope| {
            for model in [&first, &second] {
                let (requests, alone) = (&requests, &alone);
                scope.spawn(move || {
                    for _ in 0..2 {
                        for (request, want) in requests.iter().zip(alone) {
                            assert_close(&model.forward(request).expect("concurrent forward"), want, "shared module");
                        }
                    }
                });
            }
        });
        // Another model file, or the last replica gone: loaded afresh.
        drop((first, second));
        let again = torch.load(&config, Device::Cpu).expect("reload");
        let other = torch.load(&one_input_model("normed.pt", InputSpec::new("x", DType::F32, vec![None, Some(4)], None), "y", Precision::Fp32), Device::Cpu).expect("other");
        assert!(!again.shares_weights_with(&other));
    }

    /// Replicas start loading at the same moment: the second waits for the first one's module.
    #[test]
    fn cpu_replicas_that_load_at_once_still_share_one_copy_of_the_weights() {
        let torch = Torch::default();
        let config = tokenwise(policy(8, 0), 4);
        let start = std::sync::Barrier::new(4);
        let models: Vec<TorchModel> = std::thread::scope(|scope| {
            let loads: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        torch.load(&config, Device::Cpu).expect("replica")
                    })
                })
                .collect();
            loads.into_iter().map(|l| l.join().expect("load thread")).collect()
        });
        for model in &models[1..] {
            assert!(models[0].shares_weights_with(model), "replicas that loaded together loaded the weights twice");
        }
    }

    /// libtorch sizes a thread's pool at its first parallel region from the count any thread set
    /// last: another model's replica setting its `threads` between this replica's load and its
    /// first forward pass must not decide this replica's.
    #[test]
    fn a_replica_keeps_its_own_thread_count_when_another_model_sets_another_one() {
        let (loaded, load_done) = std::sync::mpsc::channel();
        let (go, may_run) = std::sync::mpsc::channel::<()>();
        let replica = std::thread::spawn(move || {
            let model = Torch::default().load(&digits(policy(1, 0)), Device::Cpu).expect("load");
            loaded.send(()).expect("main thread");
            may_run.recv().expect("main thread");
            let image = HostTensor { dtype: DType::F32, shape: vec![1, 1, 8, 8], data: vec![0; 256] };
            model.forward(&[image]).expect("forward");
            tch::get_num_threads()
        });
        load_done.recv().expect("replica thread");
        // Another model, configured with three threads, loading on its own thread.
        std::thread::spawn(|| tch::set_num_threads(3)).join().expect("other model's thread");
        go.send(()).expect("replica thread");
        assert_eq!(replica.join().expect("replica thread"), 1, "the replica's pool was resized by another model");
    }

    #[test]
    fn reduced_precision_keeps_integer_buffers_casts_batch_norm_and_refuses_frozen_modules() {
        let ids = InputSpec::new("ids", DType::I64, vec![None, None], None);
        // Position ids in an integer buffer stay integers: the lookup works and positions past
        // 256 (not representable in bf16) still get their own embedding.
        let config = one_input_model("positions.pt", ids.clone(), "hidden", Precision::Bf16);
        let (model, meta) = load_and_warm_up(&Torch::default(), &config, Device::Cpu).expect("positions in bf16");
        assert_eq!(meta[0].dtype, DType::F32);
        let long = i64_tensor(vec![1, 300], &[5; 300]);
        let out = f32_values(&model.forward(std::slice::from_ref(&long)).expect("300 positions")[0]);
        let row = |i: usize| &out[i * 16..(i + 1) * 16];
        assert_ne!(row(297), row(298), "positions 297 and 298 collapsed: the buffer was cast");
        let full = one_input_model("positions.pt", ids.clone(), "hidden", Precision::Fp32);
        let (reference, _) = load_and_warm_up(&Torch::default(), &full, Device::Cpu).expect("fp32");
        let want = f32_values(&reference.forward(std::slice::from_ref(&long)).expect("fp32 forward")[0]);
        let worst = out.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst > 0.0 && worst < 0.1, "bf16 differs from fp32 by {worst}");

        // Batch norm's running statistics are cast with the parameters.
        let x = InputSpec::new("x", DType::F32, vec![None, Some(4)], None);
        let config = one_input_model("normed.pt", x, "y", Precision::Bf16);
        let (model, _) = load_and_warm_up(&Torch::default(), &config, Device::Cpu).expect("batch norm in bf16");
        let input = HostTensor { dtype: DType::F32, shape: vec![2, 4], data: [0.5f32; 8].iter().flat_map(|v| v.to_le_bytes()).collect() };
        assert_eq!(model.forward(&[input]).expect("forward")[0].dtype, DType::F32);

        // A frozen module has nothing to cast: refused, not silently served in FP32.
        let config = one_input_model("positions-frozen.pt", ids, "hidden", Precision::Bf16);
        let error = load_and_warm_up(&Torch::default(), &config, Device::Cpu).err().expect("frozen in bf16").to_string();
        assert!(error.contains("frozen") && error.contains("precision bf16"), "{error}");
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
        let full = TorchModel::load(&digits(policy(1, 0)), Device::Cpu, Cast::Parameters).expect("fp32");
        let reference = f32_values(&full.forward(std::slice::from_ref(&input)).expect("fp32 forward")[0]);
        let argmax = |v: &[f32]| -> Vec<usize> {
            v.chunks(10)
                .map(|row| row.iter().enumerate().fold(0, |best, (i, x)| if *x > row[best] { i } else { best }))
                .collect()
        };
        for (precision, tolerance) in [(Precision::Bf16, 0.25f32), (Precision::Fp16, 0.05)] {
            let mut config = digits(policy(1, 0));
            config.precision = precision;
            let loaded = load_and_warm_up(&Torch::default(), &config, Device::Cpu);
            match loaded.and_then(|(model, _)| model.forward(std::slice::from_ref(&input))) {
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
                    let e = e.to_string();
                    assert_eq!(precision, Precision::Fp16, "bf16 must run on the CPU: {e}");
                    assert!(e.contains("Half"), "an unsupported fp16 kernel must be named: {e}");
                }
            }
        }
        // Integer inputs stay integers: the token model runs in bf16 with INT64 ids.
        let mut config = tokenwise(policy(1, 0), 1);
        config.precision = Precision::Bf16;
        let model = TorchModel::load(&config, Device::Cpu, Cast::Parameters).expect("tokenwise bf16");
        let outputs = model.forward(&token_request(&mut rng, 2, 5)).expect("tokenwise forward");
        assert_eq!(outputs[1].dtype, DType::F32);
        assert_eq!(outputs[1].shape, vec![2, 16]);
    }
}

#[cfg(test)]
mod on_a_fake_backend {
    //! The scheduler alone, on a scripted backend: batching, isolation, cancellation and the
    //! replica set, in milliseconds and without a model file.

    use std::path::PathBuf;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::*;
    use crate::model::backend::fake::{Fake, Script, f32_tensor, f32_values};
    use crate::model::handle::{InferOptions, ModelHandle};
    use crate::model::signature::{InputSpec, OutputSpec};
    use crate::model::spec::{BatchPolicy, DeviceChoice, Replicas};
    use crate::model::tensor::DType;
    use crate::telemetry::EventLog;

    fn config(max_batch_size: u32, replicas: Replicas) -> ModelConfig {
        ModelConfig {
            worker: false,
            name: "fake".into(),
            path: PathBuf::from("fake.pt"),
            source: None,
            sha256: None,
            version: 1,
            device: DeviceChoice::Cpu,
            inputs: vec![InputSpec::new("x", DType::F32, vec![None, Some(1)], None)],
            outputs: vec![OutputSpec { name: "y".into(), ragged_dim: None }],
            warmup_runs: 1,
            batching: BatchPolicy {
                max_batch_size,
                max_queue_delay: Duration::ZERO,
                preferred_batch_sizes: Vec::new(),
                max_queue_size: 1000,
                max_rows: max_batch_size,
            },
            replicas,
            latency_objective: Duration::from_millis(50),
            memory_headroom_bytes: 0,
            threads: 1,
            timeout: Duration::from_secs(10),
            precision: Precision::Fp32,
        }
    }

    fn script(forward_ms: u64) -> Fake {
        Fake(Arc::new(Script { forward_delay: Duration::from_millis(forward_ms), ..Script::default() }))
    }

    fn spawn(config: ModelConfig, fake: &Fake) -> ModelHandle {
        let placements = (0..config.replicas.min).map(|_| Placement::cpu()).collect();
        ModelHandle::spawn(config, placements, Arc::new(fake.clone()), Arc::new(EventLog::new(16))).expect("spawn")
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn ready(handle: &ModelHandle) {
        until("the model is ready", || matches!(handle.state(), ModelState::Ready(_))).await;
    }

    fn rows(values: &[f32]) -> HostTensor {
        f32_tensor(vec![values.len() as u32, 1], values)
    }

    fn ask(handle: &ModelHandle, values: &[f32]) -> tokio::task::JoinHandle<Result<Vec<f32>, InferError>> {
        let (handle, input) = (handle.clone(), rows(values));
        tokio::spawn(async move {
            let outputs = handle.infer(vec![input], InferOptions::default()).await?;
            Ok(f32_values(&outputs[0]))
        })
    }

    /// Starts a request that holds the only replica for the script's forward delay and returns
    /// once its pass runs, so what is sent next queues.
    async fn occupy(handle: &ModelHandle) -> tokio::task::JoinHandle<Result<Vec<f32>, InferError>> {
        let before = handle.counters().executions.load(Ordering::Relaxed);
        let blocker = ask(handle, &[1000.0]);
        until("the blocker runs", || handle.counters().executions.load(Ordering::Relaxed) > before).await;
        blocker
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn merged_batches_answer_each_caller_exactly_its_own_rows() {
        let fake = script(20);
        let handle = spawn(config(8, Replicas::fixed(1)), &fake);
        ready(&handle).await;
        let blocker = occupy(&handle).await;
        let mut callers = Vec::new();
        for i in 0..30u16 {
            let values: Vec<f32> = (0..1 + i % 3).map(|r| f32::from(i * 10 + r)).collect();
            callers.push((values.clone(), ask(&handle, &values)));
        }
        until("all 30 wait", || handle.counters().queued.load(Ordering::Relaxed) == 30).await;
        for (values, caller) in callers {
            let want: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
            assert_eq!(caller.await.expect("task").expect("answer"), want);
        }
        blocker.await.expect("task").expect("blocker");
        let passes = fake.0.passes();
        // One warm-up, the blocker, then the 30 queued requests in merged passes of <= 8 rows.
        assert!(passes.len() < 2 + 30, "nothing was batched: {} passes", passes.len());
        assert!(passes.iter().all(|p| p.len() <= 8), "a pass over max_batch_size: {passes:?}");
        assert_eq!(handle.counters().inferences.load(Ordering::Relaxed), 31);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partial_batch_waits_for_guests_on_their_way_and_a_lone_request_never_waits() {
        // Every pass costs the same whatever its rows, so fuller batches pay.
        let fake = script(100);
        let mut config = config(8, Replicas::fixed(1));
        config.latency_objective = Duration::from_secs(1);
        let handle = spawn(config, &fake);
        ready(&handle).await;
        // A lone request: nothing on its way, so it runs at once (a hold would add 100 ms).
        let started = Instant::now();
        assert_eq!(ask(&handle, &[1.0]).await.expect("task").expect("answer"), vec![2.0]);
        assert!(started.elapsed() < Duration::from_millis(195), "a lone request waited: {:?}", started.elapsed());
        // The pass is timed after its callers are answered.
        until("the pass is on the curve", || !handle.forward_curve().is_empty()).await;
        assert_eq!(handle.forward_curve().first().map(|p| p.0), Some(1));

        // Three guests are running that may call the model; two do, one ends without calling.
        let mut guests: Vec<_> = (0..3).map(|_| handle.expect()).collect();
        assert_eq!(handle.expected(), 3);
        let first = ask(&handle, &[2.0]);
        until("the first waits", || handle.counters().queued.load(Ordering::Relaxed) == 1).await;
        let counters = handle.counters();
        let queued = |n: usize| move || counters.queued.load(Ordering::Relaxed) == n;
        guests[0].arrived(&handle);
        let second = ask(&handle, &[3.0]);
        until("the second waits too", queued(2)).await;
        guests[1].arrived(&handle);
        let third = ask(&handle, &[4.0]);
        until("the third waits too", queued(3)).await;
        // The last guest ends without calling: the held batch goes now.
        drop(guests);
        assert_eq!(handle.expected(), 0);
        for (caller, want) in [(first, 4.0), (second, 6.0), (third, 8.0)] {
            assert_eq!(caller.await.expect("task").expect("answer"), vec![want]);
        }
        let passes = fake.0.passes();
        assert!(passes.contains(&vec![2.0, 3.0, 4.0]), "the three did not share a pass: {passes:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_that_fails_the_backend_fails_alone_and_its_neighbours_get_their_answers() {
        let fake = script(30);
        let handle = spawn(config(16, Replicas::fixed(1)), &fake);
        ready(&handle).await;
        let blocker = occupy(&handle).await;
        let good: Vec<_> = (1..=7).map(|i| (i as f32, ask(&handle, &[i as f32]))).collect();
        let bad = ask(&handle, &[-1.0]);
        let more: Vec<_> = (8..=11).map(|i| (i as f32, ask(&handle, &[i as f32]))).collect();
        until("all 12 wait", || handle.counters().queued.load(Ordering::Relaxed) == 12).await;
        let error = bad.await.expect("task").expect_err("the bad request fails");
        assert!(matches!(&error, InferError::Runtime { message, .. } if message.contains("negative input")), "{error:?}");
        for (v, caller) in good.into_iter().chain(more) {
            assert_eq!(caller.await.expect("task").expect("a neighbour's answer"), vec![v * 2.0]);
        }
        blocker.await.expect("task").expect("blocker");
        assert!(handle.counters().isolated.load(Ordering::Relaxed) >= 1);
        // Bisection: a handful of extra passes, not one per request.
        let failed = fake.0.passes().iter().filter(|p| p.contains(&-1.0)).count();
        assert!((2..=5).contains(&failed), "the bad row ran in {failed} passes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_gives_up_is_never_run() {
        let fake = script(20);
        let handle = spawn(config(8, Replicas::fixed(1)), &fake);
        ready(&handle).await;
        let blocker = occupy(&handle).await;
        let gone = ask(&handle, &[77.0]);
        until("the request queues", || handle.counters().queued.load(Ordering::Relaxed) == 1).await;
        gone.abort();
        let _ = gone.await;
        blocker.await.expect("task").expect("blocker");
        assert_eq!(ask(&handle, &[5.0]).await.expect("task").expect("answer"), vec![10.0]);
        assert!(!fake.0.passes().iter().any(|p| p.contains(&77.0)), "a withdrawn request ran");
        assert_eq!(handle.counters().dropped.load(Ordering::Relaxed), 1);
        assert_eq!(handle.counters().queued.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_and_a_short_timeout_gives_up() {
        let fake = script(30);
        let mut c = config(1, Replicas::fixed(1));
        c.batching.max_queue_size = 2;
        let handle = spawn(c, &fake);
        ready(&handle).await;
        let blocker = occupy(&handle).await;
        let queued: Vec<_> = (0..2).map(|i| ask(&handle, &[i as f32])).collect();
        until("two wait", || handle.counters().queued.load(Ordering::Relaxed) == 2).await;
        let refused = ask(&handle, &[9.0]).await.expect("task");
        assert!(matches!(refused, Err(InferError::Overloaded(_))), "{refused:?}");
        for q in queued {
            q.await.expect("task").expect("queued requests run");
        }
        blocker.await.expect("task").expect("blocker");
        let blocker = occupy(&handle).await;
        let short = InferOptions { priority: 0, timeout: Some(Duration::from_millis(1)) };
        let timed_out = handle.infer(vec![rows(&[1.0])], short).await;
        assert!(matches!(timed_out, Err(InferError::Timeout { .. })), "{timed_out:?}");
        blocker.await.expect("task").expect("blocker");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_come_and_go_by_command_and_the_last_one_stays() {
        let fake = script(5);
        let handle = spawn(config(4, Replicas { min: 1, max: 4 }), &fake);
        ready(&handle).await;
        assert_eq!(handle.load().target, 1);
        assert!(handle.add_replica(Placement::cpu()));
        assert!(handle.add_replica(Placement::cpu()));
        until("three replicas are ready", || handle.load().ready == 3).await;
        assert_eq!(handle.load().target, 3);
        // Work spreads while replicas are drained under it, and nothing is lost.
        let callers: Vec<_> = (0..60).map(|i| (i as f32, ask(&handle, &[i as f32]))).collect();
        until("work spreads", || handle.replicas().iter().filter(|r| r.batches > 0).count() >= 2).await;
        assert!(handle.remove_replica());
        assert!(handle.remove_replica());
        assert!(!handle.remove_replica(), "the last replica was drained");
        assert_eq!(handle.load().target, 1);
        for (v, caller) in callers {
            assert_eq!(caller.await.expect("task").expect("no request is lost"), vec![v * 2.0]);
        }
        until("drained replicas go", || handle.replicas().len() == 1).await;

        // A scale-up whose load fails leaves the target where it was, and the model serving.
        fake.0.fail_loads.store(1, Ordering::Release);
        assert!(handle.add_replica(Placement::cpu()));
        until("the failed replica is forgotten", || {
            fake.0.fail_loads.load(Ordering::Acquire) == 0 && handle.replicas().len() == 1 && handle.load().target == 1
        })
        .await;
        assert!(matches!(handle.state(), ModelState::Ready(_)));
        assert_eq!(ask(&handle, &[3.0]).await.expect("task").expect("still serving"), vec![6.0]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_whose_first_load_fails_says_why_and_refuses_work() {
        let fake = script(0);
        fake.0.fail_loads.store(1, Ordering::Release);
        let handle = spawn(config(4, Replicas::fixed(1)), &fake);
        until("the load fails", || matches!(handle.state(), ModelState::Failed(_))).await;
        let ModelState::Failed(reason) = handle.state() else { panic!("{:?}", handle.state()) };
        assert!(reason.contains("scripted load failure"), "{reason}");
        let refused = ask(&handle, &[1.0]).await.expect("task");
        assert!(matches!(refused, Err(InferError::NotReady { .. })), "{refused:?}");
        assert!(handle.replicas().is_empty(), "a failed replica stays listed: {:?}", handle.replicas());
    }
}
