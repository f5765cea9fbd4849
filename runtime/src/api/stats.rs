//! The admin's views of a running server, all behind the admin key: `GET /v1/stats` (one JSON
//! snapshot of everything the dashboard shows), `GET /v1/scaler` (recent scaling decisions) and
//! `GET /v1/events` (server-sent events, the recent history first).
//!
//! Counters are cumulative since start; rates and recent percentiles come from two snapshots
//! (`kiln bench` reads one before and one after a run to report the average batch size).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use kiln_wire::{Bounds, CurvePoint, ModelStats, ScalerReport, ServerEvent, Stats};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::auth::AdminKey;
use super::http::json_response;
use super::{ApiError, AppState};
use crate::model::shared::ModelState;

/// Every live handler's cache: the counters over its name (they survive redeploys), the size
/// of the one serving now.
fn cache_stats(app: &AppState) -> Vec<kiln_wire::CacheStats> {
    let counted = app.telemetry.caches();
    let count = |handler: &str, outcome: &str| {
        counted.iter().find(|((h, o), _)| h == handler && *o == outcome).map_or(0, |(_, n)| *n)
    };
    app.registry
        .list()
        .iter()
        .filter_map(|h| {
            let (entries, bytes) = h.cache()?.size();
            Some(kiln_wire::CacheStats {
                handler: h.name().to_owned(),
                hits: count(h.name(), "hit"),
                misses: count(h.name(), "miss"),
                stores: count(h.name(), "store"),
                evictions: count(h.name(), "eviction"),
                entries: entries as u64,
                bytes: bytes as u64,
            })
        })
        .collect()
}

/// Every model, handler, tenant and GPU: admin only, since it names every tenant's models.
pub(super) async fn snapshot(State(app): State<Arc<AppState>>, _admin: AdminKey) -> Result<Response, ApiError> {
    // One row per version served (a versioned model's are named NAME@VERSION).
    let models = app
        .models
        .handles()
        .iter()
        .map(|model| {
            let c = model.counters();
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            let (inferences, executions) = (load(&c.inferences), load(&c.executions));
            let config = model.config();
            let tuning = model.tuning();
            ModelStats {
                name: model.name().to_owned(),
                state: match model.state() {
                    ModelState::Loading => "loading",
                    ModelState::Ready(_) => "ready",
                    ModelState::Failed(_) => "failed",
                }
                .to_owned(),
                device: config.device.to_string(),
                paused: model.paused(),
                instances: Bounds { min: tuning.replicas.min, max: tuning.replicas.max },
                replica_target: model.load().target,
                replicas: model.replicas(),
                max_batch_size: tuning.max_batch_size,
                latency_objective_ms: config.latency_objective.as_secs_f64() * 1e3,
                queued: c.queued.load(Ordering::Relaxed) as u64,
                inferences,
                executions,
                rows: c.batch_sizes.rows(),
                dropped: load(&c.dropped),
                overloaded: load(&c.overloaded),
                timeouts: load(&c.timeouts),
                isolated_batches: load(&c.isolated),
                ragged_batching: model.ragged_batching(),
                average_batch_size: if executions == 0 { 0.0 } else { inferences as f64 / executions as f64 },
                batch_sizes: c.batch_sizes.counts(),
                queue_wait: c.queue_wait.snapshot(),
                forward: c.forward.snapshot(),
                forward_curve: model
                    .forward_curve()
                    .into_iter()
                    .map(|(rows, us, samples)| CurvePoint { rows, forward_ms: us / 1e3, samples })
                    .collect(),
                precision: model.precision(),
            }
        })
        .collect();
    let stats = Stats {
        server: format!("kiln {}", env!("CARGO_PKG_VERSION")),
        uptime_seconds: app.started.elapsed().as_secs_f64(),
        gpus: app.gpus.latest().to_vec(),
        models,
        handlers: app.telemetry.handlers(),
        tenants: app.telemetry.tenants(),
        process: crate::telemetry::process::sample(),
        caches: cache_stats(&app),
        replica: app.cluster.clone(),
    };
    Ok(json_response(StatusCode::OK, &json!(stats)))
}

/// The scaler's recent decisions, oldest first.
pub(super) async fn scaler(State(app): State<Arc<AppState>>, _admin: AdminKey) -> Result<Response, ApiError> {
    let report = ScalerReport { decisions: app.decisions.recent() };
    Ok(json_response(StatusCode::OK, &json!(report)))
}

/// Server-sent events: the recent history, then every new event as it happens. A follower
/// too slow to keep up is told how many it missed and goes on.
pub(super) async fn events(State(app): State<Arc<AppState>>, _admin: AdminKey) -> Result<Response, ApiError> {
    let (history, feed) = app.telemetry.events.follow();
    let replay = futures::stream::iter(history.into_iter().map(|e| Ok(sse(&e))));
    // The stream ends after the server's last event, so clients see the drain and go.
    let live = futures::stream::unfold(Some(feed), |feed| async move {
        let mut feed = feed?;
        match feed.recv().await {
            Ok(event) if matches!(event.kind, kiln_wire::EventKind::Draining { .. }) => Some((Ok(sse(&event)), None)),
            Ok(event) => Some((Ok(sse(&event)), Some(feed))),
            Err(RecvError::Lagged(missed)) => {
                Some((Ok(Event::default().event("lagged").data(missed.to_string())), Some(feed)))
            }
            Err(RecvError::Closed) => None,
        }
    });
    let stream: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(futures::StreamExt::chain(replay, live));
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn sse(event: &ServerEvent) -> Event {
    let data = serde_json::to_string(event).unwrap_or_else(|e| json!({ "error": e.to_string() }).to_string());
    Event::default().event(event.kind.name()).id(event.seq.to_string()).data(data)
}
