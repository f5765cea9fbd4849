//! The Open Inference Protocol over gRPC (`proto/inference.proto`), on its own listener
//! (`grpc_listen`, 127.0.0.1:8001 by default, as Triton): the same routes as [`super::oip`] with
//! the same keys, quotas, batching and messages, so Triton's and KServe's gRPC clients work as
//! they are.
//!
//! Its own port rather than the HTTP one: those clients take the gRPC address apart from the HTTP
//! one (8001 beside 8000), an operator can expose, firewall and balance HTTP/2 apart from
//! HTTP/1, and the HTTP listener keeps serving HTTP/1 alone.
//!
//! The key goes in the `authorization` metadata (`Bearer …`), as over HTTP, and is checked by
//! [`Authenticated`] before any of the message is read: a caller without a valid key gets nothing
//! decoded, and a tenant's message is read only up to its own `max_body_bytes`. `kiln-priority`
//! and `kiln-timeout-ms` go in the metadata too, and a client's `grpc-timeout` bounds the model's
//! wait like `kiln-timeout-ms`. Errors carry the HTTP API's message, with the status mapped to
//! its gRPC code (404 → NOT_FOUND, 400 → INVALID_ARGUMENT, 401 → UNAUTHENTICATED, 413 and 429 →
//! RESOURCE_EXHAUSTED, …) and its kind in the `kiln-error-kind` metadata. The repository calls
//! take an admin key, as the HTTP repository extension does on the admin listener.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tonic::codegen::{BoxFuture, Service};
use tonic::metadata::MetadataValue;
use tonic::server::NamedService;
use tonic::{Code, Request, Response, Status};

use super::inference::{self, Metadata};
use super::requests::{Counted, Metered, PEER, TRACEPARENT, Unanswered};
use crate::telemetry::access::{Record, TraceContext};
use super::{ApiError, AppState};
use crate::model::handle::ModelHandle;
use crate::model::tensor::{DType, HostTensor};
use crate::tenancy::Tenant;

/// The code generated from `proto/inference.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use proto::model_infer_response::InferOutputTensor;
use proto::model_metadata_response::TensorMetadata;
use proto::*;

/// Direct model calls over gRPC are counted as this handler.
const HANDLER: &str = "grpc";

/// The service, ready to add to a tonic server: every call's key is checked, and its message
/// bounded, by [`Authenticated`] before the generated server reads it.
pub fn service(app: Arc<AppState>) -> Authenticated {
    // A backstop only: `Authenticated` refuses any message over this (or the tenant's own
    // limit) from its length prefix, before the decoder sees it. Compression stays off (tonic's
    // default) because that bound is on the bytes received, which compression would not bound.
    let inner = GrpcInferenceServiceServer::new(Grpc { app: Arc::clone(&app) })
        .max_decoding_message_size(app.max_body_bytes)
        .max_encoding_message_size(usize::MAX);
    Authenticated { app, inner }
}

/// The calls' handlers. Only [`service`] builds it, always behind [`Authenticated`], whose
/// [`Caller`] each call that needs a key takes from its request.
pub struct Grpc {
    app: Arc<AppState>,
}

/// The messages of the calls that need no key (health and server metadata) are empty: anything
/// larger than this is not a real client's, and is refused unread.
const KEYLESS_MAX_BYTES: usize = 4096;

/// Each message on the wire starts with a compressed flag and a 4-byte big-endian length.
const FRAME_PREFIX: usize = 5;

/// Who a call is from, as [`Authenticated`] found it from the metadata; in the request's
/// extensions, so no handler checks the key again.
#[derive(Clone)]
enum Caller {
    /// A tenant's key, on the model calls.
    Tenant(Arc<Tenant>),
    /// The admin key, on the repository calls.
    Admin,
}

/// What a call needs before its message is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Health and server metadata, answered to anyone (load balancers probe them keyless).
    Anyone,
    /// The model calls: a tenant's key.
    Tenant,
    /// The repository calls: the admin key.
    Admin,
}

