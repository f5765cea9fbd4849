//! The deployment config: one TOML file with `[server]`, `[[model]]` and `[[handler]]`.
//!
//! The file is parsed raw (`deny_unknown_fields`) and then validated into the typed [`Config`]
//! the rest of Kiln uses. Every error names the file, the field and what is wrong with it.

pub mod layers;
pub mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fleet::gpu::GpuConfig;
use crate::fleet::scaler::ScalerConfig;
use crate::model::spec::ModelConfig;
use crate::sandbox::{HandlerConfig, SlotResetPolicy};
use crate::tenancy::TenantConfig;
use crate::tls::{ServerTls, TlsFiles};
use kiln_codec::config::RawConfig;
use validate::Validator;

/// A validated deployment.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config was read from (or `<inline>`), for messages.
    pub source: PathBuf,
    pub server: ServerConfig,
    pub models: Vec<ModelConfig>,
    pub tenants: Vec<TenantConfig>,
    pub handlers: Vec<HandlerConfig>,
    /// The handlers whose `component` is an `oci://` reference: `kiln serve` fetches them (or
    /// finds them cached) and points their `component` at the file before anything compiles.
    pub oci_handlers: Vec<OciHandler>,
    pub scaler: ScalerConfig,
    pub gpus: GpuConfig,
}

/// A handler whose component is in an OCI registry.
#[derive(Debug, Clone)]
pub struct OciHandler {
    pub name: String,
    pub tenant: String,
    pub reference: kiln_codec::oci::OciRef,
    /// What a signature must cover, for a tenant with a signing key.
    pub settings: crate::deploy::HandlerSettings,
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
    /// The gRPC API's address (Open Inference Protocol); `None` when turned off.
    pub grpc_listen: Option<SocketAddr>,
    /// A listener of its own serving only `/metrics`, without a key, for a Prometheus that
    /// holds no admin key; `None` (the default) when turned off.
    pub metrics_listen: Option<SocketAddr>,
    /// Largest component the admin API accepts.
    pub max_component_bytes: usize,
    /// After SIGTERM: how long new connections are still accepted while readiness says 503 (so
    /// load balancers stop sending first), and how long in-flight work has in all to finish.
    pub drain_grace: Duration,
    pub drain_timeout: Duration,
    /// How sandbox slots are reset between requests.
    pub slot_reset: SlotResetPolicy,
    /// The content-addressed cache of remote model files, and its size limit.
    pub cache_dir: PathBuf,
    pub cache_max_bytes: Option<u64>,
    /// Whether remote sources may go without a `sha256` pin.
    pub allow_unpinned: bool,
    /// Whether tenants' model sources may be loopback or private addresses.
    pub tenant_private_sources: bool,
    /// Credentials for OCI registries: a Docker `config.json` (else `$DOCKER_CONFIG` or
    /// `~/.docker/config.json` where there is one).
    pub registry_auth: Option<PathBuf>,
    /// CA certificates (PEM) trusted for OCI registries besides the public roots built into kiln (Mozilla's, from webpki-roots).
    pub registry_ca: Option<PathBuf>,
    /// In cluster mode, this replica's name; `None` for a server on its own.
    pub cluster: Option<String>,
    /// Where the API key hashes are (`admin.keys`, `tenant-keys/TENANT.keys`), re-read when
    /// they change: the state directory, or a mounted Secret.
    pub keys_dir: PathBuf,
    /// Which listeners speak TLS, with which certificates.
    pub tls: ListenersTls,
    /// Where traces go (`otlp_endpoint`); `None` when the config does not say.
    pub otlp_endpoint: Option<String>,
    pub otlp_sample_ratio: f64,
    /// Whether CPU passes spread over idle cores ([`crate::model::cores`]).
    pub spread_idle_cores: bool,
    /// How long a model may take to load and warm up before its load fails.
    pub load_timeout: Duration,
    /// How long a tenant's model download may take in all.
    pub tenant_fetch_timeout: Duration,
}

