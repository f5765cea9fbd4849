//! Calling a guest handler: `/v1/handlers/NAME/...` with a tenant's key runs that tenant's handler
//! in a fresh sandbox under the tenant's quotas, or answers from the handler's response cache.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use http_body_util::Full;

use super::http::{priority_header, read_body, timeout_header};
use super::requests::Counted;
use super::{ApiError, AppState};
use crate::sandbox::cache::{self, Lookup};
use crate::sandbox::{CallOptions, Lease};
use crate::telemetry::UNKNOWN;

pub(super) async fn invoke_root(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    counted_call(&app, &name, request).await
}

pub(super) async fn invoke(
    State(app): State<Arc<AppState>>,
    Path((name, _rest)): Path<(String, String)>,
    request: Request,
) -> Response {
    counted_call(&app, &name, request).await
}

/// [`call_handler`], counted by handler, tenant and status.
async fn counted_call(app: &AppState, name: &str, request: Request) -> Response {
    let mut counted = Counted::start(UNKNOWN);
    let response = call_handler(app, name, request, &mut counted)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    counted.finish(&app.telemetry, response.status().as_u16());
    response
}

/// Runs handler `name` on `request`. The guest sees the part of the path after the handler's
/// name, so a component written for `wasmtime serve` runs unchanged under its mount point.
async fn call_handler(
    app: &AppState,
    name: &str,
    request: Request,
    counted: &mut Counted,
) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    // Authentication first: without a valid key nothing is said about which handlers exist.
    let principal = app.authenticate(&parts.headers, Some(name))?;
    let tenant = app.tenant_of(&principal)?;
    counted.tenant = Some(Arc::clone(tenant));
    let handler = app
        .handler(name)
        .filter(|h| h.tenant() == tenant.name())
        .ok_or_else(|| ApiError::NotFound(format!("handler '{name}' not found")))?;
    counted.handler = Some(handler.name_arc());
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
    // Answered from the handler's response cache without a sandbox when it can be (the
    // tenant's quota was still charged).
    let cached = handler.cache().map(|c| &**c);
    let key = match cache::lookup(cached, handler.name(), &app.telemetry, &parts.method, &path_and_query, &body) {
        Lookup::Hit(kept) => return Ok(kept.map(Body::from)),
        Lookup::Miss(key) => Some(key),
        Lookup::Uncached => None,
    };
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
    // The tenant's slot is held until the guest has streamed its whole body.
    let response = cache::capture(handler.cache(), &handler.name_arc(), &app.telemetry, key, response);
    Ok(response.map(|body| Body::new(Holding { body, _permit: held })))
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
