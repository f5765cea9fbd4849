//! The route tables: the serving listener's (handlers, the Open Inference Protocol, the
//! tenant's own models, stats and metrics), the admin listener's, and the optional metrics
//! listener's (`/metrics` alone, keyless). Anything else is answered with an `{"error": ...}` 404.

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::routing::{any, get, post};

use super::{ApiError, AppState, admin, handlers, metrics, oip, repository, requests, stats};

/// All routes, with `{"error": ...}` 404s for everything else.
pub fn serving(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/handlers/{name}", any(handlers::invoke_root))
        .route("/v1/handlers/{name}/", any(handlers::invoke_root))
        .route("/v1/handlers/{name}/{*rest}", any(handlers::invoke))
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

/// The admin routes.
pub fn admin(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/handlers", get(admin::list))
        .route("/v1/handlers/{name}", get(admin::show).put(admin::deploy).delete(admin::remove))
        .route("/v1/log", get(admin::show_log).put(admin::set_log))
        .route("/v1/models", get(repository::list))
        .route(
            "/v1/models/{name}",
            get(repository::show)
                .put(repository::put)
                .patch(repository::tune)
                .delete(repository::delete),
        )
        .route("/v1/models/{name}/{action}", post(repository::control))
        .route("/v1/requests", get(repository::in_flight))
        .route("/v1/requests/{id}", axum::routing::delete(repository::cancel))
        .route("/v2/repository/index", post(repository::index))
        .route("/v2/repository/models/{name}/load", post(repository::load))
        .route("/v2/repository/models/{name}/unload", post(repository::unload))
        .fallback(|request: Request| async move {
            ApiError::NotFound(format!("no admin route for {} {}", request.method(), request.uri().path()))
        })
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), requests::tag_request))
        .with_state(state)
}

/// `[server] metrics_listen`: `GET /metrics` without a key, and nothing else.
pub fn metrics(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics::export_keyless))
        .fallback(|request: Request| async move {
            ApiError::NotFound(format!("the metrics listener serves GET /metrics only, not {} {}", request.method(), request.uri().path()))
        })
        .with_state(state)
}
