//! Requests in flight: each gets a fresh `kiln-request-id` (a guest cannot set its own), is listed
//! until its answer's head is sent (`GET /v1/requests`) and can be cancelled by that id (`DELETE
//! /v1/requests/{id}`); and the client's address is known to everything that handles it. The
//! table belongs to the server's [`AppState`], one per server. Once answered, a handler or model
//! call is counted, timed, under its handler and tenant ([`Counted`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::response::{IntoResponse as _, Response};

use super::{ApiError, AppState};
use crate::sync::MutexExt;
use crate::telemetry::access::{Record, TraceContext};
use crate::telemetry::{ANONYMOUS, Telemetry};
use crate::tenancy::Tenant;

tokio::task_local! {
    /// The client's address while its request is handled (see [`tag_request`]).
    pub(crate) static PEER: std::net::IpAddr;
}

/// The address of the client whose request is being handled, where known.
pub(crate) fn peer() -> Option<std::net::IpAddr> {
    PEER.try_with(|ip| *ip).ok()
}

/// Middleware on every route: makes the client's address known to everything that handles its
/// request, for the audit log's flood limit, without threading it through every route; tags
/// the answer with a fresh `kiln-request-id`, whatever answered it; and lets an operator cancel
/// the request by that id until its answer's head is sent ([`Requests::cancel`]).
pub(crate) async fn tag_request(State(app): State<Arc<AppState>>, request: Request, next: axum::middleware::Next) -> Response {
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    let requests = &app.requests;
    let (n, id) = requests.next_id();
    let cancelled = requests.register(n, &request);
    // Forgotten however this ends: answered, cancelled, or dropped because the client went away.
    let _registered = Registered(requests, n);
    let trace = TraceContext::from_header(request.headers().get(TRACEPARENT).map(HeaderValue::as_bytes));
    let record = Record::new("http", request.method().as_str(), request.uri().path(), id, trace);
    // Metered only when its line or span is wanted: the wrapping costs two allocations.
    let wanted = record.wanted();
    let request = if wanted { request.map(|body| axum::body::Body::new(Metered::incoming(body, &record))) } else { request };
    // A client that goes away before its answer starts still gets its line.
    let mut unanswered = Unanswered(wanted.then(|| Arc::clone(&record)), None);
    let handled = Arc::clone(&record).scope(async {
        match peer {
            Some(ip) => PEER.scope(ip, next.run(request)).await,
            None => next.run(request).await,
        }
    });
    // Dropping the handler's future withdraws everything it started: its guest task is
    // aborted, and its queued inference is skipped by the model's scheduler.
    let mut response = tokio::select! {
        response = handled => response,
        Ok(()) = cancelled => ApiError::Cancelled(record.request_id.clone()).into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&record.request_id) {
        response.headers_mut().insert(kiln_wire::headers::REQUEST_ID, value);
    }
    let status = response.status().as_u16();
    unanswered.answered();
    if !wanted {
        return response;
    }
    response.map(|body| axum::body::Body::new(Metered::outgoing(body, record, status)))
}

/// A request's record until its answer is under way: dropped before then (the client went
/// away, the server ran out of drain time), it writes the access line as status 499 (and the
/// gRPC status it is given).
pub(crate) struct Unanswered(pub(crate) Option<Arc<Record>>, pub(crate) Option<i32>);

impl Unanswered {
    /// The answer is under way: its body writes the line.
    pub(crate) fn answered(&mut self) {
        self.0 = None;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(record) = self.0.take() {
            record.write(499, self.1, 0);
        }
    }
}

/// The W3C Trace Context header.
pub(crate) const TRACEPARENT: &str = "traceparent";

/// A body counted into a request's [`Record`]: a request's as it is read, or an answer's as it
/// is sent, whose access line is written when it ends or is dropped unsent (the client went
/// away). An answer's gRPC status is read from its trailers.
pub(crate) struct Metered<B> {
    inner: B,
    record: Arc<Record>,
    /// For an answer: its HTTP status, gRPC status and bytes sent so far.
    answer: Option<(u16, Option<i32>, u64)>,
}