/// The access a call's path needs. A method not named here needs a tenant's key, so a call
/// added to the proto later is closed until it is given its place.
fn access(path: &str) -> Access {
    match path.rsplit('/').next().unwrap_or_default() {
        "ServerLive" | "ServerReady" | "ServerMetadata" => Access::Anyone,
        "RepositoryIndex" | "RepositoryModelLoad" | "RepositoryModelUnload" => Access::Admin,
        _ => Access::Tenant,
    }
}

/// The generated server behind a check made from the metadata alone, before any of the body is
/// read: a call that needs a key and has no valid one is answered at once, its message unread;
/// an accepted call's body is bounded by the caller's `max_body_bytes` (see [`Bounded`]) as it
/// streams in, and carries its [`Caller`] to the handler.
#[derive(Clone)]
pub struct Authenticated {
    app: Arc<AppState>,
    inner: GrpcInferenceServiceServer<Grpc>,
}

impl NamedService for Authenticated {
    const NAME: &'static str = <GrpcInferenceServiceServer<Grpc> as NamedService>::NAME;
}

impl Authenticated {
    /// The caller of a call needing `access`, and the most message bytes it may send; or the
    /// refusal. Failures are audited (with the peer, for the flood limit) by the same checks as
    /// the HTTP routes make.
    fn check_key(&self, access: Access, headers: &http::HeaderMap) -> Result<(Option<Caller>, usize), ApiError> {
        let app = &self.app;
        match access {
            Access::Anyone => Ok((None, KEYLESS_MAX_BYTES.min(app.max_body_bytes))),
            Access::Admin => {
                super::auth::require_admin(app, headers, None)?;
                Ok((Some(Caller::Admin), app.max_body_bytes))
            }
            Access::Tenant => {
                let principal = app.authenticate(headers, None)?;
                // Admin keys manage; model calls go through a tenant and its quotas.
                let tenant = Arc::clone(app.tenant_of(&principal)?);
                let limit = app.max_body_bytes.min(tenant.config.quota.max_body_bytes);
                Ok((Some(Caller::Tenant(tenant)), limit))
            }
        }
    }
}

impl Service<http::Request<tonic::body::Body>> for Authenticated {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let trace = TraceContext::from_header(request.headers().get(TRACEPARENT).map(http::HeaderValue::as_bytes));
        let record = Record::new("grpc", request.method().as_str(), request.uri().path(), self.app.requests.fresh_id(), trace);
        let mut counted = Counted::start(HANDLER);
        let access = access(request.uri().path());
        let counts = request.uri().path().ends_with("/ModelInfer");
        // Over TLS too (see `tls::TlsConnection`).
        let peer = request
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(tonic::transport::server::TcpConnectInfo::remote_addr);
        let admitted = match peer {
            Some(addr) => PEER.sync_scope(addr.ip(), || self.check_key(access, request.headers())),
            None => self.check_key(access, request.headers()),
        };
        let (caller, limit) = match admitted {
            Ok(admitted) => admitted,
            Err(error) => {
                let response = Arc::clone(&record).sync_scope(|| {
                    if counts {
                        counted.finish(&self.app.telemetry, error.status().as_u16());
                    }
                    // The body is dropped unread: the stream is reset once the answer is sent.
                    let mut response: http::Response<tonic::body::Body> = status(error).into_http();
                    tag_response(&self.app, response.headers_mut());
                    response
                });
                return Box::pin(std::future::ready(Ok(metered(response, record))));
            }
        };
        let over = Arc::new(AtomicBool::new(false));
        let counted = match &caller {
            Some(Caller::Tenant(tenant)) if counts => {
                counted.tenant = Some(Arc::clone(tenant));
                Some(counted)
            }
            _ => None,
        };
        let (mut parts, body) = request.into_parts();
        if let Some(caller) = caller {
            parts.extensions.insert(caller);
        }
        let body = Bounded { inner: Metered::incoming(body, &record), limit, read: 0, prefix: [0; FRAME_PREFIX], over: Arc::clone(&over) };
        let answer = self.inner.call(http::Request::from_parts(parts, tonic::body::Body::new(body)));
        let app = Arc::clone(&self.app);
        // Cancelled (its client's grpc-timeout, a reset stream): CANCELLED in its line.
        let mut unanswered = Unanswered(record.wanted().then(|| Arc::clone(&record)), Some(Code::Cancelled as i32));
        Box::pin(Arc::clone(&record).scope(async move {
            let response = answer.await;
            unanswered.answered();
            // Refused while its message was read, the call never reached its handler, which
            // counts the others.
            if let Some(counted) = counted
                && over.load(Ordering::Relaxed)
            {
                counted.finish(&app.telemetry, ApiError::PayloadTooLarge { limit }.status().as_u16());
            }
            response.map(|response| metered(response, record))
        }))
    }
}

