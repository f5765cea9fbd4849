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

use kiln_wire::ReplicaState;

use crate::model::backend::{Backend, BackendError};
use crate::model::command::{Command, Pending};
use crate::model::device::{Device, Placement, Reservation};
use crate::model::error::InferError;
use crate::model::replica::{load_replica, run_replica};
use crate::model::shared::{ModelState, ReplicaSlot, Shared};
use crate::model::signature::OutputMeta;
use crate::model::spec::{MAX_PRIORITY, Tuning};
use crate::sync::MutexExt;

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
            .locked();
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

#[cfg(test)]
mod tests;

#[cfg(test)]
mod on_a_fake_backend;
