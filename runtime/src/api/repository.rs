//! The model repository over HTTP, on the admin listener (admin key): Kiln's own routes and the
//! Open Inference Protocol's repository extension as Triton speaks it, so `tritonclient`'s
//! `load_model`, `unload_model` and `get_model_repository_index` work against the admin URL.
//!
//! - `GET /v1/models`, `GET /v1/models/{name}`: every model Kiln knows, served or not.
//! - `PUT /v1/models/{name}`: load or replace a model; the body is a `[[model]]` section's fields
//!   as JSON or TOML (`name` may be left out), plus `tenants = [...]`, the tenants that may use
//!   it. Answers once the model is ready (201 new, 200 replaced) or did not load (422, the model
//!   serving before still is).
//! - `DELETE /v1/models/{name}`: stop serving a model loaded through the API and forget it.
//! - `POST /v1/models/{name}/pause|resume|flush|reset-stats`, `PATCH /v1/models/{name}` (the
//!   batching knobs, the timeout and the replica bounds): steer a served model.
//! - `GET /v1/requests`, `DELETE /v1/requests/{id}`: the requests in flight; cancel one.
//! - `POST /v2/repository/index` (`{"ready": true}` for ready models only),
//!   `POST /v2/repository/models/{name}/load` (a reload, or with `parameters.config` the model's
//!   fields as a JSON string, a load of that definition) and `.../unload` (kept, not served).
//!
//! On the serving listener, with a tenant's key, the same `GET/PUT/DELETE /v1/models[/{name}]`
//! manage the tenant's own models (its namespace: no other tenant sees them), within its quota
//! (`max_models`, `max_model_bytes`); their files must be remote and pinned. Its `GET` lists the
//! tenant's own models and the others it may use.
//!
//! The [`ModelRepository`](crate::deploy::models::ModelRepository) does the work; these routes
//! only translate.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use kiln_wire::{Bounds, ModelInfo, ModelList, TensorInfo};
use serde_json::{Value, json};

use super::auth::AdminKey;
use super::http::{json_response, read_body};
use super::{ApiError, AppState};
use crate::deploy::models::{Control, Loaded, ModelEntry, ModelOrigin};
use crate::model::spec::owned_key;
use crate::model::handle::{ModelHandle, TuningChange};
use crate::model::spec::{Replicas, Tuning};

/// Largest model definition accepted (the fields, not the weights).
const MAX_SPEC_BYTES: usize = 1 << 20;

pub(super) async fn list(State(app): State<Arc<AppState>>, _admin: AdminKey) -> Result<Response, ApiError> {
    let models = app.repository.list().iter().map(describe).collect();
    Ok(json_response(StatusCode::OK, &ModelList { models }))
}

pub(super) async fn show(
    State(app): State<Arc<AppState>>,
    _admin: AdminKey,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let entry = entry(&app, &name)?;
    Ok(json_response(StatusCode::OK, &describe(&entry)))
}

pub(super) async fn put(
    State(app): State<Arc<AppState>>,
    _admin: AdminKey,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, &headers, MAX_SPEC_BYTES).await?;
    let spec = parse_spec(&bytes)?;
    let loaded = app.repository.put(&name, spec).await?;
    let status = match loaded {
        Loaded::New => StatusCode::CREATED,
        Loaded::Replaced => StatusCode::OK,
    };
    let entry = entry(&app, &name)?;
    Ok(json_response(status, &describe(&entry)))
}

pub(super) async fn delete(
    State(app): State<Arc<AppState>>,
    _admin: AdminKey,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    app.repository.delete(&name).await?;
    Ok(json_response(StatusCode::OK, &json!({ "deleted": name })))
}

/// The tenant a serving-listener model route acts for.
fn owner<'a>(app: &'a AppState, headers: &HeaderMap) -> Result<&'a Arc<crate::tenancy::Tenant>, ApiError> {
    let principal = app.authenticate(headers, None)?;
    app.tenant_of(&principal)
}

