//! `kiln bench`: a load generator for handlers and OIP models (over HTTP, or gRPC with
//! `--grpc`), and `kiln bench-raw`: the libtorch ceiling, the same module's forward passes
//! without HTTP, sandbox or queue.
//!
//! Closed loop keeps `concurrency` requests in flight; open loop starts requests at a fixed
//! rate and measures each from its scheduled start, so a slow server cannot hide its queueing.
//! The server's average batch size comes from `/v1/stats` before and after the run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use kiln_wire::Stats;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;

use crate::api::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use crate::api::grpc::proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::api::grpc::proto::ModelInferRequest;

/// What to load and how.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub url: String,
    /// Base URL of the server, for `/v1/stats`.
    pub server: String,
    /// An admin key, to read `/v1/stats` (the average batch size); without one it is not reported.
    pub admin_key: Option<String>,
    pub method: http::Method,
    pub body: Bytes,
    /// Other bodies, sent in turn by the requests that do not repeat `body`.
    pub others: Vec<Bytes>,
    /// Percent of requests that repeat `body` exactly; each of the others is unique (100: all
    /// repeat).
    pub repeat_percent: u32,
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
    pub concurrency: usize,
    /// Open loop at this many requests per second instead of a closed loop.
    pub rate: Option<f64>,
    /// Open loop: requests due while this many are in flight are not sent (see `not_sent`).
    pub max_in_flight: usize,
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
    pub progress: bool,
    /// Send `ModelInfer` over gRPC to this address instead of HTTP requests to `url`.
    pub grpc: Option<GrpcLoad>,
    /// How to speak to an https:// server.
    pub tls: crate::tls::ClientTls,
}

/// A gRPC load: one OIP request, sent again and again.
#[derive(Debug, Clone)]
pub struct GrpcLoad {
    /// `HOST:PORT` (plain), or `http://HOST:PORT` or `https://HOST:PORT`.
    pub addr: String,
    pub request: ModelInferRequest,
}

/// The gRPC `ModelInfer` request for `model` from an OIP JSON request body (`--body`): the same
/// inputs, sent as raw contents, as the official clients send them.
pub fn grpc_request(model: &str, body: Bytes) -> anyhow::Result<ModelInferRequest> {
    let (request, named) = kiln_codec::oip::decode(None, body).map_err(|e| anyhow::anyhow!("--body: {}", e.0))?;
    let mut inputs = Vec::with_capacity(named.len());
    let mut raw = Vec::with_capacity(named.len());
    for (name, tensor) in named {
        inputs.push(InferInputTensor {
            name,
            datatype: tensor.dtype.wire_name().to_owned(),
            shape: tensor.shape.iter().map(|&d| i64::from(d)).collect(),
            ..InferInputTensor::default()
        });
        raw.push(Bytes::from(tensor.data));
    }
    let outputs = request
        .outputs
        .unwrap_or_default()
        .into_iter()
        .map(|o| InferRequestedOutputTensor { name: o.name, ..InferRequestedOutputTensor::default() })
        .collect();
    Ok(ModelInferRequest {
        model_name: model.to_owned(),
        id: request.id.unwrap_or_default(),
        inputs,
        outputs,
        raw_input_contents: raw,
        ..ModelInferRequest::default()
    })
}

/// The result of a run, as printed and as `--json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub url: String,
    pub mode: String,
    pub requests: u64,
    pub ok: u64,
    /// Open loop: requests that were due while `max_in_flight` were outstanding, not sent.
    pub not_sent: u64,
    /// Non-2xx answers by status; `connect: WHY` for connections refused or failed (a TLS
    /// handshake included), `transport: WHY` for connections that failed after the request
    /// went out.
    pub errors: BTreeMap<String, u64>,
    pub seconds: f64,
    pub throughput_rps: f64,
    pub latency_ms: Latency,
    /// Per model: requests and forward passes during the run, and their ratio.
    pub server_batching: BTreeMap<String, Batching>,
    /// What the server spent per request during the run (from `/v1/stats`, with an admin key).
    pub server_cost: Option<ServerCost>,
}

/// The server's own CPU time and thread hand-offs during a run, per request sent; they include
/// whatever else the server did meanwhile, so measure a server that serves only this load.
#[derive(Debug, Serialize)]
pub struct ServerCost {
    pub cpu_us_per_request: f64,
    /// A thread went to sleep and had to be woken again: the hand-offs between threads.
    pub wakeups_per_request: f64,
    pub preemptions_per_request: f64,
    /// Heap allocations by the server's Rust code (0 from a server that does not count them).
    pub allocations_per_request: f64,
    /// Resident memory after the run.
    pub rss_mib: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Serialize)]
