//! A model as configured: its file, signature, batching, replicas and precision.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::model::signature::{InputSpec, OutputSpec};

pub mod parse;

#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The name it is served and reported under: the model's name, or `NAME@VERSION` for each
    /// version of a model whose definition lists `versions`.
    pub name: String,
    /// Its version number (1 for a model defined without versions).
    pub version: u64,
    /// The TorchScript file. For a remote `source`, the cache's copy once fetched (empty before).
    pub path: PathBuf,
    /// Where the file comes from when it is not local, as written: `https://…` or `hf://…`.
    pub source: Option<String>,
    /// The file's SHA-256 (lower-case hex), checked before it loads; remote sources need one.
    pub sha256: Option<String>,
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
    /// Whether 4-D floating weights and inputs (convolutions' and images') lie channels-last in
    /// memory, which oneDNN's and cuDNN's convolutions run faster on.
    pub channels_last: bool,
    /// Set by `precision = "auto"`: how the first replica to load picks `precision` and
    /// `channels_last` by measuring ([`crate::model::precision`]); until it has, FP32.
    pub auto_precision: Option<AutoPrecision>,
    /// Runs each replica's module in a confined worker process instead of in the server
    /// ([`crate::model::backend::worker`]): what a tenant's own model always does, and an
    /// operator's does when its config says `worker = true`.
    pub worker: bool,
}

impl ModelConfig {
    /// One replica's weights estimated from its file's size, before any has loaded: the file,
    /// halved in a reduced precision's weights.
    pub fn weights_of_file(&self, file_bytes: u64) -> u64 {
        match self.precision {
            Precision::Fp32 | Precision::Bf16Autocast => file_bytes,
            Precision::Fp16 | Precision::Bf16 => file_bytes / 2,
        }
    }

    /// What its replicas load as.
    pub fn form(&self) -> Form {
        Form { precision: self.precision, channels_last: self.channels_last }
    }

    /// This config with replicas loading as `form`.
    pub fn with_form(&self, form: Form) -> ModelConfig {
        ModelConfig { precision: form.precision, channels_last: form.channels_last, ..self.clone() }
    }

    /// Whether an input is a batch of images: what a channels-last layout is for.
    pub fn takes_images(&self) -> bool {
        takes_images(&self.inputs)
    }

    /// Whether the model runs in worker processes: asked for, or a tenant's own.
    pub fn in_worker(&self) -> bool {
        self.worker || self.key().contains(OWNER_SEPARATOR)
    }
}

/// Whether `name` is a valid name for a model, handler or tenant: 1-64 of `a-z A-Z 0-9 - _ .`,
/// not starting with `.` (so never a path, `..`, a NUL, nor a temporary file's name).
pub fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.')
}

/// Splits a model name as guests and callers write it, `NAME` or `NAME@VERSION`, into the name
/// and the version asked for; `None` if it is neither.
pub fn split_version(name: &str) -> Option<(&str, Option<u64>)> {
    match name.split_once('@') {
        None => Some((name, None)),
        Some((base, version)) => {
            let digits = !version.is_empty() && version.len() <= 19 && version.bytes().all(|b| b.is_ascii_digit());
            let number = if digits { version.parse::<u64>().ok().filter(|v| *v > 0) } else { None };
            number.map(|v| (base, Some(v)))
        }
    }
}

/// The name one version of a versioned model is served and reported under.
pub fn versioned_name(name: &str, version: u64) -> String {
    format!("{name}@{version}")
}

impl ModelConfig {
    /// The model's name as its users know it: without the version a versioned model's name
    /// carries, nor the owner a tenant's own model's carries.
    pub fn model_name(&self) -> &str {
        let key = self.key();
        key.split_once(OWNER_SEPARATOR).map_or(key, |(_, name)| name)
    }

    /// The tenant that owns it, for a tenant's own model.
    pub fn owner(&self) -> Option<&str> {
        self.key().split_once(OWNER_SEPARATOR).map(|(owner, _)| owner)
    }

    /// The name the model table keeps it under: `NAME`, or `TENANT:NAME` for a tenant's own.
    pub fn key(&self) -> &str {
        self.name.split_once('@').map_or(self.name.as_str(), |(name, _)| name)
    }
}

/// Between a tenant's name and the name of a model it owns, in the model table's keys. Names
/// cannot hold it, so a tenant's `m` never meets another's, nor the operator's.
pub const OWNER_SEPARATOR: char = ':';

/// The model table's key for tenant `owner`'s own model `name`.
pub fn owned_key(owner: &str, name: &str) -> String {
    format!("{owner}{OWNER_SEPARATOR}{name}")
}

