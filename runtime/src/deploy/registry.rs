//! The live handler table, and the one way it changes. Start-up restores it (the config's
//! handlers, then those the state directory kept), and the admin API deploys, replaces and
//! removes through it, so a handler is checked, compiled, recorded and audited the same way
//! whichever door it came in by.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use kiln_wire::EventKind;

use crate::deploy::store::{Deployment, Store};
use crate::files::sha256_hex;
use crate::deploy::{HandlerSettings, check_name};
use crate::model::table::ModelTable;
use crate::sandbox::{ComponentError, Handler, HandlerConfig, Origin, Sandbox};
use crate::telemetry::{EventLog, unix_seconds};
use crate::tenancy::TenantConfig;
use crate::tenancy::audit::{Audit, Event};
use crate::tenancy::keys;
use crate::sync::RwLockExt;

/// Why a deploy or a removal was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeployError {
    /// The request itself is wrong (a name, a setting, a malformed signature).
    #[error("{0}")]
    Invalid(String),
    /// The signature is missing or is not the tenant's.
    #[error("{0}")]
    Unsigned(String),
    /// The config file owns this handler.
    #[error("handler '{0}' is defined in the config file; change it there")]
    ConfigOwned(String),
    #[error("handler '{0}' not found")]
    NotFound(String),
    /// The component is not a handler Kiln can run.
    #[error(transparent)]
    Component(#[from] ComponentError),
    /// The state directory could not record the change; nothing changed.
    #[error("{0}")]
    Store(String),
}

/// A deployment as the admin API received it.
#[derive(Debug)]
pub struct DeployRequest<'a> {
    pub name: &'a str,
    pub tenant: &'a TenantConfig,
    pub settings: HandlerSettings,
    pub component: Vec<u8>,
    /// Base64, as `kiln sign` printed it; required when the tenant has a signing key.
    pub signature: Option<&'a str>,
}

/// What start-up restores from: the config file's handlers and tenants.
#[derive(Debug, Clone, Copy)]
pub struct Handlers<'a> {
    /// The config file, for messages.
    pub source: &'a std::path::Path,
    pub handlers: &'a [HandlerConfig],
    pub tenants: &'a [TenantConfig],
    /// Serve the handlers deployed earlier and kept in the state directory; not in cluster
    /// mode, where a replica serves its config's alone.
    pub restore_deployed: bool,
}

/// The handlers being served, by name. A change swaps an entry; calls in flight keep theirs.
pub struct Registry {
    live: RwLock<HashMap<String, Arc<Handler>>>,
    sandbox: Sandbox,
    store: Store,
    models: Arc<ModelTable>,
    /// Handlers from the config file: the file owns them, the API cannot replace or delete them.
    config_handlers: HashSet<String>,
    /// One change at a time, so the state directory and the live table agree.
    changes: tokio::sync::Mutex<()>,
    audit: Arc<Audit>,
    events: Arc<EventLog>,
}