/// TLS on the listeners: `tls_cert`/`tls_key` for every one, unless a listener's own fields
/// (`admin_tls_cert`, `grpc_tls = false`, ...) say otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenersTls {
    pub default: Option<TlsFiles>,
    pub admin: ListenerTls,
    pub grpc: ListenerTls,
    pub metrics: ListenerTls,
    /// The CAs the admin listener's clients must present a certificate from.
    pub admin_client_ca: Option<PathBuf>,
}

/// One listener's own TLS fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ListenerTls {
    /// The default pair, if any.
    #[default]
    Inherit,
    /// Plain text (`X_tls = false`).
    Plain,
    /// Its own certificate and key.
    Own(TlsFiles),
}

impl ListenerTls {
    fn resolve(&self, default: Option<&TlsFiles>) -> Option<TlsFiles> {
        match self {
            ListenerTls::Inherit => default.cloned(),
            ListenerTls::Plain => None,
            ListenerTls::Own(files) => Some(files.clone()),
        }
    }
}

impl ListenersTls {
    /// The serving listener's TLS; `None` for plain HTTP.
    pub fn serving(&self) -> Option<ServerTls> {
        self.default.clone().map(|files| ServerTls { files, client_ca: None })
    }

    pub fn admin(&self) -> Option<ServerTls> {
        self.admin.resolve(self.default.as_ref()).map(|files| ServerTls { files, client_ca: self.admin_client_ca.clone() })
    }

    pub fn grpc(&self) -> Option<ServerTls> {
        self.grpc.resolve(self.default.as_ref()).map(|files| ServerTls { files, client_ca: None })
    }

    pub fn metrics(&self) -> Option<ServerTls> {
        self.metrics.resolve(self.default.as_ref()).map(|files| ServerTls { files, client_ca: None })
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";
/// Triton's gRPC port, so its clients' defaults work.
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:8001";
pub const DEFAULT_STATE_DIR: &str = "state";
pub const DEFAULT_MAX_COMPONENT_BYTES: usize = 64 * 1024 * 1024;
pub const DEFAULT_REQUESTS_PER_SECOND: f64 = 1000.0;
/// What a tenant's own models' files may weigh in all, unless its quota says otherwise.
pub const DEFAULT_MAX_MODEL_BYTES: u64 = 1 << 30;
/// What a tenant's own models may use in all, unless its quota says otherwise: a few versions,
/// each served version with one single-threaded instance.
pub const DEFAULT_MAX_MODEL_VERSIONS: u32 = 4;
pub const DEFAULT_MAX_MODEL_INSTANCES: u32 = 4;
pub const DEFAULT_MAX_MODEL_THREADS: u32 = 4;
pub const DEFAULT_LOAD_TIMEOUT_S: u64 = 60;
pub const DEFAULT_TENANT_FETCH_TIMEOUT_S: u64 = 600;
pub const DEFAULT_MAX_CONCURRENT: u32 = 64;
pub const DEFAULT_MAX_COMPUTE_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_MAX_COMPUTE_CALLS: u32 = 64;
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
pub const DEFAULT_MAX_INSTANCES: u32 = 256;
pub const DEFAULT_MEMORY_LIMIT_MIB: u64 = 128;
pub const DEFAULT_DEADLINE_MS: u64 = 10_000;
pub const DEFAULT_SCALER_INTERVAL_MS: u64 = 2_000;
pub const DEFAULT_UP_COOLDOWN_MS: u64 = 10_000;
pub const DEFAULT_DOWN_COOLDOWN_MS: u64 = 30_000;
pub const DEFAULT_MAX_GPU_UTILIZATION: u32 = 95;
pub const DEFAULT_SCALER_HISTORY: usize = 256;
pub const DEFAULT_GPU_POLL_MS: u64 = 1_000;
pub const DEFAULT_DRAIN_GRACE_MS: u64 = 5_000;
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 30_000;

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
    #[error("no config file: looked for {looked}; pass --config FILE")]
    NotFound { looked: String },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: PathBuf,
        field: String,
        message: String,
    },
}

// ---- raw form, exactly as written in the file -------------------------------------------------