/// Floating-point precision of a model's weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    #[default]
    Fp32,
    Fp16,
    Bf16,
    /// FP32 weights, with libtorch's autocast running the ops that gain from it (matrix
    /// products, convolutions) in bf16 on copies of their weights made for the pass; other ops
    /// run in their inputs' type. Slower than bf16 weights, as every pass casts the weights
    /// again, but weights that no matrix product uses (embeddings, norms) stay FP32, and it
    /// needs no parameters to cast, so frozen modules take it too. A pass holds the bf16
    /// copies beside the FP32 weights: up to half as much again, within the headroom.
    Bf16Autocast,
}

impl Precision {
    /// Every precision, by its name in a config.
    pub const ALL: [Precision; 4] = [Precision::Fp32, Precision::Fp16, Precision::Bf16, Precision::Bf16Autocast];
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(name: &str) -> Result<Precision, String> {
        Precision::ALL.into_iter().find(|p| p.to_string() == name).ok_or_else(|| {
            format!("'{name}' is not a precision; use \"fp32\", \"fp16\", \"bf16\", \"bf16-autocast\" or \"auto\"")
        })
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
            Precision::Bf16Autocast => "bf16-autocast",
        })
    }
}

/// Whether any of `inputs` is a batch of images (floating, 4-D).
pub fn takes_images(inputs: &[InputSpec]) -> bool {
    inputs.iter().any(|i| i.shape.len() == 4 && i.dtype.is_float())
}

/// What a model's replicas run as: a precision, and the layout of its 4-D tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Form {
    pub precision: Precision,
    pub channels_last: bool,
}

impl Form {
    pub const fn new(precision: Precision) -> Form {
        Form { precision, channels_last: false }
    }

    pub const fn channels_last(precision: Precision) -> Form {
        Form { precision, channels_last: true }
    }
}

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.precision, if self.channels_last { " channels-last" } else { "" })
    }
}

/// What `precision = "auto"` measures by.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoPrecision {
    /// Every output's bounds, unless it has its own.
    pub tolerance: Tolerance,
    /// Outputs with bounds of their own, by name.
    pub output_tolerances: Vec<(String, Tolerance)>,
    /// Files of OIP inference requests whose inputs the candidates are compared on, beside
    /// inputs drawn from the declared signature.
    pub calibration: Vec<PathBuf>,
    /// The most the search may spend timing candidates (loading them and the first comparison
    /// aside, which it cannot skip).
    pub budget: Duration,
}

impl Default for AutoPrecision {
    /// `precision = "auto"` with nothing else said.
    fn default() -> AutoPrecision {
        AutoPrecision {
            tolerance: Tolerance::default(),
            output_tolerances: Vec::new(),
            calibration: Vec::new(),
            budget: DEFAULT_PRECISION_BUDGET,
        }
    }
}

impl AutoPrecision {
    /// The bounds `output` is held to.
    pub fn tolerance_of(&self, output: &str) -> Tolerance {
        self.output_tolerances.iter().find(|(name, _)| name == output).map_or(self.tolerance, |(_, own)| *own)
    }
}

/// How far a candidate precision's outputs may stray from FP32's, per output: every row's
/// cosine similarity at least `cosine`, and no value off by more than `max_abs` (by default,
/// a tenth of the output's largest FP32 magnitude).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub cosine: f64,
    pub max_abs: Option<f64>,
}

impl Default for Tolerance {
    fn default() -> Tolerance {
        Tolerance { cosine: DEFAULT_COSINE, max_abs: None }
    }
}

/// The cosine similarity a reduced precision must keep by default: bf16 keeps well over this on
/// transformer hidden states and classifier logits; a model it truly breaks falls far below.
pub const DEFAULT_COSINE: f64 = 0.999;
/// The search's default budget: a few seconds per model, paid once at load.
pub const DEFAULT_PRECISION_BUDGET: Duration = Duration::from_secs(5);
pub const MAX_PRECISION_BUDGET: Duration = Duration::from_secs(60);

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

/// The knobs an operator may turn while the model serves (`PATCH /v1/models/{name}`). They start
/// as the model's config says and last until it is reloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    pub max_batch_size: u32,
    pub max_queue_delay: Duration,
    pub timeout: Duration,
    pub replicas: Replicas,
}

impl Tuning {
    pub fn of(config: &ModelConfig) -> Tuning {
        Tuning {
            max_batch_size: config.batching.max_batch_size,
            max_queue_delay: config.batching.max_queue_delay,
            timeout: config.timeout,
            replicas: config.replicas,
        }
    }
}

