//! What every route of both listeners shares about HTTP itself: Kiln's request headers, reading a
//! bounded body, and writing a JSON answer.

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::LengthLimitError;
use kiln_wire::headers::{PRIORITY as PRIORITY_HEADER, TIMEOUT_MS as TIMEOUT_HEADER};

use super::ApiError;
use crate::model::spec::MAX_PRIORITY;

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

pub(super) fn priority_header(headers: &http::HeaderMap) -> Result<Option<u8>, ApiError> {
    match header_number(headers, PRIORITY_HEADER)? {
        Some(p) if p > u64::from(MAX_PRIORITY) => Err(ApiError::BadRequest(format!(
            "header {PRIORITY_HEADER} must be 0 to {MAX_PRIORITY}, got {p}"
        ))),
        p => Ok(p.map(|p| p as u8)),
    }
}

pub(super) fn timeout_header(headers: &http::HeaderMap) -> Result<Option<std::time::Duration>, ApiError> {
    match header_number(headers, TIMEOUT_HEADER)? {
        Some(0) => Err(ApiError::BadRequest(format!("header {TIMEOUT_HEADER} must be at least 1"))),
        t => Ok(t.map(std::time::Duration::from_millis)),
    }
}

/// Reads a whole body, refusing one over `limit` with 413 before reading it when the client
/// declared its length.
pub(super) async fn read_body(body: Body, headers: &http::HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
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
pub(super) fn json_response(status: http::StatusCode, value: &impl serde::Serialize) -> Response {
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
