//! The HTTP front door: guest handlers under `/v1/handlers`, and the Open Inference Protocol
//! (KServe v2) under `/v2` for direct model calls; and, on its own listener, the admin API.
//!
//! Every handler and model call carries a tenant's key (`Authorization: Bearer`). A tenant sees
//! only its own handlers and models: anything else is answered exactly like a name that does not
//! exist.

mod admin;
mod auth;
mod error;
pub mod grpc;
mod handlers;
mod http;
mod inference;
pub mod metrics;
mod oip;
mod repository;
pub mod requests;
pub mod routes;
mod stats;

use std::collections::HashMap;
use std::sync::Arc;

pub use self::error::ApiError;
use crate::deploy::models::ModelRepository;
use crate::deploy::registry::Registry;
use crate::fleet::gpu::Gpus;
use crate::fleet::scaler::DecisionLog;
use crate::model::table::ModelTable;
use crate::sandbox::Handler;
use crate::telemetry::Telemetry;
use crate::tenancy::Tenant;
use crate::tenancy::audit::Audit;
use crate::tenancy::keys::LiveKeys;

/// What every route can see. Built once at start-up; handlers and keys change at run time.
pub struct AppState {
    /// Live handlers by name, and the one way they change.
    pub registry: Registry,
    /// Every model known, and the one way models change while serving.
    pub repository: Arc<ModelRepository>,
    /// The models being served now (the repository's table).
    pub models: Arc<ModelTable>,
    pub tenants: HashMap<String, Arc<Tenant>>,
    /// Reloaded from the state directory when key files change.
    pub keys: Arc<LiveKeys>,
    /// Every request being handled now, by its id: to list and to cancel.
    pub requests: Arc<requests::Requests>,
    pub max_body_bytes: usize,
    /// The highest `kiln-priority` a direct OIP call may ask for.
    pub oip_max_priority: u8,
    pub audit: Arc<Audit>,
    /// Largest component the admin API accepts.
    pub max_component_bytes: usize,
    pub gpus: Arc<Gpus>,
    /// The scaler's recent decisions.
    pub decisions: Arc<DecisionLog>,
    pub telemetry: Arc<Telemetry>,
    /// What `/metrics` exports.
    pub metrics: prometheus_client::registry::Registry,
    pub started: std::time::Instant,
    /// Set once SIGTERM (or Ctrl-C) starts the drain: readiness answers 503 from then on.
    pub draining: std::sync::atomic::AtomicBool,
    /// In cluster mode, this replica's name: changes that would set it apart are refused.
    pub cluster: Option<String>,
}

impl AppState {
    /// In cluster mode, the refusal (409) of `what`, a change that would set this replica apart
    /// from the others, saying how to make it on all of them.
    pub(crate) fn refuse_change_in_cluster(&self, what: &str) -> Result<(), ApiError> {
        match &self.cluster {
            None => Ok(()),
            Some(replica) => Err(ApiError::Conflict(format!(
                "{what}: this is replica '{replica}' of a cluster, whose handlers, models and tenants come from its \
                 config alone so that every replica is the same; change the config (a handler's component as \
                 oci://…@sha256:…, a model's pinned source, a tenant's models) and roll the replicas"
            ))),
        }
    }

    /// The live handler `name`, if there is one.
    pub fn handler(&self, name: &str) -> Option<Arc<Handler>> {
        self.registry.get(name)
    }
}