pub struct Batching {
    pub inferences: u64,
    pub executions: u64,
    pub average_batch_size: f64,
}

type HttpClient = Client<super::connect::Connector, Full<Bytes>>;

struct Shared {
    spec: LoadSpec,
    client: HttpClient,
    stop: AtomicBool,
    issued: AtomicU64,
    /// Requests built, to pick each one's body.
    built: AtomicU64,
    progress: indicatif::ProgressBar,
    grpc: Option<GrpcClient>,
}

/// One HTTP/2 connection for every request in flight, as gRPC clients use one.
struct GrpcClient {
    client: GrpcInferenceServiceClient<Channel>,
    request: ModelInferRequest,
    metadata: MetadataMap,
}

impl GrpcClient {
    async fn connect(load: &GrpcLoad, headers: &[(String, String)], tls: &crate::tls::ClientTls) -> anyhow::Result<GrpcClient> {
        let uri = if load.addr.contains("://") { load.addr.clone() } else { format!("http://{}", load.addr) };
        let channel = tonic::transport::Endpoint::from_shared(uri.clone())
            .with_context(|| format!("--grpc {}", load.addr))?
            .connect_with_connector(super::connect::grpc(tls, super::connect::is_https(&uri))?)
            .await
            // anyhow's alternate form writes the error with its causes, "a: b: c".
            .map_err(|e| kiln_wire::cli::Unreachable(format!("cannot reach {}: {:#}", load.addr, anyhow::Error::new(e))))?;
        let mut headers_map = http::HeaderMap::new();
        for (k, v) in headers {
            let name = http::HeaderName::from_bytes(k.to_lowercase().as_bytes()).with_context(|| format!("header '{k}'"))?;
            headers_map.insert(name, v.parse().with_context(|| format!("header '{k}'"))?);
        }
        let client = GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        Ok(GrpcClient { client, request: load.request.clone(), metadata: MetadataMap::from_headers(headers_map) })
    }

    async fn one(&self, tally: &mut Tally, since: Instant) {
        let mut request = tonic::Request::new(self.request.clone());
        *request.metadata_mut() = self.metadata.clone();
        let result = self.client.clone().model_infer(request).await;
        tally.latencies_us.push(since.elapsed().as_micros() as u64);
        match result {
            Ok(_) => tally.ok += 1,
            Err(status) => *tally.errors.entry(format!("grpc {:?}", status.code())).or_default() += 1,
        }
    }
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    ok: u64,
    not_sent: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.ok += other.ok;
        self.not_sent += other.not_sent;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

impl Shared {
    /// Claims the next request slot, or `None` when the run is over.
    fn claim(&self, started: Instant) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        if let Some(limit) = self.spec.requests
            && self.issued.fetch_add(1, Ordering::Relaxed) >= limit {
                return false;
            }
        if let Some(d) = self.spec.duration
            && started.elapsed() >= d {
                self.stop.store(true, Ordering::Relaxed);
                return false;
            }
        true
    }

    async fn one(&self, tally: &mut Tally, since: Instant) {
        if let Some(grpc) = &self.grpc {
            grpc.one(tally, since).await;
            self.progress.inc(1);
            return;
        }
        // Below `repeat_percent`, the request repeats `body` exactly; the others are each made
        // unique (a query parameter no guest reads), with the `others` bodies in turn.
        let n = self.built.fetch_add(1, Ordering::Relaxed);
        let repeat = self.spec.repeat_percent >= 100 || n % 100 < u64::from(self.spec.repeat_percent);
        let (uri, body) = if repeat {
            (std::borrow::Cow::Borrowed(self.spec.url.as_str()), &self.spec.body)
        } else {
            let separator = if self.spec.url.contains('?') { '&' } else { '?' };
            let body = match self.spec.others.len() as u64 {
                0 => &self.spec.body,
                others => &self.spec.others[(n % others) as usize],
            };
            (std::borrow::Cow::Owned(format!("{}{separator}kiln-bench-unique={n}", self.spec.url)), body)
        };
        let mut request = http::Request::builder().method(self.spec.method.clone()).uri(uri.as_ref());
        if let Some(ct) = &self.spec.content_type {
            request = request.header(http::header::CONTENT_TYPE, ct);
        }
        for (k, v) in &self.spec.headers {
            request = request.header(k, v);
        }
        let request = match request.body(Full::new(body.clone())) {
            Ok(r) => r,
            Err(_) => {
                *tally.errors.entry("invalid request".into()).or_default() += 1;
                return;
            }
        };
        match self.client.request(request).await {
            Ok(response) => {
                let status = response.status();
                // The body is part of the answer: latency ends when it is all here.
                let complete = response.into_body().collect().await.is_ok();
                tally.latencies_us.push(since.elapsed().as_micros() as u64);
                if status.is_success() && complete {
                    tally.ok += 1;
                } else {
                    *tally.errors.entry(status.as_u16().to_string()).or_default() += 1;
                }
            }
            Err(e) => {
                // The innermost cause says why (refused, a certificate not trusted or expired).
                let kind = if e.is_connect() { "connect" } else { "transport" };
                let mut cause: &dyn std::error::Error = &e;
                while let Some(inner) = cause.source() {
                    cause = inner;
                }
                *tally.errors.entry(format!("{kind}: {cause}")).or_default() += 1;
            }
        }
        self.progress.inc(1);
    }
}

