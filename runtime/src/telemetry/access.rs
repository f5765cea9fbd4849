//! One access line per request, on HTTP and gRPC alike: what was asked (method, route), of what
//! (handler, model) and by whom (tenant), how it was answered (status, bytes in and out,
//! latency) and how it was batched (queue wait, batch size), under its request id and the trace
//! id of the client's W3C `traceparent` (a fresh one without).
//!
//! A [`Record`] is made when a request arrives and is the task's current record while it is
//! handled, so the layers that learn something (the handler's tenant, a model's batch) note it
//! without being handed anything; a guest's task is given its request's record. The line is
//! written once, when the answer's body has been sent or given up, under the target
//! `kiln::access` (so `KILN_LOG=info,kiln::access=off` turns the lines off).
//!
//! A request whose answer writes nothing (access lines off, its trace not exported) gets a
//! record that keeps no text but its request id (for guests' log lines): no method, route or
//! names; and the HTTP server leaves its bodies unwrapped ([`Record::wanted`]), so that what is
//! not asked for is not paid for. Counters stay (atomics; a gRPC request's body is wrapped
//! anyway, to bound its size). Whether a line is wanted is decided when the request arrives: a
//! log filter changed meanwhile applies from the next request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::spans::{self, Finished, SpanContext, SpanId, Value};
use crate::sync::MutexExt as _;

tokio::task_local! {
    static CURRENT: Arc<Record>;
}

/// A route is cut to this many bytes in the line.
const MAX_ROUTE: usize = 256;

/// A request's place in a distributed trace (W3C Trace Context).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The client's span this request is a child of; `None` when the trace starts here.
    pub parent: Option<[u8; 8]>,
    pub sampled: bool,
}

impl TraceContext {
    /// The client's `traceparent` when it is one (`00-TRACE-PARENT-FLAGS`, lower-case hex, ids
    /// not all zeros); else a new trace.
    pub fn from_header(value: Option<&[u8]>) -> TraceContext {
        value.and_then(TraceContext::parse).unwrap_or_else(TraceContext::fresh)
    }

    pub fn parse(value: &[u8]) -> Option<TraceContext> {
        let text = std::str::from_utf8(value).ok()?.trim();
        let mut parts = text.split('-');
        let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four parts; later versions may add more, and ff is invalid.
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let _ = hex::<1>(version)?;
        let trace_id = hex::<16>(trace)?;
        let parent = hex::<8>(parent)?;
        let flags = hex::<1>(flags)?;
        if trace_id == [0; 16] || parent == [0; 8] {
            return None;
        }
        Some(TraceContext { trace_id, parent: Some(parent), sampled: flags[0] & 1 == 1 })
    }

    /// A new trace, sampled: its id a random half drawn once per process and a half that
    /// scrambles a counter (no system call per request; unique within the process, and across
    /// processes but by chance).
    pub fn fresh() -> TraceContext {
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&spans::process_prefix().to_be_bytes());
        trace_id[8..].copy_from_slice(&spans::unique_id().to_be_bytes());
        TraceContext { trace_id, parent: None, sampled: true }
    }

    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }
}

/// `N` bytes from exactly `2N` lower-case hex digits.
fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let value = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = value(digits[2 * i])? << 4 | value(digits[2 * i + 1])?;
    }
    Some(out)
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What is known of one request so far; its access line once answered.
#[derive(Debug)]
pub struct Record {
    pub request_id: String,
    pub trace: TraceContext,
    protocol: &'static str,
    method: String,
    route: String,
    started: Instant,
    bytes_in: AtomicU64,
    /// The longest a compute call of it waited in a model's queue, in microseconds.
    queue_wait_us: AtomicU64,
    /// The most requests in one forward pass it took part in.
    batch_size: AtomicU32,
    computes: AtomicU32,
    names: std::sync::Mutex<Names>,
    written: AtomicBool,
    /// Whether its answer writes anything: an access line or a span.
    wanted: bool,
    /// Its span, when traces are exported and this one is sampled.
    span: Option<SpanContext>,
    /// The span its model calls are children of (the sandbox's run), else 0 for its own.
    compute_parent: AtomicU64,
}

#[derive(Debug, Default)]
struct Names {
    handler: Option<String>,
    model: Option<String>,
    tenant: Option<String>,
}