impl ServerConfig {
    /// `kiln serve --allow-unpinned`: refused in cluster mode, which serves pinned sources only.
    pub fn allow_unpinned_by_flag(&mut self, flag: bool) -> Result<(), String> {
        if flag && let Some(replica) = &self.cluster {
            return Err(format!(
                "--allow-unpinned: replica '{replica}' is in cluster mode, which serves pinned sources only (a tag or \
                 an unpinned file could differ from one replica to the next)"
            ));
        }
        self.allow_unpinned |= flag;
        Ok(())
    }
}

impl Config {
    /// Reads and validates a config file, with this process's `KILN_SERVER__FIELD` variables
    /// over its `[server]` table ([`layers`]). Relative paths inside it are relative to its
    /// folder.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        Config::load_with(file, &layers::server_overrides(server_env())?)
    }

    /// [`Config::load`] with these overrides instead of the environment's.
    pub fn load_with(file: &Path, overrides: &[layers::Override]) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        let base = file.parent().unwrap_or(Path::new("."));
        Config::parse_with(&text, file, base, overrides)
    }

    /// Validates config text; `file` is only used in messages, `base` resolves relative paths.
    pub fn parse(text: &str, file: &Path, base: &Path) -> Result<Config, ConfigError> {
        Config::parse_with(text, file, base, &[])
    }

    /// [`Config::parse`] with `overrides` set over the text's `[server]` table once the text
    /// has parsed (so its own errors keep their lines). A value the variable gave that
    /// validation refuses is blamed on the variable, not the file.
    fn parse_with(text: &str, file: &Path, base: &Path, overrides: &[layers::Override]) -> Result<Config, ConfigError> {
        let mut raw: RawConfig = kiln_codec::config::parse(text).map_err(|message| ConfigError::Parse {
            file: file.to_path_buf(),
            message,
        })?;
        raw.server = layers::apply(raw.server, overrides)?;
        Validator { file, base }.config(raw).map_err(|e| layers::blame(e, overrides))
    }

    /// Model `name` (`NAME@VERSION`, or `NAME` for its latest version served).
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name).or_else(|| self.models.iter().rfind(|m| m.model_name() == name))
    }
}


impl Config {
    /// The folder relative paths of the config file (and of models loaded later) resolve against.
    pub fn base(&self) -> &Path {
        self.source.parent().unwrap_or(Path::new("."))
    }

    pub fn tenant(&self, name: &str) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| t.name == name)
    }
}

/// This process's `KILN_SERVER__*` variables (the others are not read; a value that is not
/// UTF-8 is read lossily and then refused by its field's type, or taken as a path).
pub fn server_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            k.starts_with(layers::SERVER_ENV_PREFIX).then(|| (k, v.to_string_lossy().into_owned()))
        })
        .collect()
}

