//! A model's fields, as a `[[model]]` section of the config file or the same fields as JSON to
//! the repository API (an operator's or a tenant's), checked into the [`ModelConfig`]s of the
//! versions it serves. One reader for every way a model arrives, so they cannot disagree; the
//! ranges it shares with live tuning are [`super::range`]'s.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_codec::config::{RawBatching, RawModel, RawTolerance};
use kiln_codec::source::{parse_digest, parse_source};

use super::{
    AutoPrecision, BatchPolicy, DEFAULT_PRECISION_BUDGET, DeviceChoice, MAX_PRECISION_BUDGET, MAX_REPLICAS, ModelConfig, Precision,
    Replicas, Tolerance, is_name, range, versioned_name,
};
use crate::model::device::Device;
use crate::model::signature::{InputSpec, OutputSpec, Ragged, ValueRange};
use crate::model::tensor::DType;

pub const DEFAULT_WARMUP_RUNS: u32 = 2;
pub const DEFAULT_MAX_BATCH_SIZE: u32 = 32;
pub const DEFAULT_MAX_QUEUE_DELAY_US: u64 = 0;
pub const DEFAULT_MAX_QUEUE_SIZE: u32 = 1024;
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_LATENCY_OBJECTIVE_MS: u64 = 50;
pub const DEFAULT_MEMORY_HEADROOM_MIB: u64 = 512;

/// What is wrong with a model's fields: the field, written as the file has it (`model
/// 'NAME'.batching.max_batch_size`), and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError { field: field.into(), message: message.into() }
}

/// Reads a model's fields; relative paths resolve against `base` (the config file's folder).
pub struct ModelFields<'a> {
    pub base: &'a Path,
}

