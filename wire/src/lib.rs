//! Everything that crosses a process boundary: the JSON of Kiln's admin endpoints (`/v1/stats`,
//! `/v1/scaler`, `/v1/events`, `/v1/handlers`), the error body every route answers with, the
//! header names clients send, and tensor element types ([`DType`], shared with the guest SDK).
//! Plain data with serde; no libtorch or wasmtime, so the dashboard and guests stay small.

#![forbid(unsafe_code)]

pub mod cli;
pub mod dtype;

pub use dtype::DType;

use serde::{Deserialize, Serialize};

/// Header names Kiln reads from clients, and writes.
pub mod headers {
    /// On every answer: an id for this request, unique to it (24 hex digits, after the
    /// replica's name and a `-` in cluster mode), for logs and support.
    pub const REQUEST_ID: &str = "kiln-request-id";
    /// A request's scheduling priority, `0 ..= 9`; capped at what the handler (or, for OIP,
    /// the server) allows.
    pub const PRIORITY: &str = "kiln-priority";
    /// A shorter inference timeout than the model's own, in milliseconds.
    pub const TIMEOUT_MS: &str = "kiln-timeout-ms";
    /// A deployment's Ed25519 signature (base64), as `kiln sign` prints it.
    pub const SIGNATURE: &str = "kiln-signature";
    /// A tenant's own token for its model's hub source, sent with its model load and used for
    /// that download alone (never stored, never the operator's).
    pub const SOURCE_TOKEN: &str = "kiln-source-token";
}

/// The body of every error Kiln answers (4xx and 5xx): what went wrong for people, and a
/// stable word for code (`not_found`, `quota`, `trap`, ...; docs/reference/errors.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub kind: String,
}

/// One handler, as `GET /v1/handlers` lists it and a deploy answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandlerInfo {
    pub name: String,
    pub tenant: String,
    /// The models its guest may load, sorted.
    pub models: Vec<String>,
    pub limits: HandlerLimits,
    pub origin: HandlerOrigin,
    /// For deployed handlers: the component's SHA-256 (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// For deployed handlers: seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed_at: Option<u64>,
    /// For deployed handlers: whether a signature was verified at deploy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerOrigin {
    /// A `[[handler]]` section of the config file.
    Config,
    /// The admin API.
    Deployed,
}

/// What one request's sandbox may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerLimits {
    pub memory_limit_mib: u64,
    pub deadline_ms: u64,
    /// Wasm fuel per request; `None` is unmetered.
    pub fuel: Option<u64>,
    pub max_compute_bytes: u64,
    pub max_compute_calls: u32,
    pub max_response_bytes: u64,
}

/// `GET /v1/handlers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandlerList {
    pub handlers: Vec<HandlerInfo>,
}

/// One model of the repository, as `GET /v1/models` lists it and a load answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    /// `config` (the config file owns it) or `api` (loaded through the admin API).
    pub origin: String,
    /// `READY`, `LOADING` or `UNAVAILABLE`, as the OIP repository index spells them.
    pub state: String,
    /// Why it is unavailable; empty otherwise.
    pub reason: String,
    /// The tenants that may use it.
    pub tenants: Vec<String>,
    /// The file loaded (for a remote source, the cache's copy).
    pub path: String,
    /// Where the file comes from when it is not local: `https://…` or `hf://…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Its pinned SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub device: String,
    pub precision: String,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<String>,
    pub instances: Bounds,
    pub max_batch_size: u32,
    pub max_queue_delay_us: u64,
    pub timeout_ms: u64,
    /// One replica's weights as measured at load; 0 until one has loaded.
    pub weights_bytes: u64,
    /// Requests waiting now, and whether an operator paused it (requests queue, none run).
    pub queued: u64,
    pub paused: bool,
    /// The module's parameters (elements; 0 for a frozen module, whose weights are constants).
    pub parameters: u64,
    /// How long its first replica took to load, and then to warm up; 0 until it has.
    pub load_ms: u64,
    pub warmup_ms: u64,
    /// Its versions (one until versioned models land).
    pub versions: Vec<String>,
    /// For models loaded through the API: seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed_at: Option<u64>,
    pub replicas: Vec<ReplicaInfo>,
    /// For `precision = "auto"`: what the search at load chose, per kind of device it ran on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub precision_search: Vec<PrecisionChoice>,
}