/// An address to listen on, or `None` for `off` (the listener turned off); `None` inside the
/// `Option` when the text is neither.
pub fn parse_optional_listen(text: &str) -> Option<Option<SocketAddr>> {
    match text {
        "off" => Some(None),
        _ => text.parse().ok().map(Some),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_listener_may_be_turned_off() {
        assert_eq!(super::parse_optional_listen("off"), Some(None));
        assert_eq!(super::parse_optional_listen("127.0.0.1:9001"), Some(Some(([127, 0, 0, 1], 9001).into())));
        assert_eq!(super::parse_optional_listen("localhost"), None);
    }

    use super::*;
    use crate::model::spec::{DeviceChoice, Replicas};

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
        assert_eq!(config.server.grpc_listen.map(|a| a.to_string()).as_deref(), Some(DEFAULT_GRPC_LISTEN));
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
        assert_eq!(handler.models, None, "every model of the tenant, as they come and go");
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
    fn a_versioned_model_serves_the_versions_its_policy_picks_each_under_its_own_name() {
        let parse = |policy: &str| {
            let text = format!(
                "[[model]]\nname = \"m\"\nversion_policy = \"{policy}\"\ninputs = [{{ name = \"x\", dtype = \"FP32\", shape = [-1, 3] }}]\n\
                 outputs = [{{ name = \"y\" }}]\nversions = [\n  {{ version = 3, source = \"m3.pt\" }},\n  {{ version = 1, path = \"m1.pt\" }},\n\
                 {{ version = 2, source = \"https://example.com/m2.pt\", sha256 = \"{}\" }},\n]\n\
                 [[tenant]]\nname = \"t\"\nmodels = [\"m\"]\n",
                "0".repeat(64)
            );
            Config::parse(&text, Path::new("t.toml"), Path::new("/srv")).map(|c| {
                c.models.iter().map(|m| (m.name.clone(), m.version, m.model_name().to_owned())).collect::<Vec<_>>()
            })
        };
        let named = |vs: &[u64]| vs.iter().map(|v| (format!("m@{v}"), *v, "m".to_owned())).collect::<Vec<_>>();
        assert_eq!(parse("latest(1)").expect("valid"), named(&[3]));
        assert_eq!(parse("latest(2)").expect("valid"), named(&[2, 3]));
        assert_eq!(parse("latest(9)").expect("valid"), named(&[1, 2, 3]));
        assert_eq!(parse("all").expect("valid"), named(&[1, 2, 3]));
        assert_eq!(parse("specific(3, 1)").expect("valid"), named(&[1, 3]));
        for (bad, naming) in [("latest(0)", "N must be 1 or more"), ("specific(4)", "version 4 is not in"), ("first", "not a version policy")] {
            let e = parse(bad).expect_err(bad).to_string();
            assert!(e.contains("model 'm'.version_policy") && e.contains(naming), "{bad}: {e}");
        }
        let config = Config::parse(
            "[[model]]\nname = \"m\"\nversions = [{ version = 1, source = \"ftp://x/m.pt\" }]\ninputs = [{ name = \"x\", dtype = \"FP32\", shape = [-1] }]\noutputs = [{ name = \"y\" }]\n",
            Path::new("t.toml"),
            Path::new("/srv"),
        );
        let e = config.expect_err("bad scheme").to_string();
        assert!(e.contains("model 'm'.versions[1].source") && e.contains("unsupported scheme"), "{e}");
    }

    #[test]
    fn an_outputs_own_tolerance_takes_what_it_leaves_out_from_the_model_wide_one() {
        let text = r#"
            [[model]]
            name = "m"
            path = "m.pt"
            precision = "auto"
            tolerance = { cosine = 0.99, max_abs = 0.5, outputs = { logits = { cosine = 0.9 }, ids = { max_abs = 1.0 } } }
            inputs = [{ name = "x", dtype = "FP32", shape = [-1, 3] }]
            outputs = [{ name = "hidden" }, { name = "logits" }, { name = "ids" }]
        "#;
        let config = Config::parse(text, Path::new("t.toml"), Path::new("/srv")).expect("valid");
        let auto = config.models[0].auto_precision.as_ref().expect("auto");
        let of = |name: &str| {
            let t = auto.tolerance_of(name);
            (t.cosine, t.max_abs)
        };
        assert_eq!(of("hidden"), (0.99, Some(0.5)));
        assert_eq!(of("logits"), (0.9, Some(0.5)));
        assert_eq!(of("ids"), (0.99, Some(1.0)));
        // A precision pinned by name.
        let pinned = text
            .replace("precision = \"auto\"", "precision = \"bf16-autocast\"\nchannels_last = true")
            .replace("tolerance = ", "# ")
            .replace("shape = [-1, 3]", "shape = [-1, 3, 8, 8]");
        let config = Config::parse(&pinned, Path::new("t.toml"), Path::new("/srv")).expect("valid");
        let form = config.models[0].form();
        assert_eq!((form.precision, form.channels_last), (crate::model::spec::Precision::Bf16Autocast, true));
        assert_eq!(form.to_string(), "bf16-autocast channels-last");
        // Said false beside auto, it says what auto would do anyway.
        let said = text.replace("precision = \"auto\"", "precision = \"auto\"\nchannels_last = false");
        assert!(Config::parse(&said, Path::new("t.toml"), Path::new("/srv")).is_ok());
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
