//! Validation: raw config in, typed [`Config`] out, or an error naming the file, the field and
//! what is wrong. Defaults are applied here.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use crate::deploy::{HandlerSettings, check_name};
use crate::deploy::sources::{parse_digest, parse_source};
use crate::fleet::gpu::{GpuConfig, SimulatedGpuConfig, SimulatedStep};
use crate::fleet::scaler::ScalerConfig;
use crate::model::signature::{InputSpec, OutputSpec, Ragged, ValueRange};
use crate::model::spec::{range, 
    BatchPolicy, DeviceChoice, MAX_PRIORITY, MAX_REPLICAS, ModelConfig, Precision, Replicas, versioned_name,
};
use crate::model::tensor::DType;
use crate::sandbox::{HandlerConfig, SandboxLimits, SlotResetPolicy};
use crate::tenancy::keys::parse_public_key;
use crate::tenancy::{Quota, TenantConfig};

use kiln_codec::config::{
    RawBatching, RawConfig, RawGpus, RawHandler, RawModel, RawQuota,
    RawScaler, RawServer, RawTenant,
};
use super::{
    Config, ConfigError, ServerConfig, DEFAULT_LISTEN, DEFAULT_ADMIN_LISTEN, DEFAULT_GRPC_LISTEN, DEFAULT_STATE_DIR,
    DEFAULT_MAX_COMPONENT_BYTES, DEFAULT_REQUESTS_PER_SECOND, DEFAULT_MAX_CONCURRENT,
    DEFAULT_MAX_COMPUTE_BYTES, DEFAULT_MAX_COMPUTE_CALLS, DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_INSTANCES, DEFAULT_MEMORY_LIMIT_MIB,
    DEFAULT_DEADLINE_MS, DEFAULT_WARMUP_RUNS, DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_DELAY_US, DEFAULT_MAX_QUEUE_SIZE, DEFAULT_TIMEOUT_MS,
    DEFAULT_LATENCY_OBJECTIVE_MS, DEFAULT_MEMORY_HEADROOM_MIB, DEFAULT_SCALER_INTERVAL_MS,
    DEFAULT_UP_COOLDOWN_MS, DEFAULT_DOWN_COOLDOWN_MS, DEFAULT_MAX_GPU_UTILIZATION,
    DEFAULT_SCALER_HISTORY, DEFAULT_GPU_POLL_MS, DEFAULT_DRAIN_GRACE_MS,
    DEFAULT_DRAIN_TIMEOUT_MS, DEFAULT_MAX_MODEL_BYTES, DEFAULT_MAX_MODEL_VERSIONS,
    DEFAULT_MAX_MODEL_INSTANCES, DEFAULT_MAX_MODEL_THREADS, DEFAULT_LOAD_TIMEOUT_S,
    DEFAULT_TENANT_FETCH_TIMEOUT_S,
};
use crate::tenancy::ModelDevices;
use crate::model::device::Device;

