//! `GET /v1/stats` (admin key): one JSON snapshot of every model's scheduler counters, replicas
//! and the GPUs; `GET /v1/scaler` (admin key): the scaler's recent decisions.
//!
//! Counters are cumulative since start; rates and averages come from two snapshots (for example
//! `kiln bench` reads one before and one after a run to report the average batch size).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::{AppState, json_response};
use crate::executor::{BATCH_BUCKETS, ModelState};

/// Every model's counters: admin only, since it names every tenant's models.
pub(super) async fn snapshot(
    State(app): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
) -> Result<Response, super::ApiError> {
    super::admin::require_admin(&app, &headers, None)?;
    let mut names: Vec<&String> = app.models.keys().collect();
    names.sort();
    let models: Vec<Value> = names
        .into_iter()
        .map(|name| {
            let model = &app.models[name];
            let c = model.counters();
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            let inferences = load(&c.inferences);
            let executions = load(&c.executions);
            // In bucket order; `up_to: null` counts the batches larger than the last bucket.
            let buckets: Vec<Value> = c
                .batch_sizes
                .iter()
                .enumerate()
                .map(|(i, count)| json!({ "up_to": BATCH_BUCKETS.get(i), "count": load(count) }))
                .collect();
            let state = match model.state() {
                ModelState::Loading => "loading",
                ModelState::Ready(_) => "ready",
                ModelState::Failed(_) => "failed",
            };
            let config = model.config();
            json!({
                "name": name,
                "state": state,
                "device": config.device.to_string(),
                "instances": { "min": config.replicas.min, "max": config.replicas.max },
                "replica_target": model.replica_target(),
                "replicas": model.replicas(),
                "latency_objective_ms": config.latency_objective.as_secs_f64() * 1e3,
                "max_batch_size": config.batching.max_batch_size,
                "queued": c.queued.load(Ordering::Relaxed),
                "inferences": inferences,
                "executions": executions,
                "rows": load(&c.rows),
                "dropped": load(&c.dropped),
                "overloaded": load(&c.overloaded),
                "timeouts": load(&c.timeouts),
                "queue_wait_us": load(&c.queue_wait_us),
                "forward_us": load(&c.forward_us),
                "average_batch_size": if executions == 0 { 0.0 } else { inferences as f64 / executions as f64 },
                "batch_sizes": buckets,
            })
        })
        .collect();
    let gpus = app.gpus.latest();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "uptime_seconds": app.started.elapsed().as_secs_f64(),
            "gpus": *gpus,
            "models": models,
        }),
    ))
}

/// The scaler's recent decisions, oldest first: admin only, like the stats.
pub(super) async fn scaler(
    State(app): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
) -> Result<Response, super::ApiError> {
    super::admin::require_admin(&app, &headers, None)?;
    let report = kiln_wire::ScalerReport { decisions: app.decisions.recent() };
    Ok(json_response(StatusCode::OK, &json!(report)))
}
