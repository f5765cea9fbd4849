//! The dynamic scaler: every interval, for each model whose `instances` has room between `min`
//! and `max`, it looks at queue depth, queue-wait p95 against the model's latency objective,
//! replica utilization and the GPUs the model may use, and adds, removes or holds replicas.
//!
//! Flapping is kept out three ways: pressure must last two intervals before a scale-up; a model
//! must have been quiet for the whole down cooldown before a scale-down (and that long after its
//! last change); and scale-ups are spaced by the up cooldown. Every change, and every hold with a
//! reason worth knowing ("at max", "cooldown", "no GPU memory", "GPUs busy"), is recorded with
//! its inputs in a [`DecisionLog`] that the API serves.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kiln_wire::{EventKind, GpuBrief, ScaleAction, ScalingDecision, ScalingInputs};

use crate::telemetry::EventLog;

use crate::model::spec::Replicas;
use crate::fleet::estimated_weights;
use crate::fleet::placement::{Placer, Purpose};
use crate::model::handle::{ModelHandle, WeakModelHandle};
use crate::model::table::ModelTable;
use kiln_wire::Histogram;
use crate::sync::MutexExt;

/// Utilization the remaining replicas may reach after a scale-down.
const DOWN_UTILIZATION: f64 = 0.6;

/// The recent decisions and counts by direction; each decision also goes to the event log.
#[derive(Debug)]
pub struct DecisionLog {
    recent: Mutex<VecDeque<ScalingDecision>>,
    capacity: usize,
    counts: [AtomicU64; 3],
    events: Arc<EventLog>,
}

impl DecisionLog {
    pub fn new(capacity: usize, events: Arc<EventLog>) -> DecisionLog {
        DecisionLog {
            recent: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity: capacity.max(1),
            counts: Default::default(),
            events,
        }
    }

    pub fn record(&self, decision: ScalingDecision) {
        tracing::info!(
            target: "kiln::scaler",
            model = %decision.model,
            action = decision.action.as_str(),
            from = decision.from,
            to = decision.to,
            device = decision.device.as_deref().unwrap_or("-"),
            queue_wait_p95_ms = decision.inputs.queue_wait_p95_ms,
            queue_depth = decision.inputs.queue_depth,
            utilization = decision.inputs.utilization,
            "{}",
            decision.reason
        );
        self.counts[action_index(decision.action)].fetch_add(1, Ordering::Relaxed);
        self.events.emit(EventKind::Scaling(decision.clone()));
        let mut recent = self.recent.locked();
        if recent.len() == self.capacity {
            recent.pop_front();
        }
        recent.push_back(decision);
    }

    /// Oldest first.
    pub fn recent(&self) -> Vec<ScalingDecision> {
        self.recent.locked().iter().cloned().collect()
    }

    /// Decisions recorded since start with this action.
    pub fn count(&self, action: ScaleAction) -> u64 {
        self.counts[action_index(action)].load(Ordering::Relaxed)
    }
}

fn action_index(action: ScaleAction) -> usize {
    match action {
        ScaleAction::Up => 0,
        ScaleAction::Down => 1,
        ScaleAction::Hold => 2,
    }
}

/// What one model's scaler is bound by.
#[derive(Debug, Clone)]
pub struct Policy {
    pub replicas: Replicas,
    pub objective: Duration,
    pub max_batch_size: u32,
    pub up_cooldown: Duration,
    pub down_cooldown: Duration,
}

/// One model over one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Replicas asked for (loading ones included).
    pub replicas: u32,
    pub queue_depth: u64,
    pub requests: u64,
    pub wait_p95_ms: f64,
    pub utilization: f64,
    pub gpus: Vec<GpuBrief>,
}

/// One model's scaling state between intervals.
#[derive(Debug)]
pub struct ModelScaler {
    model: String,
    policy: Policy,
    /// Consecutive intervals with pressure.
    streak: u32,
    quiet_since: Option<Instant>,
    last_up: Option<Instant>,
    last_change: Option<Instant>,
    /// The kind of the last notable hold, so a hold that repeats is recorded once.
    last_hold: Option<String>,
}

impl ModelScaler {
    pub fn new(model: impl Into<String>, policy: Policy) -> ModelScaler {
        ModelScaler {
            model: model.into(),
            policy,
            streak: 0,
            quiet_since: None,
            last_up: None,
            last_change: None,
            last_hold: None,
        }
    }