/// `response` with its access line written once its body is sent (see [`Metered`]).
fn metered(response: http::Response<tonic::body::Body>, record: Arc<Record>) -> http::Response<tonic::body::Body> {
    if !record.wanted() {
        return response;
    }
    let status = response.status().as_u16();
    let trailers_only = super::requests::grpc_status(response.headers());
    response.map(|body| {
        let mut metered = Metered::outgoing(body, record, status);
        metered.set_grpc_status(trailers_only);
        tonic::body::Body::new(metered)
    })
}

/// A request body cut off past `limit` bytes of message: refused as soon as the message's
/// length prefix says it is longer, and in any case once more than one prefix and `limit` bytes
/// have come (a unary call carries one message). So at most that much is ever buffered.
struct Bounded {
    inner: Metered<tonic::body::Body>,
    limit: usize,
    /// Bytes received so far.
    read: usize,
    /// The first message's length prefix, as it arrives.
    prefix: [u8; FRAME_PREFIX],
    /// Set once the body has been refused.
    over: Arc<AtomicBool>,
}

impl Bounded {
    /// Counts `data` in; whether the body is now over its limit.
    fn exceeds(&mut self, data: &[u8]) -> bool {
        if let Some(missing) = self.prefix.get_mut(self.read..) {
            let n = missing.len().min(data.len());
            missing[..n].copy_from_slice(&data[..n]);
        }
        self.read = self.read.saturating_add(data.len());
        let declared = (self.read >= FRAME_PREFIX)
            .then(|| u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]) as usize);
        declared.is_some_and(|n| n > self.limit) || self.read > self.limit.saturating_add(FRAME_PREFIX)
    }
}

impl http_body::Body for Bounded {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if self.over.load(Ordering::Relaxed) {
            return Poll::Ready(None);
        }
        let polled = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &polled
            && let Some(data) = frame.data_ref()
            && self.exceeds(data)
        {
            self.over.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(status(ApiError::PayloadTooLarge { limit: self.limit }))));
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.over.load(Ordering::Relaxed) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The gRPC status for an API error: the same message, the code nearest its HTTP status.
fn status(error: ApiError) -> Status {
    let http = error.status();
    let code = match http.as_u16() {
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        409 => Code::AlreadyExists,
        413 | 429 => Code::ResourceExhausted,
        422 => Code::FailedPrecondition,
        503 if matches!(error, ApiError::Cancelled(_)) => Code::Cancelled,
        503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        _ => Code::Internal,
    };
    if http.is_server_error() {
        tracing::warn!(kind = error.kind(), code = ?code, "gRPC: {error}");
    } else {
        tracing::debug!(kind = error.kind(), code = ?code, "gRPC: {error}");
    }
    let mut status = Status::new(code, error.to_string());
    if let Ok(kind) = MetadataValue::try_from(error.kind()) {
        status.metadata_mut().insert("kiln-error-kind", kind);
    }
    if let ApiError::Quota(refusal) = &error {
        status.metadata_mut().insert("retry-after", MetadataValue::from(refusal.retry_after_secs()));
    }
    status
}

/// The HTTP status a gRPC answer stands for, for the request counters shared with HTTP.
fn counted_status<T>(result: &Result<T, ApiError>) -> u16 {
    match result {
        Ok(_) => 200,
        Err(e) => e.status().as_u16(),
    }
}

