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
        .layer(axum::middleware::from_fn_with_state(Guard { app: Arc::clone(&state), admin: false }, cluster_guard))
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
        .layer(axum::middleware::from_fn_with_state(Guard { app: Arc::clone(&state), admin: true }, cluster_guard))
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

/// Whether `method path` on a listener (the admin one or the serving one) changes what a
/// server serves: a deploy or undeploy, a model's load, tuning, control or removal, a tenant's
/// own model. Reads, calls to handlers, cancels and the log filter (this process's alone, gone
/// at restart) are not.
fn changes_what_is_served(admin: bool, method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    if *method == Method::GET || *method == Method::HEAD {
        return false;
    }
    if admin {
        path.starts_with("/v1/handlers/") || path.starts_with("/v1/models/") || path.starts_with("/v2/repository/models/")
    } else {
        path.starts_with("/v1/models/")
    }
}

/// What [`cluster_guard`] needs: the server, and which listener it guards.
#[derive(Clone)]
struct Guard {
    app: Arc<AppState>,
    admin: bool,
}

/// In cluster mode, refuses every change that would set this replica apart from the others
/// (409, saying how to change them all).
async fn cluster_guard(axum::extract::State(guard): axum::extract::State<Guard>, request: Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if guard.app.cluster.is_none() || !changes_what_is_served(guard.admin, request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    let what = format!("{} {}", request.method(), request.uri().path());
    match guard.app.refuse_change_in_cluster(&what) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use axum::http::Method;

    #[test]
    fn in_cluster_mode_only_changes_to_what_is_served_are_guarded() {
        let changes = |admin, method: Method, path| super::changes_what_is_served(admin, &method, path);
        assert!(changes(true, Method::PUT, "/v1/handlers/digits"));
        assert!(changes(true, Method::DELETE, "/v1/handlers/digits"));
        assert!(changes(true, Method::PUT, "/v1/models/m"));
        assert!(changes(true, Method::PATCH, "/v1/models/m"));
        assert!(changes(true, Method::POST, "/v1/models/m/unload"));
        assert!(changes(true, Method::POST, "/v2/repository/models/m/load"));
        assert!(changes(false, Method::PUT, "/v1/models/mine"));
        assert!(changes(false, Method::DELETE, "/v1/models/mine"));
        // Reads, calls, cancels, the repository index and the log filter pass.
        assert!(!changes(true, Method::GET, "/v1/handlers"));
        assert!(!changes(false, Method::POST, "/v1/handlers/digits/"));
        assert!(!changes(false, Method::PUT, "/v1/handlers/digits/anything"));
        assert!(!changes(true, Method::DELETE, "/v1/requests/r-00"));
        assert!(!changes(true, Method::POST, "/v2/repository/index"));
        assert!(!changes(true, Method::PUT, "/v1/log"));
        assert!(!changes(false, Method::GET, "/v1/models/mine"));
    }
}