    /// Decides for one interval. `add` places and starts a replica and names its device, or
    /// says why it cannot; `remove` drains one. Returns the decision when it is worth recording.
    pub fn step(
        &mut self,
        obs: &Observation,
        now: Instant,
        add: impl FnOnce() -> Result<String, String>,
        remove: impl FnOnce() -> bool,
    ) -> Option<ScalingDecision> {
        let p = &self.policy;
        let n = obs.replicas;
        let objective_ms = p.objective.as_secs_f64() * 1e3;
        let waits = obs.requests > 0 && obs.wait_p95_ms > objective_ms;
        let backlog = obs.queue_depth > u64::from(p.max_batch_size) * u64::from(n.max(1));
        let pressure = waits || backlog;
        self.streak = if pressure { self.streak + 1 } else { 0 };
        let after_down = if n > 1 { obs.utilization * f64::from(n) / f64::from(n - 1) } else { 0.0 };
        let quiet = !pressure && obs.queue_depth == 0 && obs.wait_p95_ms <= objective_ms / 2.0 && after_down < DOWN_UTILIZATION;
        if quiet {
            self.quiet_since.get_or_insert(now);
        } else {
            self.quiet_since = None;
        }
        let within = |at: Option<Instant>, span: Duration| at.is_some_and(|t| now.duration_since(t) < span);

        if n < p.replicas.min {
            return self.up(obs, now, format!("below min {}", p.replicas.min), add);
        }
        if pressure {
            if self.streak < 2 {
                return None;
            }
            if n >= p.replicas.max {
                return self.hold(obs, format!("at max ({})", p.replicas.max));
            }
            if within(self.last_up, p.up_cooldown) {
                return self.hold(obs, "cooldown after the last scale-up".to_owned());
            }
            let why = if waits {
                format!("queue wait p95 {:.1} ms over the {objective_ms:.0} ms objective", obs.wait_p95_ms)
            } else {
                format!("{} queued, more than {n} replicas take in one batch each", obs.queue_depth)
            };
            return self.up(obs, now, why, add);
        }
        let quiet_for = self.quiet_since.map_or(Duration::ZERO, |t| now.duration_since(t));
        if quiet && n > p.replicas.min && quiet_for >= p.down_cooldown {
            if within(self.last_change, p.down_cooldown) {
                return self.hold(obs, "cooldown after the last change".to_owned());
            }
            if !remove() {
                return None;
            }
            self.last_change = Some(now);
            self.quiet_since = Some(now);
            self.last_hold = None;
            let reason = if obs.requests == 0 {
                format!("idle for {} s", quiet_for.as_secs())
            } else {
                format!(
                    "utilization {:.0}% would be {:.0}% on one fewer replica",
                    obs.utilization * 100.0,
                    after_down * 100.0
                )
            };
            return Some(self.decision(obs, ScaleAction::Down, n - 1, reason, None));
        }
        None
    }

    fn up(
        &mut self,
        obs: &Observation,
        now: Instant,
        why: String,
        add: impl FnOnce() -> Result<String, String>,
    ) -> Option<ScalingDecision> {
        match add() {
            Ok(device) => {
                self.last_up = Some(now);
                self.last_change = Some(now);
                self.streak = 0;
                self.last_hold = None;
                Some(self.decision(obs, ScaleAction::Up, obs.replicas + 1, why, Some(device)))
            }
            Err(refusal) => self.hold(obs, refusal),
        }
    }

    fn hold(&mut self, obs: &Observation, reason: String) -> Option<ScalingDecision> {
        // Repeats are judged by the kind of hold ("no GPU memory"), not its numbers, which
        // change every interval on a real GPU.
        let kind = reason.split(':').next().unwrap_or(&reason).to_owned();
        if self.last_hold.as_deref() == Some(kind.as_str()) {
            return None;
        }
        self.last_hold = Some(kind);
        Some(self.decision(obs, ScaleAction::Hold, obs.replicas, reason, None))
    }

    fn decision(
        &self,
        obs: &Observation,
        action: ScaleAction,
        to: u32,
        reason: String,
        device: Option<String>,
    ) -> ScalingDecision {
        ScalingDecision {
            at_unix_ms: crate::telemetry::unix_ms(),
            model: self.model.clone(),
            action,
            from: obs.replicas,
            to,
            reason,
            device,
            inputs: ScalingInputs {
                queue_depth: obs.queue_depth,
                requests: obs.requests,
                queue_wait_p95_ms: obs.wait_p95_ms,
                latency_objective_ms: self.policy.objective.as_secs_f64() * 1e3,
                utilization: obs.utilization,
                gpus: obs.gpus.clone(),
            },
        }
    }
}

/// The counters one interval is measured against.
struct Mark {
    at: Instant,
    waits: Histogram,
    forward_us: u64,
}

