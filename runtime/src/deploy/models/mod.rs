//! The model repository: every model Kiln knows (the config file's and those loaded through the
//! admin API), whether each is being served, and the one way models are loaded, replaced,
//! unloaded and deleted while serving. The admin API's `/v1/models` routes and the Open
//! Inference Protocol's repository extension both go through it.
//!
//! A replacement never drops a request: the new model loads and warms up beside the old one,
//! which keeps serving; only once the new one is ready does the [`ModelTable`] switch to it.
//! Requests already holding the old model finish on it, and it stops when the last is done.
//! A model loaded for the first time is in the table while it loads, so that its readiness and
//! its callers see "loading", and leaves it again if the load fails.
//!
//! Models loaded through the API are recorded in the state directory (`models/NAME.json`, the
//! fields as sent) when their load succeeds, and come back after a restart; an unloaded one keeps
//! its record until it is deleted. The config file's models can be unloaded and loaded again
//! (a reload from the same file), not replaced or deleted: the file owns them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_wire::EventKind;

use crate::deploy::check_name;
use crate::deploy::sources::{Held, ModelCache, Remote, Requester, TenantFetch, verify_local};
use crate::deploy::store::{ModelDeployment, Store};
use crate::fleet::placement::Placer;
use crate::fleet::start_model;
use crate::model::handle::{ModelHandle, TuningChange};
use crate::model::shared::ModelState;
use crate::model::spec::parse::ModelFields;
use crate::model::spec::{DeviceChoice, ModelConfig, OWNER_SEPARATOR, owned_key};
use crate::model::table::{ModelTable, Served};
use crate::telemetry::{EventLog, MAX_LOGGED, loggable, unix_seconds};
use crate::tenancy::Quota;
use crate::tenancy::audit::{Audit, Event};
use crate::sync::MutexExt;

mod control;
mod fetch;
mod owned;

pub use control::Control;

/// Why a model the config file defines is not served: an operator unloaded it.
const UNLOADED: &str = "unloaded";

/// How often a load in progress is looked at.
const LOAD_POLL: Duration = Duration::from_millis(10);

/// Why a repository change was refused or failed. Nothing changed in any case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The request is wrong: a name, a field, an unknown tenant.
    #[error("{0}")]
    Invalid(String),
    #[error("model '{0}' is defined in the config file; change it there")]
    ConfigOwned(String),
    #[error("model '{0}' not found")]
    NotFound(String),
    /// The model did not load (its file, its placement, its warm-up); the one serving before,
    /// if any, still is.
    #[error("model '{model}' did not load: {reason}")]
    LoadFailed { model: String, reason: String },
    /// The state directory could not record the change.
    #[error("{0}")]
    Store(String),
    /// A tenant's own model would take it over its quota.
    #[error("{0}")]
    Quota(String),
    /// The tenant already has a model load in progress.
    #[error("{0}")]
    Busy(String),
}

/// Where a model's definition comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelOrigin {
    Config,
    Api,
    /// Loaded by a tenant into its own namespace.
    Tenant,
}

/// One model of the repository, as the API shows it.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    /// Its key in the repository: `NAME`, or `TENANT:NAME` for a tenant's own.
    pub name: String,
    pub origin: ModelOrigin,
    /// `READY`, `LOADING` or `UNAVAILABLE`, as the OIP repository index spells them.
    pub state: &'static str,
    /// Why it is unavailable; empty otherwise.
    pub reason: String,
    /// Its latest version's config.
    pub config: ModelConfig,
    pub users: Arc<[String]>,
    /// When it was last loaded through the API.
    pub deployed_at: Option<u64>,
    /// Its latest version being served, when one is.
    pub handle: Option<ModelHandle>,
    /// The versions served, in order.
    pub versions: Vec<u64>,
}

/// What the repository keeps about a model besides the table entry.
#[derive(Debug, Clone)]
struct Record {
    /// The versions its definition serves, in version order; never empty.
    configs: Vec<ModelConfig>,
    users: Arc<[String]>,
    /// `None` for the config file's models.
    deployment: Option<ModelDeployment>,
    /// Why it is not served, when it is not.
    reason: Option<String>,
    /// Its file is being fetched (or waits to be, at start-up) before it loads.
    fetching: bool,
}