/// What `precision = "auto"` chose for a model on one kind of device, and why: the precision
/// served, its speed and its worst agreement with FP32, and every candidate tried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrecisionChoice {
    pub model: String,
    /// Where it was measured: `cpu` or `cuda:N`.
    pub device: String,
    /// `fp32`, `bf16` or `fp16`.
    pub precision: String,
    /// How many times faster than FP32 at the batch sizes timed (1 for FP32).
    pub speedup: f64,
    /// The lowest cosine similarity of any output row to FP32's (1 for FP32).
    pub worst_cosine: f64,
    /// The largest difference of any output value from FP32's (0 for FP32).
    pub worst_abs: f64,
    /// What the search cost at load.
    pub search_ms: u64,
    /// Each candidate and what became of it, one line each: `bf16: 2.9× fp32, worst cosine
    /// 0.9996`, `fp16: drifts on logits (cosine 0.93, under 0.999)`.
    pub candidates: Vec<String>,
}

impl PrecisionChoice {
    /// One line: `minilm: bf16, 2.9× fp32, worst cosine 0.9996 (cpu, 3.1 s)`.
    pub fn summary(&self) -> String {
        let took = format!("{}, {:.1} s", self.device, self.search_ms as f64 / 1e3);
        if self.precision == "fp32" {
            let tried = if self.candidates.is_empty() { "nothing else to try".to_owned() } else { self.candidates.join("; ") };
            format!("{}: fp32 ({tried}) ({took})", self.model)
        } else {
            format!(
                "{}: {}, {:.1}× fp32, worst cosine {:.4} ({took})",
                self.model, self.precision, self.speedup, self.worst_cosine
            )
        }
    }
}

/// A model input's name, type and shape (`-1` for a dynamic dimension).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

/// One request being handled, as `GET /v1/requests` lists it (to cancel with
/// `DELETE /v1/requests/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestInFlight {
    pub id: String,
    pub method: String,
    /// Without the query.
    pub path: String,
    pub age_ms: f64,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    pub models: Vec<ModelInfo>,
}

/// One GPU as the inventory last saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// The CUDA index, `cuda:N`.
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub memory_free_bytes: u64,
    /// Percent of the last sample period a kernel was running.
    pub utilization_percent: u32,
    pub temperature_celsius: u32,
    pub power_watts: f64,
    pub power_limit_watts: f64,
    /// A stand-in from `[[gpus.simulated]]`; its replicas run on the CPU.
    pub simulated: bool,
}

/// What the scaler did about one model at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleAction {
    Up,
    Down,
    Hold,
}

impl ScaleAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ScaleAction::Up => "up",
            ScaleAction::Down => "down",
            ScaleAction::Hold => "hold",
        }
    }
}

/// One scaling decision, with the inputs that produced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingDecision {
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    pub model: String,
    pub action: ScaleAction,
    /// Replica counts before and after (equal for a hold).
    pub from: u32,
    pub to: u32,
    /// Why, in a few words ("queue wait p95 80 ms over the 50 ms objective", "at max", ...).
    pub reason: String,
    /// The device a new replica went to, for a scale-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    pub inputs: ScalingInputs,
}