/// Tenant `tenant`'s view of a model: by the name it knows, with nothing of the server's or
/// of other tenants' in it: no file paths, no other tenant's name, and for a model it does not
/// own no source, digest or failure reason (those can name the operator's files and hosts).
fn describe_for(entry: &ModelEntry, tenant: &str) -> ModelInfo {
    let mut info = describe(entry);
    info.name = entry.config.model_name().to_owned();
    info.tenants = vec![tenant.to_owned()];
    info.path = String::new();
    // Before a remote file is fetched there is no path, and replacing "" would mangle the text.
    let file = entry.config.path.display().to_string();
    let hide_file = |text: &str| if file.is_empty() { text.to_owned() } else { text.replace(&file, "its file") };
    let own = matches!(entry.origin, ModelOrigin::Tenant);
    for choice in &mut info.precision_search {
        choice.model = info.name.clone();
        for line in &mut choice.candidates {
            *line = candidate_for_tenant(line, &file, own);
        }
    }
    if matches!(entry.origin, ModelOrigin::Tenant) {
        info.reason = hide_file(&info.reason);
    } else {
        info.source = None;
        info.sha256 = None;
        if !info.reason.is_empty() {
            info.reason = "unavailable".to_owned();
        }
    }
    info
}

/// `GET /v1/models` with a tenant key: its own models, then the others it may use.
pub(super) async fn tenant_list(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let tenant = owner(&app, &headers)?;
    let own = app.repository.list_owned(tenant.name());
    let shared = app.repository.list().into_iter().filter(|e| {
        !matches!(e.origin, ModelOrigin::Tenant) && e.users.iter().any(|u| u == tenant.name())
    });
    let models = own.iter().chain(shared.collect::<Vec<_>>().iter()).map(|e| describe_for(e, tenant.name())).collect();
    Ok(json_response(StatusCode::OK, &ModelList { models }))
}

/// `GET /v1/models/{name}` with a tenant key: its own model of that name, else one it may use.
pub(super) async fn tenant_show(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let tenant = owner(&app, &headers)?;
    let own = app.repository.get(&owned_key(tenant.name(), &name));
    let shared = || {
        app.repository
            .get(&name)
            .filter(|e| !matches!(e.origin, ModelOrigin::Tenant) && e.users.iter().any(|u| u == tenant.name()))
    };
    let entry = own.or_else(shared).ok_or_else(|| ApiError::NotFound(format!("model '{name}' not found")))?;
    Ok(json_response(StatusCode::OK, &describe_for(&entry, tenant.name())))
}

/// `PUT /v1/models/{name}` with a tenant key: loads or replaces one of its own models.
pub(super) async fn tenant_put(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let tenant = owner(&app, &headers)?;
    // A load is a request of the tenant's like any other: its rate and concurrency apply.
    let _permit = app.admit(tenant, None)?;
    let bytes = read_body(body, &headers, MAX_SPEC_BYTES).await?;
    let spec = parse_spec(&bytes)?;
    let token = match headers.get(kiln_wire::headers::SOURCE_TOKEN) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| ApiError::BadRequest(format!("header {} is not visible ASCII", kiln_wire::headers::SOURCE_TOKEN)))?
                .to_owned(),
        ),
    };
    let loaded = app.repository.put_owned(tenant.name(), &name, spec, token).await?;
    let status = match loaded {
        Loaded::New => StatusCode::CREATED,
        Loaded::Replaced => StatusCode::OK,
    };
    let entry = entry(&app, &owned_key(tenant.name(), &name))?;
    Ok(json_response(status, &describe_for(&entry, tenant.name())))
}

/// `DELETE /v1/models/{name}` with a tenant key: stops serving one of its own models and forgets it.
pub(super) async fn tenant_delete(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let tenant = owner(&app, &headers)?;
    let key = owned_key(tenant.name(), &name);
    if app.repository.get(&key).is_none() {
        return Err(ApiError::NotFound(format!("model '{name}' is not one of your own")));
    }
    app.repository.delete(&key).await?;
    Ok(json_response(StatusCode::OK, &json!({ "deleted": name })))
}

