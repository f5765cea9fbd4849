//! [`ModelTable`]: the models being served now, by name, with their versions, and who may use
//! each. A name looked up is `NAME` (the model's latest version) or `NAME@VERSION`. Every reader
//! (a guest's `load-by-name`, a direct OIP call, the scaler, the metrics) looks models up here,
//! so a model loaded, replaced or unloaded while serving is seen everywhere at once.
//!
//! A change swaps the whole table (copy on write) and bumps a generation number; readers hold
//! a snapshot for as long as they like, and whoever caches a view of it (each handler keeps the
//! models its guest may see) rebuilds that view when the generation moves. Calls in flight keep
//! the [`ModelHandle`] they hold, so a replaced model drains its queue before it stops.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::model::handle::ModelHandle;
use crate::model::spec::{OWNER_SEPARATOR, owned_key, split_version};
use crate::sync::RwLockExt;

/// One model being served: each of its versions served, and who may use them.
#[derive(Debug, Clone)]
pub struct Served {
    /// By version number; never empty.
    pub versions: BTreeMap<u64, ModelHandle>,
    /// The tenants that may use it, by name. The model layer knows nothing else of tenants.
    pub users: Arc<[String]>,
}

impl Served {
    pub fn new(handles: impl IntoIterator<Item = ModelHandle>, users: Arc<[String]>) -> Served {
        Served { versions: handles.into_iter().map(|h| (h.config().version, h)).collect(), users }
    }

    pub fn usable_by(&self, tenant: &str) -> bool {
        self.users.iter().any(|u| u == tenant)
    }

    /// The latest version: what the plain name resolves to. (A new set of versions takes the
    /// table only once every one is ready, so the latest is ready whenever the model was.)
    pub fn latest(&self) -> &ModelHandle {
        match self.versions.last_key_value() {
            Some((_, handle)) => handle,
            None => unreachable!("a served model has a version"),
        }
    }

    /// Lets every version's queue run again (after an operator's pause), as the model leaves the
    /// table: what it holds is served, not timed out.
    pub fn resume(&self) {
        self.versions.values().for_each(ModelHandle::resume);
    }

    /// Version `version`, or the latest for `None`.
    pub fn version(&self, version: Option<u64>) -> Option<&ModelHandle> {
        match version {
            None => Some(self.latest()),
            Some(v) => self.versions.get(&v),
        }
    }
}

/// The served models, by name, in name order.
pub type Models = BTreeMap<String, Served>;

#[derive(Debug, Default)]
pub struct ModelTable {
    current: RwLock<Arc<Models>>,
    generation: AtomicU64,
    /// Whether any tenant has a model of its own: lookups skip that step (an allocation) when none.
    any_owned: AtomicBool,
}

impl ModelTable {
    pub fn new(models: Models) -> ModelTable {
        let any_owned = AtomicBool::new(models.keys().any(|k| k.contains(OWNER_SEPARATOR)));
        ModelTable { current: RwLock::new(Arc::new(models)), generation: AtomicU64::new(0), any_owned }
    }

    /// The table as it is now; later changes do not touch it.
    pub fn snapshot(&self) -> Arc<Models> {
        Arc::clone(&self.current.reading())
    }

    /// Changes with every [`ModelTable::update`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The model `name` (`NAME` or `NAME@VERSION`) if `tenant` may use it; `None` whether it is
    /// missing or someone else's.
    /// A tenant's own model of that name comes first.
    pub fn usable(&self, tenant: &str, name: &str) -> Option<ModelHandle> {
        let (base, version) = split_version(name)?;
        let any_owned = self.any_owned.load(Ordering::Acquire);
        let current = self.current.reading();
        resolve(&current, any_owned, tenant, base).and_then(|s| s.version(version)).cloned()
    }

    /// The model `name` (`NAME` or `NAME@VERSION`), whoever may use it.
    pub fn get(&self, name: &str) -> Option<ModelHandle> {
        let (base, version) = split_version(name)?;
        let current = self.current.reading();
        current.get(base).and_then(|s| s.version(version)).cloned()
    }

    /// The versions of `name` served, for `tenant` (none if it may not use it).
    pub fn versions(&self, tenant: &str, name: &str) -> Vec<u64> {
        let any_owned = self.any_owned.load(Ordering::Acquire);
        let current = self.current.reading();
        resolve(&current, any_owned, tenant, name).map(|s| s.versions.keys().copied().collect()).unwrap_or_default()
    }

    /// Every version of every model, in name order.
    pub fn handles(&self) -> Vec<ModelHandle> {
        self.snapshot().values().flat_map(|s| s.versions.values().cloned()).collect()
    }

    /// The models `tenant` may use, limited to `names` when given: what a handler's guest sees,
    /// under each model's name (its latest version) and `NAME@VERSION` for every version.
    /// The tenant's own models appear under their own names, before any other of the same name.
    pub fn view(&self, tenant: &str, names: Option<&[String]>) -> std::collections::HashMap<String, ModelHandle> {
        let snapshot = self.snapshot();
        let own: Vec<(&str, &Served)> = snapshot
            .iter()
            .filter_map(|(key, served)| match key.split_once(OWNER_SEPARATOR) {
                Some((owner, name)) if owner == tenant => Some((name, served)),
                _ => None,
            })
            .collect();
        let shared: Vec<(&str, &Served)> = snapshot
            .iter()
            .filter(|(key, served)| {
                !key.contains(OWNER_SEPARATOR) && served.usable_by(tenant) && !own.iter().any(|(name, _)| name == key)
            })
            .map(|(key, served)| (key.as_str(), served))
            .collect();
        let mut view = std::collections::HashMap::new();
        for (name, served) in own.into_iter().chain(shared) {
            if names.is_some_and(|n| !n.iter().any(|allowed| allowed == name)) {
                continue;
            }
            view.insert(name.to_owned(), served.latest().clone());
            for (version, handle) in &served.versions {
                view.insert(format!("{name}@{version}"), handle.clone());
            }
        }
        view
    }

    /// Changes the table in one step: readers see it before or after, never half-way. Returns
    /// what `change` returned; entries it removed are dropped here (their models stop once
    /// their last caller is done).
    pub fn update<R>(&self, change: impl FnOnce(&mut Models) -> R) -> R {
        let mut current = self.current.writing();
        let mut next = Models::clone(&current);
        let out = change(&mut next);
        self.any_owned.store(next.keys().any(|k| k.contains(OWNER_SEPARATOR)), Ordering::Release);
        *current = Arc::new(next);
        self.generation.fetch_add(1, Ordering::AcqRel);
        out
    }
}

/// The model `name` means to `tenant`: its own of that name, else a shared one it may use.
fn resolve<'a>(models: &'a Models, any_owned: bool, tenant: &str, name: &str) -> Option<&'a Served> {
    if name.contains(OWNER_SEPARATOR) {
        return None;
    }
    let own = if any_owned { models.get(&owned_key(tenant, name)) } else { None };
    own.or_else(|| models.get(name).filter(|s| s.usable_by(tenant)))
}
