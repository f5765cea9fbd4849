//! The admin API, on its own listener (loopback by default): deploy, replace, delete and list
//! handlers at run time. Every call needs an admin key.
//!
//! `PUT /v1/handlers/{name}?tenant=T[&models=a,b][&memory_limit_mib=N][&deadline_ms=N]
//! [&priority=N][&max_priority=N]` with the component bytes as the body and, when the tenant has a
//! signing key, `kiln-signature: BASE64` (Ed25519 over the exact bytes).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, json_response, read, read_body, write};
use crate::audit::Event;
use crate::config::{HandlerSettings, check_name};
use crate::executor::ModelHandle;
use crate::keys::{self, Principal};
use crate::sandbox::{Handler, Origin, Sandbox};
use crate::state::{Deployment, Store, sha256_hex};

/// The header carrying a deployment's signature.
pub const SIGNATURE_HEADER: &str = "kiln-signature";

/// What deploying needs beyond the request-path state.
pub struct AdminState {
    pub sandbox: Sandbox,
    pub store: Store,
    /// Handlers from the config file: the file owns them, the API cannot replace or delete them.
    pub config_handlers: HashSet<String>,
    /// One deploy or delete at a time, so the state directory and the live table agree.
    pub lock: tokio::sync::Mutex<()>,
    pub max_component_bytes: usize,
}

/// The admin routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/handlers", get(list))
        .route("/v1/handlers/{name}", get(show).put(deploy).delete(remove))
        .fallback(|request: Request| async move {
            ApiError::NotFound(format!("no admin route for {} {}", request.method(), request.uri().path()))
        })
        .layer(axum::middleware::from_fn(super::remember_peer))
        .with_state(state)
}

pub(super) fn require_admin(app: &AppState, headers: &HeaderMap, handler: Option<&str>) -> Result<(), ApiError> {
    match app.authenticate(headers, handler)? {
        Principal::Admin => Ok(()),
        Principal::Tenant(t) => {
            app.audit.auth_failure(super::peer(), Some(&t), handler, "tenant key used on the admin API");
            Err(ApiError::Forbidden("the admin API needs an admin key".to_owned()))
        }
    }
}

/// The settings a deployment may carry in its query string.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployParams {
    tenant: String,
    /// Comma-separated.
    models: Option<String>,
    memory_limit_mib: Option<u64>,
    deadline_ms: Option<u64>,
    priority: Option<u8>,
    max_priority: Option<u8>,
}

async fn deploy(
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
    check_name(name).map_err(|m| ApiError::BadRequest(format!("handler name {m}")))?;
    let Query(params) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let tenant = app.tenants.get(&params.tenant).ok_or_else(|| {
        ApiError::BadRequest(format!("tenant '{}' is not declared in the config", params.tenant))
    })?;
    if app.admin.config_handlers.contains(name) {
        return Err(ApiError::Conflict(format!(
            "handler '{name}' is defined in the config file; change it there"
        )));
    }
    let settings = HandlerSettings {
        models: params
            .models
            .as_deref()
            .map(|m| m.split(',').map(str::trim).filter(|m| !m.is_empty()).map(str::to_owned).collect()),
        memory_limit_mib: params.memory_limit_mib,
        deadline_ms: params.deadline_ms,
        priority: params.priority,
        max_priority: params.max_priority,
    };
    let config = settings
        .resolve(name, &tenant.config, PathBuf::from(format!("<deployed {name}>")))
        .map_err(|(field, message)| ApiError::BadRequest(format!("{field}: {message}")))?;
    let bytes = read_body(body, headers, app.admin.max_component_bytes).await?;
    let sha256 = sha256_hex(&bytes);

    let signature = match &tenant.config.signing_key {
        None => None,
        Some(public) => {
            let signature = headers
                .get(SIGNATURE_HEADER)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    ApiError::Forbidden(format!(
                        "tenant '{}' requires signed components: send the signature in {SIGNATURE_HEADER}",
                        tenant.name()
                    ))
                })?;
            let decoded = keys::decode_base64(signature).ok_or_else(|| {
                ApiError::BadRequest(format!("{SIGNATURE_HEADER} is not base64"))
            })?;
            let manifest = settings.signed_manifest(name, tenant.name(), &sha256);
            if !keys::verify_signature(public, manifest.as_bytes(), &decoded) {
                return Err(ApiError::Forbidden(format!(
                    "the signature is not the signing key of tenant '{}' over this component as handler '{name}' \
                     with these models and priorities (`kiln sign` with the same --handler, --tenant, --models, \
                     --priority and --max-priority)",
                    tenant.name()
                )));
            }
            Some(signature.trim().to_owned())
        }
    };
    let signed = signature.is_some();

    let sandbox = app.admin.sandbox.clone();
    let checked = bytes.clone();
    let component = tokio::task::spawn_blocking(move || sandbox.check_component(&checked))
        .await
        .map_err(|e| ApiError::Internal(format!("compilation task failed: {e}")))??;
    let deployment = Deployment {
        name: name.to_owned(),
        tenant: tenant.name().to_owned(),
        sha256,
        settings,
        deployed_at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        signed,
        signature,
    };
    let handler = app.admin.sandbox.handler(
        &config,
        &component,
        allowed_models(&app.models, &config.models),
        Origin::Deployed {
            sha256: deployment.sha256.clone(),
            deployed_at: deployment.deployed_at,
            signed,
        },
    )?;

    let _one_at_a_time = app.admin.lock.lock().await;
    let store = app.admin.store.clone();
    let saved = deployment.clone();
    tokio::task::spawn_blocking(move || store.save(&saved, &bytes))
        .await
        .map_err(|e| ApiError::Internal(format!("state task failed: {e}")))?
        .map_err(|e| ApiError::Internal(format!("cannot record the deployment: {e}")))?;
    let handler = Arc::new(handler);
    let replaced = write(&app.handlers)
        .insert(name.to_owned(), Arc::clone(&handler))
        .is_some();
    app.audit.record(
        Event::Deploy,
        Some(tenant.name()),
        Some(name),
        &format!(
            "{} sha256={}{}",
            if replaced { "replaced" } else { "deployed" },
            deployment.sha256,
            if signed { " (signature verified)" } else { "" }
        ),
    );
    app.telemetry.events.emit(kiln_wire::EventKind::Deployed {
        handler: name.to_owned(),
        tenant: tenant.name().to_owned(),
        sha256: deployment.sha256.clone(),
    });
    let status = if replaced { StatusCode::OK } else { StatusCode::CREATED };
    Ok(json_response(status, &describe(&handler)))
}