/// `POST /v1/models/{name}/{pause|resume|flush|reset-stats}`: the model's info after, and what
/// was done (`flushed N queued requests`).
pub(super) async fn control(
    State(app): State<Arc<AppState>>,
    _admin: AdminKey,
    Path((name, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let control = match action.as_str() {
        "pause" => Control::Pause,
        "resume" => Control::Resume,
        "flush" => Control::Flush,
        "reset-stats" => Control::ResetStats,
        other => {
            return Err(ApiError::NotFound(format!(
                "no model action '{other}' (pause, resume, flush, reset-stats; PATCH to tune)"
            )));
        }
    };
    controlled(&app, &name, control).await
}

/// The knobs `PATCH /v1/models/{name}` takes; each optional.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TuneRequest {
    max_batch_size: Option<u32>,
    max_queue_delay_us: Option<u64>,
    timeout_ms: Option<u64>,
    /// `N`, or `{ "min": A, "max": B }`.
    instances: Option<Instances>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum Instances {
    Fixed(u32),
    Range { min: u32, max: u32 },
}

/// `PATCH /v1/models/{name}`: change the served model's knobs while it serves.
pub(super) async fn tune(
    State(app): State<Arc<AppState>>,
    _admin: AdminKey,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, &headers, MAX_SPEC_BYTES).await?;
    let request: TuneRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::BadRequest(format!(
            "send any of max_batch_size, max_queue_delay_us, timeout_ms, instances (N or {{\"min\": A, \"max\": B}}): {e}"
        ))
    })?;
    let change = TuningChange {
        max_batch_size: request.max_batch_size,
        max_queue_delay: request.max_queue_delay_us.map(std::time::Duration::from_micros),
        timeout: request.timeout_ms.map(std::time::Duration::from_millis),
        replicas: request.instances.map(|i| match i {
            Instances::Fixed(n) => Replicas::fixed(n),
            Instances::Range { min, max } => Replicas { min, max },
        }),
    };
    controlled(&app, &name, Control::Tune(change)).await
}

async fn controlled(app: &AppState, name: &str, control: Control) -> Result<Response, ApiError> {
    let done = app.repository.control(name, control).await?;
    let entry = entry(app, name)?;
    let mut body = serde_json::to_value(describe(&entry)).map_err(|e| ApiError::Internal(e.to_string()))?;
    body["done"] = Value::String(done);
    Ok(json_response(StatusCode::OK, &body))
}

/// `GET /v1/requests`: every request in flight, oldest first.
pub(super) async fn in_flight(State(app): State<Arc<AppState>>, _admin: AdminKey) -> Result<Response, ApiError> {
    Ok(json_response(StatusCode::OK, &json!({ "requests": app.requests.in_flight() })))
}

/// `DELETE /v1/requests/{id}`: cancel a request in flight by its `kiln-request-id`.
pub(super) async fn cancel(
    State(app): State<Arc<AppState>>,
    _admin: AdminKey,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match app.requests.cancel(&id) {
        super::requests::Cancel::Cancelled => {}
        super::requests::Cancel::NotInFlight => {
            return Err(ApiError::NotFound(format!("no request {id} in flight (it may have been answered already)")));
        }
        super::requests::Cancel::OtherReplica(replica) => {
            let here = app.requests.replica().map_or_else(|| "a server outside any cluster".to_owned(), |r| format!("replica '{r}'"));
            return Err(ApiError::Misdirected(format!(
                "request {id} belongs to replica '{replica}', and this is {here}: send the cancel to that replica's admin API"
            )));
        }
    }
    app.audit.record(crate::tenancy::audit::Event::RequestCancel, None, None, &format!("request {id} cancelled"));
    Ok(json_response(StatusCode::OK, &json!({ "cancelled": id })))
}