impl<B> Metered<B> {
    pub(crate) fn incoming(inner: B, record: &Arc<Record>) -> Metered<B> {
        Metered { inner, record: Arc::clone(record), answer: None }
    }

    pub(crate) fn outgoing(inner: B, record: Arc<Record>, status: u16) -> Metered<B> {
        Metered { inner, record, answer: Some((status, None, 0)) }
    }

    /// The gRPC status known before the body (a trailers-only answer's).
    pub(crate) fn set_grpc_status(&mut self, status: Option<i32>) {
        if let Some((_, grpc, _)) = &mut self.answer {
            *grpc = status.or(*grpc);
        }
    }
}

impl<B> http_body::Body for Metered<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            let data = frame.data_ref().map_or(0, |d| d.len() as u64);
            match &mut this.answer {
                Some((_, grpc, sent)) => {
                    *sent += data;
                    if let Some(status) = frame.trailers_ref().and_then(grpc_status) {
                        *grpc = Some(status);
                    }
                }
                None => this.record.add_bytes_in(data),
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        if let Some((status, grpc, sent)) = self.answer {
            self.record.write(status, grpc, sent);
        }
    }
}

/// The `grpc-status` of trailers (or of a trailers-only answer's headers).
pub(crate) fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The requests being handled now, by their id's counter, each with the way to cancel it.
/// Sharded, so that concurrent requests rarely meet on one lock.
#[derive(Debug)]
pub struct Requests {
    /// In cluster mode, this replica's name: request ids start with it and a `-`.
    replica: Option<String>,
    /// This server's prefix of request ids, drawn at start-up.
    prefix: u32,
    next: AtomicU64,
    shards: [std::sync::Mutex<HashMap<u64, Flying>>; 16],
}

/// One request in flight. Cloning a parsed request's method and URI shares their bytes (the
/// first share of hyper's buffer allocates once); the channel is one allocation more.
#[derive(Debug)]
struct Flying {
    cancel: tokio::sync::oneshot::Sender<()>,
    method: http::Method,
    uri: http::Uri,
    since: std::time::Instant,
}

/// A request's place in [`Requests`], given up when dropped.
struct Registered<'a>(&'a Requests, u64);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.shard(self.1).remove(&self.1);
    }
}

/// What became of a cancel.
#[derive(Debug, PartialEq, Eq)]
pub enum Cancel {
    Cancelled,
    /// Not in flight here: answered already, or never this server's.
    NotInFlight,
    /// The id is another replica's (cluster mode): the cancel must go to that one.
    OtherReplica(String),
}

impl Default for Requests {
    fn default() -> Requests {
        Requests::new(None)
    }
}

impl Requests {
    /// The table of a server on its own (`replica` `None`) or of replica `replica`.
    pub fn new(replica: Option<String>) -> Requests {
        let mut bytes = [0u8; 4];
        // Without randomness the ids are still unique within this run.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
        Requests {
            replica,
            prefix: u32::from_le_bytes(bytes),
            next: AtomicU64::new(0),
            shards: std::array::from_fn(|_| std::sync::Mutex::new(HashMap::new())),
        }
    }

