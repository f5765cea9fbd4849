//! [`ModelTable`]: the models being served now, by name, and who may use each. Every reader
//! (a guest's `load-by-name`, a direct OIP call, the scaler, the metrics) looks models up here,
//! so a model loaded, replaced or unloaded while serving is seen everywhere at once.
//!
//! A change swaps the whole table (copy on write) and bumps a generation number; readers hold
//! a snapshot for as long as they like, and whoever caches a view of it (each handler keeps the
//! models its guest may see) rebuilds that view when the generation moves. Calls in flight keep
//! the [`ModelHandle`] they hold, so a replaced model drains its queue before it stops.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::model::handle::ModelHandle;

/// One model being served.
#[derive(Debug, Clone)]
pub struct Served {
    pub handle: ModelHandle,
    /// The tenants that may use it, by name. The model layer knows nothing else of tenants.
    pub users: Arc<[String]>,
}

impl Served {
    pub fn usable_by(&self, tenant: &str) -> bool {
        self.users.iter().any(|u| u == tenant)
    }
}

/// The served models, by name, in name order.
pub type Models = BTreeMap<String, Served>;

#[derive(Debug, Default)]
pub struct ModelTable {
    current: RwLock<Arc<Models>>,
    generation: AtomicU64,
}

impl ModelTable {
    pub fn new(models: Models) -> ModelTable {
        ModelTable { current: RwLock::new(Arc::new(models)), generation: AtomicU64::new(0) }
    }

    /// The table as it is now; later changes do not touch it.
    pub fn snapshot(&self) -> Arc<Models> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Changes with every [`ModelTable::update`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The model `name` if `tenant` may use it; `None` whether it is missing or someone else's.
    pub fn usable(&self, tenant: &str, name: &str) -> Option<ModelHandle> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        current.get(name).filter(|s| s.usable_by(tenant)).map(|s| s.handle.clone())
    }

    pub fn get(&self, name: &str) -> Option<ModelHandle> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        current.get(name).map(|s| s.handle.clone())
    }

    /// Every model, in name order.
    pub fn handles(&self) -> Vec<ModelHandle> {
        self.snapshot().values().map(|s| s.handle.clone()).collect()
    }

    /// The models `tenant` may use, limited to `names` when given: what a handler's guest sees.
    pub fn view(&self, tenant: &str, names: Option<&[String]>) -> std::collections::HashMap<String, ModelHandle> {
        self.snapshot()
            .iter()
            .filter(|(name, served)| served.usable_by(tenant) && names.is_none_or(|n| n.contains(name)))
            .map(|(name, served)| (name.clone(), served.handle.clone()))
            .collect()
    }

    /// Changes the table in one step: readers see it before or after, never half-way. Returns
    /// what `change` returned; entries it removed are dropped here (their models stop once
    /// their last caller is done).
    pub fn update<R>(&self, change: impl FnOnce(&mut Models) -> R) -> R {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let mut next = Models::clone(&current);
        let out = change(&mut next);
        *current = Arc::new(next);
        self.generation.fetch_add(1, Ordering::AcqRel);
        out
    }
}
