//! The HTTP front door: guest handlers under `/v1/handlers`, and the Open Inference Protocol
//! (KServe v2) under `/v2` for direct model calls; and, on its own listener, the admin API.
//!
//! Every handler and model call carries a tenant's key (`Authorization: Bearer`). A tenant sees
//! only its own handlers and models: anything else is answered exactly like a name that does not
//! exist.

pub mod admin;
mod auth;
pub mod requests;

pub(crate) use requests::{PEER, peer};
mod error;
pub mod grpc;
pub mod metrics;
mod oip;
mod repository;
mod stats;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use bytes::Bytes;
use http_body_util::{Full, LengthLimitError};
use kiln_wire::headers::{PRIORITY as PRIORITY_HEADER, TIMEOUT_MS as TIMEOUT_HEADER};

pub use self::error::ApiError;
use crate::deploy::models::ModelRepository;
use crate::deploy::registry::Registry;
use crate::fleet::gpu::Gpus;
use crate::fleet::scaler::DecisionLog;
use crate::model::handle::ModelHandle;
use crate::model::table::ModelTable;
use crate::model::spec::MAX_PRIORITY;
use crate::sandbox::cache::{self, Outcome};
use crate::sandbox::{CallOptions, Handler, Lease};
use crate::telemetry::{ANONYMOUS, Telemetry, UNKNOWN};
use crate::tenancy::audit::{Audit, Event};
use crate::tenancy::keys::{LiveKeys, Principal};
use crate::tenancy::{Permit, QuotaRefusal, Tenant};

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
    pub requests: requests::Requests,
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
}

impl AppState {
    /// The caller's principal, or 401. Failures are audited with `handler` when known.
    fn authenticate(&self, headers: &http::HeaderMap, handler: Option<&str>) -> Result<Principal, ApiError> {
        let keys = self.keys.current();
        let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        match keys.verify(authorization) {
            Ok(principal) => Ok(principal.clone()),
            Err(failure) => {
                let tenant = match failure.principal() {
                    Some(Principal::Tenant(t)) => Some(t.as_str()),
                    Some(Principal::Admin) => Some("admin"),
                    None => None,
                };
                self.audit.auth_failure(peer(), tenant, handler, failure.reason());
                Err(ApiError::Unauthorized(failure.public_message().to_owned()))
            }
        }
    }

    /// The tenant a principal acts as on the data routes; admin keys manage, they do not call.
    fn tenant_of(&self, principal: &Principal) -> Result<&Arc<Tenant>, ApiError> {
        match principal {
            Principal::Tenant(name) => self
                .tenants
                .get(name)
                .ok_or_else(|| ApiError::Unauthorized("invalid API key".to_owned())),
            Principal::Admin => Err(ApiError::Forbidden(
                "admin keys are for the admin API; call handlers and models with a tenant's key".to_owned(),
            )),
        }
    }

    /// Admits one request under the tenant's quotas, auditing a refusal.
    fn admit(&self, tenant: &Arc<Tenant>, handler: Option<&str>) -> Result<Permit, ApiError> {
        tenant.admit().map_err(|refusal| self.refused(tenant, handler, refusal))
    }

    /// Counts and audits a quota refusal.
    fn refused(&self, tenant: &Tenant, handler: Option<&str>, refusal: QuotaRefusal) -> ApiError {
        self.telemetry.record_refusal(tenant.name(), refusal.kind());
        self.audit.record(Event::QuotaRefused, Some(tenant.name()), handler, &refusal.to_string());
        ApiError::Quota(refusal)
    }

    /// A model the caller's tenant may use; any other name is "not found", whether or not it
    /// exists.
    fn authorized_model(
        &self,
        headers: &http::HeaderMap,
        name: &str,
    ) -> Result<(ModelHandle, &Arc<Tenant>), ApiError> {
        let principal = self.authenticate(headers, None)?;
        // Admin keys manage; model calls go through a tenant and its quotas.
        let tenant = self.tenant_of(&principal)?;
        Ok((self.tenant_model(tenant, name)?, tenant))
    }

    /// A model `tenant` may use; any other name is "not found", whether or not it exists.
    fn tenant_model(&self, tenant: &Tenant, name: &str) -> Result<ModelHandle, ApiError> {
        self.models.usable(tenant.name(), name).ok_or_else(|| match name.split_once('@') {
            Some((model, version)) => ApiError::NotFound(format!("model '{model}' has no version '{version}'")),
            None => ApiError::NotFound(format!("model '{name}' not found")),
        })
    }