/// What the scaler looked at, over the interval that ended with the decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingInputs {
    /// Requests waiting when the interval ended.
    pub queue_depth: u64,
    /// Requests that started a forward pass during the interval.
    pub requests: u64,
    /// Queue-wait 95th percentile over the interval, in milliseconds (0 without requests).
    pub queue_wait_p95_ms: f64,
    pub latency_objective_ms: f64,
    /// Fraction of the interval the replicas spent in forward passes, averaged over them.
    pub utilization: f64,
    /// The GPUs the model may use, as seen then.
    pub gpus: Vec<GpuBrief>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuBrief {
    pub device: String,
    pub utilization_percent: u32,
    pub memory_free_bytes: u64,
}

/// `GET /v1/scaler`: the most recent decisions, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalerReport {
    pub decisions: Vec<ScalingDecision>,
}

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    Loading,
    Ready,
    /// Finishing its last batch before it is removed.
    Draining,
}

/// One replica of a model, for stats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub id: u32,
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub state: ReplicaState,
    pub busy: bool,
    pub batches: u64,
    pub rows: u64,
    /// Seconds spent in forward passes.
    pub busy_seconds: f64,
}

/// Upper bounds (microseconds) of every latency histogram Kiln keeps: request duration, queue
/// wait, forward pass, sandbox instantiation. One more bucket counts the rest.
pub const LATENCY_BOUNDS_US: [u64; 19] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Batch sizes are counted up to these bounds: 1, 2, 3-4, 5-8, ..., 65-128; one more bucket
/// counts larger batches.
pub const BATCH_BOUNDS: [u32; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// A latency histogram over [`LATENCY_BOUNDS_US`], cumulative since the server started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Per bucket (not cumulative); `LATENCY_BOUNDS_US.len() + 1` entries.
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

impl Histogram {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds `other`'s counts to these, bucket by bucket (two replicas', or two routes', into one).
    pub fn add(&mut self, other: &Histogram) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }

    /// What was added since `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        Histogram {
            counts: self
                .counts
                .iter()
                .enumerate()
                .map(|(i, c)| c.saturating_sub(earlier.counts.get(i).copied().unwrap_or(0)))
                .collect(),
            sum_us: self.sum_us.saturating_sub(earlier.sum_us),
        }
    }

    /// The `q` quantile in milliseconds (see [`quantile`]).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        quantile(&LATENCY_BOUNDS_US, &self.counts, q) / 1e3
    }
}

/// The `q` quantile (0..=1) of a bucketed histogram, interpolated inside its bucket; zero when
/// empty. `counts` has one more entry than `bounds` (the overflow, reported as the last bound).
pub fn quantile(bounds: &[u64], counts: &[u64], q: f64) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, &count) in counts.iter().enumerate() {
        if count > 0 && (seen + count) as f64 >= rank {
            let lower = i.checked_sub(1).and_then(|j| bounds.get(j)).copied().unwrap_or(0) as f64;
            let Some(&upper) = bounds.get(i) else {
                return lower;
            };
            let into = ((rank - seen as f64) / count as f64).clamp(0.0, 1.0);
            return lower + (upper as f64 - lower) * into;
        }
        seen += count;
    }
    bounds.last().copied().unwrap_or(0) as f64
}

/// `GET /v1/stats`: everything the dashboard shows, cumulative since start (rates come from two
/// snapshots).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// `kiln <version>`.
    pub server: String,
    pub uptime_seconds: f64,
    pub gpus: Vec<GpuInfo>,
    pub models: Vec<ModelStats>,
    pub handlers: Vec<RouteStats>,
    pub tenants: Vec<RouteStats>,
    /// What the server process itself costs; absent from servers older than this field.
    #[serde(default)]
    pub process: ProcessStats,
    /// Handlers' response caches (those that have one).
    #[serde(default)]
    pub caches: Vec<CacheStats>,
    /// In cluster mode, this replica's name (what its request ids start with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// The server process's own cost, cumulative over its live threads (a thread that has exited