impl Registry {
    /// Compiles every handler the config names and every one the state directory kept, as
    /// many at once as there are cores. A config handler that fails stops the start (the file
    /// is wrong); a kept one that fails is logged and left out (its files stay for inspection).
    pub fn restore(
        config: &Handlers<'_>,
        sandbox: Sandbox,
        store: Store,
        models: Arc<ModelTable>,
        audit: Arc<Audit>,
        events: Arc<EventLog>,
    ) -> anyhow::Result<Registry> {
        let mut deployed = store
            .load_all()
            .map_err(|e| anyhow::anyhow!("cannot read deployed handlers in {}: {e}", store.dir().display()))?;
        if !config.restore_deployed && !deployed.is_empty() {
            tracing::warn!("{} handlers deployed earlier are not served: in cluster mode a replica serves its config's alone", deployed.len());
            deployed.clear();
        }
        let mut config_sources = Vec::with_capacity(config.handlers.len());
        for handler in config.handlers {
            let bytes = std::fs::read(&handler.component).map_err(|e| {
                anyhow::anyhow!(
                    "{}: handler '{}': cannot read component {}: {e}",
                    config.source.display(),
                    handler.name,
                    handler.component.display()
                )
            })?;
            config_sources.push(bytes);
        }
        let sources: Vec<&[u8]> = config_sources
            .iter()
            .chain(deployed.iter().map(|(_, bytes)| bytes))
            .map(Vec::as_slice)
            .collect();
        let started = std::time::Instant::now();
        let mut compiled = compile_all(&sandbox, &sources).into_iter();
        tracing::info!(
            components = sources.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "handlers compiled"
        );
        let registry = Registry {
            live: RwLock::new(HashMap::new()),
            sandbox,
            store,
            models,
            config_handlers: config.handlers.iter().map(|h| h.name.clone()).collect(),
            changes: tokio::sync::Mutex::new(()),
            audit,
            events,
        };

        let mut live = HashMap::new();
        for (handler, component) in config.handlers.iter().zip(compiled.by_ref()) {
            let loaded = component.and_then(|c| registry.instantiate(handler, &c, Origin::Config)).map_err(|e| {
                anyhow::anyhow!(
                    "{}: handler '{}': component {}: {e}",
                    config.source.display(),
                    handler.name,
                    handler.component.display()
                )
            })?;
            live.insert(handler.name.clone(), Arc::new(loaded));
        }
        for ((deployment, _), component) in deployed.into_iter().zip(compiled) {
            let name = deployment.name.clone();
            let loaded = if live.contains_key(&name) {
                Err("the config file now defines a handler of this name".to_owned())
            } else {
                registry.restore_one(config, &deployment, component)
            };
            match loaded {
                Ok(handler) => {
                    tracing::info!(handler = %name, tenant = %deployment.tenant, "deployed handler loaded");
                    live.insert(name, Arc::new(handler));
                }
                Err(e) => tracing::error!(handler = %name, "deployed handler not loaded: {e}"),
            }
        }
        *registry.live.writing() = live;
        Ok(registry)
    }

    fn restore_one(
        &self,
        config: &Handlers<'_>,
        deployment: &Deployment,
        component: Result<wasmtime::component::Component, ComponentError>,
    ) -> Result<Handler, String> {
        let name = &deployment.name;
        let tenant = config
            .tenants
            .iter()
            .find(|t| t.name == deployment.tenant)
            .ok_or_else(|| format!("tenant '{}' is no longer in the config", deployment.tenant))?;
        if let Some(public) = &tenant.signing_key
            && !deployment.verifies(public)
        {
            // The tenant's key changed (or was added) since the deploy: the operator must
            // deploy a component signed by the current key. The files stay for inspection.
            let reason = "its signature does not verify against the tenant's current signing_key; kept out of \
                          service until it is deployed again, signed by that key";
            self.audit.record(Event::DeployRefused, Some(&deployment.tenant), Some(name), reason);
            return Err(reason.to_owned());
        }
        // Models it names that are gone since are simply not visible to it, as while serving.
        let handler = deployment
            .settings
            .resolve(name, tenant, |_| true, self.store.dir().join("blobs"))
            .map_err(|(field, message)| format!("{field}: {message}"))?;
        let component = component.map_err(|e| e.to_string())?;
        self.instantiate(&handler, &component, origin(deployment)).map_err(|e| e.to_string())
    }

    fn instantiate(
        &self,
        handler: &HandlerConfig,
        component: &wasmtime::component::Component,
        origin: Origin,
    ) -> Result<Handler, ComponentError> {
        self.sandbox.handler(handler, component, Arc::clone(&self.models), origin)
    }

    /// The handler serving `name` now.
    pub fn get(&self, name: &str) -> Option<Arc<Handler>> {
        self.live.reading().get(name).cloned()
    }