    /// The live handler `name`, if there is one.
    pub fn handler(&self, name: &str) -> Option<Arc<Handler>> {
        self.registry.get(name)
    }
}

/// All routes, with `{"error": ...}` 404s for everything else.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/handlers/{name}", any(invoke_root))
        .route("/v1/handlers/{name}/", any(invoke_root))
        .route("/v1/handlers/{name}/{*rest}", any(invoke))
        .route("/v1/models", get(repository::tenant_list))
        .route(
            "/v1/models/{name}",
            get(repository::tenant_show).put(repository::tenant_put).delete(repository::tenant_delete),
        )
        .route("/v1/stats", get(stats::snapshot))
        .route("/v1/scaler", get(stats::scaler))
        .route("/v1/events", get(stats::events))
        .route("/metrics", get(metrics::export))
        .route("/v2", get(oip::server_metadata))
        .route("/v2/health/live", get(oip::live))
        .route("/v2/health/ready", get(oip::ready))
        .route("/v2/models/{model}", get(oip::model_metadata))
        .route("/v2/models/{model}/ready", get(oip::model_ready))
        .route("/v2/models/{model}/infer", post(oip::infer))
        .route("/v2/models/{model}/versions/{version}", get(oip::version_metadata))
        .route("/v2/models/{model}/versions/{version}/ready", get(oip::version_ready))
        .route("/v2/models/{model}/versions/{version}/infer", post(oip::version_infer))
        .fallback(|request: Request| async move {
            ApiError::NotFound(format!("no route for {} {}", request.method(), request.uri().path()))
        })
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), requests::tag_request))
        .with_state(state)
}

async fn invoke_root(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    counted_call(&app, &name, request).await
}

async fn invoke(
    State(app): State<Arc<AppState>>,
    Path((name, _rest)): Path<(String, String)>,
    request: Request,
) -> Response {
    counted_call(&app, &name, request).await
}

/// Who a handler call turned out to be for, once known: the labels it is counted under.
#[derive(Default)]
struct CallLabels {
    handler: Option<Arc<str>>,
    tenant: Option<String>,
}

/// [`call_handler`], counted by handler, tenant and status.
async fn counted_call(app: &AppState, name: &str, request: Request) -> Response {
    let started = std::time::Instant::now();
    let mut labels = CallLabels::default();
    let response = call_handler(app, name, request, &mut labels)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    let handler = labels.handler.as_deref().unwrap_or(UNKNOWN);
    let tenant = labels.tenant.as_deref().unwrap_or(ANONYMOUS);
    app.telemetry.record_request(handler, tenant, response.status().as_u16(), started.elapsed());
    response
}