/// What a successful load did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// The model was not being served before.
    New,
    /// It replaced the version that was.
    Replaced,
}

pub struct ModelRepository {
    table: Arc<ModelTable>,
    records: Mutex<BTreeMap<String, Record>>,
    placer: Placer,
    store: Store,
    cache: Arc<ModelCache>,
    /// Whether tenants' model sources may be loopback or private addresses.
    tenant_private_sources: bool,
    /// How long a load may take to become ready (file load and warm-up) before it fails.
    load_timeout: Duration,
    /// How long a tenant's download may take in all.
    tenant_fetch_timeout: Duration,
    /// The folder relative model paths resolve against (the config file's).
    base: PathBuf,
    /// Every tenant, by name, with its quota: to check a model's `tenants`, and to bound a
    /// tenant's own models (also when they are restored at start-up).
    tenants: BTreeMap<String, Quota>,
    /// One change at a time per lock: per model name for the operator's models, per tenant for
    /// a tenant's own (so its quota is checked and used in one step). Changes under different
    /// locks never wait for each other, so a load that hangs holds up its own name (or tenant)
    /// alone, not the repository.
    changes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Tenants with one of their own models loading: one load (and so one download) each.
    loading_tenants: Mutex<HashSet<String>>,
    audit: Arc<Audit>,
    events: Arc<EventLog>,
}

/// One model of the config file: the versions it serves, their handles once started (`None`:
/// the repository fetches or checks their files first), and the tenants that may use it.
pub type ConfigModel = (Vec<ModelConfig>, Option<Vec<ModelHandle>>, Vec<String>);

/// What the repository is built from.
pub struct RepositoryParts {
    /// The config file's models, already started (those with a remote source not yet: see
    /// [`ModelRepository::start_fetches`]), and who may use each.
    pub config_models: Vec<ConfigModel>,
    pub placer: Placer,
    pub store: Store,
    pub cache: Arc<ModelCache>,
    pub tenant_private_sources: bool,
    pub load_timeout: Duration,
    pub tenant_fetch_timeout: Duration,
    /// The folder relative model paths resolve against (the config file's).
    pub base: PathBuf,
    pub tenants: BTreeMap<String, Quota>,
    pub audit: Arc<Audit>,
    pub events: Arc<EventLog>,
    /// Serve the models the state directory kept (loaded through the APIs earlier); not in
    /// cluster mode, where a replica serves its config's alone.
    pub restore_kept: bool,
}

impl ModelRepository {
    /// The config file's models (already starting), then every model the state directory kept:
    /// those recorded as loaded start loading now (those with a remote source once
    /// [`ModelRepository::start_fetches`] runs). A kept model that no longer validates, or whose
    /// name the config file now uses, is reported unavailable with the reason.
    pub fn restore(parts: RepositoryParts) -> std::io::Result<ModelRepository> {
        let RepositoryParts {
            config_models,
            placer,
            store,
            cache,
            tenant_private_sources,
            load_timeout,
            tenant_fetch_timeout,
            base,
            tenants,
            audit,
            events,
            restore_kept,
        } = parts;
        let mut records = BTreeMap::new();
        let table = Arc::new(ModelTable::default());
        table.update(|served| {
            for (configs, handles, users) in config_models {
                let users: Arc<[String]> = users.into();
                let name = configs[0].key().to_owned();
                let fetching = handles.is_none();
                if let Some(handles) = handles {
                    served.insert(name.clone(), Served::new(handles, Arc::clone(&users)));
                }
                records.insert(name, Record { configs, users, deployment: None, reason: None, fetching });
            }
        });
        let repository = ModelRepository {
            table,
            records: Mutex::new(BTreeMap::new()),
            placer,
            store,
            cache,
            tenant_private_sources,
            load_timeout,
            tenant_fetch_timeout,
            base,
            tenants,
            changes: Mutex::new(HashMap::new()),
            loading_tenants: Mutex::new(HashSet::new()),
            audit,
            events,
        };
        let kept = repository.store.load_models()?;
        if !restore_kept && !kept.is_empty() {
            tracing::warn!("{} models kept in the state directory are not served: in cluster mode a replica serves its config's alone", kept.len());
        }
        for deployment in kept.into_iter().filter(|_| restore_kept) {
            let name = deployment.name.clone();
            if records.contains_key(&name) {
                tracing::error!(model = %name, "kept model not loaded: the config file now defines a model of this name");
                continue;
            }
            let (configs, users) = match repository.check(&name, &deployment.spec) {
                Ok(parsed) => parsed,
                Err(e) => {
                    // Nothing to serve, and no config to show: the record stays for inspection.
                    tracing::error!(model = %name, "kept model not loaded: {e}");
                    continue;
                }
            };
            let users: Arc<[String]> = users.into();
            let mut reason = (!deployment.loaded).then(|| UNLOADED.to_owned());
            let fetching = deployment.loaded && configs.iter().any(|c| c.source.is_some() || c.sha256.is_some());
            if deployment.loaded && !fetching {
                match repository.start(&configs) {
                    Ok(handles) => {
                        tracing::info!(model = %name, "kept model loading");
                        repository.table.update(|served| served.insert(name.clone(), Served::new(handles, Arc::clone(&users))));
                    }
                    Err(e) => {
                        tracing::error!(model = %name, "kept model not loaded: {e}");
                        reason = Some(e.to_string());
                    }
                }
            }
            records.insert(name, Record { configs, users, deployment: Some(deployment), reason, fetching });
        }
        *repository.records() = records;
        Ok(repository)
    }