    /// Every handler, by name.
    pub fn list(&self) -> Vec<Arc<Handler>> {
        let mut all: Vec<Arc<Handler>> = self.live.reading().values().cloned().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// Checks, compiles and records a deployment, then serves it. Returns the handler and
    /// whether it replaced one. Nothing changes unless everything succeeded.
    pub async fn deploy(&self, request: DeployRequest<'_>) -> Result<(Arc<Handler>, bool), DeployError> {
        let DeployRequest { name, tenant, settings, component: bytes, signature } = request;
        check_name(name).map_err(|m| DeployError::Invalid(format!("handler name {m}")))?;
        if self.config_handlers.contains(name) {
            return Err(DeployError::ConfigOwned(name.to_owned()));
        }
        let may_use = |m: &str| self.models.usable(&tenant.name, m).is_some();
        let config = settings
            .resolve(name, tenant, may_use, PathBuf::from(format!("<deployed {name}>")))
            .map_err(|(field, message)| DeployError::Invalid(format!("{field}: {message}")))?;
        let sha256 = sha256_hex(&bytes);
        let signature = match &tenant.signing_key {
            None => None,
            Some(public) => {
                let signature = signature.ok_or_else(|| {
                    DeployError::Unsigned(format!(
                        "tenant '{}' requires signed components: send the signature in {}",
                        tenant.name,
                        kiln_wire::headers::SIGNATURE
                    ))
                })?;
                let decoded = keys::decode_base64(signature)
                    .ok_or_else(|| DeployError::Invalid(format!("{} is not base64", kiln_wire::headers::SIGNATURE)))?;
                let manifest = settings.signed_manifest(name, &tenant.name, &sha256);
                if !keys::verify_signature(public, manifest.as_bytes(), &decoded) {
                    return Err(DeployError::Unsigned(format!(
                        "the signature is not the signing key of tenant '{}' over this component as handler '{name}' \
                         with these models and priorities (`kiln sign` with the same --handler, --tenant, --models, \
                         --priority and --max-priority)",
                        tenant.name
                    )));
                }
                Some(signature.trim().to_owned())
            }
        };
        let signed = signature.is_some();

        let sandbox = self.sandbox.clone();
        let (component, bytes) = tokio::task::spawn_blocking(move || (sandbox.check_component(&bytes), bytes))
            .await
            .map_err(|e| DeployError::Store(format!("compilation task failed: {e}")))?;
        let component = component?;
        let deployment = Deployment {
            name: name.to_owned(),
            tenant: tenant.name.clone(),
            sha256,
            settings,
            deployed_at: unix_seconds(),
            signed,
            signature,
        };
        let handler = Arc::new(self.instantiate(&config, &component, origin(&deployment))?);

        let _one_at_a_time = self.changes.lock().await;
        let store = self.store.clone();
        let saved = deployment.clone();
        tokio::task::spawn_blocking(move || store.save(&saved, &bytes))
            .await
            .map_err(|e| DeployError::Store(format!("state task failed: {e}")))?
            .map_err(|e| DeployError::Store(format!("cannot record the deployment: {e}")))?;
        let replaced = self
            .live
            .writing()
            .insert(name.to_owned(), Arc::clone(&handler))
            .is_some();
        self.audit.record(
            Event::Deploy,
            Some(&tenant.name),
            Some(name),
            &format!(
                "{} sha256={}{}",
                if replaced { "replaced" } else { "deployed" },
                deployment.sha256,
                if signed { " (signature verified)" } else { "" }
            ),
        );
        self.events.emit(EventKind::Deployed {
            handler: name.to_owned(),
            tenant: tenant.name.clone(),
            sha256: deployment.sha256,
        });
        Ok((handler, replaced))
    }

    /// Stops serving a deployed handler and forgets it; calls in flight finish.
    pub async fn remove(&self, name: &str) -> Result<(), DeployError> {
        if self.config_handlers.contains(name) {
            return Err(DeployError::ConfigOwned(name.to_owned()));
        }
        let _one_at_a_time = self.changes.lock().await;
        let existing = self.get(name).ok_or_else(|| DeployError::NotFound(name.to_owned()))?;
        let store = self.store.clone();
        let key = name.to_owned();
        tokio::task::spawn_blocking(move || store.remove(&key))
            .await
            .map_err(|e| DeployError::Store(format!("state task failed: {e}")))?
            .map_err(|e| DeployError::Store(format!("cannot remove the deployment: {e}")))?;
        self.live.writing().remove(name);
        self.audit.record(Event::Delete, Some(existing.tenant()), Some(name), "deleted");
        self.events.emit(EventKind::Undeployed {
            handler: name.to_owned(),
            tenant: existing.tenant().to_owned(),
        });
        Ok(())
    }
}

fn origin(deployment: &Deployment) -> Origin {
    Origin::Deployed {
        sha256: deployment.sha256.clone(),
        deployed_at: deployment.deployed_at,
        signed: deployment.signed,
    }
}

/// Checks and compiles every component, as many at once as there are cores; results in order.
fn compile_all(sandbox: &Sandbox, sources: &[&[u8]]) -> Vec<Result<wasmtime::component::Component, ComponentError>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(sources.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<_>>> = sources.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(bytes) = sources.get(i) else { break };
                    let result = sandbox.check_component(bytes);
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(result);
                    }
                }
            });
        }
    });
    results
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .ok()
                .flatten()
                .unwrap_or_else(|| Err(ComponentError::Invalid("the compiler thread failed".to_owned())))
        })
        .collect()
}