impl ModelFields<'_> {
    /// The fields of model `name` as the repository API takes them: those of a `[[model]]`
    /// section, as a JSON object, where `name` may be left out and `tenants` lists the tenants
    /// that may use the model. The configs of its versions, and those tenants.
    pub fn from_json(&self, name: &str, spec: &serde_json::Value) -> Result<(Vec<ModelConfig>, Vec<String>), SpecError> {
        use serde_json::Value;
        let Value::Object(fields) = spec else {
            return Err(invalid("model", "send the model's fields as an object, like a [[model]] section"));
        };
        let mut fields = fields.clone();
        match fields.remove("name") {
            None => {}
            Some(Value::String(n)) if n == name => {}
            Some(other) => return Err(invalid("name", format!("{other} is not the name in the path ('{name}')"))),
        }
        let users = match fields.remove("tenants") {
            None => Vec::new(),
            Some(v) => serde_json::from_value::<Vec<String>>(v)
                .map_err(|e| invalid("tenants", format!("a list of tenant names: {e}")))?,
        };
        fields.insert("name".to_owned(), Value::String(name.to_owned()));
        let raw: RawModel = serde_json::from_value(Value::Object(fields)).map_err(|e| invalid("model", e.to_string()))?;
        Ok((self.versions(0, raw)?, users))
    }

    /// A path as written in the config: relative to `base`, or absolute (`join` keeps an
    /// absolute path as it is). The one rule for every path the config file names.
    pub fn path(&self, p: &str) -> PathBuf {
        self.base.join(p)
    }

    /// A `[[model]]` section as the configs of the versions it serves, in version order: one,
    /// named as the model, without `versions`; else one per version its `version_policy` picks,
    /// each named `NAME@VERSION`.
    pub fn versions(&self, i: usize, mut raw: RawModel) -> Result<Vec<ModelConfig>, SpecError> {
        let at = |f: &str| format!("model '{}'.{f}", raw.name);
        let Some(mut versions) = raw.versions.take() else {
            if raw.version_policy.is_some() {
                return Err(invalid(at("version_policy"), "a version policy needs `versions`"));
            }
            return Ok(vec![self.model(i, raw)?]);
        };
        if raw.source.is_some() || raw.path.is_some() || raw.sha256.is_some() {
            return Err(invalid(
                at("versions"),
                "give each version its `source` (and `sha256`) in `versions`, not the model one",
            ));
        }
        if versions.is_empty() {
            return Err(invalid(at("versions"), "list at least one version"));
        }
        versions.sort_by_key(|v| v.version);
        if let Some(bad) = versions.iter().find(|v| v.version == 0) {
            return Err(invalid(at("versions"), format!("version {} is not a version number (1 or more)", bad.version)));
        }
        if let Some(w) = versions.windows(2).find(|w| w[0].version == w[1].version) {
            return Err(invalid(at("versions"), format!("version {} is listed twice", w[0].version)));
        }
        let numbers: Vec<u64> = versions.iter().map(|v| v.version).collect();
        let served = self.version_policy(&at("version_policy"), raw.version_policy.as_deref(), &numbers)?;
        let name = raw.name.clone();
        let mut configs = Vec::with_capacity(served.len());
        for version in versions.into_iter().filter(|v| served.contains(&v.version)) {
            let mut one = raw.clone();
            (one.source, one.path, one.sha256) = (version.source, version.path, version.sha256);
            let mut config = self.model(i, one).map_err(|SpecError { field, message }| SpecError {
                field: field.replacen(&format!("model '{name}'."), &format!("model '{name}'.versions[{}].", version.version), 1),
                message,
            })?;
            config.name = versioned_name(&name, version.version);
            config.version = version.version;
            configs.push(config);
        }
        Ok(configs)
    }

    /// The versions `policy` serves out of `versions` (ascending).
    fn version_policy(&self, field: &str, policy: Option<&str>, versions: &[u64]) -> Result<Vec<u64>, SpecError> {
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
                .ok_or_else(|| invalid(field, format!("'{text}': N must be 1 or more; {usage}")))?;
            return Ok(versions[versions.len().saturating_sub(n)..].to_vec());
        }
        if let Some(list) = inner("specific(") {
            let mut picked = Vec::new();
            for item in list.split(',') {
                let v: u64 = item.parse().map_err(|_| invalid(field, format!("'{item}' is not a version number; {usage}")))?;
                if !versions.contains(&v) {
                    return Err(invalid(field, format!("version {v} is not in `versions`")));
                }
                picked.push(v);
            }
            picked.sort_unstable();
            picked.dedup();
            return Ok(picked);
        }
        Err(invalid(field, format!("'{text}' is not a version policy; {usage}")))
    }

    fn model(&self, i: usize, mut raw: RawModel) -> Result<ModelConfig, SpecError> {
        let at = |f: &str| format!("model[{i}].{f}");
        if !is_name(&raw.name) {
            return Err(invalid(
                at("name"),
                format!("'{}' is not a valid name (1-64 of a-z A-Z 0-9 - _ ., not starting with '.')", raw.name),
            ));
        }
        let at = |f: &str| format!("model '{}'.{f}", raw.name);
        let device = self.device(&at("device"), raw.device.as_ref())?;
        if raw.inputs.is_empty() {
            return Err(invalid(at("inputs"), "a model needs at least one input"));
        }
        let mut inputs = Vec::with_capacity(raw.inputs.len());
        for (j, input) in raw.inputs.into_iter().enumerate() {
            let field = |f: &str| at(&format!("inputs[{j}].{f}"));
            if input.name.is_empty() {
                return Err(invalid(field("name"), "input name is empty"));
            }
            if inputs.iter().any(|s: &InputSpec| s.name == input.name) {
                return Err(invalid(
                    field("name"),
                    format!("duplicate input name '{}'", input.name),
                ));
            }
            let dtype = DType::from_wire_name(&input.dtype).ok_or_else(|| {
                invalid(
                    field("dtype"),
                    format!(
                        "unknown dtype '{}'; expected one of {}",
                        input.dtype,
                        DType::ALL.map(DType::wire_name).join(", ")
                    ),
                )
            })?;
            if input.shape.is_empty() || input.shape.len() > 8 {
                return Err(invalid(
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
                        return Err(invalid(
                            field("shape"),
                            format!("dimension {d} is invalid; use a positive size or -1 for dynamic"),
                        ));
                    }
                });
            }
            let ragged = match (input.ragged_dim, input.pad) {
                (None, None) => None,
                (None, Some(_)) => {
                    return Err(invalid(field("pad"), "pad is only used with ragged_dim"));
                }
                (Some(dim), pad) => {
                    if dim == 0 || dim >= shape.len() || shape[dim].is_some() {
                        return Err(invalid(
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
                        return Err(invalid(field("min"), "min and max must be finite numbers"));
                    }
                    if let (Some(lo), Some(hi)) = (min, max)
                        && lo > hi
                    {
                        return Err(invalid(field("max"), format!("{hi} is below min {lo}")));
                    }
                    Some(ValueRange { min, max })
                }
            };
            let max_dims = match input.max_dims {
                None => vec![None; shape.len()],
                Some(dims) => {
                    if dims.len() != shape.len() {
                        return Err(invalid(
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
                                return Err(invalid(
                                    field("max_dims"),
                                    format!("dimension {axis} is fixed by shape; use -1 there"),
                                ));
                            }
                            _ => {
                                return Err(invalid(
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
            return Err(invalid(at("outputs"), "a model needs at least one output"));
        }
        let mut outputs: Vec<OutputSpec> = Vec::with_capacity(raw.outputs.len());
        for (j, output) in raw.outputs.into_iter().enumerate() {
            if output.name.is_empty() || outputs.iter().any(|o| o.name == output.name) {
                return Err(invalid(
                    at(&format!("outputs[{j}].name")),
                    format!("output name '{}' is empty or repeated", output.name),
                ));
            }
            if output.ragged_dim.is_some() && !inputs.iter().any(|i| i.ragged.is_some()) {
                return Err(invalid(
                    at(&format!("outputs[{j}].ragged_dim")),
                    "no input declares a ragged_dim to follow",
                ));
            }
            if output.ragged_dim == Some(0) {
                return Err(invalid(
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
            return Err(invalid(at("warmup_runs"), format!("{warmup_runs} is over 100")));
        }
        let batching = self.batching(&at("batching"), raw.batching)?;
        let replicas = self.replicas(&at("instances"), raw.instances.as_ref())?;
        let objective_ms = raw.latency_objective_ms.unwrap_or(DEFAULT_LATENCY_OBJECTIVE_MS);
        if !(1..=3_600_000).contains(&objective_ms) {
            return Err(invalid(
                at("latency_objective_ms"),
                format!("{objective_ms} is out of range (1 ..= 3600000)"),
            ));
        }
        let headroom_mib = raw.memory_headroom_mib.unwrap_or(DEFAULT_MEMORY_HEADROOM_MIB);
        if headroom_mib > 1 << 24 {
            return Err(invalid(at("memory_headroom_mib"), format!("{headroom_mib} is over 16 TiB")));
        }
        let threads = raw.threads.unwrap_or(1);
        if !(1..=256).contains(&threads) {
            return Err(invalid(at("threads"), format!("{threads} is out of range (1 ..= 256)")));
        }
        let timeout = range::timeout_ms(raw.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS))
            .map_err(|e| invalid(at("timeout_ms"), e.detail()))?;
        let (precision, auto_precision) = match raw.precision.as_deref() {
            None => (Precision::Fp32, None),
            Some("auto") => {
                let names: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
                let auto = self.auto_precision(&at, &names, raw.tolerance.take(), raw.calibration.take(), raw.precision_budget_ms)?;
                (Precision::Fp32, Some(auto))
            }
            Some(name) => (name.parse().map_err(|e: String| invalid(at("precision"), e))?, None),
        };
        for (field, given) in [("tolerance", raw.tolerance.is_some()), ("calibration", raw.calibration.is_some()), ("precision_budget_ms", raw.precision_budget_ms.is_some())] {
            if given && auto_precision.is_none() {
                return Err(invalid(at(field), "applies only to precision = \"auto\""));
            }
        }
        let channels_last = raw.channels_last.unwrap_or(false);
        if channels_last && auto_precision.is_some() {
            return Err(invalid(at("channels_last"), "precision = \"auto\" tries it for a model with an image input; set it only with a precision pinned"));
        }
        if channels_last && !crate::model::spec::takes_images(&inputs) {
            return Err(invalid(at("channels_last"), "lays out 4-D floating inputs and weights, and the model has no 4-D floating input"));
        }
        let (path, source) = match (raw.path, raw.source) {
            (Some(_), Some(_)) => return Err(invalid(at("source"), "give `source` or `path`, not both")),
            (None, None) => {
                return Err(invalid(
                    at("source"),
                    "a model needs a `source`: a local path, https://HOST/FILE or hf://ORG/REPO/FILE@REVISION",
                ));
            }
            (Some(path), None) => (self.path(&path), None),
            (None, Some(text)) => match parse_source(&text).map_err(|e| invalid(at("source"), e.to_string()))? {
                None => (self.path(&text), None),
                Some(remote) => (PathBuf::new(), Some(remote.text)),
            },
        };
        let sha256 = raw.sha256.map(|d| parse_digest(&d).map_err(|e| invalid(at("sha256"), e.to_string()))).transpose()?;
        Ok(ModelConfig {
            worker: raw.worker.unwrap_or(false),
            precision,
            channels_last,
            auto_precision,
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

    /// `precision = "auto"`'s settings: its tolerance (model-wide, and for any of `outputs`),
    /// calibration files and budget.
    fn auto_precision(
        &self,
        at: &dyn Fn(&str) -> String,
        outputs: &[&str],
        tolerance: Option<RawTolerance>,
        calibration: Option<Vec<String>>,
        budget_ms: Option<u64>,
    ) -> Result<AutoPrecision, SpecError> {
        let raw = tolerance.unwrap_or_default();
        let bounds = |field: &str, cosine: Option<f64>, max_abs: Option<f64>, default: Tolerance| {
            let cosine = cosine.unwrap_or(default.cosine);
            if !(0.0..=1.0).contains(&cosine) {
                return Err(invalid(at(&format!("{field}.cosine")), format!("{cosine} is not a cosine similarity (0 ..= 1)")));
            }
            if let Some(max_abs) = max_abs.filter(|m| !m.is_finite() || *m <= 0.0) {
                return Err(invalid(at(&format!("{field}.max_abs")), format!("{max_abs} is not a positive error")));
            }
            Ok(Tolerance { cosine, max_abs: max_abs.or(default.max_abs) })
        };
        let tolerance = bounds("tolerance", raw.cosine, raw.max_abs, Tolerance::default())?;
        let mut output_tolerances = Vec::new();
        for (name, own) in raw.outputs.unwrap_or_default() {
            let field = format!("tolerance.outputs.{name}");
            if !outputs.iter().any(|o| *o == name) {
                return Err(invalid(at(&field), format!("'{name}' is not one of the model's outputs ({})", outputs.join(", "))));
            }
            output_tolerances.push((name, bounds(&field, own.cosine, own.max_abs, tolerance)?));
        }
        let budget = budget_ms.map_or(DEFAULT_PRECISION_BUDGET, Duration::from_millis);
        if budget > MAX_PRECISION_BUDGET {
            return Err(invalid(
                at("precision_budget_ms"),
                format!("{} is over {}", budget.as_millis(), MAX_PRECISION_BUDGET.as_millis()),
            ));
        }
        let calibration = calibration.unwrap_or_default();
        if calibration.len() > 16 {
            return Err(invalid(at("calibration"), format!("{} files; list at most 16", calibration.len())));
        }
        Ok(AutoPrecision {
            tolerance,
            output_tolerances,
            calibration: calibration.iter().map(|p| self.path(p)).collect(),
            budget,
        })
    }

    fn device(&self, field: &str, raw: Option<&toml::Value>) -> Result<DeviceChoice, SpecError> {
        let usage = "use \"auto\", \"cpu\", \"cuda:N\" or a list like [\"cuda:0\", \"cuda:1\"]";
        let gpu = |text: &str| -> Result<usize, SpecError> {
            match text.parse::<Device>() {
                Ok(Device::Cuda(n)) if n < 64 => Ok(n),
                _ => Err(invalid(field, format!("'{text}' is not a device; {usage}"))),
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
                        return Err(invalid(field, format!("{item} is not a device name; {usage}")));
                    };
                    let n = gpu(text)?;
                    if list.contains(&n) {
                        return Err(invalid(field, format!("cuda:{n} is listed twice")));
                    }
                    list.push(n);
                }
                if list.is_empty() {
                    return Err(invalid(field, format!("the list is empty; {usage}")));
                }
                Ok(DeviceChoice::Gpus(list))
            }
            Some(other) => Err(invalid(field, format!("{other} is not a device; {usage}"))),
        }
    }

    fn replicas(&self, field: &str, raw: Option<&toml::Value>) -> Result<Replicas, SpecError> {
        let usage = "use a count like 2 or bounds like { min = 1, max = 4 }";
        let count = |name: &str, v: Option<&toml::Value>| -> Result<u32, SpecError> {
            match v.and_then(toml::Value::as_integer) {
                Some(n) if (1..=i64::from(MAX_REPLICAS)).contains(&n) => Ok(n as u32),
                Some(n) => Err(invalid(
                    field,
                    format!("{name}{n} is out of range (1 ..= {MAX_REPLICAS})"),
                )),
                None => Err(invalid(field, format!("{name}must be a whole number; {usage}"))),
            }
        };
        match raw {
            None => Ok(Replicas::fixed(1)),
            Some(v @ toml::Value::Integer(_)) => Ok(Replicas::fixed(count("", Some(v))?)),
            Some(toml::Value::Table(t)) => {
                if let Some(unknown) = t.keys().find(|k| *k != "min" && *k != "max") {
                    return Err(invalid(field, format!("unknown key '{unknown}'; {usage}")));
                }
                let min = match t.get("min") {
                    None => 1,
                    v => count("min ", v)?,
                };
                let max = count("max ", t.get("max"))?;
                if min > max {
                    return Err(invalid(field, format!("min {min} is over max {max}")));
                }
                Ok(Replicas { min, max })
            }
            Some(other) => Err(invalid(field, format!("{other} is not a replica count; {usage}"))),
        }
    }

    fn batching(&self, at: &str, raw: RawBatching) -> Result<BatchPolicy, SpecError> {
        let field = |f: &str| format!("{at}.{f}");
        let max_batch_size = range::max_batch_size(raw.max_batch_size.unwrap_or(DEFAULT_MAX_BATCH_SIZE))
            .map_err(|e| invalid(field("max_batch_size"), e.detail()))?;
        let delay = range::max_queue_delay_us(raw.max_queue_delay_us.unwrap_or(DEFAULT_MAX_QUEUE_DELAY_US))
            .map_err(|e| invalid(field("max_queue_delay_us"), e.detail()))?;
        let mut preferred = raw.preferred_batch_sizes.unwrap_or_default();
        preferred.sort_unstable();
        preferred.dedup();
        if let Some(bad) = preferred.iter().find(|&&p| p == 0 || p > max_batch_size) {
            return Err(invalid(
                field("preferred_batch_sizes"),
                format!("{bad} is not between 1 and max_batch_size ({max_batch_size})"),
            ));
        }
        let max_queue_size = raw.max_queue_size.unwrap_or(DEFAULT_MAX_QUEUE_SIZE);
        if max_queue_size == 0 {
            return Err(invalid(field("max_queue_size"), "must be at least 1"));
        }
        let max_rows = raw.max_rows.unwrap_or(max_batch_size);
        if !(1..=65_536).contains(&max_rows) {
            return Err(invalid(field("max_rows"), format!("{max_rows} is out of range (1 ..= 65536)")));
        }
        Ok(BatchPolicy {
            max_rows,
            max_batch_size,
            max_queue_delay: delay,
            preferred_batch_sizes: preferred,
            max_queue_size,
        })
    }
}