    /// Starts every version of `configs`; stops those started if one cannot start.
    fn start(&self, configs: &[ModelConfig]) -> Result<Vec<ModelHandle>, crate::fleet::StartError> {
        configs.iter().map(|c| start_model(c, &self.placer, Arc::clone(&self.events), self.load_timeout)).collect()
    }

    /// The models being served now: what every request looks models up in.
    pub fn table(&self) -> &Arc<ModelTable> {
        &self.table
    }

    fn records(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Record>> {
        self.records.locked()
    }

    /// The reader of a model's fields, with relative paths against the config file's folder.
    fn fields(&self) -> ModelFields<'_> {
        ModelFields { base: &self.base }
    }

    /// Validates `spec` for model `name`: the fields, and that every tenant named exists. For a
    /// tenant's own model (`TENANT:NAME`), also that its files are remote and pinned (a tenant
    /// cannot name a file of the server's) and that it names no other tenant.
    fn check(&self, name: &str, spec: &serde_json::Value) -> Result<(Vec<ModelConfig>, Vec<String>), ModelError> {
        if let Some((owner, short)) = name.split_once(OWNER_SEPARATOR) {
            return self.check_owned(owner, short, spec);
        }
        check_name(name).map_err(|m| ModelError::Invalid(format!("model name {m}")))?;
        let (configs, users) = self.fields().from_json(name, spec).map_err(|e| ModelError::Invalid(e.to_string()))?;
        if let Some(unknown) = users.iter().find(|u| !self.tenants.contains_key(u.as_str())) {
            return Err(ModelError::Invalid(format!("tenants: tenant '{unknown}' is not declared in the config")));
        }
        Ok((configs, users))
    }

    /// Every model of the repository, in name order.
    pub fn list(&self) -> Vec<ModelEntry> {
        let served = self.table.snapshot();
        self.records().iter().map(|(name, record)| entry(name, record, served.get(name))).collect()
    }

    pub fn get(&self, name: &str) -> Option<ModelEntry> {
        let served = self.table.snapshot();
        self.records().get(name).map(|record| entry(name, record, served.get(name)))
    }

    /// Whether every model of the config file that is meant to be served is ready: the server's
    /// readiness. Models loaded through the API report on their own, at load and in the index.
    pub fn config_models_ready(&self) -> bool {
        let served = self.table.snapshot();
        self.records().iter().filter(|(_, r)| r.deployment.is_none()).all(|(name, record)| {
            match served.get(name) {
                Some(s) => s.versions.values().all(|h| matches!(h.state(), ModelState::Ready(_))),
                // Unloaded on purpose through the API.
                None => !record.fetching && record.reason.as_deref() == Some(UNLOADED),
            }
        })
    }

