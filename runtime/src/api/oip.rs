//! Open Inference Protocol (KServe v2) REST: health, metadata and `infer` with JSON tensors, plus
//! the binary tensor data extension that the official clients use by default.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::{ApiError, AppState, json_response, priority_header, read_body, timeout_header};
use crate::model::handle::InferOptions;
use crate::model::signature::OutputMeta;
use crate::model::handle::ModelHandle;
use crate::model::shared::ModelState;
use crate::model::spec::split_version;
use crate::model::tensor::{self, HostTensor};
use kiln_codec::oip::{self, RequestOutput};


pub(super) async fn live() -> Response {
    json_response(StatusCode::OK, &json!({ "live": true }))
}

/// Not draining, and every model of the config file ready (but those an operator unloaded):
/// models loaded through the admin API report their own readiness.
pub(super) fn server_ready(app: &AppState) -> bool {
    let draining = app.draining.load(std::sync::atomic::Ordering::Relaxed);
    !draining && app.repository.config_models_ready()
}

pub(super) async fn ready(State(app): State<Arc<AppState>>) -> Response {
    let ready = server_ready(&app);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &json!({ "ready": ready }))
}

pub(super) async fn server_metadata() -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "name": "kiln",
            "version": env!("CARGO_PKG_VERSION"),
            "extensions": ["binary_tensor_data"],
        }),
    )
}

pub(super) async fn model_ready(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (model, _) = app.authorized_model(&headers, &model)?;
    let name = model.config().model_name();
    let (status, ready) = match model.state() {
        ModelState::Ready(_) => (StatusCode::OK, true),
        ModelState::Loading | ModelState::Failed(_) => (StatusCode::SERVICE_UNAVAILABLE, false),
    };
    Ok(json_response(
        status,
        &json!({ "name": name, "ready": ready }),
    ))
}

pub(super) async fn model_metadata(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (model, tenant) = app.authorized_model(&headers, &model)?;
    let name = model.config().model_name();
    let versions: Vec<String> = app.models.versions(tenant.name(), name).iter().map(u64::to_string).collect();
    let inputs: Vec<Value> = model
        .config()
        .inputs
        .iter()
        .map(|i| {
            json!({
                "name": i.name,
                "datatype": i.dtype.wire_name(),
                "shape": dims(&i.shape),
            })
        })
        .collect();
    let outputs: Vec<Value> = match model.state() {
        ModelState::Ready(meta) => meta.iter().map(output_metadata).collect(),
        // Output types are learned at warm-up; until then only the names are known.
        ModelState::Loading | ModelState::Failed(_) => model
            .config()
            .outputs
            .iter()
            .map(|o| json!({ "name": o.name }))
            .collect(),
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "name": name,
            "versions": versions,
            "platform": "pytorch_libtorch",
            "inputs": inputs,
            "outputs": outputs,
        }),
    ))
}

fn output_metadata(meta: &OutputMeta) -> Value {
    json!({
        "name": meta.name,
        "datatype": meta.dtype.wire_name(),
        "shape": dims(&meta.shape),
    })
}

pub(super) fn dims(shape: &[Option<u32>]) -> Vec<i64> {
    shape.iter().map(|d| d.map_or(-1, i64::from)).collect()
}

/// `/v2/models/{m}/versions/{v}/...`: the same routes for one version, looked up as `m@v` (a
/// model defined without versions has one, `1`); a version not served is "not found", as a
/// model that is not.
pub(super) fn version_name(model: &str, version: &str) -> Result<String, ApiError> {
    let name = format!("{model}@{version}");
    match split_version(&name) {
        Some((base, Some(_))) if base == model => Ok(name),
        _ => Err(ApiError::NotFound(format!("model '{model}' has no version '{version}'"))),
    }
}

pub(super) async fn version_ready(
    State(app): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let name = version_name(&model, &version)?;
    model_ready(State(app), Path(name), headers).await
}

pub(super) async fn version_metadata(
    State(app): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let name = version_name(&model, &version)?;
    model_metadata(State(app), Path(name), headers).await
}

pub(super) async fn version_infer(
    State(app): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let name = version_name(&model, &version)?;
    Ok(infer(State(app), Path(name), headers, body).await)
}

