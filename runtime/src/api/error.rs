//! One mapping from every failure on the request path to an HTTP status and a JSON body
//! [`kiln_wire::ErrorBody`]: `{"error": "...", "kind": "..."}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_wire::ErrorBody;

use crate::deploy::models::ModelError;
use crate::deploy::registry::DeployError;
use crate::model::error::InferError;
use crate::sandbox::{ComponentError, GuestError};
use crate::telemetry::{MAX_LOGGED, loggable};
use crate::tenancy::QuotaRefusal;
use crate::model::tensor::TensorError;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    /// Meant for another replica of the cluster (a cancel of its request).
    #[error("{0}")]
    Misdirected(String),
    #[error(transparent)]
    Quota(#[from] QuotaRefusal),
    #[error(transparent)]
    Component(#[from] ComponentError),
    #[error("{0}")]
    Internal(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error(transparent)]
    Infer(#[from] InferError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// A model did not load (its file, its placement, its warm-up).
    #[error("{0}")]
    LoadFailed(String),
    /// An operator cancelled the request (by its `kiln-request-id`).
    #[error("request {0} was cancelled by an operator")]
    Cancelled(String),
    /// The same work of this caller's is already running (a tenant's model load): try later.
    #[error("{0}")]
    Busy(String),
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        match e {
            DeployError::Invalid(m) => ApiError::BadRequest(m),
            DeployError::Unsigned(m) => ApiError::Forbidden(m),
            e @ DeployError::ConfigOwned(_) => ApiError::Conflict(e.to_string()),
            e @ DeployError::NotFound(_) => ApiError::NotFound(e.to_string()),
            DeployError::Component(e) => ApiError::Component(e),
            DeployError::Store(m) => ApiError::Internal(m),
        }
    }
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Invalid(m) => ApiError::BadRequest(m),
            e @ ModelError::ConfigOwned(_) => ApiError::Conflict(e.to_string()),
            e @ ModelError::NotFound(_) => ApiError::NotFound(e.to_string()),
            e @ ModelError::LoadFailed { .. } => ApiError::LoadFailed(e.to_string()),
            ModelError::Store(m) => ApiError::Internal(m),
            ModelError::Quota(m) => ApiError::Forbidden(m),
            ModelError::Busy(m) => ApiError::Busy(m),
        }
    }
}

impl From<TensorError> for ApiError {
    fn from(e: TensorError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) | ApiError::Component(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            ApiError::Quota(_) | ApiError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::LoadFailed(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Cancelled(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Infer(e) => match e {
                InferError::NotReady { .. }
                | InferError::Overloaded(_)
                | InferError::Closed(_)
                | InferError::Unavailable { .. }
                | InferError::Flushed(_) => StatusCode::SERVICE_UNAVAILABLE,
                InferError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                InferError::Runtime { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::Guest(e) => match e {
                GuestError::Deadline { .. } => StatusCode::GATEWAY_TIMEOUT,
                GuestError::PoolFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
                GuestError::MemoryLimit { .. }
                | GuestError::ComputeCalls { .. }
                | GuestError::OutOfFuel { .. }
                | GuestError::ResponseTooLarge { .. }
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
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Conflict(_) => "conflict",
            ApiError::Misdirected(_) => "other_replica",
            ApiError::Quota(_) => "quota",
            ApiError::Busy(_) => "busy",
            ApiError::Component(_) => "bad_component",
            ApiError::Internal(_) => "internal",
            ApiError::LoadFailed(_) => "load_failed",
            ApiError::Cancelled(_) => "cancelled",
            ApiError::PayloadTooLarge { .. } => "too_large",
            ApiError::Infer(InferError::Overloaded(_)) => "overloaded",
            ApiError::Infer(InferError::Flushed(_)) => "flushed",
            ApiError::Infer(InferError::Timeout { .. }) => "timeout",
            ApiError::Infer(InferError::Unavailable { .. }) => "unavailable",
            ApiError::Infer(_) => "inference",
            ApiError::Guest(e) => e.kind(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if matches!(self, ApiError::Guest(_)) {
            // Logged where it happened, with the handler's tenant.
        } else if status.is_server_error() {
            tracing::warn!(kind = self.kind(), status = status.as_u16(), "{}", loggable(&self.to_string(), MAX_LOGGED));
        } else {
            // A client's mistake can quote what it sent: escaped and bounded for the log.
            tracing::debug!(kind = self.kind(), status = status.as_u16(), "{}", loggable(&self.to_string(), MAX_LOGGED));
        }
        let body = ErrorBody { error: self.to_string(), kind: self.kind().to_owned() };
        let mut response = (status, Json(body)).into_response();
        match &self {
            ApiError::Infer(InferError::Overloaded(_) | InferError::Flushed(_) | InferError::Unavailable { .. })
            | ApiError::Guest(GuestError::PoolFull { .. })
            | ApiError::Busy(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Quota(refusal) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(refusal.retry_after_secs()));
            }
            ApiError::Unauthorized(_) => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}