impl Mark {
    fn now(handle: &ModelHandle) -> Mark {
        let c = handle.counters();
        Mark {
            at: Instant::now(),
            waits: c.queue_wait.snapshot(),
            forward_us: c.forward.sum_us(),
        }
    }
}

/// Watches one model's counters between intervals, without keeping the model alive.
struct Watched {
    handle: WeakModelHandle,
    scaler: ModelScaler,
    mark: Mark,
}

impl Watched {
    fn new(handle: &ModelHandle, config: &ScalerConfig) -> Watched {
        let c = handle.config();
        let tuning = handle.tuning();
        let policy = Policy {
            replicas: tuning.replicas,
            objective: c.latency_objective,
            max_batch_size: tuning.max_batch_size,
            up_cooldown: config.up_cooldown,
            down_cooldown: config.down_cooldown,
        };
        Watched { scaler: ModelScaler::new(c.name.clone(), policy), mark: Mark::now(handle), handle: handle.downgrade() }
    }

    fn observe(&mut self, handle: &ModelHandle, placer: &Placer) -> Observation {
        let now = Mark::now(handle);
        let waits = now.waits.since(&self.mark.waits);
        let elapsed_us = now.at.duration_since(self.mark.at).as_micros().max(1) as f64;
        let load = handle.load();
        let busy_us = now.forward_us.saturating_sub(self.mark.forward_us) as f64;
        let gpus = placer
            .candidates(handle.config())
            .into_iter()
            .map(|g| GpuBrief {
                device: format!("cuda:{}", g.index),
                utilization_percent: g.utilization_percent,
                memory_free_bytes: g.memory_free_bytes,
            })
            .collect();
        self.mark = now;
        Observation {
            replicas: load.target,
            queue_depth: load.queued as u64,
            requests: waits.count(),
            wait_p95_ms: waits.quantile_ms(0.95),
            utilization: (busy_us / (elapsed_us * f64::from(load.ready.max(1)))).clamp(0.0, 1.0),
            gpus,
        }
    }
}

/// Places one more replica of `handle`'s model and asks its scheduler to start it; returns
/// the device, or why none could take it.
fn scale_up(handle: &ModelHandle, placer: &Placer) -> Result<String, String> {
    let config = handle.config();
    let weights = match handle.load().weights {
        0 => estimated_weights(config),
        measured => measured,
    };
    let placement = placer
        .place(config, weights, Purpose::ScaleUp)
        .map_err(|e| format!("{}: {e}", e.short()))?;
    let device = placement.device.to_string();
    if handle.add_replica(placement) {
        Ok(device)
    } else {
        Err(format!("model '{}' is shut down", config.name))
    }
}

/// Starts the scaler thread, which looks at every scalable model of `models` each interval
/// (models loaded later too) for as long as the table lives; returns at once.
pub fn spawn(models: Arc<ModelTable>, placer: Placer, config: &ScalerConfig, log: Arc<DecisionLog>) -> std::io::Result<()> {
    let table = Arc::downgrade(&models);
    drop(models);
    let config = config.clone();
    thread::Builder::new().name("kiln-scaler".into()).spawn(move || {
        let mut watched: Vec<Watched> = Vec::new();
        loop {
            thread::sleep(config.interval);
            let Some(table) = table.upgrade() else { return };
            let serving = table.handles();
            drop(table);
            // Unloaded and replaced models are no longer scaled (their last callers finish), nor
            // models an operator fixed at one count.
            let scalable: Vec<&ModelHandle> = serving.iter().filter(|h| h.tuning().replicas.scalable()).collect();
            watched.retain(|w| scalable.iter().any(|h| w.handle.refers_to(h)));
            for handle in scalable {
                if !watched.iter().any(|w| w.handle.refers_to(handle)) {
                    watched.push(Watched::new(handle, &config));
                }
            }
            for w in &mut watched {
                let Some(handle) = w.handle.upgrade() else { continue };
                let tuning = handle.tuning();
                w.scaler.policy.replicas = tuning.replicas;
                w.scaler.policy.max_batch_size = tuning.max_batch_size;
                let obs = w.observe(&handle, &placer);
                let decision = w.scaler.step(
                    &obs,
                    Instant::now(),
                    || scale_up(&handle, &placer),
                    || handle.remove_replica(),
                );
                if let Some(decision) = decision {
                    log.record(decision);
                }
            }
        }
    })?;
    Ok(())
}

