//! `GET /metrics` (admin key): Prometheus/OpenMetrics text, encoded by `prometheus-client` from
//! the counters Kiln keeps anyway (read at scrape time, so serving pays nothing extra).
//!
//! Every name starts with `kiln_` and uses base units (seconds, bytes, ratios); histograms have
//! explicit buckets ([`LATENCY_BOUNDS_US`], [`BATCH_BOUNDS`]); labels are configured names only.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_wire::{BATCH_BOUNDS, Histogram, LATENCY_BOUNDS_US, ScaleAction};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use super::auth::AdminKey;
use super::requests::Requests;
use super::{ApiError, AppState};
use crate::model::table::ModelTable;
use crate::fleet::gpu::Gpus;
use crate::fleet::scaler::DecisionLog;
use crate::sandbox::Activity;
use crate::telemetry::Telemetry;

/// The registry `/metrics` encodes: one collector over the whole server.
pub fn registry(
    models: &Arc<ModelTable>,
    gpus: &Arc<Gpus>,
    decisions: &Arc<DecisionLog>,
    telemetry: &Arc<Telemetry>,
    sandbox: &Arc<Activity>,
    requests: &Arc<Requests>,
) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exporter {
        models: Arc::clone(models),
        gpus: Arc::clone(gpus),
        decisions: Arc::clone(decisions),
        telemetry: Arc::clone(telemetry),
        sandbox: Arc::clone(sandbox),
        requests: Arc::clone(requests),
    }));
    registry
}

pub(super) async fn export(State(app): State<Arc<AppState>>, _admin: AdminKey) -> Result<Response, ApiError> {
    render(&app)
}

/// `/metrics` on the metrics listener (`[server] metrics_listen`), which serves nothing else:
/// no key, for a Prometheus that holds none. Whoever can reach that address reads every
/// tenant's, handler's and model's name and counts (SECURITY.md).
pub(super) async fn export_keyless(State(app): State<Arc<AppState>>) -> Result<Response, ApiError> {
    render(&app)
}

fn render(app: &AppState) -> Result<Response, ApiError> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &app.metrics)
        .map_err(|e| ApiError::Internal(format!("cannot encode metrics: {e}")))?;
    let mut response = (StatusCode::OK, text).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(response)
}

#[derive(Debug)]
struct Exporter {
    models: Arc<ModelTable>,
    gpus: Arc<Gpus>,
    decisions: Arc<DecisionLog>,
    telemetry: Arc<Telemetry>,
    sandbox: Arc<Activity>,
    requests: Arc<Requests>,
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family: its descriptor, then one sample set per label set.
fn family<'a>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels<'a>, Sample)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, unit, kind)?;
    for (labels, sample) in samples {
        sample.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

enum Sample {
    Counter(u64),
    Gauge(f64),
    Latency(Histogram),
    /// Per-bucket counts over [`BATCH_BOUNDS`] and the sum of rows.
    Batches(Vec<u64>, u64),
}

impl Sample {
    fn encode(self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        match self {
            Sample::Counter(v) => ConstCounter::new(v).encode(encoder),
            Sample::Gauge(v) => ConstGauge::new(v).encode(encoder),
            Sample::Latency(h) => {
                let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_US
                    .iter()
                    .map(|&us| us as f64 / 1e6)
                    .chain([f64::INFINITY])
                    .zip(h.counts.iter().copied())
                    .collect();
                encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    h.sum_us as f64 / 1e6,
                    h.count(),
                    &buckets,
                    None,
                )
            }
            Sample::Batches(counts, rows) => {
                let buckets: Vec<(f64, u64)> = BATCH_BOUNDS
                    .iter()
                    .map(|&b| f64::from(b))
                    .chain([f64::INFINITY])
                    .zip(counts.iter().copied())
                    .collect();
                let count = counts.iter().sum();
                encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(rows as f64, count, &buckets, None)
            }
        }
    }
}

