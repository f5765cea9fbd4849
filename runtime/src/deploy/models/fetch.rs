//! Fetching a model's remote files into the cache before it loads: the config file's at start-up
//! in the background, the API's as they are loaded; each version's progress in the model's
//! record, and eviction once the cache is over its size.

use super::*;

impl ModelRepository {
    /// Fetches and loads, in the background, every model restored with a remote source.
    pub fn start_fetches(self: &Arc<Self>) {
        let waiting: Vec<String> = self.records().iter().filter(|(_, r)| r.fetching).map(|(n, _)| n.clone()).collect();
        for name in waiting {
            let this = Arc::clone(self);
            tokio::spawn(async move {
                let _ = this.load_now(&name).await;
            });
        }
    }

    /// Makes `record`'s file ready to load: checks a local file against its pin, or fetches a
    /// remote one into the cache and points the config at the cached copy. While a download
    /// runs the model shows as loading (a model new to the repository is listed from now on,
    /// and keeps the reason if the download fails).
    /// The files come back held: the cache spares them until the caller drops the holds (once
    /// the model serves, or failed).
    pub(super) async fn fetch(&self, name: &str, record: Record, requester: &Requester) -> Result<(Record, Vec<Held>), ModelError> {
        let fetched = self.fetch_file(name, record, requester).await;
        if let Err(e) = &fetched {
            self.done_fetching(name, Some(e));
        }
        fetched
    }

    pub(super) async fn fetch_file(&self, name: &str, mut record: Record, requester: &Requester) -> Result<(Record, Vec<Held>), ModelError> {
        let mut held = Vec::new();
        let mut requester = requester.clone();
        for i in 0..record.configs.len() {
            let config = self.fetch_version(name, &record, &record.configs[i], &requester).await?;
            held.push(self.cache.hold(&config.path));
            // A tenant's later versions fit in what its earlier ones left.
            if let Requester::Tenant(bounds) = &mut requester {
                bounds.max_bytes = bounds.max_bytes.saturating_sub(file_bytes(std::slice::from_ref(&config)));
            }
            record.configs[i] = config;
        }
        record.fetching = false;
        Ok((record, held))
    }

    pub(super) async fn fetch_version(&self, name: &str, record: &Record, config: &ModelConfig, requester: &Requester) -> Result<ModelConfig, ModelError> {
        let mut config = config.clone();
        let failed = |reason: String| ModelError::LoadFailed { model: name.to_owned(), reason };
        let pin = config.sha256.clone();
        let Some(source) = config.source.clone() else {
            if let Some(pin) = pin {
                let path = config.path.clone();
                tokio::task::spawn_blocking(move || verify_local(&path, &pin))
                    .await
                    .map_err(|e| ModelError::Store(format!("the check task failed: {e}")))?
                    .map_err(failed)?;
            }
            return Ok(config);
        };
        if pin.is_none() && !self.cache.allows_unpinned() {
            return Err(ModelError::Invalid(crate::deploy::sources::FetchError::Unpinned { origin: source }.to_string()));
        }
        // The operator's loads take a cached file as it is; a tenant's go through the cache's
        // checks for tenants every time.
        let cached = match requester {
            Requester::Operator => pin.as_deref().and_then(|d| self.cache.cached(d)),
            Requester::Tenant(_) => None,
        };
        let fetched = match cached {
            Some(hit) => hit,
            None => {
                self.mark_fetching(name, record, &source);
                tracing::info!(model = %name, "fetching {}", loggable(&source, MAX_LOGGED));
                let cache = Arc::clone(&self.cache);
                let remote = Remote { text: source.clone() };
                let requester = requester.clone();
                let fetched = tokio::task::spawn_blocking(move || cache.fetch(&remote, pin.as_deref(), &requester, &mut |_| {}))
                    .await
                    .map_err(|e| ModelError::Store(format!("the download task failed: {e}")))
                    .and_then(|r| {
                        r.map_err(|e| match e {
                            crate::deploy::sources::FetchError::OverQuota { .. } => ModelError::Quota(e.to_string()),
                            e => failed(e.to_string()),
                        })
                    });
                let fetched = fetched?;
                self.done_fetching(name, None);
                tracing::info!(model = %name, "fetched {}: {} bytes, sha256 {}", loggable(&source, MAX_LOGGED), fetched.bytes, fetched.sha256);
                if config.sha256.is_none() {
                    tracing::warn!(model = %name, "{} is not pinned; pin it with sha256 = \"{}\"", loggable(&source, MAX_LOGGED), fetched.sha256);
                }
                fetched
            }
        };
        config.path = fetched.path;
        Ok(config)
    }

    /// Shows `name` as fetching; a model new to the repository is listed from now on.
    pub(super) fn mark_fetching(&self, name: &str, record: &Record, source: &str) {
        let mut records = self.records();
        match records.get_mut(name) {
            Some(known) => known.fetching = true,
            None => {
                let deployment = record.deployment.clone().map(|d| ModelDeployment { loaded: false, ..d });
                records.insert(name.to_owned(), Record { fetching: true, deployment, ..record.clone() });
            }
        }
        tracing::debug!(model = %name, "fetching {}", loggable(source, MAX_LOGGED));
    }

    /// A fetch ended; one that failed is the reason a model not being served is not.
    pub(super) fn done_fetching(&self, name: &str, error: Option<&ModelError>) {
        let serving = self.table.get(name).is_some();
        if let Some(known) = self.records().get_mut(name) {
            known.fetching = false;
            if let Some(e) = error
                && !serving
            {
                known.reason = Some(e.to_string());
            }
        }
    }

    /// Over the cache's size limit, removes the least recently used files no served model uses.
    pub(super) async fn evict(&self) {
        let in_use: std::collections::HashSet<std::path::PathBuf> =
            self.table.handles().iter().map(|h| h.config().path.clone()).collect();
        let cache = Arc::clone(&self.cache);
        match tokio::task::spawn_blocking(move || cache.evict(&in_use)).await {
            Ok(Ok(removed)) => {
                for file in removed {
                    tracing::info!("model cache: removed {} ({} bytes, least recently used)", file.sha256, file.bytes);
                }
            }
            Ok(Err(e)) => tracing::warn!("model cache: cannot evict: {e}"),
            Err(e) => tracing::warn!("model cache: the eviction task failed: {e}"),
        }
    }
}
