//! The deployment config: one TOML file with `[server]`, `[[model]]` and `[[handler]]`.
//!
//! The file is parsed raw (`deny_unknown_fields`) and then validated into the typed [`Config`]
//! the rest of Kiln uses. Every error names the file, the field and what is wrong with it.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::tensor::DType;

/// A validated deployment.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config was read from (or `<inline>`), for messages.
    pub source: PathBuf,
    pub server: ServerConfig,
    pub models: Vec<ModelConfig>,
    pub tenants: Vec<TenantConfig>,
    pub handlers: Vec<HandlerConfig>,
    pub scaler: ScalerConfig,
    pub gpus: GpuConfig,
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

/// Where the GPU inventory comes from (`[gpus]`).
#[derive(Debug, Clone, PartialEq)]
pub struct GpuConfig {
    pub poll_interval: Duration,
    /// When not empty, these stand in for NVML: for tests and demos of placement and scaling on
    /// machines without GPUs. Replicas placed on them run on the CPU.
    pub simulated: Vec<SimulatedGpuConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimulatedGpuConfig {
    pub name: String,
    pub memory_total_bytes: u64,
    /// Memory and utilization used by others over time, as steps from the server's start.
    pub script: Vec<SimulatedStep>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimulatedStep {
    pub at: Duration,
    pub memory_used_bytes: u64,
    pub utilization: u32,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Largest request body accepted on any route; larger ones get 413.
    pub max_body_bytes: usize,
    /// Sandbox slots in the pooling allocator: the most guest instances alive at once.
    pub max_instances: u32,
    /// The highest priority a direct OIP request may ask for with `kiln-priority`.
    pub oip_max_priority: u8,
    /// Where deployed handlers and API key hashes live.
    pub state_dir: PathBuf,
    /// The admin API's address (deploys, deletes, listing); loopback by default.
    pub admin_listen: SocketAddr,
    /// Largest component the admin API accepts.
    pub max_component_bytes: usize,
    /// After SIGTERM: how long new connections are still accepted while readiness says 503 (so
    /// load balancers stop sending first), and how long in-flight work has in all to finish.
    pub drain_grace: Duration,
    pub drain_timeout: Duration,
}

/// A tenant: who may call which handlers, see which models, and within what limits.
#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub name: String,
    /// The models this tenant's handlers (and its OIP calls) may use.
    pub models: Vec<String>,
    /// When set, every deployment for this tenant must carry an Ed25519 signature by this key.
    pub signing_key: Option<[u8; 32]>,
    pub quota: Quota,
}

/// A tenant's limits. Handlers may tighten the sandbox limits, never loosen them.
#[derive(Debug, Clone, PartialEq)]
pub struct Quota {
    /// Sustained request rate (token bucket refill); over it → 429 with `Retry-After`.
    pub requests_per_second: f64,
    /// Requests that may arrive at once above the sustained rate (bucket size).
    pub burst: u32,
    /// Requests in flight at once, response bodies and guests still running included; over it
    /// → 429.
    pub max_concurrent: u32,
    /// Sandboxes of the server's pool this tenant's guests may hold at once; over it → 429.
    pub max_instances: u32,
    pub max_body_bytes: usize,
    pub limits: SandboxLimits,
}

/// What one request's sandbox may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxLimits {
    pub memory_limit_bytes: u64,
    pub deadline: Duration,
    /// Wasm instructions (fuel units) per request; `None` is unmetered.
    pub fuel: Option<u64>,
    /// Input bytes one `compute` may pass, and bytes of tensors a request may hold at once.
    pub max_compute_bytes: u64,
    pub max_compute_calls: u32,
    /// The response body is cut off past this many bytes.
    pub max_response_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    pub path: PathBuf,
    /// Where replicas may go; the placer picks the device of each replica.
    pub device: DeviceChoice,
    pub inputs: Vec<InputSpec>,
    pub outputs: Vec<OutputSpec>,
    /// Forward passes run at load, before the model reports ready.
    pub warmup_runs: u32,
    pub batching: BatchPolicy,
    /// How many replicas (each a thread with its own copy of the module) the scaler may run.
    pub replicas: Replicas,
    /// The queue-wait p95 the scaler keeps this model under by adding replicas.
    pub latency_objective: Duration,
    /// GPU memory each replica needs beyond its weights (activations, workspace); a GPU must have
    /// weights + headroom free to take a replica.
    pub memory_headroom_bytes: u64,
    /// libtorch intra-op threads per instance. Small models run best on one: a thread pool's
    /// hand-offs cost more than their forward pass, and idle pool threads spin on cores the
    /// sandboxes need.
    pub threads: u32,
    /// Longest a request may wait for its result; a request may ask for less, never more.
    pub timeout: Duration,
    /// The floating-point type the model runs in. Floating inputs are cast to it and floating
    /// outputs back to FP32, so guests see the same dtypes whatever the precision.
    pub precision: Precision,
}

/// Floating-point precision of a model's weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Fp32,
    Fp16,
    Bf16,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        })
    }
}

/// How the scheduler merges concurrent requests for one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Most rows in one forward pass; 1 turns batching off.
    pub max_batch_size: u32,
    /// How long the oldest request may wait for a fuller batch, and only while another batch
    /// is running: an idle model never waits.
    pub max_queue_delay: Duration,
    /// Batch sizes the model runs best at, ascending; a batch is trimmed to the largest that fits.
    pub preferred_batch_sizes: Vec<u32>,
    /// Requests waiting beyond this are refused as overloaded.
    pub max_queue_size: u32,
    /// Most rows one request may carry (`max_rows`; `max_batch_size` by default), so no caller
    /// can make a forward pass of its own size.
    pub max_rows: u32,
}

/// Where one replica runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

/// A model's `device`: where its replicas may be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The GPU with the most free memory that fits, or the CPU where there is no GPU.
    Auto,
    Cpu,
    /// One of these GPUs, the one with the most free memory that fits.
    Gpus(Vec<usize>),
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Gpus(list) => {
                let names: Vec<String> = list.iter().map(|n| format!("cuda:{n}")).collect();
                f.write_str(&names.join(","))
            }
        }
    }
}

