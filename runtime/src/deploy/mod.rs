//! Deployed handlers and models: the settings a deployment carries, the state directory that
//! keeps them across restarts ([`store`]), the live handler table every change goes through
//! ([`registry`]), and the model repository ([`models`]).

pub mod models;
pub mod oci;
pub mod registry;
pub mod sources;
pub mod store;

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::model::spec::MAX_PRIORITY;
use crate::sandbox::HandlerConfig;
use crate::sandbox::cache::CachePolicy;
use crate::tenancy::TenantConfig;

/// A handler's own settings, as written in a `[[handler]]` section or sent with a deployment.
/// Everything is optional: models default to all of the tenant's (as they come and go), limits
/// to the tenant's quota.
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
    /// A response cache for this handler (not covered by the signature: it changes how answers
    /// are kept, not what runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<kiln_codec::config::RawCache>,
}

/// Defaults of a handler's `cache`, and the largest values it may take.
pub const DEFAULT_CACHE_TTL_MS: u64 = 60_000;
pub const DEFAULT_CACHE_MAX_ENTRIES: u64 = 1024;
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 16 << 20;
const MAX_CACHE_TTL_MS: u64 = 86_400_000;
const MAX_CACHE_ENTRIES: u64 = 1_000_000;
const MAX_CACHE_BYTES: u64 = 1 << 30;

/// A handler's `cache` with its defaults, or the field that is out of range.
fn cache_policy(raw: &kiln_codec::config::RawCache) -> Result<CachePolicy, (&'static str, String)> {
    let range = |field: &'static str, value: Option<u64>, default: u64, most: u64| match value.unwrap_or(default) {
        n if (1..=most).contains(&n) => Ok(n),
        n => Err((field, format!("{n} is out of range (1 ..= {most})"))),
    };
    Ok(CachePolicy {
        ttl: Duration::from_millis(range("cache.ttl_ms", raw.ttl_ms, DEFAULT_CACHE_TTL_MS, MAX_CACHE_TTL_MS)?),
        max_entries: range("cache.max_entries", raw.max_entries, DEFAULT_CACHE_MAX_ENTRIES, MAX_CACHE_ENTRIES)? as usize,
        max_bytes: range("cache.max_bytes", raw.max_bytes, DEFAULT_CACHE_MAX_BYTES, MAX_CACHE_BYTES)? as usize,
    })
}

impl HandlerSettings {
    /// The text a signature over this deployment covers (see [`crate::tenancy::keys::deployment_manifest`]).
    pub fn signed_manifest(&self, handler: &str, tenant: &str, sha256: &str) -> String {
        crate::tenancy::keys::deployment_manifest(handler, tenant, sha256, self.models.as_deref(), self.priority, self.max_priority)
    }

    /// The handler these settings describe for `tenant`: models must be ones the tenant may use
    /// (`may_use`), and limits may only tighten the tenant's quota. An error names the offending
    /// field.
    pub fn resolve(
        &self,
        name: &str,
        tenant: &TenantConfig,
        may_use: impl Fn(&str) -> bool,
        component: PathBuf,
    ) -> Result<HandlerConfig, (&'static str, String)> {
        if let Some(m) = self.models.iter().flatten().find(|m| !may_use(m)) {
            return Err(("models", format!("model '{m}' is not among the models of tenant '{}'", tenant.name)));
        }
        let models = self.models.clone();
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
        let cache = self.cache.as_ref().map(cache_policy).transpose()?;
        Ok(HandlerConfig {
            cache,
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

/// Checks a handler or tenant name from outside the config (the admin API, the CLI).
pub fn check_name(name: &str) -> Result<(), String> {
    if crate::model::spec::is_name(name) {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a valid name (1-64 of a-z A-Z 0-9 - _ ., not starting with '.')"
        ))
    }
}