/// takes its counts with it, so compare two snapshots of a steady server).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessStats {
    /// CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Times a thread went to sleep waiting for something: each one is a wake-up later, the
    /// hand-offs a request pays for.
    pub voluntary_switches: u64,
    /// Times a thread was preempted while it had work.
    pub involuntary_switches: u64,
    pub threads: u64,
    /// Resident memory, in bytes.
    pub rss_bytes: u64,
    /// Heap allocations made by the server's Rust code (libtorch's tensors not included).
    #[serde(default)]
    pub allocations: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStats {
    pub name: String,
    /// `loading`, `ready` or `failed`.
    pub state: String,
    /// The configured choice: `auto`, `cpu`, `cuda:N` or a list.
    pub device: String,
    /// Whether an operator paused it (requests queue, no batch runs).
    #[serde(default)]
    pub paused: bool,
    pub instances: Bounds,
    pub replica_target: u32,
    pub replicas: Vec<ReplicaInfo>,
    pub max_batch_size: u32,
    pub latency_objective_ms: f64,
    /// Requests waiting now.
    pub queued: u64,
    /// Requests answered by a forward pass, and forward passes: their ratio is the average
    /// batch size.
    pub inferences: u64,
    pub executions: u64,
    pub rows: u64,
    pub dropped: u64,
    pub overloaded: u64,
    pub timeouts: u64,
    /// Merged forward passes that failed and were split to answer each caller on its own.
    #[serde(default)]
    pub isolated_batches: u64,
    /// Whether requests of different lengths share batches (false when the model was found at
    /// load not to mask padding).
    #[serde(default = "yes")]
    pub ragged_batching: bool,
    pub average_batch_size: f64,
    /// Forward passes per [`BATCH_BOUNDS`] bucket.
    pub batch_sizes: Vec<u64>,
    pub queue_wait: Histogram,
    pub forward: Histogram,
    /// Mean forward time by batch rows, learned while serving: what the scheduler weighs when
    /// it holds a partial batch for rows on their way.
    #[serde(default)]
    pub forward_curve: Vec<CurvePoint>,
    /// The precision it serves in, with `precision = "auto"`'s speed-up where it chose one
    /// (`bf16 2.9×`); `auto` while the search runs.
    #[serde(default)]
    pub precision: String,
}

/// One batch size of a model's learned forward curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub rows: u32,
    pub forward_ms: f64,
    pub samples: u64,
}

impl ModelStats {
    /// The measured batch size with the lowest forward time per row (among sizes seen at least
    /// three times), as `(rows, ms per row)`.
    pub fn best_batch(&self) -> Option<(u32, f64)> {
        self.forward_curve
            .iter()
            .filter(|p| p.samples >= 3 && p.rows > 0)
            .map(|p| (p.rows, p.forward_ms / f64::from(p.rows)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
}

/// One handler's response cache, as `/v1/stats` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    pub handler: String,
    pub hits: u64,
    pub misses: u64,
    pub stores: u64,
    pub evictions: u64,
    /// Entries and their body bytes now.
    pub entries: u64,
    pub bytes: u64,
}

/// Requests through one handler, or from one tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteStats {
    pub name: String,
    pub requests: u64,
    /// Answers of 500 and above.
    pub errors: u64,
    /// 429 answers: over a rate or concurrency quota.
    pub throttled: u64,
    pub latency: Histogram,
}

/// One entry of `GET /v1/events` (server-sent events; `data:` is this as JSON):
/// `{"seq": 3, "at_unix_ms": ..., "type": "scaling", "detail": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerEvent {
    /// Increasing from 1 since the server started; the SSE `id`.
    pub seq: u64,
    pub at_unix_ms: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "detail", rename_all = "snake_case")]
