//! A tenant's own models (`TENANT:NAME`): checked as a tenant's (remote and pinned files, its
//! TorchScript read before it loads), held to the tenant's quota (models, versions, bytes,
//! devices), fetched apart from everyone else's, one load at a time per tenant.

use super::*;

impl ModelRepository {
    pub(super) fn check_owned(&self, owner: &str, name: &str, spec: &serde_json::Value) -> Result<(Vec<ModelConfig>, Vec<String>), ModelError> {
        check_name(name).map_err(|m| ModelError::Invalid(format!("model name {m}")))?;
        let Some(quota) = self.tenants.get(owner) else {
            return Err(ModelError::Invalid(format!("tenant '{owner}' is not declared in the config")));
        };
        if spec.get("tenants").is_some() {
            return Err(ModelError::Invalid("tenants: a tenant's own model is its own; leave `tenants` out".to_owned()));
        }
        if spec.get("calibration").is_some() {
            return Err(ModelError::Invalid(
                "calibration: names files of the server's, which a tenant's model cannot; precision = \"auto\" compares on inputs drawn from the signature".to_owned(),
            ));
        }
        let (mut configs, _) = self.fields().from_json(name, spec).map_err(|e| ModelError::Invalid(e.to_string()))?;
        let key = owned_key(owner, name);
        for config in &mut configs {
            if config.source.is_none() || config.sha256.is_none() {
                return Err(ModelError::Invalid(
                    "source: a tenant's model comes from https://HOST/FILE or hf://ORG/REPO/FILE@REVISION, with its sha256 \
                     (not a file of the server's)"
                        .to_owned(),
                ));
            }
            if let Some((_, version)) = config.name.split_once('@') {
                config.name = format!("{key}@{version}");
            } else {
                config.name = key.clone();
            }
            // Left to the default, a tenant's model runs where its quota lets it: the CPU unless
            // it may use GPUs.
            if spec.get("device").is_none() && config.device == DeviceChoice::Auto && !quota.model_devices.allows(&DeviceChoice::Auto) {
                config.device = DeviceChoice::Cpu;
            }
            within_model_quota(owner, quota, config)?;
        }
        Ok((configs, vec![owner.to_owned()]))
    }

    /// How tenant `owner`'s fetches are bounded: what its quota has left besides model `key`'s
    /// own files, its own token, the deadline, and `cancelled`.
    pub(super) fn tenant_fetch(&self, owner: &str, key: &str, token: Option<String>, cancelled: Arc<AtomicBool>) -> Requester {
        let max = self.tenants.get(owner).map_or(0, |q| q.max_model_bytes);
        let kept: u64 = self.owned_by(owner, key).iter().map(|r| file_bytes(&r.configs)).sum();
        Requester::Tenant(TenantFetch {
            tenant: owner.to_owned(),
            max_bytes: max.saturating_sub(kept),
            public_only: !self.tenant_private_sources,
            token,
            deadline: self.tenant_fetch_timeout,
            cancelled,
        })
    }

    /// Loads tenant `owner`'s own model `name` from `spec` (a `[[model]]` section's fields, with
    /// remote pinned sources and no `tenants`), replacing its own of that name once the new one
    /// is ready, if its quota allows: `max_models` models, `max_model_bytes` of files in all, and
    /// the instances, threads, versions, devices and latency objective its quota sets. One load
    /// per tenant at a time; `token` (the tenant's own, for a hub source) is used for this
    /// download alone. When the caller goes away (the client hung up), the download stops.
    pub async fn put_owned(self: &Arc<Self>, owner: &str, name: &str, spec: serde_json::Value, token: Option<String>) -> Result<Loaded, ModelError> {
        let key = owned_key(owner, name);
        let busy = || ModelError::Busy(format!("tenant '{owner}' already has a model loading; wait for it to finish"));
        let loading = OneLoad::take(self, owner).ok_or_else(busy)?;
        let cancelled = Arc::new(AtomicBool::new(false));
        let _cancel_when_gone = SetOnDrop(Arc::clone(&cancelled));
        let (this, owner) = (Arc::clone(self), owner.to_owned());
        detached(async move {
            let _loading = loading;
            let result = this.put_owned_fetched(&owner, &key, spec, token, cancelled).await;
            this.report(&key, &result);
            result
        })
        .await
    }