/// Bounds on a model's replica count. `min == max` is a fixed count the scaler leaves alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    pub min: u32,
    pub max: u32,
}

impl Replicas {
    pub fn fixed(n: u32) -> Replicas {
        Replicas { min: n, max: n }
    }

    pub fn scalable(&self) -> bool {
        self.max > self.min
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// One named `forward` argument, in declaration order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    pub name: String,
    pub dtype: DType,
    /// `None` marks a dynamic dimension (`-1` in the file).
    pub shape: Vec<Option<u32>>,
    /// A dynamic dimension that differs between requests of one batch: it is padded with
    /// `pad` to the longest in the batch.
    pub ragged: Option<Ragged>,
    /// The values the model can take (`min`/`max` in the file): anything else is refused before
    /// it is queued, so one caller's bad ids never reach a batch shared with others.
    pub range: Option<ValueRange>,
    /// Largest size of each dynamic dimension (`max_dims`, `-1` for no limit beyond the batch
    /// cap); fixed dimensions are checked exactly anyway. Same length as `shape`.
    pub max_dims: Vec<Option<u32>>,
}

impl InputSpec {
    /// An input with no value range and no dimension limits beyond its shape.
    pub fn new(name: &str, dtype: DType, shape: Vec<Option<u32>>, ragged: Option<Ragged>) -> InputSpec {
        let max_dims = vec![None; shape.len()];
        InputSpec {
            name: name.to_owned(),
            dtype,
            shape,
            ragged,
            range: None,
            max_dims,
        }
    }
}

/// Inclusive bounds on an input's values (either may be open).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueRange {
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl Eq for ValueRange {}

impl fmt::Display for ValueRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.min, self.max) {
            (Some(lo), Some(hi)) => write!(f, "{lo} ..= {hi}"),
            (Some(lo), None) => write!(f, ">= {lo}"),
            (None, Some(hi)) => write!(f, "<= {hi}"),
            (None, None) => f.write_str("any value"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ragged {
    pub dim: usize,
    pub pad: f64,
}

impl Eq for Ragged {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    pub name: String,
    /// The output dimension that follows the inputs' ragged dimension; it is cut back to each
    /// caller's own length.
    pub ragged_dim: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct HandlerConfig {
    pub name: String,
    /// The tenant that owns the handler: its key calls it, its quotas apply.
    pub tenant: String,
    pub component: PathBuf,
    /// The models this handler's guest may `load-by-name`; nothing else is visible to it.
    pub models: Vec<String>,
    pub limits: SandboxLimits,
    /// Scheduling priority of this handler's inference (higher runs first).
    pub priority: u8,
    /// The highest priority a request may ask for with the `kiln-priority` header.
    pub max_priority: u8,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";
pub const DEFAULT_STATE_DIR: &str = "state";
pub const DEFAULT_MAX_COMPONENT_BYTES: usize = 64 * 1024 * 1024;
pub const DEFAULT_REQUESTS_PER_SECOND: f64 = 1000.0;
pub const DEFAULT_MAX_CONCURRENT: u32 = 64;
pub const DEFAULT_MAX_COMPUTE_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_MAX_COMPUTE_CALLS: u32 = 64;
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
pub const DEFAULT_MAX_INSTANCES: u32 = 256;
pub const DEFAULT_MEMORY_LIMIT_MIB: u64 = 128;
pub const DEFAULT_DEADLINE_MS: u64 = 10_000;
pub const DEFAULT_WARMUP_RUNS: u32 = 2;
pub const DEFAULT_MAX_BATCH_SIZE: u32 = 32;
pub const DEFAULT_MAX_QUEUE_DELAY_US: u64 = 0;
pub const DEFAULT_MAX_QUEUE_SIZE: u32 = 1024;
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_LATENCY_OBJECTIVE_MS: u64 = 50;
pub const DEFAULT_MEMORY_HEADROOM_MIB: u64 = 512;
pub const DEFAULT_SCALER_INTERVAL_MS: u64 = 2_000;
pub const DEFAULT_UP_COOLDOWN_MS: u64 = 10_000;
pub const DEFAULT_DOWN_COOLDOWN_MS: u64 = 30_000;
pub const DEFAULT_MAX_GPU_UTILIZATION: u32 = 95;
pub const DEFAULT_SCALER_HISTORY: usize = 256;
pub const DEFAULT_GPU_POLL_MS: u64 = 1_000;
pub const DEFAULT_DRAIN_GRACE_MS: u64 = 5_000;
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 30_000;
/// Most replicas one model may have.
pub const MAX_REPLICAS: u32 = 64;
/// Priorities run from 0 (default) to this.
pub const MAX_PRIORITY: u8 = 9;

/// Everything that can be wrong with a config file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: PathBuf,
        field: String,
        message: String,
    },
}

// ---- raw form, exactly as written in the file -------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    model: Vec<RawModel>,
    #[serde(default)]
    tenant: Vec<RawTenant>,
    #[serde(default)]
    handler: Vec<RawHandler>,
    #[serde(default)]
    scaler: RawScaler,
    #[serde(default)]
    gpus: RawGpus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScaler {
    interval_ms: Option<u64>,
    up_cooldown_ms: Option<u64>,
    down_cooldown_ms: Option<u64>,
    max_gpu_utilization: Option<u32>,
    history: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpus {
    poll_interval_ms: Option<u64>,
    #[serde(default)]
    simulated: Vec<RawSimulatedGpu>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSimulatedGpu {
    name: Option<String>,
    memory_mib: u64,
    #[serde(default)]
    script: Vec<RawStep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    at_ms: u64,
    used_mib: Option<u64>,
    utilization: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    max_body_bytes: Option<u64>,
    max_instances: Option<u32>,
    oip_max_priority: Option<u8>,
    state_dir: Option<String>,
    admin_listen: Option<String>,
    max_component_bytes: Option<u64>,
    drain_grace_ms: Option<u64>,
    drain_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: String,
    #[serde(default)]
    models: Vec<String>,
    signing_key: Option<String>,
    #[serde(default)]
    quota: RawQuota,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    requests_per_second: Option<f64>,
    burst: Option<u32>,
    max_concurrent: Option<u32>,
    max_instances: Option<u32>,
    max_body_bytes: Option<u64>,
    memory_limit_mib: Option<u64>,
    deadline_ms: Option<u64>,
    fuel: Option<u64>,
    max_compute_bytes: Option<u64>,
    max_compute_calls: Option<u32>,
    max_response_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    path: String,
    /// `"auto"`, `"cpu"`, `"cuda:N"` or a list of `"cuda:N"`; checked by hand for clear errors.
    #[serde(default)]
    device: Option<toml::Value>,
    inputs: Vec<RawInput>,
    outputs: Vec<RawOutput>,
    warmup_runs: Option<u32>,
    #[serde(default)]
    batching: RawBatching,
    /// `N` or `{ min = A, max = B }`.
    instances: Option<toml::Value>,
    threads: Option<u32>,
    timeout_ms: Option<u64>,
    precision: Option<String>,
    latency_objective_ms: Option<u64>,
    memory_headroom_mib: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatching {
    max_batch_size: Option<u32>,
    max_queue_delay_us: Option<u64>,
    preferred_batch_sizes: Option<Vec<u32>>,
    max_queue_size: Option<u32>,
    max_rows: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    name: String,
    dtype: String,
    shape: Vec<i64>,
    ragged_dim: Option<usize>,
    pad: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
    max_dims: Option<Vec<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    name: String,
    ragged_dim: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandler {
    name: String,
    tenant: Option<String>,
    component: String,
    models: Option<Vec<String>>,
    memory_limit_mib: Option<u64>,
    deadline_ms: Option<u64>,
    priority: Option<u8>,
    max_priority: Option<u8>,
}

/// A handler's own settings, as written in a `[[handler]]` section or sent with a deployment.
/// Everything is optional: models default to all of the tenant's, limits to the tenant's quota.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_priority: Option<u8>,
}

impl Config {
    /// Reads and validates a config file. Relative paths inside it are relative to its folder.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        let base = file.parent().unwrap_or(Path::new("."));
        Config::parse(&text, file, base)
    }

    /// Validates config text; `file` is only used in messages, `base` resolves relative paths.
    pub fn parse(text: &str, file: &Path, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_path_buf(),
            message: parse_message(text, &e),
        })?;
        Validator { file, base }.config(raw)
    }

    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }
}

/// toml's own message spans several lines with a source excerpt; keep the place and the reason.
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let reason = e.message().trim();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {reason}")
        }
        None => reason.to_owned(),
    }
}

