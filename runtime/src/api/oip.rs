//! Open Inference Protocol (KServe v2) REST: health, metadata and `infer` with JSON tensors, plus
//! the binary tensor data extension that the official clients use by default.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use kiln_codec::oip;
use serde_json::{Map, Value, json};

use super::http::{json_response, read_body};
use super::inference::{self, Metadata, TensorMetadata};
use super::requests::Counted;
use super::{ApiError, AppState};
use crate::model::handle::ModelHandle;
use crate::model::tensor::{self, HostTensor};

pub(super) async fn live() -> Response {
    json_response(StatusCode::OK, &json!({ "live": true }))
}

pub(super) async fn ready(State(app): State<Arc<AppState>>) -> Response {
    let ready = inference::server_ready(&app);
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
    let ready = inference::model_ready(&model);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok(json_response(status, &json!({ "name": model.config().model_name(), "ready": ready })))
}

pub(super) async fn model_metadata(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (model, tenant) = app.authorized_model(&headers, &model)?;
    let Metadata { name, versions, inputs, outputs } = inference::metadata(&app, &model, tenant);
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "name": name,
            "versions": versions,
            "platform": inference::PLATFORM,
            "inputs": inputs.into_iter().map(tensor_metadata).collect::<Vec<_>>(),
            "outputs": outputs.into_iter().map(tensor_metadata).collect::<Vec<_>>(),
        }),
    ))
}

/// An input or output as JSON: only its name while its type is not known yet.
fn tensor_metadata(meta: TensorMetadata) -> Value {
    let mut value = json!({ "name": meta.name });
    if let Some(datatype) = meta.datatype {
        value["datatype"] = json!(datatype);
    }
    if let Some(shape) = meta.shape {
        value["shape"] = json!(shape);
    }
    value
}

// `/v2/models/{m}/versions/{v}/...`: the same routes for one version, looked up as `m@v`; a
// version not served is "not found", as a model that is not. (A route's segment is never empty.)

pub(super) async fn version_ready(
    State(app): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let name = inference::versioned(&model, &version)?;
    model_ready(State(app), Path(name), headers).await
}

pub(super) async fn version_metadata(
    State(app): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let name = inference::versioned(&model, &version)?;
    model_metadata(State(app), Path(name), headers).await
}

pub(super) async fn version_infer(
    State(app): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let name = inference::versioned(&model, &version)?;
    Ok(infer(State(app), Path(name), headers, body).await)
}

/// Direct model calls are counted as the handler `oip`.
pub(super) async fn infer(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut counted = Counted::start("oip");
    let response = infer_model(&app, &model, headers, body, &mut counted)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    counted.finish(&app.telemetry, response.status().as_u16());
    response
}

async fn infer_model(
    app: &AppState,
    model: &str,
    headers: HeaderMap,
    body: Body,
    counted: &mut Counted,
) -> Result<Response, ApiError> {
    let (model, tenant) = app.authorized_model(&headers, model)?;
    counted.tenant = Some(Arc::clone(tenant));
    let options = inference::options(app, &headers, None)?;
    let limit = app.max_body_bytes.min(tenant.config.quota.max_body_bytes);
    let mut request = None;
    let inputs = async {
        let body = read_body(body, &headers, limit).await?;
        let header_length = headers.get(oip::HEADER_LENGTH).map(|v| v.to_str().unwrap_or(""));
        let (decoded, named) = oip::decode(header_length, body).map_err(|e| ApiError::BadRequest(e.0))?;
        request = Some(decoded);
        Ok(named)
    };
    let outputs = inference::infer(app, tenant, &model, options, inputs).await?;
    let request = request.ok_or_else(|| ApiError::Internal("an OIP call ran without its request".to_owned()))?;
    encode_response(&model, request, outputs, tenant.config.quota.limits.max_response_bytes)
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
    request: oip::InferRequest,
    outputs: Vec<HostTensor>,
    limit: u64,
) -> Result<Response, ApiError> {
    let all_binary = wants_binary(&request.parameters, "binary_data_output");
    let names = &model.config().outputs;
    // Which outputs to return, and whether each goes as binary.
    let requested = request.outputs.unwrap_or_default();
    let chosen = inference::select_outputs(model, requested.iter().map(|r| r.name.as_str()))?;
    let selection: Vec<(usize, bool)> = match requested.is_empty() {
        true => chosen.into_iter().map(|at| (at, all_binary)).collect(),
        false => chosen
            .into_iter()
            .zip(&requested)
            .map(|(at, r)| (at, r.parameters.get("binary_data").and_then(Value::as_bool).unwrap_or(all_binary)))
            .collect(),
    };
    let at_least: u64 = selection
        .iter()
        .map(|&(at, binary)| {
            let t = &outputs[at];
            if binary { t.data.len() as u64 } else { (t.data.len() / t.dtype.size()) as u64 * MIN_JSON_BYTES_PER_ELEMENT }
        })
        .sum();
    if at_least > limit {
        return Err(inference::too_large(format_args!("at least {at_least}"), limit));
    }
    let mut document = json!({
        "model_name": model.config().model_name(),
        "model_version": model.config().version.to_string(),
        "outputs": [],
    });
    if let Some(id) = request.id {
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
            return Err(inference::too_large(header_len + tail.len(), limit));
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
