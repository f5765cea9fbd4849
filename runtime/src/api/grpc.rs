//! The Open Inference Protocol over gRPC (`proto/inference.proto`), on its own listener
//! (`grpc_listen`, 127.0.0.1:8001 by default, as Triton): the same routes as [`super::oip`] with
//! the same keys, quotas, batching and messages, so Triton's and KServe's gRPC clients work as
//! they are.
//!
//! Its own port rather than the HTTP one: those clients take the gRPC address apart from the HTTP
//! one (8001 beside 8000), an operator can expose, firewall and balance HTTP/2 apart from
//! HTTP/1, and the HTTP listener keeps serving HTTP/1 alone.
//!
//! The key goes in the `authorization` metadata (`Bearer …`), as over HTTP; `kiln-priority` and
//! `kiln-timeout-ms` too, and a client's `grpc-timeout` bounds the model's wait like
//! `kiln-timeout-ms`. Errors carry the HTTP API's message, with the status mapped to its gRPC
//! code (404 → NOT_FOUND, 400 → INVALID_ARGUMENT, 401 → UNAUTHENTICATED, 429 → RESOURCE_EXHAUSTED,
//! …) and its kind in the `kiln-error-kind` metadata. The repository calls take an admin key,
//! as the HTTP repository extension does on the admin listener.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};

use super::{ApiError, AppState, priority_header, timeout_header};
use crate::model::handle::{InferOptions, ModelHandle, ModelState};
use crate::model::tensor::{DType, HostTensor};

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

/// The service, ready to add to a tonic server. Messages up to the server's `max_body_bytes`
/// are read; each tenant's own `max_body_bytes` is checked after.
pub fn service(app: Arc<AppState>) -> GrpcInferenceServiceServer<Grpc> {
    let limit = app.max_body_bytes;
    GrpcInferenceServiceServer::new(Grpc { app })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX)
}

pub struct Grpc {
    app: Arc<AppState>,
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

/// Runs `call` on the request's metadata (as HTTP headers, for the checks the HTTP routes make)
/// and message, as a request from its peer (for the audit log's flood limit), with a fresh
/// `kiln-request-id` on its answer.
async fn tagged<M, T, F>(request: Request<M>, call: impl FnOnce(http::HeaderMap, M) -> F) -> Result<Response<T>, Status>
where
    F: Future<Output = Result<T, ApiError>>,
{
    let (_, id) = super::next_request_id();
    let peer = request.remote_addr();
    let (metadata, _, message) = request.into_parts();
    let call = call(metadata.into_headers(), message);
    let result = match peer {
        Some(addr) => super::PEER.scope(addr.ip(), call).await,
        None => call.await,
    };
    let mut response = Response::new(result.map_err(status)?);
    if let Ok(value) = MetadataValue::try_from(id.as_str()) {
        response.metadata_mut().insert(kiln_wire::headers::REQUEST_ID, value);
    }
    Ok(response)
}

/// `model` or, for a version, `model@version`.
fn versioned(name: &str, version: &str) -> Result<String, ApiError> {
    match version {
        "" => Ok(name.to_owned()),
        v => super::oip::version_name(name, v),
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Grpc {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: super::oip::server_ready(&self.app) }))
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
        tagged(request, |headers, request| async move {
            let name = versioned(&request.name, &request.version)?;
            let (model, _) = self.app.authorized_model(&headers, &name)?;
            Ok(ModelReadyResponse { ready: matches!(model.state(), ModelState::Ready(_)) })
        })
        .await
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        tagged(request, |headers, request| async move {
            let name = versioned(&request.name, &request.version)?;
            let (model, tenant) = self.app.authorized_model(&headers, &name)?;
            Ok(metadata(&self.app, &model, tenant.name()))
        })
        .await
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let started = Instant::now();
        let app = &self.app;
        tagged(request, |headers, request| async move {
            let mut tenant_label = None;
            let result = infer(app, &headers, request, &mut tenant_label).await;
            let tenant = tenant_label.as_deref().unwrap_or(crate::telemetry::ANONYMOUS);
            app.telemetry.record_request(HANDLER, tenant, counted_status(&result), started.elapsed());
            result
        })
        .await
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        tagged(request, |headers, request| async move {
            super::admin::require_admin(&self.app, &headers, None)?;
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
        tagged(request, |headers, request| async move {
            super::admin::require_admin(&self.app, &headers, None)?;
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
        tagged(request, |headers, request| async move {
            super::admin::require_admin(&self.app, &headers, None)?;
            self.app.repository.unload(&request.model_name).await?;
            Ok(RepositoryModelUnloadResponse {})
        })
        .await
    }
}

fn metadata(app: &AppState, model: &ModelHandle, tenant: &str) -> ModelMetadataResponse {
    let name = model.config().model_name();
    let inputs = model
        .config()
        .inputs
        .iter()
        .map(|i| TensorMetadata {
            name: i.name.clone(),
            datatype: i.dtype.wire_name().to_owned(),
            shape: super::oip::dims(&i.shape),
        })
        .collect();
    let outputs = match model.state() {
        ModelState::Ready(meta) => meta
            .iter()
            .map(|o| TensorMetadata { name: o.name.clone(), datatype: o.dtype.wire_name().to_owned(), shape: super::oip::dims(&o.shape) })
            .collect(),
        // Output types are learned at warm-up; until then only the names are known.
        ModelState::Loading | ModelState::Failed(_) => model
            .config()
            .outputs
            .iter()
            .map(|o| TensorMetadata { name: o.name.clone(), ..TensorMetadata::default() })
            .collect(),
    };
    ModelMetadataResponse {
        name: name.to_owned(),
        versions: app.models.versions(tenant, name).iter().map(u64::to_string).collect(),
        platform: "pytorch_libtorch".to_owned(),
        inputs,
        outputs,
    }
}

async fn infer(
    app: &AppState,
    headers: &http::HeaderMap,
    mut request: ModelInferRequest,
    tenant_label: &mut Option<String>,
) -> Result<ModelInferResponse, ApiError> {
    let name = versioned(&request.model_name, &request.model_version)?;
    let (model, tenant) = app.authorized_model(headers, &name)?;
    *tenant_label = Some(tenant.name().to_owned());
    let limit = app.max_body_bytes.min(tenant.config.quota.max_body_bytes);
    let size = prost::Message::encoded_len(&request);
    if size > limit {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let _permit = app.admit(tenant, None)?;
    let named = decode_inputs(&mut request)?;
    let arranged = model.arrange_inputs(named)?;
    let options = InferOptions {
        priority: priority_header(headers)?.map_or(0, |p| p.min(app.oip_max_priority)),
        timeout: timeout_header(headers)?.or_else(|| grpc_timeout(headers)),
    };
    let outputs = model.infer(arranged, options).await?;
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
        let tensor = HostTensor::new(name, dtype, shape, data).map_err(|e| bad(e.0))?;
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
    let selection: Vec<usize> = match request.outputs.is_empty() {
        true => (0..names.len()).collect(),
        false => request
            .outputs
            .iter()
            .map(|r| {
                names.iter().position(|o| o.name == r.name).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "requested output '{}' is not an output of model '{}'",
                        r.name,
                        model.name()
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let size: u64 = selection.iter().map(|&at| outputs[at].data.len() as u64).sum();
    if size > limit {
        return Err(ApiError::BadRequest(format!(
            "the answer would be {size} bytes, over the limit of {limit} bytes (max_response_bytes): \
             send fewer rows per request"
        )));
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