/// Direct model calls are counted as the handler `oip`.
pub(super) async fn infer(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = std::time::Instant::now();
    let mut tenant_label = None;
    let response = infer_model(&app, &model, headers, body, &mut tenant_label)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    let tenant = tenant_label.as_deref().unwrap_or(crate::telemetry::ANONYMOUS);
    app.telemetry.record_request("oip", tenant, response.status().as_u16(), started.elapsed());
    response
}

async fn infer_model(
    app: &AppState,
    model: &str,
    headers: HeaderMap,
    body: Body,
    tenant_label: &mut Option<String>,
) -> Result<Response, ApiError> {
    let (model, tenant) = app.authorized_model(&headers, model)?;
    *tenant_label = Some(tenant.name().to_owned());
    let limit = app.max_body_bytes.min(tenant.config.quota.max_body_bytes);
    let _permit = app.admit(tenant, None)?;
    let body = read_body(body, &headers, limit).await?;
    let header_length = headers.get(oip::HEADER_LENGTH).map(|v| v.to_str().unwrap_or(""));
    let (request, named) = oip::decode(header_length, body).map_err(|e| ApiError::BadRequest(e.0))?;
    let arranged = model.arrange_inputs(named)?;
    let options = InferOptions {
        priority: priority_header(&headers)?.map_or(0, |p| p.min(app.oip_max_priority)),
        timeout: timeout_header(&headers)?,
    };
    let outputs = model.infer(arranged, options).await?;
    encode_response(&model, request.id, request.outputs, &request.parameters, outputs, tenant.config.quota.limits.max_response_bytes)
}

fn wants_binary(parameters: &Map<String, Value>, key: &str) -> bool {
    parameters.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// JSON output data is written this many elements at a time: a large answer streams instead of
/// being built whole (as `serde_json::Value`s it would take several times the tensor's memory).
const JSON_CHUNK_ELEMENTS: usize = 16_384;

/// Every element takes at least this many bytes as JSON (a digit and a comma).
const MIN_JSON_BYTES_PER_ELEMENT: u64 = 2;

/// The answer, held to `limit` bytes (the tenant's `max_response_bytes`): refused up front when
/// it is sure to be over, cut off (an aborted body) if streamed JSON passes it.
fn encode_response(
    model: &ModelHandle,
    id: Option<String>,
    requested: Option<Vec<RequestOutput>>,
    parameters: &Map<String, Value>,
    outputs: Vec<HostTensor>,
    limit: u64,
) -> Result<Response, ApiError> {
    let all_binary = wants_binary(parameters, "binary_data_output");
    let names = &model.config().outputs;
    // Which outputs to return, and whether each goes as binary.
    let selection: Vec<(usize, bool)> = match requested {
        None => (0..names.len()).map(|i| (i, all_binary)).collect(),
        Some(requested) => requested
            .iter()
            .map(|r| {
                let at = names.iter().position(|o| o.name == r.name).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "requested output '{}' is not an output of model '{}'",
                        r.name,
                        model.name()
                    ))
                })?;
                let binary = r
                    .parameters
                    .get("binary_data")
                    .and_then(Value::as_bool)
                    .unwrap_or(all_binary);
                Ok((at, binary))
            })
            .collect::<Result<_, ApiError>>()?,
    };
    let at_least: u64 = selection
        .iter()
        .map(|&(at, binary)| {
            let t = &outputs[at];
            if binary { t.data.len() as u64 } else { (t.data.len() / t.dtype.size()) as u64 * MIN_JSON_BYTES_PER_ELEMENT }
        })
        .sum();
    if at_least > limit {
        return Err(ApiError::BadRequest(format!(
            "the answer would be at least {at_least} bytes, over the limit of {limit} bytes (max_response_bytes): \
             send fewer rows per request"
        )));
    }
    let mut document = json!({
        "model_name": model.config().model_name(),
        "model_version": model.config().version.to_string(),
        "outputs": [],
    });
    if let Some(id) = id {
        document["id"] = Value::String(id);
    }
    let describe = |at: usize, tensor: &HostTensor| {
        json!({ "name": names[at].name, "datatype": tensor.dtype.wire_name(), "shape": tensor.shape })
    };
    if selection.iter().any(|&(_, binary)| binary) {
        // The binary extension needs the JSON part's length up front: built whole, then capped.
        let mut tail: Vec<u8> = Vec::new();
        let mut described = Vec::with_capacity(selection.len());
        for &(at, binary) in &selection {
            let tensor = &outputs[at];
            let mut out = describe(at, tensor);
            if binary {
                out["parameters"] = json!({ "binary_data_size": tensor.data.len() });
                tail.extend_from_slice(&tensor.data);
            } else {
                out["data"] = Value::Array(tensor::json::decode(tensor.dtype, &tensor.data));
            }
            described.push(out);
        }
        document["outputs"] = Value::Array(described);
        let mut body = document.to_string().into_bytes();
        let header_len = body.len();
        if (header_len + tail.len()) as u64 > limit {
            return Err(ApiError::BadRequest(format!(
                "the answer would be {} bytes, over the limit of {limit} bytes (max_response_bytes): \
                 send fewer rows per request",
                header_len + tail.len()
            )));
        }
        body.extend_from_slice(&tail);
        let mut response = Response::new(Body::from(body));
        let headers = response.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        headers.insert(oip::HEADER_LENGTH, HeaderValue::from(header_len));
        return Ok(response);
    }
    // All JSON: the document around the data arrays, then the numbers a chunk at a time.
    let mut pieces: Vec<Piece> = Vec::new();
    let text = document.to_string();
    let (open, close) = text.split_once("\"outputs\":[]").unwrap_or((&text, "}"));
    pieces.push(Piece::Text(format!("{open}\"outputs\":[")));
    for (n, &(at, _)) in selection.iter().enumerate() {
        let head = describe(at, &outputs[at]).to_string();
        let head = head.strip_suffix('}').unwrap_or(&head);
        let comma = if n == 0 { "" } else { "," };
        pieces.push(Piece::Text(format!("{comma}{head},\"data\":[")));
        pieces.push(Piece::Data(at));
        pieces.push(Piece::Text("]}".to_owned()));
    }
    pieces.push(Piece::Text(format!("]{close}")));
    let stream = JsonStream { pieces: pieces.into(), outputs, offset: 0, sent: 0, limit, model: model.name().to_owned() };
    let body = Body::from_stream(futures::stream::unfold(stream, |mut s| async move { s.next_chunk().map(|c| (c, s)) }));
    let mut response = Response::new(body);
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// Part of a streamed JSON answer: fixed text, or the data array of output `n`.
enum Piece {
    Text(String),
    Data(usize),
}