/// The repository's entry for `name`, or 404.
fn entry(app: &AppState, name: &str) -> Result<ModelEntry, ApiError> {
    app.repository.get(name).ok_or_else(|| ApiError::NotFound(format!("model '{name}' not found")))
}

/// A model's fields: a JSON object, or TOML text (a `[[model]]` section's body).
fn parse_spec(bytes: &[u8]) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ApiError::BadRequest("the model's fields are not UTF-8".to_owned()))?;
    if text.trim_start().starts_with('{') {
        return serde_json::from_str(text).map_err(|e| ApiError::BadRequest(format!("the model's fields as JSON: {e}")));
    }
    let table: toml::Table =
        toml::from_str(text).map_err(|e| ApiError::BadRequest(format!("the model's fields as TOML: {}", e.message())))?;
    serde_json::to_value(table).map_err(|e| ApiError::BadRequest(format!("the model's fields: {e}")))
}

/// `POST /v2/repository/index`: every model with its state, as Triton lists them.
pub(super) async fn index(State(app): State<Arc<AppState>>, _admin: AdminKey, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let request = read_json(body, &headers).await?;
    let only_ready = request.get("ready").and_then(Value::as_bool).unwrap_or(false);
    let models: Vec<Value> = index_rows(&app, only_ready)
        .into_iter()
        .map(|(name, version, state, reason)| json!({ "name": name, "version": version, "state": state, "reason": reason }))
        .collect();
    Ok(json_response(StatusCode::OK, &models))
}

/// The repository index as Triton lists it, over HTTP and gRPC: `(name, version, state, reason)`
/// for each version served, one row without a version for a model not served.
pub(super) fn index_rows(app: &AppState, only_ready: bool) -> Vec<(String, String, &'static str, String)> {
    app.repository
        .list()
        .into_iter()
        .filter(|m| !only_ready || m.state == "READY")
        .flat_map(|m| {
            let versions: Vec<String> = match m.versions.is_empty() {
                true => vec![String::new()],
                false => m.versions.iter().map(u64::to_string).collect(),
            };
            versions.into_iter().map(move |v| (m.name.clone(), v, m.state, m.reason.clone()))
        })
        .collect()
}

/// `POST /v2/repository/models/{name}/load`.
pub(super) async fn load(
    State(app): State<Arc<AppState>>,
    _admin: AdminKey,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let request = read_json(body, &headers).await?;
    let config = match request.pointer("/parameters/config") {
        None => None,
        Some(Value::String(config)) => Some(config.as_str()),
        Some(_) => return Err(ApiError::BadRequest("parameters.config must be a string of JSON".to_owned())),
    };
    load_model(&app, &name, config).await?;
    Ok(json_response(StatusCode::OK, &json!({})))
}

/// The repository extension's load, over HTTP and gRPC: a reload of `name` as it is defined,
/// or with `config` (the model's fields as JSON) a load of that definition.
pub(super) async fn load_model(app: &AppState, name: &str, config: Option<&str>) -> Result<(), ApiError> {
    match config {
        None => app.repository.load(name).await?,
        Some(config) => {
            let spec = serde_json::from_str(config)
                .map_err(|e| ApiError::BadRequest(format!("parameters.config: the model's fields as JSON: {e}")))?;
            app.repository.put(name, spec).await?
        }
    };
    Ok(())
}

/// `POST /v2/repository/models/{name}/unload`.
pub(super) async fn unload(
    State(app): State<Arc<AppState>>,
    _admin: AdminKey,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    read_json(body, &headers).await?;
    app.repository.unload(&name).await?;
    Ok(json_response(StatusCode::OK, &json!({})))
}

/// A JSON object body; an empty one (as tritonclient sends for the index) is `{}`.
async fn read_json(body: Body, headers: &HeaderMap) -> Result<Value, ApiError> {
    let bytes = read_body(body, headers, MAX_SPEC_BYTES).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("the request body as JSON: {e}")))?;
    if value.is_object() { Ok(value) } else { Err(ApiError::BadRequest("the request body must be a JSON object".to_owned())) }
}