/// How often and how cautiously the scaler changes replica counts (`[scaler]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ScalerConfig {
    /// Every model with `instances.max > instances.min` is looked at this often.
    pub interval: Duration,
    /// Least time between two scale-ups of one model.
    pub up_cooldown: Duration,
    /// Least time after any change before a scale-down, and how long a model must have been
    /// quiet for one.
    pub down_cooldown: Duration,
    /// A GPU busier than this (percent) takes no new replica.
    pub max_gpu_utilization: u32,
    /// Decisions kept for the API.
    pub history: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::spec::{DeviceChoice, ModelConfig};
    use crate::fleet::placement::{Placer, Purpose};
    use crate::model::device::Placement;

    fn policy(min: u32, max: u32) -> Policy {
        Policy {
            replicas: Replicas { min, max },
            objective: Duration::from_millis(50),
            max_batch_size: 8,
            up_cooldown: Duration::from_secs(10),
            down_cooldown: Duration::from_secs(30),
        }
    }

    fn busy(replicas: u32) -> Observation {
        Observation { replicas, queue_depth: 20, requests: 500, wait_p95_ms: 120.0, utilization: 0.95, gpus: Vec::new() }
    }

    fn idle(replicas: u32) -> Observation {
        Observation { replicas, queue_depth: 0, requests: 0, wait_p95_ms: 0.0, utilization: 0.0, gpus: Vec::new() }
    }

    /// A model's replicas as the scaler changes them, with GPU memory booked by a real placer.
    struct Fleet {
        placer: Placer,
        model: ModelConfig,
        replicas: Vec<Placement>,
        decisions: Vec<ScalingDecision>,
        scaler: ModelScaler,
        start: Instant,
    }

    impl Fleet {
        fn new(gpus: &[(u64, u64, u32)], headroom_mib: u64, policy: Policy) -> Fleet {
            let placer = Placer::new(crate::fleet::placement::tests::simulated(gpus), 95);
            let mut model = crate::fleet::placement::tests::model(DeviceChoice::Auto, headroom_mib);
            model.replicas = policy.replicas;
            model.latency_objective = policy.objective;
            let first = placer.place(&model, 0, Purpose::Start).expect("first replica");
            Fleet {
                placer,
                model,
                replicas: vec![first],
                decisions: Vec::new(),
                scaler: ModelScaler::new("m", policy),
                start: Instant::now(),
            }
        }

        /// One interval at `second` seconds with load `busy` (true) or none.
        fn tick(&mut self, second: u64, busy_load: bool) {
            let n = self.replicas.len() as u32;
            let obs = if busy_load { busy(n) } else { idle(n) };
            let (placer, model, replicas) = (&self.placer, &self.model, &mut self.replicas);
            let added = std::cell::RefCell::new(None);
            let removed = std::cell::Cell::new(false);
            let decision = self.scaler.step(
                &obs,
                self.start + Duration::from_secs(second),
                || match placer.place(model, 0, Purpose::ScaleUp) {
                    Ok(p) => {
                        let device = p.device.to_string();
                        *added.borrow_mut() = Some(p);
                        Ok(device)
                    }
                    // As the server words it: the kind, then numbers that change.
                    Err(e) => Err(format!("{}: {e} (t={second})", e.short())),
                },
                || {
                    removed.set(true);
                    true
                },
            );
            if let Some(p) = added.into_inner() {
                replicas.push(p);
            }
            if removed.get() {
                replicas.pop();
            }
            self.decisions.extend(decision);
        }

        fn actions(&self) -> Vec<(ScaleAction, u32, String)> {
            self.decisions.iter().map(|d| (d.action, d.to, d.reason.clone())).collect()
        }
    }

    #[test]
    fn sustained_queueing_scales_up_one_step_per_cooldown_and_records_why() {
        let mut fleet = Fleet::new(&[(80_000, 0, 10)], 1024, policy(1, 4));
        for second in (0..=40).step_by(2) {
            fleet.tick(second, true);
        }
        let ups: Vec<&ScalingDecision> = fleet.decisions.iter().filter(|d| d.action == ScaleAction::Up).collect();
        // Pressure must last two intervals (t=2), then one step per 10 s cooldown: 2, 12, 22.
        assert_eq!(ups.len(), 3, "{:?}", fleet.actions());
        assert_eq!(fleet.replicas.len(), 4);
        assert!(ups[0].reason.contains("queue wait p95 120.0 ms over the 50 ms objective"), "{}", ups[0].reason);
        assert_eq!(ups[0].device.as_deref(), Some("cuda:0"));
        assert_eq!((ups[0].from, ups[0].to), (1, 2));
        assert_eq!(ups[0].inputs.queue_depth, 20);
        // The cooldown and then the ceiling are recorded as holds, once each in a row.
        let holds: Vec<String> = fleet.decisions.iter().filter(|d| d.action == ScaleAction::Hold).map(|d| d.reason.clone()).collect();
        assert!(holds.iter().any(|h| h.starts_with("cooldown")), "{holds:?}");
        assert_eq!(holds.last().map(String::as_str), Some("at max (4)"), "{holds:?}");
        assert_eq!(holds.iter().filter(|h| h.starts_with("at max")).count(), 1, "{holds:?}");
    }

    #[test]
    fn an_idle_model_scales_down_to_min_after_the_down_cooldown() {
        let mut fleet = Fleet::new(&[(80_000, 0, 10)], 1024, policy(1, 3));
        for second in (0..=24).step_by(2) {
            fleet.tick(second, true);
        }
        assert_eq!(fleet.replicas.len(), 3, "{:?}", fleet.actions());
        for second in (26..=200).step_by(2) {
            fleet.tick(second, false);
        }
        assert_eq!(fleet.replicas.len(), 1, "{:?}", fleet.actions());
        let downs: Vec<&ScalingDecision> = fleet.decisions.iter().filter(|d| d.action == ScaleAction::Down).collect();
        assert_eq!(downs.len(), 2);
        assert!(downs[0].reason.starts_with("idle for 30 s"), "{}", downs[0].reason);
        // One step at a time, never below min.
        let tail: Vec<(ScaleAction, u32)> = fleet.decisions.iter().map(|d| (d.action, d.to)).filter(|(a, _)| *a == ScaleAction::Down).collect();
        assert_eq!(tail, vec![(ScaleAction::Down, 2), (ScaleAction::Down, 1)]);
    }

    #[test]
    fn oscillating_load_never_flaps() {
        // Busy and idle in turns of 1, 2 and 5 intervals: replicas only ever go up.
        for turn in [1u64, 2, 5] {
            let mut fleet = Fleet::new(&[(80_000, 0, 10)], 1024, policy(1, 8));
            for step in 0..150u64 {
                fleet.tick(step * 2, (step / turn) % 2 == 0);
            }
            let changes: Vec<ScaleAction> = fleet
                .decisions
                .iter()
                .map(|d| d.action)
                .filter(|a| *a != ScaleAction::Hold)
                .collect();
            assert!(!changes.contains(&ScaleAction::Down), "turn {turn}: {:?}", fleet.actions());
            if turn == 1 {
                // Pressure never lasts two intervals: nothing changes at all.
                assert!(changes.is_empty(), "turn 1: {:?}", fleet.actions());
            }
        }
    }

    #[test]
    fn max_and_gpu_memory_bound_the_replica_count() {
        // 4000 MiB with 1000 used and 1024 MiB per replica: room for one more beside the first.
        let mut fleet = Fleet::new(&[(4000, 1000, 10)], 1024, policy(1, 6));
        for second in (0..=100).step_by(2) {
            fleet.tick(second, true);
        }
        assert_eq!(fleet.replicas.len(), 2, "{:?}", fleet.actions());
        let last = fleet.decisions.last().expect("a decision");
        assert_eq!(last.action, ScaleAction::Hold);
        assert!(last.reason.starts_with("no GPU memory: "), "{}", last.reason);
        let memory_holds = fleet.decisions.iter().filter(|d| d.reason.starts_with("no GPU memory")).count();
        assert_eq!(memory_holds, 1, "a hold that repeats with new numbers is recorded once");
        // A busy GPU takes no new replica either.
        let mut fleet = Fleet::new(&[(80_000, 0, 99)], 1024, policy(1, 6));
        for second in (0..=20).step_by(2) {
            fleet.tick(second, true);
        }
        assert_eq!(fleet.replicas.len(), 1);
        assert!(fleet.decisions.last().is_some_and(|d| d.reason.starts_with("GPUs busy: ")));
    }

    #[test]
    fn the_log_keeps_the_most_recent_decisions_and_counts_them() {
        let events = Arc::new(EventLog::new(16));
        let log = DecisionLog::new(2, Arc::clone(&events));
        let (_, mut feed) = events.follow();
        let mut fleet = Fleet::new(&[(80_000, 0, 10)], 1, policy(1, 4));
        for second in (0..=30).step_by(2) {
            fleet.tick(second, true);
        }
        for d in fleet.decisions.clone() {
            log.record(d);
        }
        assert_eq!(log.recent().len(), 2);
        assert_eq!(log.recent().last(), fleet.decisions.last());
        assert_eq!(log.count(ScaleAction::Up), 3);
        let first = feed.try_recv().expect("an event").kind;
        assert_eq!(Some(&first), fleet.decisions.first().cloned().map(EventKind::Scaling).as_ref());
    }
}