    /// Loads model `name` from `spec` (the `[[model]]` fields as JSON, with `tenants`), replacing
    /// the one served under that name once the new one is ready. Returns when it is ready, or
    /// with the reason it did not load (the old one still serving).
    pub async fn put(self: &Arc<Self>, name: &str, spec: serde_json::Value) -> Result<Loaded, ModelError> {
        let (this, name) = (Arc::clone(self), name.to_owned());
        detached(async move { this.put_now(&name, spec).await }).await
    }

    async fn put_now(&self, name: &str, spec: serde_json::Value) -> Result<Loaded, ModelError> {
        let result = self.put_fetched(name, spec).await;
        self.report(name, &result);
        result
    }

    async fn put_fetched(&self, name: &str, spec: serde_json::Value) -> Result<Loaded, ModelError> {
        let config_owned = || self.records().get(name).is_some_and(|r| r.deployment.is_none());
        if config_owned() {
            return Err(ModelError::ConfigOwned(name.to_owned()));
        }
        let (configs, users) = self.check(name, &spec)?;
        let deployment = ModelDeployment { name: name.to_owned(), spec, loaded: true, deployed_at: unix_seconds() };
        let record = Record { configs, users: users.into(), deployment: Some(deployment), reason: None, fetching: false };
        // Downloads run outside the one-change-at-a-time lock: a large file does not hold up
        // other models' changes, and loads of the same file at once share one download.
        let (record, _held) = self.fetch(name, record, &Requester::Operator).await?;
        let _one_at_a_time = self.change_lock(name).await;
        if config_owned() {
            return Err(ModelError::ConfigOwned(name.to_owned()));
        }
        self.load_record(name, record).await
    }

