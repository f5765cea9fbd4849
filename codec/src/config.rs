//! The config file as written: every table and field, unknown ones refused. Nothing here
//! is checked beyond its TOML type; [`super::validate`] turns it into a [`super::Config`].

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) model: Vec<RawModel>,
    #[serde(default)]
    pub(super) tenant: Vec<RawTenant>,
    #[serde(default)]
    pub(super) handler: Vec<RawHandler>,
    #[serde(default)]
    pub(super) scaler: RawScaler,
    #[serde(default)]
    pub(super) gpus: RawGpus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawScaler {
    pub(super) interval_ms: Option<u64>,
    pub(super) up_cooldown_ms: Option<u64>,
    pub(super) down_cooldown_ms: Option<u64>,
    pub(super) max_gpu_utilization: Option<u32>,
    pub(super) history: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGpus {
    pub(super) poll_interval_ms: Option<u64>,
    #[serde(default)]
    pub(super) simulated: Vec<RawSimulatedGpu>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSimulatedGpu {
    pub(super) name: Option<String>,
    pub(super) memory_mib: u64,
    #[serde(default)]
    pub(super) script: Vec<RawStep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStep {
    pub(super) at_ms: u64,
    pub(super) used_mib: Option<u64>,
    pub(super) utilization: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) max_body_bytes: Option<u64>,
    pub(super) max_instances: Option<u32>,
    pub(super) oip_max_priority: Option<u8>,
    pub(super) state_dir: Option<String>,
    pub(super) admin_listen: Option<String>,
    pub(super) max_component_bytes: Option<u64>,
    pub(super) drain_grace_ms: Option<u64>,
    pub(super) drain_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    pub(super) name: String,
    #[serde(default)]
    pub(super) models: Vec<String>,
    pub(super) signing_key: Option<String>,
    #[serde(default)]
    pub(super) quota: RawQuota,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuota {
    pub(super) requests_per_second: Option<f64>,
    pub(super) burst: Option<u32>,
    pub(super) max_concurrent: Option<u32>,
    pub(super) max_instances: Option<u32>,
    pub(super) max_body_bytes: Option<u64>,
    pub(super) memory_limit_mib: Option<u64>,
    pub(super) deadline_ms: Option<u64>,
    pub(super) fuel: Option<u64>,
    pub(super) max_compute_bytes: Option<u64>,
    pub(super) max_compute_calls: Option<u32>,
    pub(super) max_response_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    pub(super) name: String,
    pub(super) path: String,
    /// `"auto"`, `"cpu"`, `"cuda:N"` or a list of `"cuda:N"`; checked by hand for clear errors.
    #[serde(default)]
    pub(super) device: Option<toml::Value>,
    pub(super) inputs: Vec<RawInput>,
    pub(super) outputs: Vec<RawOutput>,
    pub(super) warmup_runs: Option<u32>,
    #[serde(default)]
    pub(super) batching: RawBatching,
    /// `N` or `{ min = A, max = B }`.
    pub(super) instances: Option<toml::Value>,
    pub(super) threads: Option<u32>,
    pub(super) timeout_ms: Option<u64>,
    pub(super) precision: Option<String>,
    pub(super) latency_objective_ms: Option<u64>,
    pub(super) memory_headroom_mib: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBatching {
    pub(super) max_batch_size: Option<u32>,
    pub(super) max_queue_delay_us: Option<u64>,
    pub(super) preferred_batch_sizes: Option<Vec<u32>>,
    pub(super) max_queue_size: Option<u32>,
    pub(super) max_rows: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInput {
    pub(super) name: String,
    pub(super) dtype: String,
    pub(super) shape: Vec<i64>,
    pub(super) ragged_dim: Option<usize>,
    pub(super) pad: Option<f64>,
    pub(super) min: Option<f64>,
    pub(super) max: Option<f64>,
    pub(super) max_dims: Option<Vec<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutput {
    pub(super) name: String,
    pub(super) ragged_dim: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHandler {
    pub(super) name: String,
    pub(super) tenant: Option<String>,
    pub(super) component: String,
    pub(super) models: Option<Vec<String>>,
    pub(super) memory_limit_mib: Option<u64>,
    pub(super) deadline_ms: Option<u64>,
    pub(super) priority: Option<u8>,
    pub(super) max_priority: Option<u8>,
}