    /// A request id no other request of this server has had, nor (but by a 1 in 2^32 chance)
    /// one of an earlier run: the random prefix and a counter, 24 hex digits, after the
    /// replica's name and a `-` in cluster mode; and the counter. No system call per request.
    fn next_id(&self) -> (u64, String) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (n, self.id(n))
    }

    fn id(&self, n: u64) -> String {
        match &self.replica {
            Some(replica) => format!("{replica}-{:08x}{n:016x}", self.prefix),
            None => format!("{:08x}{n:016x}", self.prefix),
        }
    }

    /// How many requests are in flight now (as [`Requests::in_flight`] lists them).
    pub fn count(&self) -> usize {
        self.shards.iter().map(|s| s.locked().len()).sum()
    }

    /// A fresh request id for an answer that is not listed in flight (a gRPC call's).
    pub(crate) fn fresh_id(&self) -> String {
        self.next_id().1
    }

    fn shard(&self, n: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Flying>> {
        self.shards[(n % 16) as usize].locked()
    }

    fn register(&self, n: u64, request: &Request) -> tokio::sync::oneshot::Receiver<()> {
        let (cancel, cancelled) = tokio::sync::oneshot::channel();
        let flying = Flying {
            cancel,
            method: request.method().clone(),
            uri: request.uri().clone(),
            since: std::time::Instant::now(),
        };
        self.shard(n).insert(n, flying);
        cancelled
    }

    /// Cancels the request `id` if it is still being handled (its answer's head not yet sent):
    /// its caller gets 503 `cancelled`, its guest stops and its queued inference is withdrawn.
    pub fn cancel(&self, id: &str) -> Cancel {
        let (replica, own) = match id.rsplit_once('-') {
            Some((replica, own)) => (Some(replica), own),
            None => (None, id),
        };
        let well_formed = own.len() == 24 && own.bytes().all(|b| b.is_ascii_hexdigit());
        // Only a replica of a cluster names others, and only for an id that is one.
        if self.replica.is_some()
            && well_formed
            && let Some(replica) = replica
            && self.replica.as_deref() != Some(replica)
        {
            return Cancel::OtherReplica(replica.to_owned());
        }
        if replica.is_some() != self.replica.is_some() {
            return Cancel::NotInFlight;
        }
        let parsed = (own.len() == 24 && own.is_ascii())
            .then(|| (u32::from_str_radix(&own[..8], 16).ok(), u64::from_str_radix(&own[8..], 16).ok()));
        let Some((Some(prefix), Some(n))) = parsed else { return Cancel::NotInFlight };
        if prefix != self.prefix {
            return Cancel::NotInFlight;
        }
        let flying = self.shard(n).remove(&n);
        if flying.is_some_and(|f| f.cancel.send(()).is_ok()) { Cancel::Cancelled } else { Cancel::NotInFlight }
    }

    /// This replica's name in cluster mode.
    pub fn replica(&self) -> Option<&str> {
        self.replica.as_deref()
    }

    /// Every request in flight on both listeners, oldest first: its id, method, path (no query)
    /// and age.
    pub fn in_flight(&self) -> Vec<kiln_wire::RequestInFlight> {
        let now = std::time::Instant::now();
        let mut all: Vec<(u64, kiln_wire::RequestInFlight)> = Vec::new();
        for shard in &self.shards {
            let shard = shard.locked();
            all.extend(shard.iter().map(|(n, f)| {
                let seen = kiln_wire::RequestInFlight {
                    id: self.id(*n),
                    method: f.method.to_string(),
                    path: f.uri.path().to_owned(),
                    age_ms: now.duration_since(f.since).as_secs_f64() * 1e3,
                };
                (*n, seen)
            }));
        }
        all.sort_by_key(|(n, _)| *n);
        all.into_iter().map(|(_, r)| r).collect()
    }
}

/// A handler or model call on its way, timed from its start and counted once answered, under
/// the handler and the tenant it turned out to be for (both learnt as the call goes on: a call
/// refused before its key is checked is counted as the front end's, for no tenant).
pub(super) struct Counted {
    started: std::time::Instant,
    /// The label until a handler is known: the front end (`oip`, `grpc`) or "unknown".
    front: &'static str,
    pub(super) handler: Option<Arc<str>>,
    pub(super) tenant: Option<Arc<Tenant>>,
}

impl Counted {
    pub(super) fn start(front: &'static str) -> Counted {
        Counted { started: std::time::Instant::now(), front, handler: None, tenant: None }
    }

    /// Counts the call as answered with `status` now.
    pub(super) fn finish(self, telemetry: &Telemetry, status: u16) {
        let handler = self.handler.as_deref().unwrap_or(self.front);
        let tenant = self.tenant.as_deref().map_or(ANONYMOUS, Tenant::name);
        if let Some(record) = Record::current() {
            record.note_call(handler, tenant);
        }
        telemetry.record_request(handler, tenant, status, self.started.elapsed());
    }
}