impl Collector for Exporter {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge, Histogram as Hist};
        use Sample::{Batches, Counter as C, Gauge as G, Latency};
        let t = &self.telemetry;

        let requests = t.requests();
        let statuses: Vec<String> = requests.iter().map(|((_, _, s), _)| s.to_string()).collect();
        family(&mut e, "kiln_requests", "Handler requests answered, by handler, tenant and status", None, Counter,
            requests.iter().zip(&statuses).map(|(((h, tenant, _), n), status)| {
                (vec![("handler", h.as_str()), ("tenant", tenant.as_str()), ("status", status.as_str())], C(*n))
            }))?;
        let handlers = t.handlers();
        family(&mut e, "kiln_request_duration", "Time to a handler's response head, by handler", Some(&Unit::Seconds), Hist,
            handlers.iter().map(|h| (vec![("handler", h.name.as_str())], Latency(h.latency.clone()))))?;

        let m = &self.models.handles();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        family(&mut e, "kiln_queue_depth", "Requests waiting in a model's queue", None, Gauge,
            m.iter().map(|h| (vec![("model", h.name())], G(h.counters().queued.load(Ordering::Relaxed) as f64))))?;
        family(&mut e, "kiln_queue_wait", "Time from enqueue to the start of the request's forward pass", Some(&Unit::Seconds), Hist,
            m.iter().map(|h| (vec![("model", h.name())], Latency(h.counters().queue_wait.snapshot()))))?;
        family(&mut e, "kiln_inferences", "Requests answered by a forward pass", None, Counter,
            m.iter().map(|h| (vec![("model", h.name())], C(load(&h.counters().inferences)))))?;
        family(&mut e, "kiln_executions", "Forward passes; inferences / executions is the average batch size", None, Counter,
            m.iter().map(|h| (vec![("model", h.name())], C(load(&h.counters().executions)))))?;
        family(&mut e, "kiln_queue_overloaded", "Requests refused because the model's queue was full", None, Counter,
            m.iter().map(|h| (vec![("model", h.name())], C(load(&h.counters().overloaded)))))?;
        family(&mut e, "kiln_batch_isolations", "Merged forward passes that failed and were split so each caller got its own result", None, Counter,
            m.iter().map(|h| (vec![("model", h.name())], C(load(&h.counters().isolated)))))?;
        let replicas: Vec<(String, Vec<(String, crate::model::handle::ReplicaMetrics)>)> =
            m.iter().map(|h| (h.name().to_owned(), h.replica_metrics())).collect();
        let per_replica = || {
            replicas.iter().flat_map(|(model, rs)| rs.iter().map(move |(id, r)| (model.as_str(), id.as_str(), r)))
        };
        family(&mut e, "kiln_batch_size", "Rows per forward pass, by model and replica", None, Hist,
            per_replica().map(|(model, id, r)| {
                (vec![("model", model), ("replica", id), ("device", r.device.as_str())], Batches(r.batch_sizes.clone(), r.rows))
            }))?;
        family(&mut e, "kiln_forward_duration", "Forward pass time, by model and replica", Some(&Unit::Seconds), Hist,
            per_replica().map(|(model, id, r)| {
                (vec![("model", model), ("replica", id), ("device", r.device.as_str())], Latency(r.forward.clone()))
            }))?;
        let mut by_device: Vec<(String, String, u64)> = Vec::new();
        for (model, rs) in &replicas {
            for (_, r) in rs {
                match by_device.iter_mut().find(|(m, d, _)| m == model && d == &r.device) {
                    Some(entry) => entry.2 += 1,
                    None => by_device.push((model.clone(), r.device.clone(), 1)),
                }
            }
        }
        family(&mut e, "kiln_replicas", "Replicas alive (loading, ready or draining), by model and device", None, Gauge,
            by_device.iter().map(|(m, d, n)| (vec![("model", m.as_str()), ("device", d.as_str())], G(*n as f64))))?;

        let gpus = self.gpus.latest();
        let names: Vec<String> = gpus.iter().map(|g| format!("cuda:{}", g.index)).collect();
        let per_gpu = |f: &dyn Fn(&kiln_wire::GpuInfo) -> f64| -> Vec<(Labels<'_>, Sample)> {
            gpus.iter().zip(&names).map(|(g, n)| (vec![("gpu", n.as_str()), ("name", g.name.as_str())], G(f(g)))).collect()
        };
        family(&mut e, "kiln_gpu_utilization", "Fraction of the last sample period a kernel ran", Some(&Unit::Other("ratio".into())), Gauge,
            per_gpu(&|g| f64::from(g.utilization_percent) / 100.0))?;
        family(&mut e, "kiln_gpu_memory_used", "GPU memory in use", Some(&Unit::Bytes), Gauge, per_gpu(&|g| g.memory_used_bytes as f64))?;
        family(&mut e, "kiln_gpu_memory_total", "GPU memory installed", Some(&Unit::Bytes), Gauge, per_gpu(&|g| g.memory_total_bytes as f64))?;
        family(&mut e, "kiln_gpu_temperature", "GPU temperature", Some(&Unit::Celsius), Gauge, per_gpu(&|g| f64::from(g.temperature_celsius)))?;
        family(&mut e, "kiln_gpu_power", "GPU power draw", Some(&Unit::Other("watts".into())), Gauge, per_gpu(&|g| g.power_watts))?;

        family(&mut e, "kiln_sandbox_instantiation", "Time to instantiate a guest in a fresh store", Some(&Unit::Seconds), Hist,
            [(vec![], Latency(self.sandbox.instantiation.snapshot()))])?;
        family(&mut e, "kiln_guests_running", "Guests executing now, over every handler", None, Gauge,
            [(vec![], G(self.sandbox.running() as f64))])?;
        family(&mut e, "kiln_requests_in_flight", "HTTP requests received on the serving and admin listeners whose response has not begun (gRPC calls not counted)", None, Gauge,
            [(vec![], G(self.requests.count() as f64))])?;
        let traps = t.traps();
        family(&mut e, "kiln_guest_traps", "Guest calls that failed, by kind", None, Counter,
            traps.iter().map(|(kind, n)| (vec![("kind", *kind)], C(*n))))?;
        family(&mut e, "kiln_events_dropped", "Events a tenant's actions caused past its budget per second, left out of /v1/events", None, Counter,
            [(vec![], C(t.events.dropped.load(Ordering::Relaxed)))])?;
        let refusals = t.refusals();
        family(&mut e, "kiln_quota_refusals", "Requests refused by a tenant's quota, by tenant and quota", None, Counter,
            refusals.iter().map(|((tenant, kind), n)| (vec![("tenant", tenant.as_str()), ("quota", *kind)], C(*n))))?;
        let caches = t.caches();
        family(&mut e, "kiln_response_cache", "Response cache lookups and changes, by handler and outcome (hit, miss, store, eviction)", None, Counter,
            caches.iter().map(|((handler, outcome), n)| (vec![("handler", handler.as_str()), ("outcome", *outcome)], C(*n))))?;
        family(&mut e, "kiln_scaling_decisions", "Scaler decisions recorded, by direction", None, Counter,
            [ScaleAction::Up, ScaleAction::Down, ScaleAction::Hold]
                .into_iter()
                .map(|a| (vec![("direction", a.as_str())], C(self.decisions.count(a)))))?;
        Ok(())
    }
}