    /// The change lock of model `name`: its tenant's for a tenant's own model, its own otherwise.
    async fn change_lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let key = owner_of(name).map_or_else(|| name.to_owned(), |owner| owned_key(owner, ""));
        let lock = Arc::clone(self.changes.locked().entry(key).or_default());
        lock.lock_owned().await
    }

    /// Loads the model `name` the repository already knows, again from its own definition: a
    /// reload when it is being served, a load when it was unloaded or had failed.
    pub async fn load(self: &Arc<Self>, name: &str) -> Result<Loaded, ModelError> {
        let (this, name) = (Arc::clone(self), name.to_owned());
        detached(async move { this.load_now(&name).await }).await
    }

    async fn load_now(&self, name: &str) -> Result<Loaded, ModelError> {
        let result = async {
            let mut record = self.records().get(name).cloned().ok_or_else(|| ModelError::NotFound(name.to_owned()))?;
            if let Some(deployment) = &mut record.deployment {
                deployment.loaded = true;
            }
            record.reason = None;
            // A tenant's model loaded again (at start-up, or by the operator) is fetched within
            // the tenant's bounds, as when the tenant loaded it.
            let requester = match owner_of(name) {
                Some(owner) => self.tenant_fetch(owner, name, None, Arc::new(AtomicBool::new(false))),
                None => Requester::Operator,
            };
            let (record, _held) = self.fetch(name, record, &requester).await?;
            if owner_of(name).is_some()
                && let Err(refused) = self.check_code(name, &record.configs).await
            {
                self.done_fetching(name, Some(&refused));
                return Err(refused);
            }
            let _one_at_a_time = self.change_lock(name).await;
            self.load_record(name, record).await
        }
        .await;
        self.report(name, &result);
        result
    }

    /// Starts `record`'s model, waits for it, records it, then serves it.
    async fn load_record(&self, name: &str, record: Record) -> Result<Loaded, ModelError> {
        let failed = |reason: String| ModelError::LoadFailed { model: name.to_owned(), reason };
        let handles = self.start(&record.configs).map_err(|e| failed(e.to_string()))?;
        let replacing = self.table.snapshot().contains_key(name);
        let served = Served::new(handles.clone(), Arc::clone(&record.users));
        let latest = served.latest().clone();
        if !replacing {
            // Loading for the first time: callers and readiness see it loading.
            self.table.update(|s| s.insert(name.to_owned(), served.clone()));
        }
        let mut outcome = Ok(());
        for handle in &handles {
            let within = tokio::time::timeout(self.load_timeout, ready(handle)).await.unwrap_or_else(|_| {
                Err(format!(
                    "not ready within {} s (its file's load and warm-up; the server's load_timeout_s); stopped",
                    self.load_timeout.as_secs()
                ))
            });
            if let Err(reason) = within {
                let version = if record.configs.len() > 1 { format!("version {}: ", handle.config().version) } else { String::new() };
                outcome = Err(failed(format!("{version}{reason}")));
                break;
            }
        }
        if outcome.is_ok() {
            outcome = self.save(&record).await;
        }
        if let Err(e) = outcome {
            if !replacing {
                self.table.update(|s| {
                    if s.get(name).is_some_and(|x| x.latest().same(&latest)) {
                        s.remove(name);
                    }
                });
            }
            // A model new to the repository stays in it, unavailable with the reason, until
            // it loads or is deleted; it is recorded only once it has loaded.
            let mut records = self.records();
            match records.get_mut(name) {
                Some(known) if replacing => known.reason = None,
                Some(known) => {
                    known.reason = Some(e.to_string());
                    known.fetching = false;
                }
                None => {
                    let deployment = record.deployment.map(|d| ModelDeployment { loaded: false, ..d });
                    records.insert(name.to_owned(), Record { reason: Some(e.to_string()), deployment, ..record });
                }
            }
            return Err(e);
        }
        if replacing {
            let old = self.table.update(|s| s.insert(name.to_owned(), served));
            // Requests an operator's pause held in the old one's queue run there, not time out.
            if let Some(old) = old {
                old.resume();
            }
        }
        self.records().insert(name.to_owned(), record);
        self.evict().await;
        Ok(if replacing { Loaded::Replaced } else { Loaded::New })
    }

    /// Records an API model in the state directory; the config file's need no record.
    async fn save(&self, record: &Record) -> Result<(), ModelError> {
        let Some(deployment) = record.deployment.clone() else { return Ok(()) };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.save_model(&deployment))
            .await
            .map_err(|e| ModelError::Store(format!("state task failed: {e}")))?
            .map_err(|e| ModelError::Store(format!("cannot record the model: {e}")))
    }

    /// Stops serving `name` and keeps it in the repository (and its record, marked unloaded);
    /// requests in flight finish.
    pub async fn unload(self: &Arc<Self>, name: &str) -> Result<(), ModelError> {
        let (this, name) = (Arc::clone(self), name.to_owned());
        detached(async move { this.unload_now(&name).await }).await
    }

    async fn unload_now(&self, name: &str) -> Result<(), ModelError> {
        let _one_at_a_time = self.change_lock(name).await;
        let mut record = self.records().get(name).cloned().ok_or_else(|| ModelError::NotFound(name.to_owned()))?;
        if let Some(deployment) = &mut record.deployment {
            deployment.loaded = false;
        }
        self.save(&record).await?;
        record.reason = Some(UNLOADED.to_owned());
        if let Some(old) = self.table.update(|s| s.remove(name)) {
            old.resume();
        }
        self.records().insert(name.to_owned(), record);
        self.audit.record(Event::ModelUnload, None, None, &format!("model '{name}' unloaded"));
        self.events.emit(EventKind::ModelChanged { model: name.to_owned(), change: "unloaded".into(), detail: String::new() });
        Ok(())
    }

    /// Stops serving an API model and forgets it; requests in flight finish.
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<(), ModelError> {
        let (this, name) = (Arc::clone(self), name.to_owned());
        detached(async move { this.delete_now(&name).await }).await
    }

    async fn delete_now(&self, name: &str) -> Result<(), ModelError> {
        let _one_at_a_time = self.change_lock(name).await;
        match self.records().get(name) {
            None => return Err(ModelError::NotFound(name.to_owned())),
            Some(r) if r.deployment.is_none() => return Err(ModelError::ConfigOwned(name.to_owned())),
            Some(_) => {}
        }
        let store = self.store.clone();
        let key = name.to_owned();
        tokio::task::spawn_blocking(move || store.remove_model(&key))
            .await
            .map_err(|e| ModelError::Store(format!("state task failed: {e}")))?
            .map_err(|e| ModelError::Store(format!("cannot remove the model's record: {e}")))?;
        if let Some(old) = self.table.update(|s| s.remove(name)) {
            old.resume();
        }
        self.records().remove(name);
        self.audit.record(Event::ModelDelete, owner_of(name), None, &format!("model '{name}' deleted"));
        let deleted = EventKind::ModelChanged { model: name.to_owned(), change: "deleted".into(), detail: String::new() };
        self.events.emit_for(owner_of(name), deleted);
        Ok(())
    }

    /// Audits and announces the outcome of a load.
    fn report(&self, name: &str, result: &Result<Loaded, ModelError>) {
        // A failure's reason can carry what a tenant sent (a field's name, a source): bounded
        // and escaped wherever it goes.
        let (event, change, detail) = match result {
            Ok(Loaded::New) => (Event::ModelLoad, "loaded", String::new()),
            Ok(Loaded::Replaced) => (Event::ModelLoad, "replaced", String::new()),
            Err(e) => (Event::ModelLoadFailed, "load_failed", loggable(&e.to_string(), MAX_LOGGED)),
        };
        match result {
            Ok(_) => tracing::info!(model = %name, "model {change}"),
            Err(_) => tracing::warn!(model = %name, "{detail}"),
        }
        let line = if detail.is_empty() { format!("model '{name}' {change}") } else { detail.clone() };
        self.audit.record(event, owner_of(name), None, &line);
        let change = EventKind::ModelChanged { model: name.to_owned(), change: change.to_owned(), detail };
        self.events.emit_for(owner_of(name), change);
    }
}