    pub(super) async fn put_owned_fetched(
        &self,
        owner: &str,
        key: &str,
        spec: serde_json::Value,
        token: Option<String>,
        cancelled: Arc<AtomicBool>,
    ) -> Result<Loaded, ModelError> {
        let quota = self.tenants.get(owner).cloned().ok_or_else(|| ModelError::Invalid(format!("tenant '{owner}' is not declared in the config")))?;
        if quota.max_models == 0 {
            return Err(ModelError::Quota(format!("tenant '{owner}' may not load models (its quota.max_models is 0)")));
        }
        let (configs, users) = self.check(key, &spec)?;
        // Checked before the download, to refuse early, and again under the tenant's change
        // lock, where no other change of this tenant's can slip in between the check and the load.
        self.within_models(owner, &quota, key, &configs)?;
        let known = self.records().contains_key(key);
        let deployment = ModelDeployment { name: key.to_owned(), spec, loaded: true, deployed_at: unix_seconds() };
        let record = Record { configs, users: users.into(), deployment: Some(deployment), reason: None, fetching: false };
        let requester = self.tenant_fetch(owner, key, token, cancelled);
        let (record, _held) = match self.fetch(key, record, &requester).await {
            Ok(fetched) => fetched,
            Err(e) => {
                // A tenant's new model whose file never arrived leaves nothing behind to count
                // against its quota; the reason went back in its answer.
                if !known && self.table.get(key).is_none() {
                    self.records().remove(key);
                }
                return Err(e);
            }
        };
        if let Err(refused) = self.check_code(key, &record.configs).await {
            if !known && self.table.get(key).is_none() {
                self.records().remove(key);
            }
            return Err(refused);
        }
        let _one_at_a_time = self.change_lock(key).await;
        let allowed =
            self.within_models(owner, &quota, key, &record.configs).and_then(|()| self.within_bytes(owner, &quota, key, &record.configs));
        if let Err(refused) = allowed {
            // A model new to the namespace was listed while its file downloaded: it goes.
            if !known && self.table.get(key).is_none() {
                self.records().remove(key);
            }
            return Err(refused);
        }
        self.load_record(key, record).await
    }

    /// Checks the code of a tenant's model files before anything loads them (a TorchScript file
    /// is code: see [`crate::model::graph_check`]). Every time, also for a file the tenant
    /// loaded before: the allow-list may have changed since.
    pub(super) async fn check_code(&self, name: &str, configs: &[ModelConfig]) -> Result<(), ModelError> {
        for config in configs {
            let path = config.path.clone();
            let checked = tokio::task::spawn_blocking(move || crate::model::graph_check::check_graph(&path))
                .await
                .map_err(|e| ModelError::Store(format!("the model check's task failed: {e}")))?;
            match checked {
                Ok(()) => {}
                Err(refusal) if refusal.is_the_models_fault() => {
                    let version = if configs.len() > 1 { format!("version {}: ", config.version) } else { String::new() };
                    return Err(ModelError::LoadFailed { model: name.to_owned(), reason: format!("{version}{refusal}") });
                }
                Err(refusal) => return Err(ModelError::Store(refusal.to_string())),
            }
        }
        Ok(())
    }