/// Runs `call` on the request's metadata (as HTTP headers, for the checks the HTTP routes make),
/// its [`Caller`] and its message, as a request from its peer (for the audit log's flood limit),
/// with a fresh `kiln-request-id` on its answer.
async fn tagged<M, T, F>(
    app: &AppState,
    request: Request<M>,
    call: impl FnOnce(http::HeaderMap, Option<Caller>, M) -> F,
) -> Result<Response<T>, Status>
where
    F: Future<Output = Result<T, ApiError>>,
{
    let peer = request.remote_addr();
    let (metadata, mut extensions, message) = request.into_parts();
    let caller = extensions.remove::<Caller>();
    let call = call(metadata.into_headers(), caller, message);
    let result = match peer {
        Some(addr) => PEER.scope(addr.ip(), call).await,
        None => call.await,
    };
    let mut response = Response::new(result.map_err(status)?);
    tag_response(app, response.metadata_mut().as_mut());
    Ok(response)
}

/// Gives an answer a fresh `kiln-request-id`.
fn tag_response(app: &AppState, headers: &mut http::HeaderMap) {
    let record = Record::current();
    let id = match &record {
        Some(record) => std::borrow::Cow::Borrowed(record.request_id.as_str()),
        None => std::borrow::Cow::Owned(app.requests.fresh_id()),
    };
    if let Ok(value) = http::HeaderValue::from_str(&id) {
        headers.insert(kiln_wire::headers::REQUEST_ID, value);
    }
}

/// The tenant a model call is from.
fn tenant_of(caller: Option<Caller>) -> Result<Arc<Tenant>, ApiError> {
    match caller {
        Some(Caller::Tenant(tenant)) => Ok(tenant),
        // `Authenticated` lets no model call through without a tenant: this is a wiring fault.
        Some(Caller::Admin) | None => Err(ApiError::Internal("a model call reached its handler without a tenant's key".to_owned())),
    }
}

/// `Ok` for a call made with the admin key.
fn admin_only(caller: Option<Caller>) -> Result<(), ApiError> {
    match caller {
        Some(Caller::Admin) => Ok(()),
        Some(Caller::Tenant(_)) | None => Err(ApiError::Internal("a repository call reached its handler without the admin key".to_owned())),
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Grpc {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: inference::server_ready(&self.app) }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "kiln".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: vec!["model_repository".to_owned()],
        }))
    }

    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        tagged(&self.app, request, |_, caller, request| async move {
            let tenant = tenant_of(caller)?;
            let name = inference::versioned(&request.name, &request.version)?;
            let model = self.app.tenant_model(&tenant, &name)?;
            Ok(ModelReadyResponse { ready: inference::model_ready(&model) })
        })
        .await
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        tagged(&self.app, request, |_, caller, request| async move {
            let tenant = tenant_of(caller)?;
            let name = inference::versioned(&request.name, &request.version)?;
            let model = self.app.tenant_model(&tenant, &name)?;
            Ok(metadata(inference::metadata(&self.app, &model, &tenant)))
        })
        .await
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let mut counted = Counted::start(HANDLER);
        let app = &self.app;
        tagged(&self.app, request, |headers, caller, request| async move {
            let result = match tenant_of(caller) {
                Ok(tenant) => {
                    counted.tenant = Some(Arc::clone(&tenant));
                    infer(app, &headers, &tenant, request).await
                }
                Err(e) => Err(e),
            };
            counted.finish(&app.telemetry, counted_status(&result));
            result
        })
        .await
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        tagged(&self.app, request, |_, caller, request| async move {
            admin_only(caller)?;
            let models = super::repository::index_rows(&self.app, request.ready)
                .into_iter()
                .map(|(name, version, state, reason)| repository_index_response::ModelIndex {
                    name,
                    version,
                    state: state.to_owned(),
                    reason,
                })
                .collect();
            Ok(RepositoryIndexResponse { models })
        })
        .await
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        tagged(&self.app, request, |_, caller, request| async move {
            admin_only(caller)?;
            self.app.refuse_change_in_cluster(&format!("RepositoryModelLoad {}", request.model_name))?;
            use model_repository_parameter::ParameterChoice;
            let config = match request.parameters.get("config").and_then(|p| p.parameter_choice.as_ref()) {
                None => None,
                Some(ParameterChoice::StringParam(text)) => Some(text.clone()),
                Some(ParameterChoice::BytesParam(bytes)) => Some(
                    String::from_utf8(bytes.to_vec())
                        .map_err(|_| ApiError::BadRequest("parameters.config is not UTF-8".to_owned()))?,
                ),
                Some(_) => return Err(ApiError::BadRequest("parameters.config must be a string of JSON".to_owned())),
            };
            super::repository::load_model(&self.app, &request.model_name, config.as_deref()).await?;
            Ok(RepositoryModelLoadResponse {})
        })
        .await
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        tagged(&self.app, request, |_, caller, request| async move {
            admin_only(caller)?;
            self.app.refuse_change_in_cluster(&format!("RepositoryModelUnload {}", request.model_name))?;
            self.app.repository.unload(&request.model_name).await?;
            Ok(RepositoryModelUnloadResponse {})
        })
        .await
    }
}