/// Runs handler `name` on `request`. The guest sees the part of the path after the handler's
/// name, so a component written for `wasmtime serve` runs unchanged under its mount point.
async fn call_handler(
    app: &AppState,
    name: &str,
    request: Request,
    labels: &mut CallLabels,
) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    // Authentication first: without a valid key nothing is said about which handlers exist.
    let principal = app.authenticate(&parts.headers, Some(name))?;
    let tenant = app.tenant_of(&principal)?;
    labels.tenant = Some(tenant.name().to_owned());
    let handler = app
        .handler(name)
        .filter(|h| h.tenant() == tenant.name())
        .ok_or_else(|| ApiError::NotFound(format!("handler '{name}' not found")))?;
    labels.handler = Some(handler.name_arc());
    let options = CallOptions {
        priority: priority_header(&parts.headers)?,
        timeout: timeout_header(&parts.headers)?,
    };
    let permit = app.admit(tenant, Some(name))?;
    // Buffered before the sandbox starts, so a slow upload never holds a sandbox slot.
    let limit = app.max_body_bytes.min(tenant.config.quota.max_body_bytes);
    let body = read_body(body, &parts.headers, limit).await?;
    // The guest sees the path exactly as the client sent it, still percent-encoded: decoding it
    // here and embedding it again would let `%3F` start a query of the caller's choosing.
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{}?{q}", guest_path(parts.uri.path())),
        None => guest_path(parts.uri.path()).to_owned(),
    };
    // The handler's response cache, when it has one and the method may be cached: answered
    // here without a sandbox (the tenant's quota was still charged).
    let cache = handler
        .cache()
        .filter(|_| cache::cacheable_request(&parts.method))
        .map(|_| cache::key(&parts.method, &path_and_query, &body));
    if let Some(key) = &cache
        && let Some(kept) = handler.cache().and_then(|c| c.get(key, std::time::Instant::now()))
    {
        app.telemetry.record_cache(name, Outcome::Hit.as_str(), 1);
        return Ok(cached_response(kept));
    }
    if cache.is_some() {
        app.telemetry.record_cache(name, Outcome::Miss.as_str(), 1);
    }
    strip_kiln_headers(&mut parts.headers);
    let authority = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_owned();
    parts.uri = http::Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(path_and_query.as_str())
        .build()
        .map_err(|e| ApiError::BadRequest(format!("invalid request URI: {e}")))?;
    let request = http::Request::from_parts(parts, Full::new(body));
    let slot = tenant.sandbox_slot().map_err(|refusal| app.refused(tenant, Some(name), refusal))?;
    // Both stay taken until the guest is gone and its body sent, whichever is later.
    let held: Arc<dyn Send + Sync> = Arc::new((permit, slot));
    let lease = Lease { held: Arc::clone(&held), cpu: tenant.cpu_gate() };
    let response = handler.call(request, options, lease).await.map_err(|e| {
        tracing::warn!(handler = %name, tenant = %tenant.name(), kind = e.kind(), "{}", crate::telemetry::loggable(&e.to_string(), 2048));
        app.telemetry.record_trap(name, tenant.name(), e.kind(), e.to_string());
        ApiError::Guest(e)
    })?;
    let keep = cache.zip(handler.cache()).and_then(|(key, c)| {
        cache::lifetime(response.status(), response.headers(), c.policy().ttl).map(|lifetime| (key, lifetime))
    });
    // The tenant's slot is held until the guest has streamed its whole body.
    let Some((key, lifetime)) = keep else {
        return Ok(response.map(|body| Body::new(Holding { body, _permit: held })));
    };
    let (mut head, body) = response.into_parts();
    head.headers.insert(CACHE_HEADER, HeaderValue::from_static("miss"));
    let capture = Capture {
        body: Body::new(body),
        kept: Some(Vec::new()),
        headers: head.headers.clone(),
        key,
        lifetime,
        handler: Arc::clone(&handler),
        telemetry: Arc::clone(&app.telemetry),
    };
    Ok(http::Response::from_parts(head, Body::new(Holding { body: capture, _permit: held })))
}

/// Says on a handler's answer whether its response cache gave it (`hit`) or it was kept for the
/// next one (`miss`).
const CACHE_HEADER: &str = "kiln-cache";

/// A kept answer, as it was first sent, with its age.
fn cached_response(kept: cache::Cached) -> Response {
    let mut response = Response::new(Body::from(kept.body));
    *response.headers_mut() = kept.headers;
    response.headers_mut().insert(CACHE_HEADER, HeaderValue::from_static("hit"));
    if let Ok(age) = HeaderValue::from_str(&kept.stored.elapsed().as_secs().to_string()) {
        response.headers_mut().insert(header::AGE, age);
    }
    response
}

/// A guest's body on its way to the client, copied as it streams; once it has ended whole
/// (within the cache's byte limit) the answer goes into the handler's cache.
struct Capture {
    body: Body,
    /// `None` once the body outgrew the cache or failed: nothing is stored then.
    kept: Option<Vec<u8>>,
    headers: http::HeaderMap,
    key: [u8; 32],
    lifetime: std::time::Duration,
    handler: Arc<Handler>,
    telemetry: Arc<Telemetry>,
}

