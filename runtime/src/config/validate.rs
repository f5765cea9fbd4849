//! Validation: raw config in, typed [`Config`] out, or an error naming the file, the field and
//! what is wrong. Defaults are applied here.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_codec::config::{RawConfig, RawGpus, RawHandler, RawModel, RawQuota, RawScaler, RawServer, RawTenant};

use super::{
    Config, ConfigError, DEFAULT_ADMIN_LISTEN, DEFAULT_DEADLINE_MS, DEFAULT_DOWN_COOLDOWN_MS, DEFAULT_DRAIN_GRACE_MS,
    DEFAULT_DRAIN_TIMEOUT_MS, DEFAULT_GPU_POLL_MS, DEFAULT_GRPC_LISTEN, DEFAULT_LISTEN, DEFAULT_LOAD_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_COMPONENT_BYTES, DEFAULT_MAX_COMPUTE_BYTES, DEFAULT_MAX_COMPUTE_CALLS,
    DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_GPU_UTILIZATION, DEFAULT_MAX_INSTANCES, DEFAULT_MAX_MODEL_BYTES,
    DEFAULT_MAX_MODEL_INSTANCES, DEFAULT_MAX_MODEL_THREADS, DEFAULT_MAX_MODEL_VERSIONS, DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_MEMORY_LIMIT_MIB, DEFAULT_REQUESTS_PER_SECOND, DEFAULT_SCALER_HISTORY, DEFAULT_SCALER_INTERVAL_MS,
    DEFAULT_STATE_DIR, DEFAULT_TENANT_FETCH_TIMEOUT_S, DEFAULT_UP_COOLDOWN_MS, ListenerTls, ListenersTls, OciHandler, ServerConfig,
};
use crate::deploy::{HandlerSettings, check_name};
use kiln_codec::oci::OciRef;
use crate::fleet::gpu::{GpuConfig, SimulatedGpuConfig, SimulatedStep};
use crate::fleet::scaler::ScalerConfig;
use crate::model::spec::parse::ModelFields;
use crate::model::spec::{MAX_PRIORITY, ModelConfig};
use crate::sandbox::{HandlerConfig, SandboxLimits, SlotResetPolicy};
use crate::tenancy::keys::parse_public_key;
use crate::tenancy::{ModelDevices, Quota, TenantConfig};

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
        ModelFields { base: self.base }.path(p)
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
        let (handlers, oci_handlers): (Vec<_>, Vec<_>) = raw
            .handler
            .into_iter()
            .enumerate()
            .map(|(i, h)| self.handler(i, h, &tenants))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let oci_handlers = oci_handlers.into_iter().flatten().collect();
        self.unique("handler", handlers.iter().map(|h| h.name.as_str()))?;
        let scaler = self.scaler(raw.scaler)?;
        let gpus = self.gpus(raw.gpus)?;
        Ok(Config {
            source: self.file.to_path_buf(),
            server,
            models,
            tenants,
            handlers,
            oci_handlers,
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
        let metrics_listen = raw.metrics_listen.as_deref().unwrap_or("off");
        let metrics_listen = super::parse_optional_listen(metrics_listen).ok_or_else(|| {
            self.invalid(
                "server.metrics_listen",
                format!("'{metrics_listen}' is not an address like 0.0.0.0:9090, nor 'off'"),
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
        let cluster = match raw.cluster {
            Some(true) => {
                if raw.allow_unpinned == Some(true) {
                    return Err(self.invalid(
                        "server.allow_unpinned",
                        "cluster mode needs every source pinned: a tag or an unpinned file could differ from one replica to the next",
                    ));
                }
                let replica = match raw.replica.as_deref() {
                    Some(name) => name.to_owned(),
                    None => default_replica_name(),
                };
                if !(1..=63).contains(&replica.len())
                    || !replica.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    || replica.starts_with('-')
                {
                    return Err(self.invalid("server.replica", format!("'{replica}' is not a replica name (1-63 of a-z 0-9 -)")));
                }
                Some(replica)
            }
            Some(false) | None => None,
        };
        let keys_dir = raw.keys_dir.as_deref().map_or_else(|| state_dir.clone(), |dir| self.path(dir));
        let tls = self.listeners_tls(&raw)?;
        let otlp_endpoint = match raw.otlp_endpoint.as_deref() {
            Some(url) => Some(check_otlp_endpoint(url).map_err(|message| self.invalid("server.otlp_endpoint", message))?),
            None => None,
        };
        let otlp_sample_ratio = raw.otlp_sample_ratio.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&otlp_sample_ratio) {
            return Err(self.invalid("server.otlp_sample_ratio", format!("{otlp_sample_ratio} is out of range (0.0 ..= 1.0)")));
        }
        if raw.cache_max_bytes == Some(0) {
            return Err(self.invalid("server.cache_max_bytes", "0 would keep nothing; leave it out for no limit"));
        }
        Ok(ServerConfig {
            cache_dir,
            cache_max_bytes: raw.cache_max_bytes,
            allow_unpinned: raw.allow_unpinned.unwrap_or(false),
            tenant_private_sources: raw.tenant_private_sources.unwrap_or(false),
            registry_auth: raw.registry_auth.as_deref().map(|p| self.path(p)),
            registry_ca: raw.registry_ca.as_deref().map(|p| self.path(p)),
            cluster,
            keys_dir,
            tls,
            otlp_endpoint,
            otlp_sample_ratio,
            spread_idle_cores: raw.spread_idle_cores.unwrap_or(false),
            load_timeout,
            tenant_fetch_timeout,
            listen,
            max_body_bytes: max_body_bytes as usize,
            max_instances,
            oip_max_priority,
            state_dir,
            admin_listen,
            grpc_listen,
            metrics_listen,
            max_component_bytes: max_component_bytes as usize,
            drain_grace: Duration::from_millis(drain_grace_ms),
            drain_timeout: Duration::from_millis(drain_timeout_ms),
            slot_reset,
        })
    }

    /// `tls_cert`/`tls_key` and each listener's own TLS fields.
    fn listeners_tls(&self, raw: &RawServer) -> Result<ListenersTls, ConfigError> {
        let pair = |prefix: &str, cert: &Option<String>, key: &Option<String>| {
            let (cert, key) = (cert.as_deref().map(|p| self.path(p)), key.as_deref().map(|p| self.path(p)));
            let missing = if cert.is_some() { "tls_key" } else { "tls_cert" };
            crate::tls::files(prefix, cert.as_deref(), key.as_deref()).map_err(|message| self.invalid(format!("server.{prefix}{missing}"), message))
        };
        let default = pair("", &raw.tls_cert, &raw.tls_key)?;
        let listener = |name: &str, cert: &Option<String>, key: &Option<String>, on: Option<bool>| -> Result<ListenerTls, ConfigError> {
            let own = pair(&format!("{name}_"), cert, key)?;
            match (on, own) {
                (Some(false), Some(_)) => Err(self.invalid(
                    format!("server.{name}_tls"),
                    format!("is false, but {name}_tls_cert and {name}_tls_key are set: leave them out for plain text, or {name}_tls out for TLS"),
                )),
                (Some(false), None) => Ok(ListenerTls::Plain),
                (_, Some(files)) => Ok(ListenerTls::Own(files)),
                (Some(true), None) if default.is_none() => Err(self.invalid(
                    format!("server.{name}_tls"),
                    format!("is true, but there is no certificate: set tls_cert and tls_key, or {name}_tls_cert and {name}_tls_key"),
                )),
                (_, None) => Ok(ListenerTls::Inherit),
            }
        };
        let tls = ListenersTls {
            admin: listener("admin", &raw.admin_tls_cert, &raw.admin_tls_key, raw.admin_tls)?,
            grpc: listener("grpc", &raw.grpc_tls_cert, &raw.grpc_tls_key, raw.grpc_tls)?,
            metrics: listener("metrics", &raw.metrics_tls_cert, &raw.metrics_tls_key, raw.metrics_tls)?,
            admin_client_ca: raw.admin_client_ca.as_deref().map(|p| self.path(p)),
            default,
        };
        if tls.admin_client_ca.is_some() && tls.admin().is_none() {
            return Err(self.invalid(
                "server.admin_client_ca",
                "client certificates need TLS on the admin listener: set tls_cert and tls_key, or admin_tls_cert and admin_tls_key",
            ));
        }
        Ok(tls)
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

    /// A `[[model]]` section as the configs of the versions it serves ([`ModelFields`]).
    pub(super) fn model_versions(&self, i: usize, raw: RawModel) -> Result<Vec<ModelConfig>, ConfigError> {
        ModelFields { base: self.base }.versions(i, raw).map_err(|e| self.invalid(e.field, e.message))
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
    ) -> Result<(HandlerConfig, Option<OciHandler>), ConfigError> {
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
        // `oci://…` names a registry's artifact, fetched at start; anything else is a file.
        let (component, oci) = if raw.component.starts_with("oci://") {
            let reference = OciRef::parse(&raw.component).map_err(|e| self.invalid(at("component"), e.to_string()))?;
            let oci = OciHandler { name: raw.name.clone(), tenant: tenant.name.clone(), reference, settings: settings.clone() };
            (PathBuf::from(&raw.component), Some(oci))
        } else {
            (self.path(&raw.component), None)
        };
        let handler = settings
            .resolve(&raw.name, tenant, |m| tenant.models.iter().any(|t| t == m), component)
            .map_err(|(f, message)| self.invalid(at(f), message))?;
        Ok((handler, oci))
    }
}

/// This host's name as a replica name: `$HOSTNAME` (a container's id on Docker, the pod's name on
/// Kubernetes), else the kernel's, lowercased with anything else turned into `-`.
fn default_replica_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_default();
    let name: String = host
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .take(63)
        .collect();
    let name = name.trim_matches('-').to_owned();
    if name.is_empty() { "replica".to_owned() } else { name }
}

/// An OTLP/gRPC endpoint as Kiln sends to it: `http://HOST:PORT`.
pub fn check_otlp_endpoint(url: &str) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    match url.split_once("://") {
        Some(("http", rest)) if !rest.is_empty() && !rest.contains('/') => Ok(url.to_owned()),
        Some(("https", _)) => Err(format!("'{url}': traces are sent over plain gRPC only for now; run the collector beside Kiln (a sidecar or the node's agent) and give its http:// address")),
        _ => Err(format!("'{url}' is not an OTLP/gRPC endpoint like http://127.0.0.1:4317")),
    }
}
