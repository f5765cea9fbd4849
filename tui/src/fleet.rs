//! Several replicas as one: the snapshot of a fleet is the sum of its replicas' snapshots
//! (queues, counters and histograms added up by model, handler and tenant name), so the rest of
//! the dashboard shows a fleet as it shows one server. Pure functions of the snapshots.

use kiln_wire::{Bounds, CacheStats, ModelStats, RouteStats, Stats};

/// One replica's latest answer to `/v1/stats`, or why there is none.
#[derive(Debug, Clone)]
pub struct ReplicaSample {
    /// The address kiln-top polls it at.
    pub url: String,
    pub outcome: Result<Stats, String>,
}

impl ReplicaSample {
    /// What to call it: its replica name in cluster mode, else its address.
    pub fn name(&self) -> String {
        match &self.outcome {
            Ok(Stats { replica: Some(name), .. }) => name.clone(),
            _ => self.url.trim_start_matches("http://").trim_start_matches("https://").to_owned(),
        }
    }
}

/// How far apart the model replica ids and GPU indices of consecutive watched replicas are put
/// in the fleet's snapshot: the `k`-th address's are offset by `k` times this, so each keeps its
/// place (and its history on screen) while others come, go or scale.
pub const ID_STRIDE: u32 = 1000;

/// The fleet's snapshot: every answering replica's, added up. GPUs are listed per replica (named
/// with their replica); model replicas keep their ids, offset by [`ID_STRIDE`] per address.
/// `None` when no replica answered.
pub fn merge(samples: &[ReplicaSample]) -> Option<Stats> {
    let answered: Vec<(u32, String, &Stats)> = (0u32..)
        .zip(samples)
        .filter_map(|(k, s)| s.outcome.as_ref().ok().map(|stats| (k, s.name(), stats)))
        .collect();
    let (_, _, first) = answered.first()?;
    if answered.len() == 1 {
        return Some((*first).clone());
    }
    let mut fleet = Stats {
        server: first.server.clone(),
        uptime_seconds: answered.iter().map(|(_, _, s)| s.uptime_seconds).fold(f64::INFINITY, f64::min),
        gpus: Vec::new(),
        models: Vec::new(),
        handlers: Vec::new(),
        tenants: Vec::new(),
        process: Default::default(),
        caches: Vec::new(),
        replica: None,
    };
    for (k, name, stats) in &answered {
        let offset = k.saturating_mul(ID_STRIDE);
        for gpu in &stats.gpus {
            let mut gpu = gpu.clone();
            gpu.name = format!("{name} cuda:{} {}", gpu.index, gpu.name);
            gpu.index = gpu.index.saturating_add(offset);
            fleet.gpus.push(gpu);
        }
        for model in &stats.models {
            add_model(&mut fleet.models, model, offset);
        }
        for route in &stats.handlers {
            add_route(&mut fleet.handlers, route);
        }
        for route in &stats.tenants {
            add_route(&mut fleet.tenants, route);
        }
        for cache in &stats.caches {
            add_cache(&mut fleet.caches, cache);
        }
        let p = &mut fleet.process;
        p.cpu_seconds += stats.process.cpu_seconds;
        p.voluntary_switches += stats.process.voluntary_switches;
        p.involuntary_switches += stats.process.involuntary_switches;
        p.threads += stats.process.threads;
        p.rss_bytes += stats.process.rss_bytes;
        p.allocations += stats.process.allocations;
    }
    for model in &mut fleet.models {
        model.average_batch_size = if model.executions == 0 { 0.0 } else { model.inferences as f64 / model.executions as f64 };
    }
    Some(fleet)
}

fn add_counts(into: &mut Vec<u64>, add: &[u64]) {
    if into.len() < add.len() {
        into.resize(add.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(add) {
        *a += b;
    }
}

fn add_model(models: &mut Vec<ModelStats>, model: &ModelStats, replica_offset: u32) {
    let mut renumbered = model.clone();
    for replica in &mut renumbered.replicas {
        replica.id = replica.id.saturating_add(replica_offset);
    }
    let Some(m) = models.iter_mut().find(|m| m.name == model.name) else {
        models.push(renumbered);
        return;
    };
    // A model is as ready as its least ready replica: `loading` or `failed` somewhere shows.
    if m.state == "ready" {
        m.state.clone_from(&model.state);
    }
    m.paused |= model.paused;
    m.ragged_batching &= model.ragged_batching;
    m.instances = Bounds { min: m.instances.min + model.instances.min, max: m.instances.max + model.instances.max };
    m.replica_target += model.replica_target;
    m.replicas.extend(renumbered.replicas);
    m.queued += model.queued;
    m.inferences += model.inferences;
    m.executions += model.executions;
    m.rows += model.rows;
    m.dropped += model.dropped;
    m.overloaded += model.overloaded;
    m.timeouts += model.timeouts;
    m.isolated_batches += model.isolated_batches;
    add_counts(&mut m.batch_sizes, &model.batch_sizes);
    m.queue_wait.add(&model.queue_wait);
    m.forward.add(&model.forward);
    // The forward curve: per batch size, the mean over every replica's samples.
    for point in &model.forward_curve {
        match m.forward_curve.iter_mut().find(|p| p.rows == point.rows) {
            Some(p) => {
                let samples = p.samples + point.samples;
                if samples > 0 {
                    p.forward_ms = (p.forward_ms * p.samples as f64 + point.forward_ms * point.samples as f64) / samples as f64;
                }
                p.samples = samples;
            }
            None => m.forward_curve.push(*point),
        }
    }
    m.forward_curve.sort_by_key(|p| p.rows);
}

fn add_route(routes: &mut Vec<RouteStats>, route: &RouteStats) {
    match routes.iter_mut().find(|r| r.name == route.name) {
        Some(r) => {
            r.requests += route.requests;
            r.errors += route.errors;
            r.throttled += route.throttled;
            r.latency.add(&route.latency);
        }
        None => routes.push(route.clone()),
    }
}

fn add_cache(caches: &mut Vec<CacheStats>, cache: &CacheStats) {
    match caches.iter_mut().find(|c| c.handler == cache.handler) {
        Some(c) => {
            c.hits += cache.hits;
            c.misses += cache.misses;
            c.stores += cache.stores;
            c.evictions += cache.evictions;
            c.entries += cache.entries;
            c.bytes += cache.bytes;
        }
        None => caches.push(cache.clone()),
    }
}