    /// Whether tenant `owner` may have model `key` (as `configs`) besides its others: their
    /// count, and the versions, instances and threads of them all.
    pub(super) fn within_models(&self, owner: &str, quota: &Quota, key: &str, configs: &[ModelConfig]) -> Result<(), ModelError> {
        let others = self.owned_by(owner, key);
        if others.len() as u64 >= u64::from(quota.max_models) {
            return Err(ModelError::Quota(format!(
                "tenant '{owner}' has {} models, its quota.max_models; delete one first",
                others.len()
            )));
        }
        let all = || others.iter().flat_map(|r| r.configs.iter()).chain(configs);
        let total = |what: &str, used: u64, limit: u32| {
            if used > u64::from(limit) {
                Err(ModelError::Quota(format!(
                    "tenant '{owner}': its models would have {used} {what} in all, over its quota.max_model_{what} ({limit})"
                )))
            } else {
                Ok(())
            }
        };
        total("versions", all().count() as u64, quota.max_model_versions)?;
        total("instances", all().map(|c| u64::from(c.replicas.max)).sum(), quota.max_model_instances)?;
        total("threads", all().map(|c| u64::from(c.replicas.max) * u64::from(c.threads)).sum(), quota.max_model_threads)
    }

    /// Whether the files of `configs` and of tenant `owner`'s other models fit its quota.
    pub(super) fn within_bytes(&self, owner: &str, quota: &Quota, key: &str, configs: &[ModelConfig]) -> Result<(), ModelError> {
        let kept: u64 = self.owned_by(owner, key).iter().map(|r| file_bytes(&r.configs)).sum();
        let wanted = file_bytes(configs);
        if kept + wanted > quota.max_model_bytes {
            return Err(ModelError::Quota(format!(
                "tenant '{owner}': this model's files ({wanted} bytes) and its others' ({kept} bytes) would be over its \
                 quota.max_model_bytes ({})",
                quota.max_model_bytes
            )));
        }
        Ok(())
    }

    /// Tenant `owner`'s own models but `except`.
    pub(super) fn owned_by(&self, owner: &str, except: &str) -> Vec<Record> {
        let prefix = owned_key(owner, "");
        self.records().iter().filter(|(key, _)| key.starts_with(&prefix) && key.as_str() != except).map(|(_, r)| r.clone()).collect()
    }

    /// Tenant `owner`'s own models, named as it knows them.
    pub fn list_owned(&self, owner: &str) -> Vec<ModelEntry> {
        let prefix = owned_key(owner, "");
        self.list().into_iter().filter(|e| e.name.starts_with(&prefix)).collect()
    }
}

/// Whether one version of a tenant's own model keeps to the parts of its quota that bound a
/// model by itself: its devices and its latency objective.
fn within_model_quota(owner: &str, quota: &Quota, config: &ModelConfig) -> Result<(), ModelError> {
    if !quota.model_devices.allows(&config.device) {
        return Err(ModelError::Quota(format!(
            "tenant '{owner}': device '{}' is not in its quota.model_devices ({})",
            config.device, quota.model_devices
        )));
    }
    let objective = config.latency_objective.as_millis();
    if objective < u128::from(quota.min_latency_objective_ms) {
        return Err(ModelError::Quota(format!(
            "tenant '{owner}': latency_objective_ms {objective} is under its quota.min_latency_objective_ms ({})",
            quota.min_latency_objective_ms
        )));
    }
    Ok(())
}

/// A tenant's one load at a time: taken for it while it is free, given back on drop.
struct OneLoad {
    repository: Arc<ModelRepository>,
    tenant: String,
}

impl OneLoad {
    pub(super) fn take(repository: &Arc<ModelRepository>, tenant: &str) -> Option<OneLoad> {
        let fresh = repository.loading_tenants.locked().insert(tenant.to_owned());
        fresh.then(|| OneLoad { repository: Arc::clone(repository), tenant: tenant.to_owned() })
    }
}

impl Drop for OneLoad {
    fn drop(&mut self) {
        self.repository.loading_tenants.locked().remove(&self.tenant);
    }
}

/// Sets its flag when dropped: with the future of a request, when the request ends.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