struct Validator<'a> {
    file: &'a Path,
    base: &'a Path,
}

impl Validator<'_> {
    fn invalid(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let server = self.server(raw.server)?;
        let models = raw
            .model
            .into_iter()
            .enumerate()
            .map(|(i, m)| self.model(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        self.unique("model", models.iter().map(|m| m.name.as_str()))?;
        let tenants = raw
            .tenant
            .into_iter()
            .enumerate()
            .map(|(i, t)| self.tenant(i, t, &models, server.max_instances))
            .collect::<Result<Vec<_>, _>>()?;
        self.unique("tenant", tenants.iter().map(|t| t.name.as_str()))?;
        let handlers = raw
            .handler
            .into_iter()
            .enumerate()
            .map(|(i, h)| self.handler(i, h, &tenants))
            .collect::<Result<Vec<_>, _>>()?;
        self.unique("handler", handlers.iter().map(|h| h.name.as_str()))?;
        let scaler = self.scaler(raw.scaler)?;
        let gpus = self.gpus(raw.gpus)?;
        Ok(Config {
            source: self.file.to_path_buf(),
            server,
            models,
            tenants,
            handlers,
            scaler,
            gpus,
        })
    }

    /// Fails on the first name that repeats an earlier one of the same kind.
    fn unique<'n>(&self, kind: &str, names: impl Iterator<Item = &'n str>) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        for (i, name) in names.enumerate() {
            if !seen.insert(name) {
                return Err(self.invalid(
                    format!("{kind}[{i}].name"),
                    format!("duplicate {kind} name '{name}'"),
                ));
            }
        }
        Ok(())
    }

    fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        let listen = raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen.parse().map_err(|_| {
            self.invalid(
                "server.listen",
                format!("'{listen}' is not an address like 127.0.0.1:8080"),
            )
        })?;
        let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES as u64);
        if max_body_bytes == 0 || max_body_bytes > 1 << 32 {
            return Err(self.invalid(
                "server.max_body_bytes",
                format!("{max_body_bytes} is out of range (1 ..= 4294967296)"),
            ));
        }
        let max_instances = raw.max_instances.unwrap_or(DEFAULT_MAX_INSTANCES);
        if !(1..=10_000).contains(&max_instances) {
            return Err(self.invalid(
                "server.max_instances",
                format!("{max_instances} is out of range (1 ..= 10000)"),
            ));
        }
        let oip_max_priority = raw.oip_max_priority.unwrap_or(0);
        self.priority("server.oip_max_priority", oip_max_priority)?;
        let admin_listen = raw.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
        let admin_listen = admin_listen.parse().map_err(|_| {
            self.invalid(
                "server.admin_listen",
                format!("'{admin_listen}' is not an address like 127.0.0.1:8081"),
            )
        })?;
        let state_dir = self.path(raw.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR));
        let max_component_bytes = raw
            .max_component_bytes
            .unwrap_or(DEFAULT_MAX_COMPONENT_BYTES as u64);
        if max_component_bytes == 0 || max_component_bytes > 1 << 30 {
            return Err(self.invalid(
                "server.max_component_bytes",
                format!("{max_component_bytes} is out of range (1 ..= 1073741824)"),
            ));
        }
        let drain_timeout_ms = raw.drain_timeout_ms.unwrap_or(DEFAULT_DRAIN_TIMEOUT_MS);
        if !(1..=3_600_000).contains(&drain_timeout_ms) {
            return Err(self.invalid(
                "server.drain_timeout_ms",
                format!("{drain_timeout_ms} is out of range (1 ..= 3600000)"),
            ));
        }
        let drain_grace_ms = raw.drain_grace_ms.unwrap_or(DEFAULT_DRAIN_GRACE_MS.min(drain_timeout_ms));
        if drain_grace_ms > drain_timeout_ms {
            return Err(self.invalid(
                "server.drain_grace_ms",
                format!("{drain_grace_ms} is over drain_timeout_ms ({drain_timeout_ms})"),
            ));
        }
        Ok(ServerConfig {
            listen,
            max_body_bytes: max_body_bytes as usize,
            max_instances,
            oip_max_priority,
            state_dir,
            admin_listen,
            max_component_bytes: max_component_bytes as usize,
            drain_grace: Duration::from_millis(drain_grace_ms),
            drain_timeout: Duration::from_millis(drain_timeout_ms),
        })
    }

    fn priority(&self, field: &str, p: u8) -> Result<(), ConfigError> {
        if p > MAX_PRIORITY {
            return Err(self.invalid(field, format!("{p} is out of range (0 ..= {MAX_PRIORITY})")));
        }
        Ok(())
    }

    fn name(&self, field: &str, name: &str) -> Result<(), ConfigError> {
        check_name(name).map_err(|m| self.invalid(field, m))
    }

    fn model(&self, i: usize, raw: RawModel) -> Result<ModelConfig, ConfigError> {
        let at = |f: &str| format!("model[{i}].{f}");
        self.name(&at("name"), &raw.name)?;
        let at = |f: &str| format!("model '{}'.{f}", raw.name);
        let device = self.device(&at("device"), raw.device.as_ref())?;
        if raw.inputs.is_empty() {
            return Err(self.invalid(at("inputs"), "a model needs at least one input"));
        }
        let mut inputs = Vec::with_capacity(raw.inputs.len());
        for (j, input) in raw.inputs.into_iter().enumerate() {
            let field = |f: &str| at(&format!("inputs[{j}].{f}"));
            if input.name.is_empty() {
                return Err(self.invalid(field("name"), "input name is empty"));
            }
            if inputs.iter().any(|s: &InputSpec| s.name == input.name) {
                return Err(self.invalid(
                    field("name"),
                    format!("duplicate input name '{}'", input.name),
                ));
            }
            let dtype = DType::from_wire_name(&input.dtype).ok_or_else(|| {
                self.invalid(
                    field("dtype"),
                    format!(
                        "unknown dtype '{}'; expected one of {}",
                        input.dtype,
                        DType::ALL.map(DType::wire_name).join(", ")
                    ),
                )
            })?;
            if input.shape.is_empty() || input.shape.len() > 8 {
                return Err(self.invalid(
                    field("shape"),
                    "a shape needs 1 to 8 dimensions (the first is the batch dimension)",
                ));
            }
            let mut shape = Vec::with_capacity(input.shape.len());
            for d in input.shape {
                shape.push(match d {
                    -1 => None,
                    1..=0xFFFF_FFFF => Some(d as u32),
                    _ => {
                        return Err(self.invalid(
                            field("shape"),
                            format!("dimension {d} is invalid; use a positive size or -1 for dynamic"),
                        ));
                    }
                });
            }
            let ragged = match (input.ragged_dim, input.pad) {
                (None, None) => None,
                (None, Some(_)) => {
                    return Err(self.invalid(field("pad"), "pad is only used with ragged_dim"));
                }
                (Some(dim), pad) => {
                    if dim == 0 || dim >= shape.len() || shape[dim].is_some() {
                        return Err(self.invalid(
                            field("ragged_dim"),
                            format!(
                                "{dim} must name a dynamic (-1) dimension other than the batch dimension 0"
                            ),
                        ));
                    }
                    Some(Ragged { dim, pad: pad.unwrap_or(0.0) })
                }
            };
            let range = match (input.min, input.max) {
                (None, None) => None,
                (min, max) => {
                    if min.into_iter().chain(max).any(|v| !v.is_finite()) {
                        return Err(self.invalid(field("min"), "min and max must be finite numbers"));
                    }
                    if let (Some(lo), Some(hi)) = (min, max)
                        && lo > hi
                    {
                        return Err(self.invalid(field("max"), format!("{hi} is below min {lo}")));
                    }
                    Some(ValueRange { min, max })
                }
            };
            let max_dims = match input.max_dims {
                None => vec![None; shape.len()],
                Some(dims) => {
                    if dims.len() != shape.len() {
                        return Err(self.invalid(
                            field("max_dims"),
                            format!("has {} dimensions but shape has {}", dims.len(), shape.len()),
                        ));
                    }
                    let mut limits = Vec::with_capacity(dims.len());
                    for (axis, d) in dims.into_iter().enumerate() {
                        limits.push(match d {
                            -1 => None,
                            1..=0xFFFF_FFFF if shape[axis].is_none() => Some(d as u32),
                            1..=0xFFFF_FFFF => {
                                return Err(self.invalid(
                                    field("max_dims"),
                                    format!("dimension {axis} is fixed by shape; use -1 there"),
                                ));
                            }
                            _ => {
                                return Err(self.invalid(
                                    field("max_dims"),
                                    format!("{d} is invalid; use a positive size or -1 for no limit"),
                                ));
                            }
                        });
                    }
                    limits
                }
            };
            inputs.push(InputSpec {
                name: input.name,
                dtype,
                shape,
                ragged,
                range,
                max_dims,
            });
        }
        if raw.outputs.is_empty() {
            return Err(self.invalid(at("outputs"), "a model needs at least one output"));
        }
        let mut outputs: Vec<OutputSpec> = Vec::with_capacity(raw.outputs.len());
        for (j, output) in raw.outputs.into_iter().enumerate() {
            if output.name.is_empty() || outputs.iter().any(|o| o.name == output.name) {
                return Err(self.invalid(
                    at(&format!("outputs[{j}].name")),
                    format!("output name '{}' is empty or repeated", output.name),
                ));
            }
            if output.ragged_dim.is_some() && !inputs.iter().any(|i| i.ragged.is_some()) {
                return Err(self.invalid(
                    at(&format!("outputs[{j}].ragged_dim")),
                    "no input declares a ragged_dim to follow",
                ));
            }
            if output.ragged_dim == Some(0) {
                return Err(self.invalid(
                    at(&format!("outputs[{j}].ragged_dim")),
                    "0 is the batch dimension",
                ));
            }
            outputs.push(OutputSpec {
                name: output.name,
                ragged_dim: output.ragged_dim,
            });
        }
        let warmup_runs = raw.warmup_runs.unwrap_or(DEFAULT_WARMUP_RUNS);
        if warmup_runs > 100 {
            return Err(self.invalid(at("warmup_runs"), format!("{warmup_runs} is over 100")));
        }
        let batching = self.batching(&at("batching"), raw.batching)?;
        let replicas = self.replicas(&at("instances"), raw.instances.as_ref())?;
        let objective_ms = raw.latency_objective_ms.unwrap_or(DEFAULT_LATENCY_OBJECTIVE_MS);
        if !(1..=3_600_000).contains(&objective_ms) {
            return Err(self.invalid(
                at("latency_objective_ms"),
                format!("{objective_ms} is out of range (1 ..= 3600000)"),
            ));
        }
        let headroom_mib = raw.memory_headroom_mib.unwrap_or(DEFAULT_MEMORY_HEADROOM_MIB);
        if headroom_mib > 1 << 24 {
            return Err(self.invalid(at("memory_headroom_mib"), format!("{headroom_mib} is over 16 TiB")));
        }
        let threads = raw.threads.unwrap_or(1);
        if !(1..=256).contains(&threads) {
            return Err(self.invalid(at("threads"), format!("{threads} is out of range (1 ..= 256)")));
        }
        let timeout_ms = raw.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
        if !(1..=3_600_000).contains(&timeout_ms) {
            return Err(self.invalid(
                at("timeout_ms"),
                format!("{timeout_ms} is out of range (1 ..= 3600000)"),
            ));
        }
        let precision = match raw.precision.as_deref() {
            None | Some("fp32") => Precision::Fp32,
            Some("fp16") => Precision::Fp16,
            Some("bf16") => Precision::Bf16,
            Some(other) => {
                return Err(self.invalid(
                    at("precision"),
                    format!("'{other}' is not a precision; use \"fp32\", \"fp16\" or \"bf16\""),
                ));
            }
        };
        Ok(ModelConfig {
            precision,
            path: self.path(&raw.path),
            name: raw.name,
            device,
            inputs,
            outputs,
            warmup_runs,
            batching,
            replicas,
            threads,
            timeout: Duration::from_millis(timeout_ms),
            latency_objective: Duration::from_millis(objective_ms),
            memory_headroom_bytes: headroom_mib << 20,
        })
    }

    fn device(&self, field: &str, raw: Option<&toml::Value>) -> Result<DeviceChoice, ConfigError> {
        let usage = "use \"auto\", \"cpu\", \"cuda:N\" or a list like [\"cuda:0\", \"cuda:1\"]";
        let gpu = |text: &str| -> Result<usize, ConfigError> {
            match text.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) if n < 64 => Ok(n),
                _ => Err(self.invalid(field, format!("'{text}' is not a device; {usage}"))),
            }
        };
        match raw {
            None => Ok(DeviceChoice::Auto),
            Some(toml::Value::String(s)) => match s.as_str() {
                "auto" => Ok(DeviceChoice::Auto),
                "cpu" => Ok(DeviceChoice::Cpu),
                other => Ok(DeviceChoice::Gpus(vec![gpu(other)?])),
            },
            Some(toml::Value::Array(items)) => {
                let mut list = Vec::with_capacity(items.len());
                for item in items {
                    let Some(text) = item.as_str() else {
                        return Err(self.invalid(field, format!("{item} is not a device name; {usage}")));
                    };
                    let n = gpu(text)?;
                    if list.contains(&n) {
                        return Err(self.invalid(field, format!("cuda:{n} is listed twice")));
                    }
                    list.push(n);
                }
                if list.is_empty() {
                    return Err(self.invalid(field, format!("the list is empty; {usage}")));
                }
                Ok(DeviceChoice::Gpus(list))
            }
            Some(other) => Err(self.invalid(field, format!("{other} is not a device; {usage}"))),
        }
    }

    fn replicas(&self, field: &str, raw: Option<&toml::Value>) -> Result<Replicas, ConfigError> {
        let usage = "use a count like 2 or bounds like { min = 1, max = 4 }";
        let count = |name: &str, v: Option<&toml::Value>| -> Result<u32, ConfigError> {
            match v.and_then(toml::Value::as_integer) {
                Some(n) if (1..=i64::from(MAX_REPLICAS)).contains(&n) => Ok(n as u32),
                Some(n) => Err(self.invalid(
                    field,
                    format!("{name}{n} is out of range (1 ..= {MAX_REPLICAS})"),
                )),
                None => Err(self.invalid(field, format!("{name}must be a whole number; {usage}"))),
            }
        };
        match raw {
            None => Ok(Replicas::fixed(1)),
            Some(v @ toml::Value::Integer(_)) => Ok(Replicas::fixed(count("", Some(v))?)),
            Some(toml::Value::Table(t)) => {
                if let Some(unknown) = t.keys().find(|k| *k != "min" && *k != "max") {
                    return Err(self.invalid(field, format!("unknown key '{unknown}'; {usage}")));
                }
                let min = match t.get("min") {
                    None => 1,
                    v => count("min ", v)?,
                };
                let max = count("max ", t.get("max"))?;
                if min > max {
                    return Err(self.invalid(field, format!("min {min} is over max {max}")));
                }
                Ok(Replicas { min, max })
            }
            Some(other) => Err(self.invalid(field, format!("{other} is not a replica count; {usage}"))),
        }
    }

    fn scaler(&self, raw: RawScaler) -> Result<ScalerConfig, ConfigError> {
        let ms = |f: &str, v: Option<u64>, default: u64, lo: u64| -> Result<Duration, ConfigError> {
            let v = v.unwrap_or(default);
            if (lo..=86_400_000).contains(&v) {
                Ok(Duration::from_millis(v))
            } else {
                Err(self.invalid(format!("scaler.{f}"), format!("{v} is out of range ({lo} ..= 86400000)")))
            }
        };
        let interval = ms("interval_ms", raw.interval_ms, DEFAULT_SCALER_INTERVAL_MS, 10)?;
        let up_cooldown = ms("up_cooldown_ms", raw.up_cooldown_ms, DEFAULT_UP_COOLDOWN_MS, 0)?;
        let down_cooldown = ms("down_cooldown_ms", raw.down_cooldown_ms, DEFAULT_DOWN_COOLDOWN_MS, 0)?;
        let max_gpu_utilization = raw.max_gpu_utilization.unwrap_or(DEFAULT_MAX_GPU_UTILIZATION);
        if !(1..=100).contains(&max_gpu_utilization) {
            return Err(self.invalid(
                "scaler.max_gpu_utilization",
                format!("{max_gpu_utilization} is out of range (1 ..= 100)"),
            ));
        }
        let history = raw.history.unwrap_or(DEFAULT_SCALER_HISTORY);
        if !(1..=100_000).contains(&history) {
            return Err(self.invalid("scaler.history", format!("{history} is out of range (1 ..= 100000)")));
        }
        Ok(ScalerConfig { interval, up_cooldown, down_cooldown, max_gpu_utilization, history })
    }

    fn gpus(&self, raw: RawGpus) -> Result<GpuConfig, ConfigError> {
        let poll = raw.poll_interval_ms.unwrap_or(DEFAULT_GPU_POLL_MS);
        if !(10..=60_000).contains(&poll) {
            return Err(self.invalid("gpus.poll_interval_ms", format!("{poll} is out of range (10 ..= 60000)")));
        }
        let mut simulated = Vec::with_capacity(raw.simulated.len());
        for (i, gpu) in raw.simulated.into_iter().enumerate() {
            let at = |f: &str| format!("gpus.simulated[{i}].{f}");
            if !(1..=1 << 24).contains(&gpu.memory_mib) {
                return Err(self.invalid(at("memory_mib"), format!("{} is out of range (1 ..= 16777216)", gpu.memory_mib)));
            }
            let mut script = Vec::with_capacity(gpu.script.len());
            for (j, step) in gpu.script.into_iter().enumerate() {
                let used = step.used_mib.unwrap_or(0);
                if used > gpu.memory_mib {
                    return Err(self.invalid(
                        at(&format!("script[{j}].used_mib")),
                        format!("{used} is over the GPU's memory_mib ({})", gpu.memory_mib),
                    ));
                }
                let utilization = step.utilization.unwrap_or(0);
                if utilization > 100 {
                    return Err(self.invalid(at(&format!("script[{j}].utilization")), format!("{utilization} is over 100")));
                }
                if script.last().is_some_and(|s: &SimulatedStep| s.at > Duration::from_millis(step.at_ms)) {
                    return Err(self.invalid(at(&format!("script[{j}].at_ms")), "steps must be in time order"));
                }
                script.push(SimulatedStep {
                    at: Duration::from_millis(step.at_ms),
                    memory_used_bytes: used << 20,
                    utilization,
                });
            }
            simulated.push(SimulatedGpuConfig {
                name: gpu.name.unwrap_or_else(|| "Simulated GPU".to_owned()),
                memory_total_bytes: gpu.memory_mib << 20,
                script,
            });
        }
        Ok(GpuConfig { poll_interval: Duration::from_millis(poll), simulated })
    }

    fn batching(&self, at: &str, raw: RawBatching) -> Result<BatchPolicy, ConfigError> {
        let field = |f: &str| format!("{at}.{f}");
        let max_batch_size = raw.max_batch_size.unwrap_or(DEFAULT_MAX_BATCH_SIZE).max(1);
        if max_batch_size > 4096 {
            return Err(self.invalid(field("max_batch_size"), format!("{max_batch_size} is over 4096")));
        }
        let delay = raw.max_queue_delay_us.unwrap_or(DEFAULT_MAX_QUEUE_DELAY_US);
        if delay > 10_000_000 {
            return Err(self.invalid(field("max_queue_delay_us"), format!("{delay} is over 10 s")));
        }
        let mut preferred = raw.preferred_batch_sizes.unwrap_or_default();
        preferred.sort_unstable();
        preferred.dedup();
        if let Some(bad) = preferred.iter().find(|&&p| p == 0 || p > max_batch_size) {
            return Err(self.invalid(
                field("preferred_batch_sizes"),
                format!("{bad} is not between 1 and max_batch_size ({max_batch_size})"),
            ));
        }
        let max_queue_size = raw.max_queue_size.unwrap_or(DEFAULT_MAX_QUEUE_SIZE);
        if max_queue_size == 0 {
            return Err(self.invalid(field("max_queue_size"), "must be at least 1"));
        }
        let max_rows = raw.max_rows.unwrap_or(max_batch_size);
        if !(1..=65_536).contains(&max_rows) {
            return Err(self.invalid(field("max_rows"), format!("{max_rows} is out of range (1 ..= 65536)")));
        }
        Ok(BatchPolicy {
            max_rows,
            max_batch_size,
            max_queue_delay: Duration::from_micros(delay),
            preferred_batch_sizes: preferred,
            max_queue_size,
        })
    }

    fn tenant(
        &self,
        i: usize,
        raw: RawTenant,
        models: &[ModelConfig],
        pool: u32,
    ) -> Result<TenantConfig, ConfigError> {
        self.name(&format!("tenant[{i}].name"), &raw.name)?;
        let at = |f: &str| format!("tenant '{}'.{f}", raw.name);
        for m in &raw.models {
            if !models.iter().any(|known| &known.name == m) {
                return Err(self.invalid(
                    at("models"),
                    format!("model '{m}' is not declared in any [[model]] section"),
                ));
            }
        }
        let signing_key = match &raw.signing_key {
            None => None,
            Some(text) => Some(parse_public_key(text).map_err(|m| self.invalid(at("signing_key"), m))?),
        };
        let quota = self.quota(&at("quota"), raw.quota, pool)?;
        Ok(TenantConfig {
            name: raw.name,
            models: raw.models,
            signing_key,
            quota,
        })
    }

    /// `pool` is the server's `max_instances`, which a tenant's sandbox share is a part of.
    fn quota(&self, at: &str, raw: RawQuota, pool: u32) -> Result<Quota, ConfigError> {
        let field = |f: &str| format!("{at}.{f}");
        let range = |f: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err(self.invalid(field(f), format!("{v} is out of range ({lo} ..= {hi})")))
            }
        };
        let rps = raw.requests_per_second.unwrap_or(DEFAULT_REQUESTS_PER_SECOND);
        if !(rps.is_finite() && rps > 0.0 && rps <= 1e7) {
            return Err(self.invalid(
                field("requests_per_second"),
                format!("{rps} is out of range (above 0, up to 10000000)"),
            ));
        }
        // A bucket of one second's worth of requests, and never less than one request.
        let default_burst = rps.ceil().max(1.0) as u64;
        let burst = range("burst", raw.burst.map_or(default_burst, u64::from), 1, 10_000_000)?;
        let max_concurrent = range(
            "max_concurrent",
            raw.max_concurrent.map_or(u64::from(DEFAULT_MAX_CONCURRENT), u64::from),
            1,
            100_000,
        )?;
        // Half the pool by default: however many sandboxes one tenant keeps busy, every other
        // tenant still finds slots.
        let max_instances = range(
            "max_instances",
            raw.max_instances.map_or(u64::from(pool.div_ceil(2)), u64::from),
            1,
            u64::from(pool),
        )?;
        let max_body_bytes = range(
            "max_body_bytes",
            raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES as u64),
            1,
            1 << 32,
        )?;
        let mib = range("memory_limit_mib", raw.memory_limit_mib.unwrap_or(DEFAULT_MEMORY_LIMIT_MIB), 1, 4096)?;
        let ms = range("deadline_ms", raw.deadline_ms.unwrap_or(DEFAULT_DEADLINE_MS), 1, 3_600_000)?;
        let fuel = match raw.fuel {
            None => None,
            Some(f) => Some(range("fuel", f, 1, u64::MAX >> 1)?),
        };
        let max_compute_bytes = range(
            "max_compute_bytes",
            raw.max_compute_bytes.unwrap_or(DEFAULT_MAX_COMPUTE_BYTES),
            1,
            1 << 34,
        )?;
        let max_compute_calls = range(
            "max_compute_calls",
            raw.max_compute_calls.map_or(u64::from(DEFAULT_MAX_COMPUTE_CALLS), u64::from),
            1,
            1_000_000,
        )?;
        let max_response_bytes = range(
            "max_response_bytes",
            raw.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES),
            1,
            1 << 40,
        )?;
        Ok(Quota {
            requests_per_second: rps,
            burst: burst as u32,
            max_concurrent: max_concurrent as u32,
            max_instances: max_instances as u32,
            max_body_bytes: max_body_bytes as usize,
            limits: SandboxLimits {
                memory_limit_bytes: mib << 20,
                deadline: Duration::from_millis(ms),
                fuel,
                max_compute_bytes,
                max_compute_calls: max_compute_calls as u32,
                max_response_bytes,
            },
        })
    }

    fn handler(
        &self,
        i: usize,
        raw: RawHandler,
        tenants: &[TenantConfig],
    ) -> Result<HandlerConfig, ConfigError> {
        self.name(&format!("handler[{i}].name"), &raw.name)?;
        let at = |f: &str| format!("handler '{}'.{f}", raw.name);
        let Some(tenant_name) = &raw.tenant else {
            return Err(self.invalid(
                at("tenant"),
                "missing: every handler belongs to a [[tenant]] (its key calls it, its quotas apply)",
            ));
        };
        let tenant = tenants.iter().find(|t| &t.name == tenant_name).ok_or_else(|| {
            self.invalid(
                at("tenant"),
                format!("tenant '{tenant_name}' is not declared in any [[tenant]] section"),
            )
        })?;
        let settings = HandlerSettings {
            models: raw.models,
            memory_limit_mib: raw.memory_limit_mib,
            deadline_ms: raw.deadline_ms,
            priority: raw.priority,
            max_priority: raw.max_priority,
        };
        settings
            .resolve(&raw.name, tenant, self.path(&raw.component))
            .map_err(|(f, message)| self.invalid(at(f), message))
    }
}