/// Runs the load and reports.
pub async fn run(spec: LoadSpec) -> anyhow::Result<Report> {
    if spec.duration.is_none() && spec.requests.is_none() {
        bail!("give --duration or --requests");
    }
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(spec.concurrency.max(64))
        .build(super::connect::http(&spec.tls, super::connect::is_https(&spec.url) || super::connect::is_https(&spec.server))?);
    let grpc = match &spec.grpc {
        Some(load) => Some(GrpcClient::connect(load, &spec.headers, &spec.tls).await?),
        None => None,
    };
    let before = stats(&client, &spec).await;
    let progress = if spec.progress {
        let bar = match (spec.requests, spec.duration) {
            (Some(n), _) => indicatif::ProgressBar::new(n),
            (None, _) => indicatif::ProgressBar::no_length(),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {pos} requests ({per_sec}) {wide_bar}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let shared = Arc::new(Shared {
        spec: spec.clone(),
        client,
        stop: AtomicBool::new(false),
        issued: AtomicU64::new(0),
        built: AtomicU64::new(0),
        progress,
        grpc,
    });
    let started = Instant::now();
    let tally = match spec.rate {
        None => closed_loop(&shared, started).await,
        Some(rate) => open_loop(&shared, started, rate).await?,
    };
    let seconds = started.elapsed().as_secs_f64();
    shared.progress.finish_and_clear();
    let after = stats(&shared.client, &spec).await;
    Ok(report(&spec, tally, seconds, before, after))
}

async fn closed_loop(shared: &Arc<Shared>, started: Instant) -> Tally {
    let mut workers = Vec::new();
    for _ in 0..shared.spec.concurrency.max(1) {
        let shared = Arc::clone(shared);
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while shared.claim(started) {
                shared.one(&mut tally, Instant::now()).await;
            }
            tally
        }));
    }
    let mut total = Tally::default();
    for w in workers {
        if let Ok(t) = w.await {
            total.merge(t);
        }
    }
    total
}