/// The executors of `names`, which the config validation already checked exist.
pub(crate) fn allowed_models(
    models: &HashMap<String, ModelHandle>,
    names: &[String],
) -> HashMap<String, ModelHandle> {
    names
        .iter()
        .filter_map(|n| models.get(n).map(|m| (n.clone(), m.clone())))
        .collect()
}

async fn remove(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers, Some(&name))?;
    if app.admin.config_handlers.contains(&name) {
        return Err(ApiError::Conflict(format!(
            "handler '{name}' is defined in the config file; change it there"
        )));
    }
    let _one_at_a_time = app.admin.lock.lock().await;
    let Some(existing) = app.handler(&name) else {
        return Err(ApiError::NotFound(format!("handler '{name}' not found")));
    };
    let store = app.admin.store.clone();
    let key = name.clone();
    tokio::task::spawn_blocking(move || store.remove(&key))
        .await
        .map_err(|e| ApiError::Internal(format!("state task failed: {e}")))?
        .map_err(|e| ApiError::Internal(format!("cannot remove the deployment: {e}")))?;
    write(&app.handlers).remove(&name);
    app.audit.record(Event::Delete, Some(existing.tenant()), Some(&name), "deleted");
    app.telemetry.events.emit(kiln_wire::EventKind::Undeployed {
        handler: name.clone(),
        tenant: existing.tenant().to_owned(),
    });
    Ok(json_response(StatusCode::OK, &json!({ "deleted": name })))
}

async fn list(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    require_admin(&app, &headers, None)?;
    let mut handlers: Vec<Arc<Handler>> = read(&app.handlers).values().cloned().collect();
    handlers.sort_by(|a, b| a.name().cmp(b.name()));
    let list: Vec<Value> = handlers.iter().map(|h| describe(h)).collect();
    Ok(json_response(StatusCode::OK, &json!({ "handlers": list })))
}

async fn show(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers, Some(&name))?;
    let handler = app
        .handler(&name)
        .ok_or_else(|| ApiError::NotFound(format!("handler '{name}' not found")))?;
    Ok(json_response(StatusCode::OK, &describe(&handler)))
}

fn describe(handler: &Handler) -> Value {
    let limits = handler.limits();
    let mut value = json!({
        "name": handler.name(),
        "tenant": handler.tenant(),
        "models": handler.model_names(),
        "limits": {
            "memory_limit_mib": limits.memory_limit_bytes >> 20,
            "deadline_ms": limits.deadline.as_millis() as u64,
            "fuel": limits.fuel,
            "max_compute_bytes": limits.max_compute_bytes,
            "max_compute_calls": limits.max_compute_calls,
            "max_response_bytes": limits.max_response_bytes,
        },
    });
    match handler.origin() {
        Origin::Config => value["origin"] = json!("config"),
        Origin::Deployed {
            sha256,
            deployed_at,
            signed,
        } => {
            value["origin"] = json!("deployed");
            value["sha256"] = json!(sha256);
            value["deployed_at"] = json!(deployed_at);
            value["signed"] = json!(signed);
        }
    }
    value
}