impl HandlerSettings {
    /// The text a signature over this deployment covers (see [`crate::keys::deployment_manifest`]).
    pub fn signed_manifest(&self, handler: &str, tenant: &str, sha256: &str) -> String {
        crate::keys::deployment_manifest(handler, tenant, sha256, self.models.as_deref(), self.priority, self.max_priority)
    }

    /// The handler these settings describe for `tenant`: models must be among the tenant's, and
    /// limits may only tighten the tenant's quota. An error names the offending field.
    pub fn resolve(
        &self,
        name: &str,
        tenant: &TenantConfig,
        component: PathBuf,
    ) -> Result<HandlerConfig, (&'static str, String)> {
        let models = match &self.models {
            None => tenant.models.clone(),
            Some(models) => {
                if let Some(m) = models.iter().find(|m| !tenant.models.contains(m)) {
                    return Err((
                        "models",
                        format!("model '{m}' is not among the models of tenant '{}'", tenant.name),
                    ));
                }
                models.clone()
            }
        };
        let quota = &tenant.quota.limits;
        let mut limits = quota.clone();
        if let Some(mib) = self.memory_limit_mib {
            if mib == 0 || mib > quota.memory_limit_bytes >> 20 {
                return Err((
                    "memory_limit_mib",
                    format!(
                        "{mib} is out of range (1 ..= {}, the quota of tenant '{}')",
                        quota.memory_limit_bytes >> 20,
                        tenant.name
                    ),
                ));
            }
            limits.memory_limit_bytes = mib << 20;
        }
        if let Some(ms) = self.deadline_ms {
            let most = quota.deadline.as_millis() as u64;
            if ms == 0 || ms > most {
                return Err((
                    "deadline_ms",
                    format!("{ms} is out of range (1 ..= {most}, the quota of tenant '{}')", tenant.name),
                ));
            }
            limits.deadline = Duration::from_millis(ms);
        }
        let priority = self.priority.unwrap_or(0);
        if priority > MAX_PRIORITY {
            return Err(("priority", format!("{priority} is out of range (0 ..= {MAX_PRIORITY})")));
        }
        let max_priority = self.max_priority.unwrap_or(priority);
        if max_priority > MAX_PRIORITY || max_priority < priority {
            return Err((
                "max_priority",
                format!("{max_priority} is out of range ({priority} ..= {MAX_PRIORITY})"),
            ));
        }
        Ok(HandlerConfig {
            name: name.to_owned(),
            tenant: tenant.name.clone(),
            component,
            models,
            limits,
            priority,
            max_priority,
        })
    }
}