/// A model's metadata as the proto has it: an output whose type is not known yet has an empty
/// datatype and shape.
fn metadata(meta: Metadata) -> ModelMetadataResponse {
    let describe = |t: inference::TensorMetadata| TensorMetadata {
        name: t.name,
        datatype: t.datatype.unwrap_or_default().to_owned(),
        shape: t.shape.unwrap_or_default(),
    };
    ModelMetadataResponse {
        name: meta.name,
        versions: meta.versions,
        platform: inference::PLATFORM.to_owned(),
        inputs: meta.inputs.into_iter().map(describe).collect(),
        outputs: meta.outputs.into_iter().map(describe).collect(),
    }
}

/// One inference for `tenant`, whose message [`Authenticated`] has already held to its
/// `max_body_bytes`.
async fn infer(
    app: &AppState,
    headers: &http::HeaderMap,
    tenant: &Arc<Tenant>,
    mut request: ModelInferRequest,
) -> Result<ModelInferResponse, ApiError> {
    let name = inference::versioned(&request.model_name, &request.model_version)?;
    let model = app.tenant_model(tenant, &name)?;
    let options = inference::options(app, headers, grpc_timeout(headers))?;
    let inputs = async { decode_inputs(&mut request) };
    let outputs = inference::infer(app, tenant, &model, options, inputs).await?;
    encode_outputs(&model, request, outputs, tenant.config.quota.limits.max_response_bytes)
}

/// The client's `grpc-timeout` (`100m`, `2S`, …), when it sent one that parses.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    // At most 8 digits, by the gRPC spec.
    let n: u64 = digits.parse().ok().filter(|_| digits.len() <= 8)?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The request's inputs by name: every one from `raw_input_contents` (in order), or every one