/// Largest `max_batch_size` a model may have.
pub const MAX_BATCH_SIZE: u32 = 4096;
/// Longest `max_queue_delay` a model may have: a batch window past a second is a mistake.
pub const MAX_QUEUE_DELAY: Duration = Duration::from_secs(1);
/// Longest `timeout` a model may have.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// A model setting outside its range: `field` as the config and the API name it, the value
/// given and the range, in the words every entry point uses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {value} is out of range ({range})")]
pub struct OutOfRange {
    pub field: &'static str,
    pub value: String,
    pub range: String,
}

impl OutOfRange {
    /// The message without the field's name, for callers that name it their own way.
    pub fn detail(&self) -> String {
        format!("{} is out of range ({})", self.value, self.range)
    }
}

/// The ranges of the settings a model may change while serving, checked here for the config
/// file, the repository API and a live `PATCH` alike.
pub mod range {
    use std::time::Duration;

    use super::{MAX_BATCH_SIZE, MAX_QUEUE_DELAY, MAX_REPLICAS, MAX_TIMEOUT, OutOfRange, Replicas};

    fn out(field: &'static str, value: impl ToString, range: String) -> OutOfRange {
        OutOfRange { field, value: value.to_string(), range }
    }

    /// `batching.max_batch_size`: 1 ..= [`MAX_BATCH_SIZE`].
    pub fn max_batch_size(n: u32) -> Result<u32, OutOfRange> {
        match n {
            1..=MAX_BATCH_SIZE => Ok(n),
            _ => Err(out("max_batch_size", n, format!("1 ..= {MAX_BATCH_SIZE}"))),
        }
    }

    /// `batching.max_queue_delay_us`: 0 ..= [`MAX_QUEUE_DELAY`].
    pub fn max_queue_delay_us(us: u64) -> Result<Duration, OutOfRange> {
        let most = MAX_QUEUE_DELAY.as_micros() as u64;
        if us > most {
            return Err(out("max_queue_delay_us", us, format!("0 ..= {most}")));
        }
        Ok(Duration::from_micros(us))
    }

    /// `timeout_ms`: 1 ..= [`MAX_TIMEOUT`].
    pub fn timeout_ms(ms: u64) -> Result<Duration, OutOfRange> {
        let most = MAX_TIMEOUT.as_millis() as u64;
        if ms == 0 || ms > most {
            return Err(out("timeout_ms", ms, format!("1 ..= {most}")));
        }
        Ok(Duration::from_millis(ms))
    }

    /// `instances`: 1 <= min <= max <= [`MAX_REPLICAS`].
    pub fn replicas(min: u32, max: u32) -> Result<Replicas, OutOfRange> {
        if min == 0 || min > max || max > MAX_REPLICAS {
            let value = if min == max { min.to_string() } else { format!("{{ min = {min}, max = {max} }}") };
            return Err(out("instances", value, format!("1 <= min <= max <= {MAX_REPLICAS}")));
        }
        Ok(Replicas { min, max })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn each_range_takes_its_ends_and_refuses_past_them_naming_the_field() {
            assert_eq!(max_batch_size(1), Ok(1));
            assert_eq!(max_batch_size(4096), Ok(4096));
            assert_eq!(max_batch_size(0).map_err(|e| e.to_string()), Err("max_batch_size: 0 is out of range (1 ..= 4096)".into()));
            assert!(max_batch_size(4097).is_err());
            assert_eq!(max_queue_delay_us(0), Ok(Duration::ZERO));
            assert_eq!(max_queue_delay_us(1_000_000), Ok(Duration::from_secs(1)));
            assert_eq!(
                max_queue_delay_us(1_000_001).map_err(|e| e.to_string()),
                Err("max_queue_delay_us: 1000001 is out of range (0 ..= 1000000)".into())
            );
            assert!(timeout_ms(0).is_err());
            assert_eq!(timeout_ms(3_600_000), Ok(Duration::from_secs(3600)));
            assert!(timeout_ms(3_600_001).is_err());
            assert_eq!(replicas(1, 64), Ok(Replicas { min: 1, max: 64 }));
            assert_eq!(replicas(0, 0).map_err(|e| e.detail()), Err("0 is out of range (1 <= min <= max <= 64)".into()));
            assert!(replicas(3, 2).is_err() && replicas(1, 65).is_err());
        }
    }
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

/// Most replicas one model may have.
pub const MAX_REPLICAS: u32 = 64;

/// Priorities run from 0 (default) to this.
pub const MAX_PRIORITY: u8 = 9;
