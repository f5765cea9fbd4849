//! The config file's syntax: every table and field, unknown ones refused, each with its TOML
//! type. Nothing here is checked beyond that; the runtime's `config::validate` turns a
//! [`RawConfig`] into its typed `Config`, naming the field of every error.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub model: Vec<RawModel>,
    #[serde(default)]
    pub tenant: Vec<RawTenant>,
    #[serde(default)]
    pub handler: Vec<RawHandler>,
    #[serde(default)]
    pub scaler: RawScaler,
    #[serde(default)]
    pub gpus: RawGpus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScaler {
    pub interval_ms: Option<u64>,
    pub up_cooldown_ms: Option<u64>,
    pub down_cooldown_ms: Option<u64>,
    pub max_gpu_utilization: Option<u32>,
    pub history: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGpus {
    pub poll_interval_ms: Option<u64>,
    #[serde(default)]
    pub simulated: Vec<RawSimulatedGpu>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSimulatedGpu {
    pub name: Option<String>,
    pub memory_mib: u64,
    #[serde(default)]
    pub script: Vec<RawStep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    pub at_ms: u64,
    pub used_mib: Option<u64>,
    pub utilization: Option<u32>,
}

/// `[server]`. Serialize too, so that the runtime can list its fields (`kiln config show`).
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub max_body_bytes: Option<u64>,
    pub max_instances: Option<u32>,
    pub oip_max_priority: Option<u8>,
    pub state_dir: Option<String>,
    pub admin_listen: Option<String>,
    /// The gRPC API's address, or `off`.
    pub grpc_listen: Option<String>,
    /// A listener serving only `/metrics`, without a key (for Prometheus), or `off`.
    pub metrics_listen: Option<String>,
    pub max_component_bytes: Option<u64>,
    pub drain_grace_ms: Option<u64>,
    pub drain_timeout_ms: Option<u64>,
    pub slot_reset: Option<String>,
    /// Where remote model files are kept (default: `STATE_DIR/cache`).
    pub cache_dir: Option<String>,
    /// Size of that cache before least recently used files no model uses go; no limit if unset.
    pub cache_max_bytes: Option<u64>,
    /// Load remote sources without a `sha256` pin (their digest is logged, to pin it).
    pub allow_unpinned: Option<bool>,
    /// Let tenants' model sources be loopback or private addresses (an internal model store).
    pub tenant_private_sources: Option<bool>,
    /// Credentials for OCI registries (`oci://` handlers): a Docker `config.json`.
    pub registry_auth: Option<String>,
    /// CA certificates (PEM) trusted for OCI registries besides the public roots built into kiln (Mozilla's, from webpki-roots).
    pub registry_ca: Option<String>,
    /// One of several identical replicas: everything comes from the config, changes through
    /// the APIs that would make replicas differ are refused.
    pub cluster: Option<bool>,
    /// This replica's name, the prefix of its request ids in cluster mode (default: the host name).
    pub replica: Option<String>,
    /// Where API key hashes are read from (default: the state directory): a mounted Secret.
    pub keys_dir: Option<String>,
    /// How long a model may take to load and warm up before its load fails (seconds).
    pub load_timeout_s: Option<u64>,
    /// How long a tenant's model download may take in all (seconds).
    pub tenant_fetch_timeout_s: Option<u64>,
    /// Every listener's certificate chain (PEM): with `tls_key`, they speak TLS only. Read
    /// again when the file changes.
    pub tls_cert: Option<String>,
    /// The private key of `tls_cert` (PEM).
    pub tls_key: Option<String>,
    /// The admin listener's own certificate and key, instead of `tls_cert`/`tls_key`.
    pub admin_tls_cert: Option<String>,
    pub admin_tls_key: Option<String>,
    /// `false`: the admin listener speaks plain HTTP even with `tls_cert` set.
    pub admin_tls: Option<bool>,
    /// CA certificates (PEM): the admin listener then takes only clients presenting a
    /// certificate that chains to one of them (besides an admin key). Read again when it changes.
    pub admin_client_ca: Option<String>,
    /// The gRPC listener's own certificate and key, or `grpc_tls = false` for plain gRPC.
    pub grpc_tls_cert: Option<String>,
    pub grpc_tls_key: Option<String>,
    pub grpc_tls: Option<bool>,
    /// The metrics listener's own certificate and key, or `metrics_tls = false` for plain HTTP.
    pub metrics_tls_cert: Option<String>,
    pub metrics_tls_key: Option<String>,
    pub metrics_tls: Option<bool>,
    /// An OTLP/gRPC receiver (`http://HOST:4317`) to send traces to; else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; none when neither is set.
    pub otlp_endpoint: Option<String>,
    /// The share of traces started here that are exported (0.0 ..= 1.0, default 1.0); a
    /// client's `traceparent` decides for its own.
    pub otlp_sample_ratio: Option<f64>,
    /// Whether a long CPU forward pass that starts while cores are idle runs on them too
    /// (default false: every pass on its replica's `threads`).
    pub spread_idle_cores: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    pub name: String,
    #[serde(default)]
    pub models: Vec<String>,
    pub signing_key: Option<String>,
    #[serde(default)]
    pub quota: RawQuota,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    pub requests_per_second: Option<f64>,
    pub burst: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub max_instances: Option<u32>,
    pub max_body_bytes: Option<u64>,
    pub memory_limit_mib: Option<u64>,
    pub deadline_ms: Option<u64>,
    pub fuel: Option<u64>,
    pub max_compute_bytes: Option<u64>,
    pub max_compute_calls: Option<u32>,
    pub max_response_bytes: Option<u64>,
    /// Models the tenant may load into its own namespace (default 0: none).
    pub max_models: Option<u32>,
    /// Their files' bytes in all (every version served counts).
    pub max_model_bytes: Option<u64>,
    /// Versions served, instances (at most) and threads (instances times threads) of its own
    /// models, in all.
    pub max_model_versions: Option<u32>,
    pub max_model_instances: Option<u32>,
    pub max_model_threads: Option<u32>,
    /// Where its own models may run: `"cpu"`, `"cuda"` (any GPU), `"cuda:N"`.
    pub model_devices: Option<Vec<String>>,
    /// The smallest latency objective its own models may ask for.
    pub min_latency_objective_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub name: String,
    /// The file: a local path (also accepted as `path`), `https://HOST/FILE` or
    /// `hf://ORG/REPO/FILE@REVISION`.
    pub source: Option<String>,
    pub path: Option<String>,
    /// The file's SHA-256; remote sources need it.
    pub sha256: Option<String>,
    /// Numbered versions, each with its own file (instead of `source`).
    pub versions: Option<Vec<RawVersion>>,
    /// Which versions are served: `"latest(N)"` (default `latest(1)`), `"all"`, `"specific(1,3)"`.
    pub version_policy: Option<String>,
    /// `"auto"`, `"cpu"`, `"cuda:N"` or a list of `"cuda:N"`; checked by hand for clear errors.
    #[serde(default)]
    pub device: Option<toml::Value>,
    pub inputs: Vec<RawInput>,
    pub outputs: Vec<RawOutput>,
    pub warmup_runs: Option<u32>,
    #[serde(default)]
    pub batching: RawBatching,
    /// `N` or `{ min = A, max = B }`.
    pub instances: Option<toml::Value>,
    pub threads: Option<u32>,
    pub timeout_ms: Option<u64>,
    /// `"fp32"`, `"fp16"`, `"bf16"`, `"bf16-autocast"` or `"auto"` (the fastest that keeps the
    /// outputs within `tolerance`, measured at load).
    pub precision: Option<String>,
    /// Lays 4-D floating weights and inputs out channels-last (for convolutions); `"auto"`
    /// tries it for a model with an image input, so it is for a pinned precision only.
    pub channels_last: Option<bool>,
    /// How far a reduced precision's outputs may stray from FP32's for `"auto"` to pick it.
    pub tolerance: Option<RawTolerance>,
    /// Inputs `"auto"` compares precisions on, beside its own: files of OIP inference requests.
    pub calibration: Option<Vec<String>>,
    /// How long `"auto"` may spend timing precisions at load.
    pub precision_budget_ms: Option<u64>,
    pub latency_objective_ms: Option<u64>,
    pub memory_headroom_mib: Option<u64>,
    /// Runs each replica in a confined worker process, as tenants' own models always do.
    pub worker: Option<bool>,
}

/// `tolerance = { cosine = 0.999, max_abs = 0.05, outputs = { logits = { max_abs = 0.5 } } }`:
/// bounds for every output, and an output's own over them.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTolerance {
    pub cosine: Option<f64>,
    pub max_abs: Option<f64>,
    /// Bounds of one output, by its name; a field left out is the model-wide one.
    pub outputs: Option<std::collections::BTreeMap<String, RawOutputTolerance>>,
}