async fn open_loop(shared: &Arc<Shared>, started: Instant, rate: f64) -> anyhow::Result<Tally> {
    if !(rate > 0.0 && rate.is_finite()) {
        bail!("--rate must be a positive number of requests per second");
    }
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut tasks = tokio::task::JoinSet::new();
    let mut total = Tally::default();
    let mut next = started;
    while shared.claim(started) {
        tokio::time::sleep_until(next.into()).await;
        if tasks.len() >= shared.spec.max_in_flight.max(1) {
            total.not_sent += 1;
            next += interval;
            while let Some(done) = tasks.try_join_next() {
                if let Ok(t) = done {
                    total.merge(t);
                }
            }
            continue;
        }
        let shared = Arc::clone(shared);
        let scheduled = next;
        tasks.spawn(async move {
            let mut tally = Tally::default();
            shared.one(&mut tally, scheduled).await;
            tally
        });
        next += interval;
        while let Some(done) = tasks.try_join_next() {
            if let Ok(t) = done {
                total.merge(t);
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(t) = done {
            total.merge(t);
        }
    }
    Ok(total)
}

async fn stats(client: &HttpClient, spec: &LoadSpec) -> Option<Stats> {
    let key = spec.admin_key.as_deref()?;
    let request = http::Request::get(format!("{}/v1/stats", spec.server.trim_end_matches('/')))
        .header(http::header::AUTHORIZATION, format!("Bearer {}", key.trim()))
        .body(Full::new(Bytes::new()))
        .ok()?;
    let response = client.request(request).await.ok()?;
    let body = response.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body).ok()
}

fn counters(stats: &Option<Stats>) -> BTreeMap<String, (u64, u64)> {
    stats
        .iter()
        .flat_map(|s| &s.models)
        .map(|m| (m.name.clone(), (m.inferences, m.executions)))
        .collect()
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

fn report(spec: &LoadSpec, mut tally: Tally, seconds: f64, before: Option<Stats>, after: Option<Stats>) -> Report {
    tally.latencies_us.sort_unstable();
    let l = &tally.latencies_us;
    let latency = Latency {
        mean: if l.is_empty() { 0.0 } else { l.iter().sum::<u64>() as f64 / l.len() as f64 / 1000.0 },
        p50: percentile(l, 50.0),
        p90: percentile(l, 90.0),
        p99: percentile(l, 99.0),
        max: l.last().map_or(0.0, |&m| m as f64 / 1000.0),
    };
    let errors: u64 = tally.errors.values().sum();
    let requests = tally.ok + errors;
    let server_cost = match (&before, &after) {
        (Some(b), Some(a)) if requests > 0 && a.process.threads > 0 => {
            let (b, a, n) = (&b.process, &a.process, requests as f64);
            Some(ServerCost {
                cpu_us_per_request: (a.cpu_seconds - b.cpu_seconds).max(0.0) * 1e6 / n,
                wakeups_per_request: a.voluntary_switches.saturating_sub(b.voluntary_switches) as f64 / n,
                preemptions_per_request: a.involuntary_switches.saturating_sub(b.involuntary_switches) as f64 / n,
                allocations_per_request: a.allocations.saturating_sub(b.allocations) as f64 / n,
                rss_mib: a.rss_bytes as f64 / (1 << 20) as f64,
            })
        }
        _ => None,
    };
    let (before, after) = (counters(&before), counters(&after));
    let server_batching = after
        .iter()
        .filter_map(|(name, &(i1, e1))| {
            let (i0, e0) = before.get(name).copied().unwrap_or((0, 0));
            let (inferences, executions) = (i1.saturating_sub(i0), e1.saturating_sub(e0));
            (executions > 0).then(|| {
                (name.clone(), Batching { inferences, executions, average_batch_size: inferences as f64 / executions as f64 })
            })
        })
        .collect();
    Report {
        url: spec.url.clone(),
        mode: match spec.rate {
            Some(r) => format!("open loop at {r} req/s"),
            None => format!("closed loop, concurrency {}", spec.concurrency),
        },
        requests,
        ok: tally.ok,
        not_sent: tally.not_sent,
        errors: tally.errors,
        seconds,
        throughput_rps: tally.ok as f64 / seconds.max(1e-9),
        latency_ms: latency,
        server_batching,
        server_cost,
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "target      {}", self.url)?;
        writeln!(f, "mode        {}", self.mode)?;
        writeln!(f, "requests    {} in {:.2} s ({} ok)", self.requests, self.seconds, self.ok)?;
        writeln!(f, "throughput  {:.1} req/s", self.throughput_rps)?;
        if self.not_sent > 0 {
            writeln!(f, "not sent    {} (due while the in-flight cap was reached)", self.not_sent)?;
        }
        let l = &self.latency_ms;
        writeln!(
            f,
            "latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}  mean {:.3}",
            l.p50, l.p90, l.p99, l.max, l.mean
        )?;
        if self.errors.is_empty() {
            writeln!(f, "errors      none")?;
        } else {
            let list: Vec<String> = self.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            writeln!(f, "errors      {}", list.join(", "))?;
        }
        for (model, b) in &self.server_batching {
            writeln!(
                f,
                "batching    {model}: {} requests in {} forward passes, average batch {:.2}",
                b.inferences, b.executions, b.average_batch_size
            )?;
        }
        if let Some(c) = &self.server_cost {
            writeln!(
                f,
                "server      {:.0} µs CPU, {:.2} wake-ups, {:.2} preemptions, {:.0} allocations per request; RSS {:.0} MiB",
                c.cpu_us_per_request, c.wakeups_per_request, c.preemptions_per_request, c.allocations_per_request, c.rss_mib
            )?;
        }
        Ok(())
    }
}

/// One row of `kiln bench-raw`.
#[derive(Debug, Serialize)]
pub struct RawRow {
    pub batch_size: u32,
    pub forwards: u64,
    pub forward_ms: f64,
    pub rows_per_second: f64,
}

/// The precision `kiln bench-raw` times a model in.
#[derive(Debug, Clone, Copy)]
pub enum RawPrecision {
    /// The model's own: pinned, or searched when it is `auto`, as the server would.
    Configured,
    /// Searched, whatever the model says (with its `auto` settings where it has them).
    Search,
    Pinned(crate::model::spec::Form),
}

/// Times the module's own forward at each batch size for about `seconds` each, with dynamic
/// non-batch dimensions set to `dim`, in the form `precision` comes to (returned beside the
/// rows; a search's report goes to stderr). Integer inputs get small ids; floats a ramp.
pub fn raw(
    config: &crate::model::spec::ModelConfig,
    device: crate::model::device::Device,
    batch_sizes: &[u32],
    dim: u32,
    seconds: f64,
    worker: bool,
    precision: RawPrecision,
) -> anyhow::Result<(crate::model::spec::Form, Vec<RawRow>)> {
    if worker {
        let events = std::sync::Arc::new(crate::telemetry::EventLog::new(16));
        let workers = crate::model::backend::worker::Worker::this_executable(events, std::time::Duration::from_secs(600))?;
        return raw_on(&workers, config, device, batch_sizes, dim, seconds, precision);
    }
    raw_on(&crate::model::backend::torch::Torch::default(), config, device, batch_sizes, dim, seconds, precision)
}

fn raw_on<B: crate::model::backend::Backend>(
    backend: &B,
    config: &crate::model::spec::ModelConfig,
    device: crate::model::device::Device,
    batch_sizes: &[u32],
    dim: u32,
    seconds: f64,
    precision: RawPrecision,
) -> anyhow::Result<(crate::model::spec::Form, Vec<RawRow>)> {
    use crate::model::backend::LoadedModel as _;
    use crate::model::spec::AutoPrecision;
    use crate::model::tensor::{DType, HostTensor};
    let search = |auto: &AutoPrecision| -> anyhow::Result<crate::model::spec::Form> {
        let decision = crate::model::precision::search(backend, config, auto, device)?;
        eprintln!("precision search: {}", decision.report.summary());
        for line in &decision.report.candidates {
            eprintln!("  {line}");
        }
        Ok(decision.form)
    };
    let precision = match (precision, &config.auto_precision) {
        (RawPrecision::Pinned(p), _) => p,
        (RawPrecision::Configured | RawPrecision::Search, Some(auto)) => search(auto)?,
        (RawPrecision::Search, None) => search(&AutoPrecision::default())?,
        (RawPrecision::Configured, None) => config.form(),
    };
    let config = &config.with_form(precision);
    let (model, _) = crate::model::replica::load_and_warm_up(backend, config, device)?;
    let mut rows = Vec::new();
    for &batch in batch_sizes {
        let inputs: Vec<HostTensor> = config
            .inputs
            .iter()
            .map(|spec| {
                let mut shape: Vec<u32> = spec.shape.iter().map(|d| d.unwrap_or(dim)).collect();
                shape[0] = batch;
                let n: usize = shape.iter().map(|&d| d as usize).product();
                let data = match spec.dtype {
                    DType::I64 => (0..n).flat_map(|i| (1 + (i % 100) as i64).to_le_bytes()).collect(),
                    DType::I32 => (0..n).flat_map(|i| (1 + (i % 100) as i32).to_le_bytes()).collect(),
                    DType::F32 => (0..n).flat_map(|i| ((i % 255) as f32 / 255.0).to_le_bytes()).collect(),
                    other => vec![0u8; n * other.size()],
                };
                HostTensor { dtype: spec.dtype, shape, data }
            })
            .collect();
        for _ in 0..3 {
            model.forward(&inputs).map_err(|e| anyhow::anyhow!(e))?;
        }
        let started = Instant::now();
        let mut forwards = 0u64;
        while started.elapsed().as_secs_f64() < seconds || forwards < 5 {
            model.forward(&inputs).map_err(|e| anyhow::anyhow!(e))?;
            forwards += 1;
        }
        let elapsed = started.elapsed().as_secs_f64();
        rows.push(RawRow {
            batch_size: batch,
            forwards,
            forward_ms: elapsed * 1000.0 / forwards as f64,
            rows_per_second: forwards as f64 * f64::from(batch) / elapsed,
        });
    }
    Ok((precision, rows))
}

/// Every file in `dir`, in name order: the other bodies of `--vary`.
pub fn read_bodies(dir: &Path) -> anyhow::Result<Vec<Bytes>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "{} has no files to send", dir.display());
    files.iter().map(|p| Ok(Bytes::from(std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?))).collect()
}

/// Reads a request body file.
pub fn read_body(path: &Option<PathBuf>) -> anyhow::Result<Bytes> {
    match path {
        None => Ok(Bytes::new()),
        Some(p) => Ok(Bytes::from(std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?)),
    }
}
