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
    pub handlers: Vec<HandlerConfig>,
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
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    pub path: PathBuf,
    pub device: Device,
    pub inputs: Vec<InputSpec>,
    pub outputs: Vec<OutputSpec>,
    /// Forward passes run at load, before the model reports ready.
    pub warmup_runs: u32,
    pub batching: BatchPolicy,
    /// Executor instances (each a thread with its own copy of the module).
    pub instances: u32,
    /// libtorch intra-op threads per instance. Small models run best on one: a thread pool's
    /// hand-offs cost more than their forward pass, and idle pool threads spin on cores the
    /// sandboxes need.
    pub threads: u32,
    /// Longest a request may wait for its result; a request may ask for less, never more.
    pub timeout: Duration,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
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
    pub component: PathBuf,
    /// The models this handler's guest may `load-by-name`; nothing else is visible to it.
    pub models: Vec<String>,
    pub memory_limit_bytes: u64,
    pub deadline: Duration,
    /// Scheduling priority of this handler's inference (higher runs first).
    pub priority: u8,
    /// The highest priority a request may ask for with the `kiln-priority` header.
    pub max_priority: u8,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
pub const DEFAULT_MAX_INSTANCES: u32 = 256;
pub const DEFAULT_MEMORY_LIMIT_MIB: u64 = 128;
pub const DEFAULT_DEADLINE_MS: u64 = 10_000;
pub const DEFAULT_WARMUP_RUNS: u32 = 2;
pub const DEFAULT_MAX_BATCH_SIZE: u32 = 32;
pub const DEFAULT_MAX_QUEUE_DELAY_US: u64 = 0;
pub const DEFAULT_MAX_QUEUE_SIZE: u32 = 1024;
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
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
    handler: Vec<RawHandler>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    max_body_bytes: Option<u64>,
    max_instances: Option<u32>,
    oip_max_priority: Option<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    path: String,
    #[serde(default)]
    device: Option<String>,
    inputs: Vec<RawInput>,
    outputs: Vec<RawOutput>,
    warmup_runs: Option<u32>,
    #[serde(default)]
    batching: RawBatching,
    instances: Option<u32>,
    threads: Option<u32>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatching {
    max_batch_size: Option<u32>,
    max_queue_delay_us: Option<u64>,
    preferred_batch_sizes: Option<Vec<u32>>,
    max_queue_size: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    name: String,
    dtype: String,
    shape: Vec<i64>,
    ragged_dim: Option<usize>,
    pad: Option<f64>,
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
    component: String,
    #[serde(default)]
    models: Vec<String>,
    memory_limit_mib: Option<u64>,
    deadline_ms: Option<u64>,
    priority: Option<u8>,
    max_priority: Option<u8>,
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
        let mut models = Vec::with_capacity(raw.model.len());
        let mut seen = HashSet::new();
        for (i, m) in raw.model.into_iter().enumerate() {
            let model = self.model(i, m)?;
            if !seen.insert(model.name.clone()) {
                return Err(self.invalid(
                    format!("model[{i}].name"),
                    format!("duplicate model name '{}'", model.name),
                ));
            }
            models.push(model);
        }
        let mut handlers = Vec::with_capacity(raw.handler.len());
        let mut seen = HashSet::new();
        for (i, h) in raw.handler.into_iter().enumerate() {
            let handler = self.handler(i, h, &models)?;
            if !seen.insert(handler.name.clone()) {
                return Err(self.invalid(
                    format!("handler[{i}].name"),
                    format!("duplicate handler name '{}'", handler.name),
                ));
            }
            handlers.push(handler);
        }
        Ok(Config {
            source: self.file.to_path_buf(),
            server,
            models,
            handlers,
        })
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
        Ok(ServerConfig {
            listen,
            max_body_bytes: max_body_bytes as usize,
            max_instances,
            oip_max_priority,
        })
    }

    fn priority(&self, field: &str, p: u8) -> Result<(), ConfigError> {
        if p > MAX_PRIORITY {
            return Err(self.invalid(field, format!("{p} is out of range (0 ..= {MAX_PRIORITY})")));
        }
        Ok(())
    }

    fn name(&self, field: &str, name: &str) -> Result<(), ConfigError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            && !name.starts_with('.');
        if ok {
            Ok(())
        } else {
            Err(self.invalid(
                field,
                format!(
                    "'{name}' is not a valid name (1-64 of a-z A-Z 0-9 - _ ., not starting with '.')"
                ),
            ))
        }
    }

    fn model(&self, i: usize, raw: RawModel) -> Result<ModelConfig, ConfigError> {
        let at = |f: &str| format!("model[{i}].{f}");
        self.name(&at("name"), &raw.name)?;
        let at = |f: &str| format!("model '{}'.{f}", raw.name);
        let device = match raw.device.as_deref() {
            None | Some("cpu") => Device::Cpu,
            Some(d) => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Device::Cuda(n),
                _ => {
                    return Err(self.invalid(
                        at("device"),
                        format!("'{d}' is not a device; use \"cpu\" or \"cuda:N\""),
                    ));
                }
            },
        };
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
            inputs.push(InputSpec {
                name: input.name,
                dtype,
                shape,
                ragged,
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
        let instances = raw.instances.unwrap_or(1);
        if !(1..=64).contains(&instances) {
            return Err(self.invalid(at("instances"), format!("{instances} is out of range (1 ..= 64)")));
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
        Ok(ModelConfig {
            path: self.path(&raw.path),
            name: raw.name,
            device,
            inputs,
            outputs,
            warmup_runs,
            batching,
            instances,
            threads,
            timeout: Duration::from_millis(timeout_ms),
        })
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
        Ok(BatchPolicy {
            max_batch_size,
            max_queue_delay: Duration::from_micros(delay),
            preferred_batch_sizes: preferred,
            max_queue_size,
        })
    }

    fn handler(
        &self,
        i: usize,
        raw: RawHandler,
        models: &[ModelConfig],
    ) -> Result<HandlerConfig, ConfigError> {
        self.name(&format!("handler[{i}].name"), &raw.name)?;
        let at = |f: &str| format!("handler '{}'.{f}", raw.name);
        for m in &raw.models {
            if !models.iter().any(|known| &known.name == m) {
                return Err(self.invalid(
                    at("models"),
                    format!("model '{m}' is not declared in any [[model]] section"),
                ));
            }
        }
        let mib = raw.memory_limit_mib.unwrap_or(DEFAULT_MEMORY_LIMIT_MIB);
        if !(1..=4096).contains(&mib) {
            return Err(self.invalid(
                at("memory_limit_mib"),
                format!("{mib} is out of range (1 ..= 4096)"),
            ));
        }
        let ms = raw.deadline_ms.unwrap_or(DEFAULT_DEADLINE_MS);
        if !(1..=3_600_000).contains(&ms) {
            return Err(self.invalid(
                at("deadline_ms"),
                format!("{ms} is out of range (1 ..= 3600000)"),
            ));
        }
        let priority = raw.priority.unwrap_or(0);
        self.priority(&at("priority"), priority)?;
        let max_priority = raw.max_priority.unwrap_or(priority);
        self.priority(&at("max_priority"), max_priority)?;
        if max_priority < priority {
            return Err(self.invalid(
                at("max_priority"),
                format!("{max_priority} is below the handler's priority {priority}"),
            ));
        }
        Ok(HandlerConfig {
            component: self.path(&raw.component),
            name: raw.name,
            models: raw.models,
            memory_limit_bytes: mib << 20,
            deadline: Duration::from_millis(ms),
            priority,
            max_priority,
        })
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
                Ok(_) => format!("(no error)\n"),
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

            [[handler]]
            name = "h"
            component = "/abs/h.wasm"
            models = ["m"]
        "#;
        let config = Config::parse(text, Path::new("t.toml"), Path::new("/srv")).expect("valid");
        assert_eq!(config.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.server.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        let model = &config.models[0];
        assert_eq!(model.path, Path::new("/srv/m.pt"));
        assert_eq!(model.device, Device::Cpu);
        assert_eq!(model.inputs[0].shape, vec![None, Some(3)]);
        let handler = &config.handlers[0];
        assert_eq!(handler.component, Path::new("/abs/h.wasm"));
        assert_eq!(handler.memory_limit_bytes, DEFAULT_MEMORY_LIMIT_MIB << 20);
        assert_eq!(handler.deadline, Duration::from_millis(DEFAULT_DEADLINE_MS));
    }

    #[test]
    fn the_bundled_examples_config_is_valid() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kiln.toml");
        let config = Config::load(&file).expect("examples/kiln.toml");
        assert_eq!(config.models.len(), 2);
        assert_eq!(config.handlers.len(), 2);
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
    }
}
