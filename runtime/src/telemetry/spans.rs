//! OpenTelemetry traces, exported over OTLP/gRPC when `[server] otlp_endpoint` (or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`) is set: a span for each request (HTTP or gRPC), its sandbox
//! (instantiate, run), each model call it makes (`compute`) and that call's wait in the queue,
//! and one span for each batch's forward pass, linked to every call in the batch.
//!
//! Spans are kept by Kiln itself, not by an SDK pipeline: a finished span is handed to a
//! bounded queue (never waiting: a full queue drops it, counted), and one task sends them in
//! batches. An exporter that cannot be reached loses spans, never requests. Unset, nothing is
//! made: [`enabled`] is one load, and no span id is drawn.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};

/// Spans waiting to be sent; past this, new ones are dropped.
const QUEUE: usize = 8192;
/// The most spans in one export call.
const BATCH: usize = 512;
/// How long the first span of a batch waits for others.
const LINGER: Duration = Duration::from_millis(200);
/// One export call's limit.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

pub type SpanId = [u8; 8];

/// A span's place: its trace and its own id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: SpanId,
}

/// An attribute's value.
#[derive(Debug, Clone)]
pub enum Value {
    Text(String),
    Int(i64),
}

/// A span that has ended.
#[derive(Debug)]
pub struct Finished {
    pub context: SpanContext,
    pub parent: Option<SpanId>,
    pub name: String,
    pub server: bool,
    pub start: Instant,
    pub end: Instant,
    pub attributes: Vec<(&'static str, Value)>,
    pub links: Vec<SpanContext>,
    pub error: Option<String>,
}

/// Where and how spans are sent.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    /// `http://HOST:PORT` of an OTLP/gRPC receiver (a collector's port 4317).
    pub endpoint: String,
    /// The share of traces started here that are kept (a client's `traceparent` decides for
    /// its own).
    pub sample_ratio: f64,
    /// `service.instance.id`: the replica's name, or the host's.
    pub instance: String,
}