struct JsonStream {
    pieces: std::collections::VecDeque<Piece>,
    outputs: Vec<HostTensor>,
    /// Elements of the current data piece already written.
    offset: usize,
    sent: u64,
    limit: u64,
    model: String,
}

impl JsonStream {
    /// The next chunk of the document; an error once it passes the limit (the client sees an
    /// aborted body), `None` at the end.
    fn next_chunk(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if self.sent > self.limit {
            return None;
        }
        let chunk = match self.pieces.front()? {
            Piece::Text(_) => match self.pieces.pop_front() {
                Some(Piece::Text(text)) => text.into_bytes(),
                _ => return None,
            },
            &Piece::Data(at) => {
                let tensor = &self.outputs[at];
                let size = tensor.dtype.size();
                let count = tensor.data.len() / size;
                let end = (self.offset + JSON_CHUNK_ELEMENTS).min(count);
                let values = tensor::json::decode(tensor.dtype, &tensor.data[self.offset * size..end * size]);
                let mut text = Vec::with_capacity(values.len() * 12);
                for (i, v) in values.iter().enumerate() {
                    if self.offset + i > 0 {
                        text.push(b',');
                    }
                    // Writing a number to a Vec cannot fail.
                    let _ = serde_json::to_writer(&mut text, v);
                }
                self.offset = end;
                if end == count {
                    self.pieces.pop_front();
                    self.offset = 0;
                }
                text
            }
        };
        self.sent += chunk.len() as u64;
        if self.sent > self.limit {
            tracing::warn!(model = %self.model, limit = self.limit, "OIP answer cut off at its limit of {} bytes", self.limit);
            return Some(Err(std::io::Error::other(format!("the answer passed the limit of {} bytes", self.limit))));
        }
        Some(Ok(Bytes::from(chunk)))
    }
}
