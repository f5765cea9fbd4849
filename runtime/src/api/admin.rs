//! The admin API, on its own listener (loopback by default): deploy, replace, delete and list
//! handlers at run time, load and unload models ([`super::repository`]), and read or change the
//! log filter. Every call needs an admin key. These
//! routes only translate HTTP: the [`Registry`](crate::deploy::registry::Registry) and
//! [`logging`](crate::telemetry::logging) do the work.
//!
//! `PUT /v1/handlers/{name}?tenant=T[&models=a,b][&memory_limit_mib=N][&deadline_ms=N]
//! [&priority=N][&max_priority=N][&cache_ttl_ms=N][&cache_max_entries=N][&cache_max_bytes=N]` with
//! the component bytes as the body and, when the tenant has a
//! signing key, `kiln-signature: BASE64` (Ed25519 over the deployment's manifest).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use kiln_wire::{HandlerInfo, HandlerLimits, HandlerList, HandlerOrigin};
use serde::Deserialize;
use serde_json::json;

use super::auth::{AdminKey, require_admin};
use super::http::{json_response, read_body};
use super::{ApiError, AppState};
use crate::deploy::HandlerSettings;
use crate::deploy::registry::DeployRequest;
use crate::sandbox::{Handler, Origin};
use crate::telemetry::logging::{self, LogError};
use crate::tenancy::audit::Event;

/// The settings a deployment may carry in its query string.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeployParams {
    tenant: String,
    /// Comma-separated.
    models: Option<String>,
    memory_limit_mib: Option<u64>,
    deadline_ms: Option<u64>,
    priority: Option<u8>,
    max_priority: Option<u8>,
    /// Any of these gives the handler a response cache (the rest take their defaults).
    cache_ttl_ms: Option<u64>,
    cache_max_entries: Option<u64>,
    cache_max_bytes: Option<u64>,
}

pub(super) async fn deploy(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    query: Result<Query<DeployParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers, Some(&name))?;
    let tenant = query.as_ref().ok().map(|q| q.tenant.clone());
    match deploy_checked(&app, &name, query, &headers, body).await {
        Ok(response) => Ok(response),
        Err(e) => {
            app.audit.record(Event::DeployRefused, tenant.as_deref(), Some(&name), &e.to_string());
            Err(e)
        }
    }
}

async fn deploy_checked(
    app: &Arc<AppState>,
    name: &str,
    query: Result<Query<DeployParams>, QueryRejection>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let tenant = app.tenants.get(&params.tenant).ok_or_else(|| {
        ApiError::BadRequest(format!("tenant '{}' is not declared in the config", params.tenant))
    })?;
    let settings = HandlerSettings {
        models: params
            .models
            .as_deref()
            .map(|m| m.split(',').map(str::trim).filter(|m| !m.is_empty()).map(str::to_owned).collect()),
        memory_limit_mib: params.memory_limit_mib,
        deadline_ms: params.deadline_ms,
        priority: params.priority,
        max_priority: params.max_priority,
        cache: (params.cache_ttl_ms.is_some() || params.cache_max_entries.is_some() || params.cache_max_bytes.is_some()).then_some(
            kiln_codec::config::RawCache {
                ttl_ms: params.cache_ttl_ms,
                max_entries: params.cache_max_entries,
                max_bytes: params.cache_max_bytes,
            },
        ),
    };
    let component = read_body(body, headers, app.max_component_bytes).await?.to_vec();
    let signature = headers.get(kiln_wire::headers::SIGNATURE).and_then(|v| v.to_str().ok());
    let request = DeployRequest { name, tenant: &tenant.config, settings, component, signature };
    let (handler, replaced) = app.registry.deploy(request).await?;
    let status = if replaced { StatusCode::OK } else { StatusCode::CREATED };
    Ok(json_response(status, &describe(&handler)))
}

pub(super) async fn remove(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers, Some(&name))?;
    app.registry.remove(&name).await?;
    Ok(json_response(StatusCode::OK, &json!({ "deleted": name })))
}

/// `{"filter": "..."}`: the log filter, as `GET /v1/log` shows it and `PUT /v1/log` takes it.
#[derive(Debug, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogFilter {
    filter: String,
}

/// Longest log filter `PUT /v1/log` takes.
const MAX_LOG_FILTER: usize = 4096;

pub(super) async fn show_log(_admin: AdminKey) -> Result<Response, ApiError> {
    let filter = logging::filter().ok_or_else(|| ApiError::Internal(LogError::NotInstalled.to_string()))?;
    Ok(json_response(StatusCode::OK, &LogFilter { filter }))
}

/// Replaces the log filter (`{"filter": "info,kiln=debug"}`) at once, for every thread; audited.
pub(super) async fn set_log(State(app): State<Arc<AppState>>, _admin: AdminKey, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, &headers, MAX_LOG_FILTER).await?;
    let wanted: LogFilter = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("send {{\"filter\": \"...\"}}, like {{\"filter\": \"info,kiln=debug\"}}: {e}")))?;
    let before = logging::filter().unwrap_or_default();
    let filter = logging::set_filter(&wanted.filter).map_err(|e| match e {
        LogError::Invalid(..) => ApiError::BadRequest(e.to_string()),
        LogError::NotInstalled | LogError::Reload(_) => ApiError::Internal(e.to_string()),
    })?;
    tracing::info!(before = %before, after = %filter, "log filter changed");
    app.audit.record(Event::LogFilter, None, None, &format!("{before} -> {filter}"));
    Ok(json_response(StatusCode::OK, &LogFilter { filter }))
}

pub(super) async fn list(State(app): State<Arc<AppState>>, _admin: AdminKey) -> Result<Response, ApiError> {
    let handlers = app.registry.list().iter().map(|h| describe(h)).collect();
    Ok(json_response(StatusCode::OK, &HandlerList { handlers }))
}

pub(super) async fn show(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers, Some(&name))?;
    let handler = app
        .registry
        .get(&name)
        .ok_or_else(|| ApiError::NotFound(format!("handler '{name}' not found")))?;
    Ok(json_response(StatusCode::OK, &describe(&handler)))
}

fn describe(handler: &Handler) -> HandlerInfo {
    let limits = handler.limits();
    let mut info = HandlerInfo {
        name: handler.name().to_owned(),
        tenant: handler.tenant().to_owned(),
        models: handler.model_names(),
        limits: HandlerLimits {
            memory_limit_mib: limits.memory_limit_bytes >> 20,
            deadline_ms: limits.deadline.as_millis() as u64,
            fuel: limits.fuel,
            max_compute_bytes: limits.max_compute_bytes,
            max_compute_calls: limits.max_compute_calls,
            max_response_bytes: limits.max_response_bytes,
        },
        origin: HandlerOrigin::Config,
        sha256: None,
        deployed_at: None,
        signed: None,
    };
    if let Origin::Deployed { sha256, deployed_at, signed } = handler.origin() {
        info.origin = HandlerOrigin::Deployed;
        info.sha256 = Some(sha256.clone());
        info.deployed_at = Some(*deployed_at);
        info.signed = Some(*signed);
    }
    info
}