struct Exporter {
    queue: tokio::sync::mpsc::Sender<Finished>,
    /// Traces started here are kept when their id's low half is below this.
    threshold: u64,
    dropped: AtomicU64,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Whether spans are being made at all.
pub fn enabled() -> bool {
    EXPORTER.get().is_some()
}

/// Whether a trace is kept: as its client's `traceparent` says, else by the sample ratio.
pub fn sampled(trace_id: &[u8; 16], from_client: Option<bool>) -> bool {
    let Some(exporter) = EXPORTER.get() else { return false };
    from_client.unwrap_or_else(|| {
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        u64::from_be_bytes(low) <= exporter.threshold
    })
}

/// Two random numbers drawn once per process.
fn seed() -> [u64; 2] {
    static SEED: OnceLock<[u64; 2]> = OnceLock::new();
    *SEED.get_or_init(|| {
        use ring::rand::SecureRandom as _;
        let mut bytes = [0u8; 16];
        let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
        let (high, low) = bytes.split_at(8);
        [u64::from_le_bytes(high.try_into().unwrap_or_default()), u64::from_le_bytes(low.try_into().unwrap_or_default())]
    })
}

/// A random number of this process's, never zero: the high half of trace ids started here.
pub fn process_prefix() -> u64 {
    seed()[0] | 1
}

/// A number no other call in this process gets, that looks random (a counter scrambled over a
/// random seed; no system call), never zero: span ids and the low half of trace ids.
pub fn unique_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let mut z = seed()[1].wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

/// A new span id.
pub fn new_span_id() -> SpanId {
    unique_id().to_be_bytes()
}

/// Hands `span` to the exporter; dropped (and counted) when its queue is full.
pub fn record(span: Finished) {
    if let Some(exporter) = EXPORTER.get()
        && exporter.queue.try_send(span).is_err()
    {
        exporter.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Starts exporting to `config.endpoint`, on the current tokio runtime.
pub fn start(config: &OtlpConfig) -> anyhow::Result<()> {
    let endpoint = tonic::transport::Endpoint::from_shared(config.endpoint.clone())
        .map_err(|e| anyhow::anyhow!("otlp_endpoint '{}' is not a URL: {e}", config.endpoint))?
        .connect_timeout(EXPORT_TIMEOUT)
        .timeout(EXPORT_TIMEOUT);
    let (queue, spans) = tokio::sync::mpsc::channel(QUEUE);
    let threshold = if config.sample_ratio >= 1.0 { u64::MAX } else { (config.sample_ratio.max(0.0) * u64::MAX as f64) as u64 };
    if EXPORTER.set(Exporter { queue, threshold, dropped: AtomicU64::new(0) }).is_err() {
        anyhow::bail!("traces are already being exported");
    }
    let resource = Resource {
        attributes: vec![
            attribute("service.name", &Value::Text("kiln".to_owned())),
            attribute("service.version", &Value::Text(env!("CARGO_PKG_VERSION").to_owned())),
            attribute("service.instance.id", &Value::Text(config.instance.clone())),
        ],
        ..Default::default()
    };
    tokio::spawn(export(TraceServiceClient::new(endpoint.connect_lazy()), spans, resource, config.endpoint.clone()));
    tracing::info!(endpoint = %config.endpoint, sample_ratio = config.sample_ratio, "exporting traces over OTLP/gRPC");
    Ok(())
}

async fn export(
    mut client: TraceServiceClient<tonic::transport::Channel>,
    mut spans: tokio::sync::mpsc::Receiver<Finished>,
    resource: Resource,
    endpoint: String,
) {
    let clock = Clock::new();
    let mut complained: Option<Instant> = None;
    let mut lost = 0u64;
    while let Some(first) = spans.recv().await {
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(until, spans.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let count = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope { name: "kiln".to_owned(), version: env!("CARGO_PKG_VERSION").to_owned(), ..Default::default() }),
                    spans: batch.into_iter().map(|s| to_proto(s, &clock)).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        if let Err(status) = client.export(request).await {
            lost += count;
            let dropped = EXPORTER.get().map_or(0, |e| e.dropped.load(Ordering::Relaxed));
            // Once a minute at most: a receiver that is gone must not flood the log.
            if complained.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                tracing::warn!(%endpoint, lost, dropped_full = dropped, "cannot export traces (they are dropped; requests are not affected): {status}");
                complained = Some(Instant::now());
            }
        }
    }
}

/// Instants as wall-clock times, from one reading of both clocks.
struct Clock {
    instant: Instant,
    unix_nanos: u64,
}

impl Clock {
    fn new() -> Clock {
        let unix_nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Clock { instant: Instant::now(), unix_nanos }
    }

    fn unix_nanos(&self, at: Instant) -> u64 {
        match at.checked_duration_since(self.instant) {
            Some(after) => self.unix_nanos.saturating_add(u64::try_from(after.as_nanos()).unwrap_or(u64::MAX)),
            None => self.unix_nanos.saturating_sub(u64::try_from(self.instant.duration_since(at).as_nanos()).unwrap_or(u64::MAX)),
        }
    }
}

fn attribute(key: &str, value: &Value) -> KeyValue {
    let value = match value {
        Value::Text(text) => any_value::Value::StringValue(text.clone()),
        Value::Int(n) => any_value::Value::IntValue(*n),
    };
    KeyValue { key: key.to_owned(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

fn to_proto(span: Finished, clock: &Clock) -> Span {
    Span {
        trace_id: span.context.trace_id.to_vec(),
        span_id: span.context.span_id.to_vec(),
        parent_span_id: span.parent.map(|p| p.to_vec()).unwrap_or_default(),
        name: span.name,
        kind: if span.server { span::SpanKind::Server } else { span::SpanKind::Internal } as i32,
        start_time_unix_nano: clock.unix_nanos(span.start),
        end_time_unix_nano: clock.unix_nanos(span.end),
        attributes: span.attributes.iter().map(|(k, v)| attribute(k, v)).collect(),
        links: span
            .links
            .iter()
            .map(|l| span::Link { trace_id: l.trace_id.to_vec(), span_id: l.span_id.to_vec(), ..Default::default() })
            .collect(),
        status: span.error.map(|message| Status { message, code: status::StatusCode::Error as i32 }),
        ..Default::default()
    }
}