/// from its typed `contents`. Each is checked against its shape; what is wrong names the input.
fn decode_inputs(request: &mut ModelInferRequest) -> Result<Vec<(String, HostTensor)>, ApiError> {
    let bad = |m: String| ApiError::BadRequest(m);
    let inputs = std::mem::take(&mut request.inputs);
    let raw = std::mem::take(&mut request.raw_input_contents);
    if !raw.is_empty() && raw.len() != inputs.len() {
        return Err(bad(format!(
            "raw_input_contents has {} entries for {} inputs: send every input raw, or none",
            raw.len(),
            inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    let mut named = Vec::with_capacity(inputs.len());
    for input in inputs {
        let name = &input.name;
        let dtype = DType::from_wire_name(&input.datatype)
            .ok_or_else(|| bad(format!("input '{name}': unsupported datatype '{}'", input.datatype)))?;
        let shape = input
            .shape
            .iter()
            .map(|&d| u32::try_from(d))
            .collect::<Result<Vec<u32>, _>>()
            .map_err(|_| bad(format!("input '{name}': shape {:?} has a negative or oversized dimension", input.shape)))?;
        let data = match (raw.next(), &input.contents) {
            (Some(_), Some(_)) => {
                return Err(bad(format!("input '{name}' has both contents and raw_input_contents")));
            }
            (Some(bytes), None) => Vec::from(bytes),
            (None, Some(contents)) => typed_bytes(name, dtype, contents)?,
            (None, None) => return Err(bad(format!("input '{name}' has neither contents nor raw_input_contents"))),
        };
        let tensor = HostTensor::new(name, dtype, shape, data)?;
        named.push((input.name, tensor));
    }
    Ok(named)
}

/// The little-endian bytes of typed contents: the field for `dtype`, and only it.
fn typed_bytes(name: &str, dtype: DType, contents: &InferTensorContents) -> Result<Vec<u8>, ApiError> {
    let (field, used) = match dtype {
        DType::F32 => ("fp32_contents", contents.fp32_contents.len()),
        DType::F64 => ("fp64_contents", contents.fp64_contents.len()),
        DType::I32 => ("int_contents", contents.int_contents.len()),
        DType::I64 => ("int64_contents", contents.int64_contents.len()),
        DType::U8 => ("uint_contents", contents.uint_contents.len()),
        DType::F16 | DType::BF16 => {
            return Err(ApiError::BadRequest(format!(
                "input '{name}': {} has no typed contents field; send it in raw_input_contents",
                dtype.wire_name()
            )));
        }
    };
    let total = contents.bool_contents.len()
        + contents.int_contents.len()
        + contents.int64_contents.len()
        + contents.uint_contents.len()
        + contents.uint64_contents.len()
        + contents.fp32_contents.len()
        + contents.fp64_contents.len()
        + contents.bytes_contents.len();
    if total != used {
        return Err(ApiError::BadRequest(format!(
            "input '{name}' is {}: its values go in {field}, and no other contents field",
            dtype.wire_name()
        )));
    }
    Ok(match dtype {
        DType::F32 => contents.fp32_contents.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F64 => contents.fp64_contents.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::I32 => contents.int_contents.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::I64 => contents.int64_contents.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::U8 => contents
            .uint_contents
            .iter()
            .map(|&v| {
                u8::try_from(v)
                    .map_err(|_| ApiError::BadRequest(format!("input '{name}': {v} is out of range for UINT8")))
            })
            .collect::<Result<_, _>>()?,
        DType::F16 | DType::BF16 => Vec::new(),
    })
}

/// The answer: the requested outputs (all when none are named), always as raw contents, held
/// to the tenant's `max_response_bytes`.
fn encode_outputs(
    model: &ModelHandle,
    request: ModelInferRequest,
    outputs: Vec<HostTensor>,
    limit: u64,
) -> Result<ModelInferResponse, ApiError> {
    let names = &model.config().outputs;
    let selection = inference::select_outputs(model, request.outputs.iter().map(|r| r.name.as_str()))?;
    let size: u64 = selection.iter().map(|&at| outputs[at].data.len() as u64).sum();
    if size > limit {
        return Err(inference::too_large(size, limit));
    }
    let mut outputs = outputs;
    let mut described = Vec::with_capacity(selection.len());
    let mut raw = Vec::with_capacity(selection.len());
    for (n, &at) in selection.iter().enumerate() {
        let tensor = &mut outputs[at];
        described.push(InferOutputTensor {
            name: names[at].name.clone(),
            datatype: tensor.dtype.wire_name().to_owned(),
            shape: tensor.shape.iter().map(|&d| i64::from(d)).collect(),
            ..InferOutputTensor::default()
        });
        // Moved out, unless the output is asked for again.
        let data = match selection[n + 1..].contains(&at) {
            true => tensor.data.clone(),
            false => std::mem::take(&mut tensor.data),
        };
        raw.push(Bytes::from(data));
    }
    Ok(ModelInferResponse {
        model_name: model.config().model_name().to_owned(),
        model_version: model.config().version.to_string(),
        id: request.id,
        parameters: Default::default(),
        outputs: described,
        raw_output_contents: raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::model_infer_request::InferInputTensor;

    fn input(name: &str, datatype: &str, shape: &[i64], contents: Option<InferTensorContents>) -> InferInputTensor {
        InferInputTensor {
            name: name.to_owned(),
            datatype: datatype.to_owned(),
            shape: shape.to_vec(),
            parameters: Default::default(),
            contents,
        }
    }

    #[test]
    fn typed_and_raw_contents_decode_to_the_same_bytes() {
        let typed = InferTensorContents { fp32_contents: vec![1.5, -2.0], ..Default::default() };
        let mut request = ModelInferRequest { inputs: vec![input("x", "FP32", &[1, 2], Some(typed))], ..Default::default() };
        let from_typed = decode_inputs(&mut request).expect("typed");
        let bytes: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut request = ModelInferRequest {
            inputs: vec![input("x", "FP32", &[1, 2], None)],
            raw_input_contents: vec![Bytes::from(bytes.clone())],
            ..Default::default()
        };
        let from_raw = decode_inputs(&mut request).expect("raw");
        assert_eq!(from_typed[0].1.data, bytes);
        assert_eq!(from_raw[0].1.data, bytes);
        assert_eq!(from_raw[0].1.shape, vec![1, 2]);
    }

    #[test]
    fn wrong_contents_are_refused_naming_the_input() {
        let wrong_field = InferTensorContents { int64_contents: vec![1], ..Default::default() };
        let mut request = ModelInferRequest { inputs: vec![input("ids", "FP32", &[1], Some(wrong_field))], ..Default::default() };
        let error = decode_inputs(&mut request).expect_err("wrong field").to_string();
        assert!(error.contains("'ids'") && error.contains("fp32_contents"), "{error}");

        let short = InferTensorContents { fp32_contents: vec![1.0], ..Default::default() };
        let mut request = ModelInferRequest { inputs: vec![input("x", "FP32", &[1, 2], Some(short))], ..Default::default() };
        let error = decode_inputs(&mut request).expect_err("too few values").to_string();
        assert!(error.contains("'x'"), "{error}");

        let mut request = ModelInferRequest {
            inputs: vec![input("a", "FP32", &[1], None), input("b", "FP32", &[1], None)],
            raw_input_contents: vec![Bytes::from_static(&[0; 4])],
            ..Default::default()
        };
        let error = decode_inputs(&mut request).expect_err("one raw entry for two inputs").to_string();
        assert!(error.contains("raw_input_contents has 1 entries for 2 inputs"), "{error}");

        let mut request = ModelInferRequest { inputs: vec![input("a", "FP32", &[-1], None)], ..Default::default() };
        assert!(decode_inputs(&mut request).expect_err("negative").to_string().contains("negative"));

        let big = InferTensorContents { uint_contents: vec![256], ..Default::default() };
        let mut request = ModelInferRequest { inputs: vec![input("p", "UINT8", &[1], Some(big))], ..Default::default() };
        assert!(decode_inputs(&mut request).expect_err("256").to_string().contains("out of range for UINT8"));

        let half = InferTensorContents { fp32_contents: vec![1.0], ..Default::default() };
        let mut request = ModelInferRequest { inputs: vec![input("h", "FP16", &[1], Some(half))], ..Default::default() };
        assert!(decode_inputs(&mut request).expect_err("fp16").to_string().contains("raw_input_contents"));
    }

    #[test]
    fn only_health_and_server_metadata_go_without_a_key() {
        let path = |method: &str| format!("/inference.GRPCInferenceService/{method}");
        for method in ["ServerLive", "ServerReady", "ServerMetadata"] {
            assert_eq!(access(&path(method)), Access::Anyone, "{method}");
        }
        for method in ["RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"] {
            assert_eq!(access(&path(method)), Access::Admin, "{method}");
        }
        for method in ["ModelReady", "ModelMetadata", "ModelInfer", "ModelStreamInfer", "", "Anything"] {
            assert_eq!(access(&path(method)), Access::Tenant, "{method}");
        }
    }

    /// `chunks` as a request body held to `limit`, read to its end: the bytes passed on, or the
    /// refusal, and whether the body was marked over.
    async fn read_bounded(chunks: &[&[u8]], limit: usize) -> (Result<usize, Status>, bool) {
        use http_body_util::BodyExt as _;
        let frames: Vec<Result<http_body::Frame<Bytes>, Status>> =
            chunks.iter().map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c)))).collect();
        let inner = tonic::body::Body::new(http_body_util::StreamBody::new(futures::stream::iter(frames)));
        let over = Arc::new(AtomicBool::new(false));
        let record = Record::new("grpc", "POST", "/test", String::new(), TraceContext::fresh());
        let mut body = Bounded { inner: Metered::incoming(inner, &record), limit, read: 0, prefix: [0; FRAME_PREFIX], over: Arc::clone(&over) };
        let mut passed = 0;
        let result = loop {
            match body.frame().await {
                None => break Ok(passed),
                Some(Ok(frame)) => passed += frame.data_ref().map_or(0, Bytes::len),
                Some(Err(status)) => break Err(status),
            }
        };
        (result, over.load(Ordering::Relaxed))
    }

    /// A message's length prefix (uncompressed) for `len` bytes.
    fn prefix(len: u32) -> Vec<u8> {
        let mut p = vec![0];
        p.extend_from_slice(&len.to_be_bytes());
        p
    }

    #[tokio::test]
    async fn a_body_is_cut_off_at_its_callers_limit() {
        // A message of exactly the limit, its prefix split over two frames, passes whole.
        let p = prefix(8);
        let (passed, over) = read_bounded(&[&p[..2], &p[2..], &[7; 8]], 8).await;
        assert_eq!((passed.expect("within the limit"), over), (13, false));

        // A prefix declaring more than the limit is refused before any of the message comes.
        let (refused, over) = read_bounded(&[&prefix(9), &[7; 9]], 8).await;
        let refused = refused.expect_err("declared over the limit");
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert_eq!(refused.message(), "request body is larger than the limit of 8 bytes");
        assert_eq!(refused.metadata().get("kiln-error-kind").and_then(|v| v.to_str().ok()), Some("too_large"));
        assert!(over);

        // A prefix that understates the message is no way round it: the bytes are counted too.
        let (refused, over) = read_bounded(&[&prefix(4), &[7; 4], &[7; 5], &[7; 1000]], 8).await;
        assert_eq!(refused.expect_err("more bytes than the limit").code(), Code::ResourceExhausted);
        assert!(over);
    }

    #[test]
    fn grpc_timeouts_parse_per_the_spec() {
        let with = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-timeout", v.parse().expect("header value"));
            grpc_timeout(&h)
        };
        assert_eq!(with("100m"), Some(Duration::from_millis(100)));
        assert_eq!(with("2S"), Some(Duration::from_secs(2)));
        assert_eq!(with("5u"), Some(Duration::from_micros(5)));
        assert_eq!(with("123456789m"), None);
        assert_eq!(with("10x"), None);
        assert_eq!(with(""), None);
    }

    #[test]
    fn errors_keep_their_message_and_map_to_the_nearest_code() {
        let s = status(ApiError::NotFound("model 'x' not found".to_owned()));
        assert_eq!((s.code(), s.message()), (Code::NotFound, "model 'x' not found"));
        assert_eq!(status(ApiError::Unauthorized("invalid API key".to_owned())).code(), Code::Unauthenticated);
        assert_eq!(status(ApiError::BadRequest("bad".to_owned())).code(), Code::InvalidArgument);
        assert_eq!(status(ApiError::PayloadTooLarge { limit: 1 }).code(), Code::ResourceExhausted);
        assert_eq!(status(ApiError::Cancelled("r".to_owned())).code(), Code::Cancelled);
        assert_eq!(
            status(ApiError::NotFound("m".to_owned())).metadata().get("kiln-error-kind").and_then(|v| v.to_str().ok()),
            Some("not_found")
        );
    }
}