pub enum EventKind {
    Scaling(ScalingDecision),
    Deployed { handler: String, tenant: String, sha256: String },
    Undeployed { handler: String, tenant: String },
    ModelLoaded { model: String, replica: u32, device: String, elapsed_ms: u64 },
    ModelUnloaded { model: String, replica: u32, device: String },
    ModelFailed { model: String, replica: u32, device: String, reason: String },
    GuestTrap { handler: String, tenant: String, kind: String, message: String },
    /// The model repository changed: `change` is `loaded`, `replaced`, `unloaded`, `deleted`,
    /// `load_failed` (then `detail` says why) or `controlled` (paused, resumed, flushed, reset or
    /// tuned: `detail` says which).
    ModelChanged { model: String, change: String, detail: String },
    /// A model's worker process ended unasked (it crashed, was killed, ran a pass past its
    /// deadline or broke the protocol): `reason` says how. Its batch failed; the next one starts
    /// a new worker, not before `restart_in_ms`.
    WorkerExited { model: String, pid: u32, reason: String, restart_in_ms: u64 },
    /// A model's worker process started again after one ended; `restarts` counts them.
    WorkerRestarted { model: String, pid: u32, restarts: u32 },
    /// The server is shutting down: the last event of every stream.
    Draining { grace_ms: u64, timeout_ms: u64 },
    /// `precision = "auto"` chose a model's precision on a kind of device.
    PrecisionChosen(PrecisionChoice),
}

impl EventKind {
    /// The SSE `event:` name.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Scaling(_) => "scaling",
            EventKind::Deployed { .. } => "deployed",
            EventKind::Undeployed { .. } => "undeployed",
            EventKind::ModelLoaded { .. } => "model_loaded",
            EventKind::ModelUnloaded { .. } => "model_unloaded",
            EventKind::ModelFailed { .. } => "model_failed",
            EventKind::GuestTrap { .. } => "guest_trap",
            EventKind::ModelChanged { .. } => "model_changed",
            EventKind::WorkerExited { .. } => "worker_exited",
            EventKind::WorkerRestarted { .. } => "worker_restarted",
            EventKind::Draining { .. } => "draining",
            EventKind::PrecisionChosen(_) => "precision_chosen",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_round_trips_with_lowercase_actions() {
        let decision = ScalingDecision {
            at_unix_ms: 1,
            model: "m".into(),
            action: ScaleAction::Up,
            from: 1,
            to: 2,
            reason: "queue".into(),
            device: Some("cuda:0".into()),
            inputs: ScalingInputs {
                queue_depth: 3,
                requests: 10,
                queue_wait_p95_ms: 80.0,
                latency_objective_ms: 50.0,
                utilization: 0.9,
                gpus: vec![GpuBrief { device: "cuda:0".into(), utilization_percent: 50, memory_free_bytes: 1 }],
            },
        };
        let text = serde_json::to_string(&decision).expect("serialize");
        assert!(text.contains("\"action\":\"up\""), "{text}");
        let back: ScalingDecision = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, decision);
        let event = ServerEvent { seq: 1, at_unix_ms: 2, kind: EventKind::Scaling(decision) };
        let text = serde_json::to_string(&event).expect("serialize");
        assert!(text.contains("\"type\":\"scaling\",\"detail\":{\"at_unix_ms\":1,\"model\":\"m\""), "{text}");
        assert_eq!(serde_json::from_str::<ServerEvent>(&text).expect("deserialize"), event);
    }

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let mut counts = vec![0u64; LATENCY_BOUNDS_US.len() + 1];
        counts[6] = 90; // 500 us to 1 ms
        counts[12] = 10; // 50 to 100 ms
        let h = Histogram { counts, sum_us: 0 };
        assert!((0.5..=1.0).contains(&h.quantile_ms(0.5)), "{}", h.quantile_ms(0.5));
        assert!((50.0..=100.0).contains(&h.quantile_ms(0.95)), "{}", h.quantile_ms(0.95));
        assert_eq!(Histogram::default().quantile_ms(0.99), 0.0);
        let later = Histogram { counts: h.counts.iter().map(|c| c * 2).collect(), sum_us: 10 };
        assert_eq!(later.since(&h), h.clone().with_sum(10));
    }

    impl Histogram {
        fn with_sum(mut self, sum_us: u64) -> Histogram {
            self.sum_us = sum_us;
            self
        }
    }
}