/// Runs a change to its end on its own task: a caller that goes away (a client that hangs up
/// during a long load) cannot leave the table, the records and the state directory disagreeing.
async fn detached<T: Send + 'static>(
    change: impl std::future::Future<Output = Result<T, ModelError>> + Send + 'static,
) -> Result<T, ModelError> {
    tokio::spawn(change).await.map_err(|e| ModelError::Store(format!("the change's task failed: {e}")))?
}

/// The tenant that owns the model keyed `name`, if a tenant does.
fn owner_of(name: &str) -> Option<&str> {
    name.split_once(OWNER_SEPARATOR).map(|(owner, _)| owner)
}

/// Waits until `handle` is ready, or says why it failed.
async fn ready(handle: &ModelHandle) -> Result<(), String> {
    loop {
        match handle.state() {
            ModelState::Ready(_) => return Ok(()),
            ModelState::Failed(reason) => return Err(reason),
            ModelState::Loading => tokio::time::sleep(LOAD_POLL).await,
        }
    }
}

fn entry(name: &str, record: &Record, served: Option<&Served>) -> ModelEntry {
    let handle = served.map(Served::latest);
    let latest = record.configs.last().unwrap_or_else(|| unreachable!("a model has a version"));
    // The least ready version speaks for the model: loading or failed if any one is.
    let state = served.map(|s| {
        let states: Vec<ModelState> = s.versions.values().map(ModelHandle::state).collect();
        let failed = states.iter().find(|s| matches!(s, ModelState::Failed(_))).cloned();
        failed.or_else(|| states.iter().find(|s| matches!(s, ModelState::Loading)).cloned()).unwrap_or_else(|| states[0].clone())
    });
    let (state, reason) = match state {
        None if record.fetching => ("LOADING", format!("fetching {}", latest.source.as_deref().unwrap_or_default())),
        Some(ModelState::Ready(_)) => ("READY", String::new()),
        Some(ModelState::Loading) => ("LOADING", String::new()),
        Some(ModelState::Failed(reason)) => ("UNAVAILABLE", reason),
        None => ("UNAVAILABLE", record.reason.clone().unwrap_or_else(|| UNLOADED.to_owned())),
    };
    ModelEntry {
        name: name.to_owned(),
        origin: match &record.deployment {
            None => ModelOrigin::Config,
            Some(_) if name.contains(OWNER_SEPARATOR) => ModelOrigin::Tenant,
            Some(_) => ModelOrigin::Api,
        },
        state,
        reason,
        config: latest.clone(),
        users: Arc::clone(&record.users),
        deployed_at: record.deployment.as_ref().map(|d| d.deployed_at),
        handle: handle.cloned(),
        versions: served.map(|s| s.versions.keys().copied().collect()).unwrap_or_default(),
    }
}

/// What the files of `configs` weigh on disk.
fn file_bytes(configs: &[ModelConfig]) -> u64 {
    configs.iter().map(|c| std::fs::metadata(&c.path).map_or(0, |m| m.len())).sum()
}