impl Record {
    pub fn new(protocol: &'static str, method: &str, route: &str, request_id: String, trace: TraceContext) -> Arc<Record> {
        let sampled = spans::enabled() && spans::sampled(&trace.trace_id, trace.parent.map(|_| trace.sampled));
        let span = sampled.then(|| SpanContext { trace_id: trace.trace_id, span_id: spans::new_span_id() });
        let wanted = span.is_some() || tracing::enabled!(target: "kiln::access", tracing::Level::INFO);
        let kept = |text: &str, max: usize| if wanted { super::logging::printable(text, max).into_owned() } else { String::new() };
        Arc::new(Record {
            span,
            compute_parent: AtomicU64::new(0),
            request_id,
            trace,
            protocol,
            method: kept(method, 16),
            route: kept(route, MAX_ROUTE),
            started: Instant::now(),
            bytes_in: AtomicU64::new(0),
            queue_wait_us: AtomicU64::new(0),
            batch_size: AtomicU32::new(0),
            computes: AtomicU32::new(0),
            names: std::sync::Mutex::new(Names::default()),
            written: AtomicBool::new(false),
            wanted,
        })
    }

    /// Whether answering it writes anything (an access line, a span), so that its bodies are
    /// worth metering and the names it is given worth keeping.
    pub fn wanted(&self) -> bool {
        self.wanted
    }

    /// The record of the request this task is handling, if any.
    pub fn current() -> Option<Arc<Record>> {
        CURRENT.try_with(Arc::clone).ok()
    }

    /// Runs `work` with this as its task's current record.
    pub async fn scope<F: Future>(self: Arc<Self>, work: F) -> F::Output {
        CURRENT.scope(self, work).await
    }