/// An Ed25519 public key as written in config: 32 bytes, base64 (standard or URL-safe).
pub fn parse_public_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = crate::keys::decode_base64(text.trim())
        .ok_or_else(|| "not base64 (expected the public key `kiln keygen` prints)".to_owned())?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        format!("the key is {} bytes; an Ed25519 public key is 32 bytes", bytes.len())
    })
}

impl Config {
    pub fn tenant(&self, name: &str) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| t.name == name)
    }
}

/// Checks a handler or tenant name from outside the config (the admin API, the CLI).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a valid name (1-64 of a-z A-Z 0-9 - _ ., not starting with '.')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden files: each `tests/config-errors/NAME.toml` must fail with exactly `NAME.err`.
    /// Run with `KILN_BLESS=1` to rewrite the `.err` files after an intended change.
    #[test]
    fn invalid_configs_fail_with_their_golden_messages() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config-errors");
        let bless = std::env::var_os("KILN_BLESS").is_some();
        let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("golden dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        cases.sort();
        assert!(cases.len() >= 10, "expected the golden cases in {}", dir.display());
        let mut failures = Vec::new();
        for case in cases {
            let text = std::fs::read_to_string(&case).expect("case");
            let name = case.file_name().expect("name");
            let err = match Config::parse(&text, Path::new(name), Path::new("/srv")) {
                Ok(_) => "(no error)\n".to_string(),
                Err(e) => format!("{e}\n"),
            };
            let golden = case.with_extension("err");
            if bless {
                std::fs::write(&golden, &err).expect("bless");
                continue;
            }
            let expected = std::fs::read_to_string(&golden).unwrap_or_default();
            if expected != err {
                failures.push(format!("{}:\n  expected: {expected}  got:      {err}", case.display()));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn defaults_fill_what_the_file_leaves_out() {
        let text = r#"
            [[model]]
            name = "m"
            path = "m.pt"
            inputs = [{ name = "x", dtype = "FP32", shape = [-1, 3] }]
            outputs = [{ name = "y" }]

            [[tenant]]
            name = "t"
            models = ["m"]

            [[handler]]
            name = "h"
            tenant = "t"
            component = "/abs/h.wasm"
        "#;
        let config = Config::parse(text, Path::new("t.toml"), Path::new("/srv")).expect("valid");
        assert_eq!(config.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.server.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        let model = &config.models[0];
        assert_eq!(model.path, Path::new("/srv/m.pt"));
        assert_eq!(model.device, DeviceChoice::Auto);
        assert_eq!(model.replicas, Replicas::fixed(1));
        assert_eq!(model.inputs[0].shape, vec![None, Some(3)]);
        assert_eq!(config.scaler.interval, Duration::from_millis(DEFAULT_SCALER_INTERVAL_MS));
        assert!(config.gpus.simulated.is_empty());
        let handler = &config.handlers[0];
        assert_eq!(handler.component, Path::new("/abs/h.wasm"));
        assert_eq!(handler.models, vec!["m".to_owned()]);
        assert_eq!(handler.limits.memory_limit_bytes, DEFAULT_MEMORY_LIMIT_MIB << 20);
        assert_eq!(handler.limits.deadline, Duration::from_millis(DEFAULT_DEADLINE_MS));
        assert_eq!(handler.limits.fuel, None);
        let quota = &config.tenants[0].quota;
        assert_eq!(quota.requests_per_second, DEFAULT_REQUESTS_PER_SECOND);
        assert_eq!(quota.burst, DEFAULT_REQUESTS_PER_SECOND as u32);
        assert_eq!(quota.max_concurrent, DEFAULT_MAX_CONCURRENT);
        assert_eq!(config.server.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
        assert_eq!(config.server.state_dir, Path::new("/srv/state"));
    }

    #[test]
    fn devices_and_replica_bounds_take_every_documented_form() {
        let parse = |device: &str, instances: &str| {
            let text = format!(
                "[[model]]\nname = \"m\"\npath = \"m.pt\"\ndevice = {device}\ninstances = {instances}\n\
                 inputs = [{{ name = \"x\", dtype = \"FP32\", shape = [-1] }}]\noutputs = [{{ name = \"y\" }}]\n"
            );
            let config = Config::parse(&text, Path::new("t.toml"), Path::new("/srv")).expect("valid");
            (config.models[0].device.clone(), config.models[0].replicas)
        };
        assert_eq!(parse("\"auto\"", "2"), (DeviceChoice::Auto, Replicas::fixed(2)));
        assert_eq!(parse("\"cpu\"", "{ max = 3 }"), (DeviceChoice::Cpu, Replicas { min: 1, max: 3 }));
        assert_eq!(parse("\"cuda:1\"", "{ min = 2, max = 4 }").0, DeviceChoice::Gpus(vec![1]));
        assert_eq!(parse("[\"cuda:1\", \"cuda:0\"]", "1").0, DeviceChoice::Gpus(vec![1, 0]));
        assert!(parse("\"cpu\"", "{ min = 2, max = 4 }").1.scalable());
        assert!(!parse("\"cpu\"", "4").1.scalable());
    }

    #[test]
    fn the_bundled_examples_config_is_valid() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kiln.toml");
        let config = Config::load(&file).expect("examples/kiln.toml");
        assert_eq!(config.models.len(), 2);
        assert_eq!(config.handlers.len(), 2);
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert!(config.handlers.iter().all(|h| config.tenant(&h.tenant).is_some()));
    }
}