pub(super) struct Validator<'a> {
    pub(super) file: &'a Path,
    pub(super) base: &'a Path,
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

    pub(super) fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let server = self.server(raw.server)?;
        self.unique("model", raw.model.iter().map(|m| m.name.as_str()))?;
        let models = raw
            .model
            .into_iter()
            .enumerate()
            .map(|(i, m)| self.model_versions(i, m))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect::<Vec<_>>();
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
        let grpc_listen = raw.grpc_listen.as_deref().unwrap_or(DEFAULT_GRPC_LISTEN);
        let grpc_listen = super::parse_optional_listen(grpc_listen).ok_or_else(|| {
            self.invalid(
                "server.grpc_listen",
                format!("'{grpc_listen}' is not an address like 127.0.0.1:8001, nor 'off'"),
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
        let slot_reset = match raw.slot_reset.as_deref() {
            None | Some("auto") => SlotResetPolicy::Auto,
            Some("memset") => SlotResetPolicy::Memset,
            Some(other) => {
                return Err(self.invalid(
                    "server.slot_reset",
                    format!("'{other}' is not a slot reset; use \"auto\" (PAGEMAP_SCAN where the kernel has it) or \"memset\""),
                ));
            }
        };
        let cache_dir = match raw.cache_dir.as_deref() {
            Some(dir) => self.path(dir),
            None => state_dir.join("cache"),
        };
        let seconds = |field: &str, value: Option<u64>, default: u64| {
            let s = value.unwrap_or(default);
            if (1..=86_400).contains(&s) {
                Ok(Duration::from_secs(s))
            } else {
                Err(self.invalid(format!("server.{field}"), format!("{s} is out of range (1 ..= 86400)")))
            }
        };
        let load_timeout = seconds("load_timeout_s", raw.load_timeout_s, DEFAULT_LOAD_TIMEOUT_S)?;
        let tenant_fetch_timeout = seconds("tenant_fetch_timeout_s", raw.tenant_fetch_timeout_s, DEFAULT_TENANT_FETCH_TIMEOUT_S)?;
        if raw.cache_max_bytes == Some(0) {
            return Err(self.invalid("server.cache_max_bytes", "0 would keep nothing; leave it out for no limit"));
        }
        Ok(ServerConfig {
            cache_dir,
            cache_max_bytes: raw.cache_max_bytes,
            allow_unpinned: raw.allow_unpinned.unwrap_or(false),
            tenant_private_sources: raw.tenant_private_sources.unwrap_or(false),
            load_timeout,
            tenant_fetch_timeout,
            listen,
            max_body_bytes: max_body_bytes as usize,
            max_instances,
            oip_max_priority,
            state_dir,
            admin_listen,
            grpc_listen,
            max_component_bytes: max_component_bytes as usize,
            drain_grace: Duration::from_millis(drain_grace_ms),
            drain_timeout: Duration::from_millis(drain_timeout_ms),
            slot_reset,
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

    /// A `[[model]]` section as the configs of the versions it serves, in version order: one,
    /// named as the model, without `versions`; else one per version its `version_policy` picks,
    /// each named `NAME@VERSION`.
    pub(super) fn model_versions(&self, i: usize, mut raw: RawModel) -> Result<Vec<ModelConfig>, ConfigError> {
        let at = |f: &str| format!("model '{}'.{f}", raw.name);
        let Some(mut versions) = raw.versions.take() else {
            if raw.version_policy.is_some() {
                return Err(self.invalid(at("version_policy"), "a version policy needs `versions`"));
            }
            return Ok(vec![self.model(i, raw)?]);
        };
        if raw.source.is_some() || raw.path.is_some() || raw.sha256.is_some() {
            return Err(self.invalid(
                at("versions"),
                "give each version its `source` (and `sha256`) in `versions`, not the model one",
            ));
        }
        if versions.is_empty() {
            return Err(self.invalid(at("versions"), "list at least one version"));
        }
        versions.sort_by_key(|v| v.version);
        if let Some(bad) = versions.iter().find(|v| v.version == 0) {
            return Err(self.invalid(at("versions"), format!("version {} is not a version number (1 or more)", bad.version)));
        }
        if let Some(w) = versions.windows(2).find(|w| w[0].version == w[1].version) {
            return Err(self.invalid(at("versions"), format!("version {} is listed twice", w[0].version)));
        }
        let numbers: Vec<u64> = versions.iter().map(|v| v.version).collect();
        let served = self.version_policy(&at("version_policy"), raw.version_policy.as_deref(), &numbers)?;
        let name = raw.name.clone();
        let mut configs = Vec::with_capacity(served.len());
        for version in versions.into_iter().filter(|v| served.contains(&v.version)) {
            let mut one = raw.clone();
            (one.source, one.path, one.sha256) = (version.source, version.path, version.sha256);
            let mut config = self.model(i, one).map_err(|e| match e {
                ConfigError::Invalid { file, field, message } => ConfigError::Invalid {
                    file,
                    field: field.replacen(&format!("model '{name}'."), &format!("model '{name}'.versions[{}].", version.version), 1),
                    message,
                },
                other => other,
            })?;
            config.name = versioned_name(&name, version.version);
            config.version = version.version;
            configs.push(config);
        }
        Ok(configs)
    }

    /// The versions `policy` serves out of `versions` (ascending).
    fn version_policy(&self, field: &str, policy: Option<&str>, versions: &[u64]) -> Result<Vec<u64>, ConfigError> {
        let usage = "use \"latest(N)\", \"all\" or \"specific(1,3)\"";
        let text = policy.unwrap_or("latest(1)").replace(' ', "");
        let inner = |prefix: &str| text.strip_prefix(prefix).and_then(|t| t.strip_suffix(')'));
        if text == "all" {
            return Ok(versions.to_vec());
        }
        if let Some(n) = inner("latest(") {
            let n: usize = n
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| self.invalid(field, format!("'{text}': N must be 1 or more; {usage}")))?;
            return Ok(versions[versions.len().saturating_sub(n)..].to_vec());
        }
        if let Some(list) = inner("specific(") {
            let mut picked = Vec::new();
            for item in list.split(',') {
                let v: u64 = item.parse().map_err(|_| self.invalid(field, format!("'{item}' is not a version number; {usage}")))?;
                if !versions.contains(&v) {
                    return Err(self.invalid(field, format!("version {v} is not in `versions`")));
                }
                picked.push(v);
            }
            picked.sort_unstable();
            picked.dedup();
            return Ok(picked);
        }
        Err(self.invalid(field, format!("'{text}' is not a version policy; {usage}")))
    }

    pub(super) fn model(&self, i: usize, raw: RawModel) -> Result<ModelConfig, ConfigError> {
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
        let timeout = range::timeout_ms(raw.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS))
            .map_err(|e| self.invalid(at("timeout_ms"), e.detail()))?;
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
        let (path, source) = match (raw.path, raw.source) {
            (Some(_), Some(_)) => return Err(self.invalid(at("source"), "give `source` or `path`, not both")),
            (None, None) => {
                return Err(self.invalid(
                    at("source"),
                    "a model needs a `source`: a local path, https://HOST/FILE or hf://ORG/REPO/FILE@REVISION",
                ));
            }
            (Some(path), None) => (self.path(&path), None),
            (None, Some(text)) => match parse_source(&text).map_err(|e| self.invalid(at("source"), e))? {
                None => (self.path(&text), None),
                Some(remote) => (PathBuf::new(), Some(remote.text)),
            },
        };
        let sha256 = raw.sha256.map(|d| parse_digest(&d).map_err(|e| self.invalid(at("sha256"), e))).transpose()?;
        Ok(ModelConfig {
            worker: raw.worker.unwrap_or(false),
            precision,
            path,
            source,
            sha256,
            version: 1,
            name: raw.name,
            device,
            inputs,
            outputs,
            warmup_runs,
            batching,
            replicas,
            threads,
            timeout,
            latency_objective: Duration::from_millis(objective_ms),
            memory_headroom_bytes: headroom_mib << 20,
        })
    }

    fn device(&self, field: &str, raw: Option<&toml::Value>) -> Result<DeviceChoice, ConfigError> {
        let usage = "use \"auto\", \"cpu\", \"cuda:N\" or a list like [\"cuda:0\", \"cuda:1\"]";
        let gpu = |text: &str| -> Result<usize, ConfigError> {
            match text.parse::<Device>() {
                Ok(Device::Cuda(n)) if n < 64 => Ok(n),
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
        let max_batch_size = range::max_batch_size(raw.max_batch_size.unwrap_or(DEFAULT_MAX_BATCH_SIZE))
            .map_err(|e| self.invalid(field("max_batch_size"), e.detail()))?;
        let delay = range::max_queue_delay_us(raw.max_queue_delay_us.unwrap_or(DEFAULT_MAX_QUEUE_DELAY_US))
            .map_err(|e| self.invalid(field("max_queue_delay_us"), e.detail()))?;
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
            max_queue_delay: delay,
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
            if !models.iter().any(|known| known.model_name() == m) {
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
        let max_models = range("max_models", raw.max_models.map_or(0, u64::from), 0, 10_000)?;
        let max_model_bytes =
            range("max_model_bytes", raw.max_model_bytes.unwrap_or(DEFAULT_MAX_MODEL_BYTES), 1, 1 << 44)?;
        let versions = range("max_model_versions", raw.max_model_versions.map_or(u64::from(DEFAULT_MAX_MODEL_VERSIONS), u64::from), 1, 10_000)?;
        let instances =
            range("max_model_instances", raw.max_model_instances.map_or(u64::from(DEFAULT_MAX_MODEL_INSTANCES), u64::from), 1, 10_000)?;
        let threads = range("max_model_threads", raw.max_model_threads.map_or(u64::from(DEFAULT_MAX_MODEL_THREADS), u64::from), 1, 100_000)?;
        let model_devices = match &raw.model_devices {
            None => ModelDevices::cpu_only(),
            Some(list) => ModelDevices::parse(list).map_err(|e| self.invalid(field("model_devices"), e))?,
        };
        let min_objective = range("min_latency_objective_ms", raw.min_latency_objective_ms.unwrap_or(1), 1, 3_600_000)?;
        Ok(Quota {
            max_models: max_models as u32,
            max_model_bytes,
            max_model_versions: versions as u32,
            max_model_instances: instances as u32,
            max_model_threads: threads as u32,
            model_devices,
            min_latency_objective_ms: min_objective,
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
            cache: raw.cache,
        };
        settings
            .resolve(&raw.name, tenant, |m| tenant.models.iter().any(|t| t == m), self.path(&raw.component))
            .map_err(|(f, message)| self.invalid(at(f), message))
    }
}