    /// Runs `work` now with this as the current record.
    pub fn sync_scope<R>(self: Arc<Self>, work: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, work)
    }

    /// Runs `work` with `record`, where there is one, as its task's current record (for work
    /// spawned on a task of its own, as a guest).
    pub async fn within<F: Future>(record: Option<Arc<Record>>, work: F) -> F::Output {
        match record {
            Some(record) => CURRENT.scope(record, work).await,
            None => work.await,
        }
    }

    /// The handler (or front end: `oip`, `grpc`) and tenant the request turned out to be for.
    pub fn note_call(&self, handler: &str, tenant: &str) {
        if !self.wanted {
            return;
        }
        let mut names = self.names.locked();
        names.handler = Some(handler.to_owned());
        names.tenant = Some(tenant.to_owned());
    }

    pub fn note_model(&self, model: &str) {
        if !self.wanted {
            return;
        }
        let mut names = self.names.locked();
        if names.model.as_deref() != Some(model) {
            names.model = Some(model.to_owned());
        }
    }

    pub fn add_bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    /// One compute call answered after `queue_wait` in a forward pass of `requests` requests.
    pub fn note_batch(&self, queue_wait: Duration, requests: u32) {
        self.computes.fetch_add(1, Ordering::Relaxed);
        self.queue_wait_us.fetch_max(u64::try_from(queue_wait.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.batch_size.fetch_max(requests, Ordering::Relaxed);
    }

    /// This request's span, when it is traced.
    pub fn span(&self) -> Option<SpanContext> {
        self.span
    }

    /// Makes `parent` the span its model calls are children of.
    pub fn set_compute_parent(&self, parent: SpanId) {
        self.compute_parent.store(u64::from_be_bytes(parent), Ordering::Relaxed);
    }

    /// The span its model calls are children of.
    pub fn compute_parent(&self) -> Option<SpanId> {
        let parent = self.compute_parent.load(Ordering::Relaxed);
        if parent != 0 { Some(parent.to_be_bytes()) } else { self.span.map(|s| s.span_id) }
    }

    /// Records a span of this request's trace (when it is traced): `id`, child of `parent` (of
    /// the request's own span when `None`).
    pub fn child(
        &self,
        id: SpanId,
        name: &str,
        parent: Option<SpanId>,
        (start, end): (Instant, Instant),
        attributes: Vec<(&'static str, Value)>,
        error: Option<String>,
    ) {
        let Some(own) = self.span else { return };
        spans::record(Finished {
            context: SpanContext { trace_id: own.trace_id, span_id: id },
            parent: Some(parent.unwrap_or(own.span_id)),
            name: name.to_owned(),
            server: false,
            start,
            end,
            attributes,
            links: Vec::new(),
            error,
        });
    }

    /// Writes the access line, once: the answer's `status` (and gRPC status), `bytes_out` sent.
    pub fn write(&self, status: u16, grpc_status: Option<i32>, bytes_out: u64) {
        if !self.wanted || self.written.swap(true, Ordering::Relaxed) {
            return;
        }
        // A copy, so no lock is held while the line is written.
        let names = {
            let names = self.names.locked();
            Names { handler: names.handler.clone(), model: names.model.clone(), tenant: names.tenant.clone() }
        };
        let none = "";
        tracing::info!(
            target: "kiln::access",
            request_id = %self.request_id,
            trace_id = %self.trace.trace_id_hex(),
            protocol = self.protocol,
            method = %self.method,
            route = %self.route,
            handler = names.handler.as_deref().unwrap_or(none),
            model = names.model.as_deref().unwrap_or(none),
            tenant = names.tenant.as_deref().unwrap_or(none),
            status,
            grpc_status,
            bytes_in = self.bytes_in.load(Ordering::Relaxed),
            bytes_out,
            latency_ms = self.started.elapsed().as_micros() as f64 / 1000.0,
            queue_wait_ms = self.queue_wait_us.load(Ordering::Relaxed) as f64 / 1000.0,
            batch_size = self.batch_size.load(Ordering::Relaxed),
            computes = self.computes.load(Ordering::Relaxed),
            "access"
        );
        if let Some(span) = self.span {
            let target = names.handler.as_deref().or(names.model.as_deref()).unwrap_or(&self.route);
            let mut attributes = vec![
                ("http.request.method", Value::Text(self.method.clone())),
                ("url.path", Value::Text(self.route.clone())),
                ("http.response.status_code", Value::Int(i64::from(status))),
                ("kiln.request_id", Value::Text(self.request_id.clone())),
                ("kiln.protocol", Value::Text(self.protocol.to_owned())),
            ];
            for (key, value) in [("kiln.tenant", &names.tenant), ("kiln.handler", &names.handler), ("kiln.model", &names.model)] {
                if let Some(value) = value {
                    attributes.push((key, Value::Text(value.clone())));
                }
            }
            if let Some(grpc) = grpc_status {
                attributes.push(("rpc.grpc.status_code", Value::Int(i64::from(grpc))));
            }
            let failed = status >= 500 || grpc_status.is_some_and(|g| g != 0);
            spans::record(Finished {
                context: span,
                parent: self.trace.parent,
                name: format!("{} {target}", self.method),
                server: true,
                start: self.started,
                end: Instant::now(),
                attributes,
                links: Vec::new(),
                error: failed.then(|| format!("status {status}")),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noted(record: &Record) -> (String, String, Option<String>, Option<String>) {
        let names = record.names.locked();
        (record.method.clone(), record.route.clone(), names.handler.clone(), names.model.clone())
    }

    #[test]
    fn a_record_whose_answer_writes_nothing_keeps_nothing_but_its_id() {
        // Unit tests install no logger: no access line is wanted, and no trace is exported.
        let quiet = Record::new("http", "POST", "/v1/handlers/digits/", "r1".to_owned(), TraceContext::fresh());
        assert!(!quiet.wanted());
        quiet.note_call("digits", "demo");
        quiet.note_model("digits");
        assert_eq!(noted(&quiet), (String::new(), String::new(), None, None));
        assert_eq!(quiet.request_id, "r1");
        // With a logger that writes `kiln::access` at info, the same record keeps what its line says.
        let logger = tracing_subscriber::fmt().with_writer(std::io::sink).with_max_level(tracing::Level::INFO).finish();
        tracing::subscriber::with_default(logger, || {
            let kept = Record::new("http", "POST", "/v1/handlers/digits/", "r2".to_owned(), TraceContext::fresh());
            assert!(kept.wanted());
            kept.note_call("digits", "demo");
            kept.note_model("digits");
            let expected = ("POST".to_owned(), "/v1/handlers/digits/".to_owned(), Some("digits".to_owned()), Some("digits".to_owned()));
            assert_eq!(noted(&kept), expected);
        });
        let off = tracing_subscriber::fmt().with_writer(std::io::sink).with_env_filter("info,kiln::access=off").finish();
        tracing::subscriber::with_default(off, || {
            assert!(!Record::new("http", "GET", "/", "r3".to_owned(), TraceContext::fresh()).wanted());
        });
    }

    #[test]
    fn a_traceparent_is_taken_only_when_it_is_one() {
        let good = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::parse(good).expect("valid");
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.parent.map(|p| to_hex(&p)).as_deref(), Some("00f067aa0ba902b7"));
        assert!(context.sampled);
        let unsampled = TraceContext::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").expect("valid");
        assert!(!unsampled.sampled);
        // A later version may carry more.
        assert!(TraceContext::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more").is_some());
        for bad in [
            &b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"[..],
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736",
            b"\xff\xfe",
            b"",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        let fresh = TraceContext::from_header(Some(b"junk"));
        assert!(fresh.parent.is_none() && fresh.trace_id != [0; 16]);
        assert_ne!(TraceContext::fresh().trace_id, fresh.trace_id);
    }
}