/// One output's own `{ cosine = 0.99, max_abs = 0.5 }`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutputTolerance {
    pub cosine: Option<f64>,
    pub max_abs: Option<f64>,
}

/// One version of a model: its number and its file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVersion {
    pub version: u64,
    pub source: Option<String>,
    pub path: Option<String>,
    pub sha256: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatching {
    pub max_batch_size: Option<u32>,
    pub max_queue_delay_us: Option<u64>,
    pub preferred_batch_sizes: Option<Vec<u32>>,
    pub max_queue_size: Option<u32>,
    pub max_rows: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInput {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<i64>,
    pub ragged_dim: Option<usize>,
    pub pad: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub max_dims: Option<Vec<i64>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    pub name: String,
    pub ragged_dim: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHandler {
    pub name: String,
    pub tenant: Option<String>,
    pub component: String,
    pub models: Option<Vec<String>>,
    pub memory_limit_mib: Option<u64>,
    pub deadline_ms: Option<u64>,
    pub priority: Option<u8>,
    pub max_priority: Option<u8>,
    /// `{ ttl_ms, max_entries, max_bytes }`: a response cache for this handler.
    pub cache: Option<RawCache>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_entries: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
}

/// Parses config text into its raw tables, or says where and why the syntax is wrong.
pub fn parse(text: &str) -> Result<RawConfig, String> {
    toml::from_str(text).map_err(|e| syntax_error(text, &e))
}

/// toml's own message spans several lines with a source excerpt; keep the place and the reason.
pub fn syntax_error(text: &str, e: &toml::de::Error) -> String {
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