impl http_body::Body for Capture {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        let this = &mut *self;
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                let limit = this.handler.cache().map_or(0, |c| c.policy().max_bytes);
                if let (Some(kept), Some(data)) = (&mut this.kept, frame.data_ref()) {
                    if kept.len() + data.len() <= limit {
                        kept.extend_from_slice(data);
                    } else {
                        this.kept = None;
                    }
                }
            }
            std::task::Poll::Ready(Some(Err(_))) => this.kept = None,
            std::task::Poll::Ready(None) => {
                if let (Some(body), Some(cache)) = (this.kept.take(), this.handler.cache()) {
                    let kept = cache::Cached {
                        headers: std::mem::take(&mut this.headers),
                        body: Bytes::from(body),
                        stored: std::time::Instant::now(),
                    };
                    if let Some(evicted) = cache.put(this.key, kept, this.lifetime) {
                        let name = this.handler.name();
                        this.telemetry.record_cache(name, Outcome::Store.as_str(), 1);
                        if evicted > 0 {
                            this.telemetry.record_cache(name, Outcome::Eviction.as_str(), evicted as u64);
                        }
                    }
                }
            }
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // Until the copy is stored, ask to be polled to the end: the store happens on `None`.
        self.kept.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The raw path after `/v1/handlers/NAME`, always starting with `/`.
fn guest_path(raw: &str) -> &str {
    let after_prefix = raw.strip_prefix(HANDLERS_PREFIX).unwrap_or("");
    match after_prefix.find('/') {
        Some(at) => &after_prefix[at..],
        None => "/",
    }
}

const HANDLERS_PREFIX: &str = "/v1/handlers/";

/// Removes what is Kiln's from a request before a guest sees it: the caller's API key, and the
/// scheduling headers Kiln has already read.
fn strip_kiln_headers(headers: &mut http::HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::PROXY_AUTHORIZATION);
    // Most requests carry none: no allocation on the hot path for them.
    if !headers.keys().any(|name| name.as_str().starts_with("kiln-")) {
        return;
    }
    let ours: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("kiln-"))
        .cloned()
        .collect();
    for name in ours {
        headers.remove(name);
    }
}

/// A body that holds something (a quota permit) until it is finished or dropped.
struct Holding<B, T> {
    body: B,
    _permit: T,
}

impl<B: http_body::Body + Unpin, T: Unpin> http_body::Body for Holding<B, T> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

fn header_number(headers: &http::HeaderMap, name: &str) -> Result<Option<u64>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::BadRequest(format!("header {name} must be a whole number")))
        })
        .transpose()
}

fn priority_header(headers: &http::HeaderMap) -> Result<Option<u8>, ApiError> {
    match header_number(headers, PRIORITY_HEADER)? {
        Some(p) if p > u64::from(MAX_PRIORITY) => Err(ApiError::BadRequest(format!(
            "header {PRIORITY_HEADER} must be 0 to {MAX_PRIORITY}, got {p}"
        ))),
        p => Ok(p.map(|p| p as u8)),
    }
}

fn timeout_header(headers: &http::HeaderMap) -> Result<Option<std::time::Duration>, ApiError> {
    match header_number(headers, TIMEOUT_HEADER)? {
        Some(0) => Err(ApiError::BadRequest(format!("header {TIMEOUT_HEADER} must be at least 1"))),
        t => Ok(t.map(std::time::Duration::from_millis)),
    }
}

/// Reads a whole body, refusing one over `limit` with 413 before reading it when the client
/// declared its length.
async fn read_body(body: Body, headers: &http::HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        discard_body(body, limit.saturating_mul(DRAIN_FACTOR)).await;
        return Err(ApiError::PayloadTooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::iter::successors(
            Some(&e as &(dyn std::error::Error + 'static)),
            |e| e.source(),
        )
        .any(|e| e.is::<LengthLimitError>());
        if too_large {
            // The rest of the body is still in flight; `to_bytes` consumed the stream, so the
            // connection closes after the response, which the client reads first.
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::BadRequest(format!("cannot read request body: {e}"))
        }
    })
}

/// Over-size bodies up to this multiple of the limit are read and dropped before answering 413,
/// so that a client still writing gets the answer instead of a reset connection. Larger ones
/// are cut off.
const DRAIN_FACTOR: usize = 4;

async fn discard_body(body: Body, budget: usize) {
    use http_body_util::BodyExt as _;
    let mut body = body;
    let mut seen = 0usize;
    let drain = async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > budget {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), drain).await;
}

/// A JSON response with an explicit content type.
fn json_response(status: http::StatusCode, value: &impl serde::Serialize) -> Response {
    let text = match serde_json::to_string(value) {
        Ok(text) => text,
        Err(e) => return ApiError::Internal(format!("cannot encode the response: {e}")).into_response(),
    };
    let mut response = (status, text).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
