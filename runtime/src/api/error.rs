//! One mapping from every failure on the request path to an HTTP status and a JSON body
//! `{"error": "..."}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::executor::InferError;
use crate::sandbox::GuestError;
use crate::tensor::TensorError;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error(transparent)]
    Infer(#[from] InferError),
    #[error(transparent)]
    Guest(#[from] GuestError),
}

impl From<TensorError> for ApiError {
    fn from(e: TensorError) -> Self {
        ApiError::BadRequest(e.0)
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Infer(e) => match e {
                InferError::NotReady { .. } | InferError::Overloaded(_) | InferError::Closed(_) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                InferError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                InferError::Runtime { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::Guest(e) => match e {
                GuestError::Deadline { .. } => StatusCode::GATEWAY_TIMEOUT,
                GuestError::MemoryLimit { .. }
                | GuestError::Trap { .. }
                | GuestError::NoResponse { .. }
                | GuestError::ErrorCode { .. }
                | GuestError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// A short, bounded label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::NotFound(_) => "not_found",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::PayloadTooLarge { .. } => "too_large",
            ApiError::Infer(InferError::Overloaded(_)) => "overloaded",
            ApiError::Infer(InferError::Timeout { .. }) => "timeout",
            ApiError::Infer(_) => "inference",
            ApiError::Guest(GuestError::Deadline { .. }) => "guest_deadline",
            ApiError::Guest(GuestError::MemoryLimit { .. }) => "guest_memory",
            ApiError::Guest(_) => "guest_trap",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(kind = self.kind(), status = status.as_u16(), "{self}");
        } else {
            tracing::debug!(kind = self.kind(), status = status.as_u16(), "{self}");
        }
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if matches!(self, ApiError::Infer(InferError::Overloaded(_))) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