/// A line of a model's precision search as a tenant sees it: the model's file named "its
/// file", and why a candidate failed only for the tenant's own model (for the operator's it can
/// name the server's files and programs).
fn candidate_for_tenant(line: &str, file: &str, own: bool) -> String {
    let mut line = if file.is_empty() { line.to_owned() } else { line.replace(file, "its file") };
    if let Some(at) = line.find(": fails (").filter(|_| !own) {
        line.truncate(at + ": fails".len());
    }
    line
}

fn describe(entry: &ModelEntry) -> ModelInfo {
    let c = &entry.config;
    // The live knobs of the model served, else the definition's.
    let tuning = entry.handle.as_ref().map_or_else(|| Tuning::of(c), ModelHandle::tuning);
    ModelInfo {
        name: entry.name.clone(),
        origin: match entry.origin {
            ModelOrigin::Config => "config",
            ModelOrigin::Api => "api",
            ModelOrigin::Tenant => "tenant",
        }
        .to_owned(),
        state: entry.state.to_owned(),
        reason: entry.reason.clone(),
        tenants: entry.users.to_vec(),
        path: c.path.display().to_string(),
        source: c.source.clone(),
        sha256: c.sha256.clone(),
        device: c.device.to_string(),
        precision: entry.handle.as_ref().map_or_else(|| if c.auto_precision.is_some() { "auto".to_owned() } else { c.form().to_string() }, ModelHandle::precision),
        inputs: c
            .inputs
            .iter()
            .map(|i| TensorInfo {
                name: i.name.clone(),
                datatype: i.dtype.wire_name().to_owned(),
                shape: i.shape.iter().map(|d| d.map_or(-1, i64::from)).collect(),
            })
            .collect(),
        outputs: c.outputs.iter().map(|o| o.name.clone()).collect(),
        instances: Bounds { min: tuning.replicas.min, max: tuning.replicas.max },
        max_batch_size: tuning.max_batch_size,
        max_queue_delay_us: tuning.max_queue_delay.as_micros() as u64,
        timeout_ms: tuning.timeout.as_millis() as u64,
        weights_bytes: entry.handle.as_ref().map_or(0, |h| h.load().weights),
        queued: entry.handle.as_ref().map_or(0, |h| h.load().queued as u64),
        paused: entry.handle.as_ref().is_some_and(ModelHandle::paused),
        parameters: entry.handle.as_ref().map_or(0, ModelHandle::parameters),
        load_ms: entry.handle.as_ref().and_then(ModelHandle::load_time).map_or(0, |t| t.load.as_millis() as u64),
        warmup_ms: entry.handle.as_ref().and_then(ModelHandle::load_time).map_or(0, |t| t.warmup.as_millis() as u64),
        versions: entry.versions.iter().map(u64::to_string).collect(),
        deployed_at: entry.deployed_at,
        replicas: entry.handle.as_ref().map(|h| h.replicas()).unwrap_or_default(),
        precision_search: entry.handle.as_ref().map(ModelHandle::precision_search).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::candidate_for_tenant;

    #[test]
    fn a_tenant_sees_why_a_candidate_failed_only_for_its_own_model_and_never_the_file() {
        let failed = "fp16: fails (cannot load TorchScript file /srv/models/secret.pt: no Half kernel in /opt/torch/lib)";
        assert_eq!(candidate_for_tenant(failed, "/srv/models/secret.pt", false), "fp16: fails");
        assert_eq!(
            candidate_for_tenant(failed, "/srv/models/secret.pt", true),
            "fp16: fails (cannot load TorchScript file its file: no Half kernel in /opt/torch/lib)"
        );
        let kept = "bf16: 2.90× fp32, worst cosine 0.9996";
        assert_eq!(candidate_for_tenant(kept, "/srv/models/secret.pt", false), kept);
        // Before a remote file is fetched there is no path: nothing is replaced.
        assert_eq!(candidate_for_tenant(kept, "", false), kept);
    }
}
