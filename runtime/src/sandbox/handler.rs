//! A handler: a component compiled and pre-instantiated once, called on each request in a fresh
//! store, within its limits (deadline, memory, fuel, response size), seeing the models its
//! tenant may use.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use wasmtime::component::ResourceTable;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi::WasiCtx;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode as HttpErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpView};

use super::cache::{CachePolicy, ResponseCache};
use super::first_line;
use super::limits::{CappedBody, GuestLimits, SandboxLimits};
use super::log::{GuestLog, LogBudget};
use super::nn::{self, NnCtx, NnLimits};
use super::store::{DenyOutgoing, RequestState};
use crate::model::handle::{InferOptions, ModelHandle};
use crate::model::table::ModelTable;
use crate::sync::{MutexExt, RwLockExt};
use crate::telemetry::access::Record;
use crate::telemetry::spans::{self, Value};
use crate::telemetry::histogram::AtomicHistogram;

/// After about this many milliseconds of its own execution (epoch ticks), a guest that is still
/// computing while other guests run is slowed to a third of a core. Ordinary handlers finish well
/// within it.
const LONG_RUNNING_TICKS: u32 = 10;

/// The pause a slowed guest takes after each tick of execution: it keeps about a third of a core.
const THROTTLE_PAUSE: Duration = Duration::from_millis(2);

/// A request's response, with the body still streaming from the guest.
pub type GuestResponse = http::Response<HyperOutgoingBody>;

/// Why a guest did not produce a response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuestError {
    #[error("handler '{handler}' exceeded its deadline of {} ms", deadline.as_millis())]
    Deadline { handler: String, deadline: Duration },
    #[error("handler '{handler}' exceeded its memory limit of {} MiB", limit >> 20)]
    MemoryLimit { handler: String, limit: u64 },
    #[error("handler '{handler}' trapped: {reason}")]
    Trap { handler: String, reason: String },
    #[error("handler '{handler}' returned no response")]
    NoResponse { handler: String },
    #[error("handler '{handler}' exceeded its limit of {limit} compute calls per request")]
    ComputeCalls { handler: String, limit: u32 },
    #[error("handler '{handler}' ran out of fuel ({fuel} units per request)")]
    OutOfFuel { handler: String, fuel: u64 },
    #[error("handler '{handler}' declared a response body of {declared} bytes, over its limit of {limit}")]
    ResponseTooLarge {
        handler: String,
        declared: u64,
        limit: u64,
    },
    #[error("handler '{handler}' answered with an error: {code:?}")]
    ErrorCode {
        handler: String,
        code: HttpErrorCode,
    },
    #[error("no sandbox is free for handler '{handler}' (the server's pool is in use); retry later")]
    PoolFull { handler: String },
    #[error("sandbox failure in handler '{handler}': {reason}")]
    Internal { handler: String, reason: String },
}

impl GuestError {
    /// A short, bounded label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            GuestError::Deadline { .. } => "deadline",
            GuestError::MemoryLimit { .. } => "memory",
            GuestError::ComputeCalls { .. } => "compute_calls",
            GuestError::OutOfFuel { .. } => "fuel",
            GuestError::ResponseTooLarge { .. } => "response_size",
            GuestError::Trap { .. } => "trap",
            GuestError::NoResponse { .. } => "no_response",
            GuestError::ErrorCode { .. } => "error_code",
            GuestError::PoolFull { .. } => "pool_full",
            GuestError::Internal { .. } => "internal",
        }
    }
}

/// A compiled, pre-instantiated handler. Each call runs in a fresh store.
pub struct Handler {
    name: Arc<str>,
    tenant: Arc<str>,
    pre: ProxyPre<RequestState>,
    limits: SandboxLimits,
    metered: bool,
    priority: u8,
    max_priority: u8,
    models: ModelView,
    /// Answers kept for repeated requests; new (empty) with every deployment of the handler.
    cache: Option<Arc<ResponseCache>>,
    origin: Origin,
    activity: Arc<Activity>,
}

/// The models a handler's guest sees: those of the live table its tenant may use and the handler
/// names (all of them when it names none), rebuilt when the table changes. A request takes the
/// view as it is when it starts and keeps it to the end.
struct ModelView {
    table: Arc<ModelTable>,
    tenant: String,
    names: Option<Vec<String>>,
    /// The view and the table generation it was built from.
    cached: std::sync::RwLock<(u64, Arc<HashMap<String, ModelHandle>>)>,
}

impl ModelView {
    fn new(table: Arc<ModelTable>, tenant: &str, names: Option<Vec<String>>) -> ModelView {
        let generation = table.generation();
        let view = Arc::new(table.view(tenant, names.as_deref()));
        ModelView { table, tenant: tenant.to_owned(), names, cached: std::sync::RwLock::new((generation, view)) }
    }

    fn current(&self) -> Arc<HashMap<String, ModelHandle>> {
        // Read before the table: a change landing in between makes the next call rebuild again.
        let generation = self.table.generation();
        {
            let cached = self.cached.reading();
            if cached.0 == generation {
                return Arc::clone(&cached.1);
            }
        }
        let view = Arc::new(self.table.view(&self.tenant, self.names.as_deref()));
        *self.cached.writing() = (generation, Arc::clone(&view));
        view
    }
}

/// What a call brings from its tenant: things to hold for as long as the guest runs, and the
/// gate its tenant's long-running guests take turns through.
pub struct Lease {
    /// Dropped when the guest's task ends, whether it answered, failed or ran to its deadline;
    /// the caller may keep a clone for as long as the response body streams.
    pub held: Arc<dyn Send + Sync>,
    /// One turn at a time per tenant for guests past [`LONG_RUNNING_TICKS`].
    pub cpu: Arc<Semaphore>,
}

/// What a caller may ask of one request's scheduling.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallOptions {
    /// Requested priority; capped at the handler's maximum. `None` uses the handler's own.
    pub priority: Option<u8>,
    /// A shorter inference timeout than the models' own.
    pub timeout: Option<Duration>,
}

impl Handler {
    /// The handler `config` describes, running `pre`; its guests see the models of `models`
    /// that its tenant may use and `config` names.
    pub(super) fn new(
        config: &HandlerConfig,
        pre: ProxyPre<RequestState>,
        models: Arc<ModelTable>,
        origin: Origin,
        metered: bool,
        activity: Arc<Activity>,
    ) -> Handler {
        Handler {
            name: config.name.as_str().into(),
            tenant: config.tenant.as_str().into(),
            pre,
            limits: config.limits.clone(),
            metered,
            priority: config.priority,
            max_priority: config.max_priority,
            models: ModelView::new(models, &config.tenant, config.models.clone()),
            cache: config.cache.map(|policy| Arc::new(ResponseCache::new(policy))),
            origin,
            activity,
        }
    }

    /// The name, shared: a label that costs no allocation per request.
    pub fn name_arc(&self) -> Arc<str> {
        Arc::clone(&self.name)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tenant that owns this handler.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn limits(&self) -> &SandboxLimits {
        &self.limits
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    pub fn cache(&self) -> Option<&Arc<ResponseCache>> {
        self.cache.as_ref()
    }

    /// The models this handler's guest may load now, sorted (each also loads as `NAME@VERSION`).
    pub fn model_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.models.current().keys().filter(|n| !n.contains('@')).cloned().collect();
        names.sort_unstable();
        names
    }

    fn infer_options(&self, options: CallOptions) -> InferOptions {
        InferOptions {
            priority: options
                .priority
                .map_or(self.priority, |p| p.min(self.max_priority)),
            timeout: options.timeout,
        }
    }

    /// Runs the guest on `request` in a fresh sandbox.
    ///
    /// Returns once the guest has set its response; the body keeps streaming from the guest,
    /// within the same deadline.
    pub async fn call(
        &self,
        request: http::Request<Full<Bytes>>,
        options: CallOptions,
        lease: Lease,
    ) -> Result<GuestResponse, GuestError> {
        let started = Instant::now();
        let deadline = started + self.limits.deadline;
        let Lease { held, cpu } = lease;
        let mut store = self.new_store(deadline, self.infer_options(options), cpu);
        let (sender, receiver) = oneshot::channel();
        let internal = |e: wasmtime::Error| GuestError::Internal {
            handler: self.name.to_string(),
            reason: e.to_string(),
        };
        let data = store.data_mut();
        let incoming = data
            .http()
            .new_incoming_request(Scheme::Http, request)
            .map_err(internal)?;
        let outparam = data.http().new_response_outparam(sender).map_err(internal)?;

        let pre = self.pre.clone();
        let activity = Arc::clone(&self.activity);
        let name = Arc::clone(&self.name);
        let limits = self.limits.clone();
        let budget = self.limits.deadline;
        // The guest's compute calls note their batches in its request's access line.
        let record = Record::current();
        let mut guest = AbortOnDrop(Some(tokio::spawn(Record::within(record, async move {
            // The tenant's slots stay taken until the guest is gone, not just its answer: a
            // guest that answers and then computes on still holds a sandbox and a core.
            let _held = held;
            let _running = Running::enter(&activity);
            // A core of the machine's, given back while it waits for a model call (`nn`).
            let _core = crate::model::cores::machine().take();
            let run = async {
                let instantiating = Instant::now();
                let proxy = pre.instantiate_async(&mut store).await?;
                activity.instantiation.record(instantiating.elapsed());
                // Traced, the sandbox's two steps are spans of their own, and its model calls
                // children of the second.
                let traced = Record::current().filter(|r| r.span().is_some());
                let running = Instant::now();
                let run_span = traced.as_ref().map(|record| {
                    let what = vec![("kiln.handler", Value::Text(name.to_string()))];
                    record.child(spans::new_span_id(), "sandbox.instantiate", None, (instantiating, running), what, None);
                    let id = spans::new_span_id();
                    record.set_compute_parent(id);
                    id
                });
                let ran = proxy.wasi_http_incoming_handler().call_handle(&mut store, incoming, outparam).await;
                if let (Some(record), Some(id)) = (&traced, run_span) {
                    let error = ran.as_ref().err().map(|e| first_line(&e.to_string()).chars().take(200).collect());
                    record.child(id, "sandbox.run", None, (running, Instant::now()), vec![("kiln.handler", Value::Text(name.to_string()))], error);
                }
                ran
            };
            match tokio::time::timeout_at(deadline.into(), run).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(classify(&name, e, store.data(), &limits)),
                Err(_) => Err(GuestError::Deadline {
                    handler: name.to_string(),
                    deadline: budget,
                }),
            }
        }))));

        let outcome = match receiver.await {
            Ok(Ok(response)) => self.cap_response(response),
            Ok(Err(code)) => Err(GuestError::ErrorCode {
                handler: self.name.to_string(),
                code,
            }),
            // The guest dropped the outparam without setting it: its task says why.
            Err(_) => match guest.0.as_mut() {
                Some(task) => match task.await {
                    Ok(Ok(())) => Err(GuestError::NoResponse {
                        handler: self.name.to_string(),
                    }),
                    Ok(Err(e)) => Err(e),
                    Err(join) => Err(GuestError::Internal {
                        handler: self.name.to_string(),
                        reason: join.to_string(),
                    }),
                },
                None => Err(GuestError::NoResponse {
                    handler: self.name.to_string(),
                }),
            },
        };
        tracing::debug!(
            handler = %self.name,
            tenant = %self.tenant,
            micros = started.elapsed().as_micros() as u64,
            ok = outcome.is_ok(),
            "guest answered"
        );
        if outcome.is_ok() {
            // The guest keeps streaming the body within its deadline; let its task run on.
            guest.disarm();
        }
        outcome
    }

    /// Holds the response body to the handler's byte limit: a declared length over it is refused
    /// up front, a streamed body is cut off where it passes it.
    fn cap_response(
        &self,
        response: http::Response<HyperOutgoingBody>,
    ) -> Result<GuestResponse, GuestError> {
        let limit = self.limits.max_response_bytes;
        let declared = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(declared) = declared.filter(|&n| n > limit) {
            return Err(GuestError::ResponseTooLarge {
                handler: self.name.to_string(),
                declared,
                limit,
            });
        }
        let name = Arc::clone(&self.name);
        let tenant = Arc::clone(&self.tenant);
        Ok(response.map(|body| {
            use http_body_util::BodyExt as _;
            CappedBody {
                inner: body,
                limit,
                sent: 0,
                handler: name,
                tenant,
            }
            .boxed_unsync()
        }))
    }

    fn new_store(&self, deadline: Instant, options: InferOptions, cpu: Arc<Semaphore>) -> Store<RequestState> {
        let budget = Arc::new(LogBudget::new(&self.name, &self.tenant, Record::current()));
        let mut wasi = WasiCtx::builder();
        wasi.stdout(GuestLog::new(&budget, "stdout"))
            .stderr(GuestLog::new(&budget, "stderr"))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }));
        let state = RequestState {
            table: ResourceTable::new(),
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            hooks: DenyOutgoing { log: budget },
            nn: NnCtx::new(
                self.models.current(),
                options,
                NnLimits {
                    max_compute_bytes: self.limits.max_compute_bytes,
                    max_compute_calls: self.limits.max_compute_calls,
                },
                Arc::clone(&self.name),
                Arc::clone(&self.tenant),
            ),
            limits: GuestLimits {
                memory: usize::try_from(self.limits.memory_limit_bytes).unwrap_or(usize::MAX),
                used: 0,
                memory_exceeded: false,
            },
            deadline_hit: false,
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|state| &mut state.limits);
        if self.metered {
            // Cannot fail: fuel is enabled on this engine.
            let _ = store.set_fuel(self.limits.fuel.unwrap_or(u64::MAX));
        }
        store.set_epoch_deadline(1);
        // Ticks that found the guest executing: about its CPU time in ms (waits in the host, such
        // as for inference, do not count).
        let mut busy_ticks: u32 = 0;
        // The turn this guest holds at its tenant's CPU gate, once it is long-running.
        let turn: Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>> = Arc::default();
        let activity = Arc::clone(&self.activity);
        store.epoch_deadline_callback(move |mut ctx| {
            busy_ticks = busy_ticks.saturating_add(1);
            if Instant::now() >= deadline {
                ctx.data_mut().deadline_hit = true;
                Err(Trap::Interrupt.into())
            } else if busy_ticks > LONG_RUNNING_TICKS {
                // A guest computing this long is not about to call a model: no batch waits for it.
                ctx.data_mut().nn.not_expected();
                // A guest that has computed for a while gives up its turn every tick and queues
                // behind its tenant's other long-running guests (FIFO), so a tenant's busy loops
                // together get one turn: a hundred of them take no more CPU than one. While
                // other guests run it also pauses, keeping about a third of a core.
                drop(turn.locked().take());
                let (gate, turn) = (Arc::clone(&cpu), Arc::clone(&turn));
                let crowded = activity.running() > 1;
                Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(async move {
                        // Always give the worker thread back, as `Yield` does: an uncontended
                        // gate alone would resume the guest without yielding at all.
                        if crowded {
                            tokio::time::sleep(THROTTLE_PAUSE).await;
                        } else {
                            tokio::task::yield_now().await;
                        }
                        // Closed only if the tenant is gone; then there is no one to share with.
                        if let Ok(permit) = gate.acquire_owned().await {
                            *turn.locked() = Some(permit);
                        }
                    }),
                ))
            } else {
                // Give the async worker back every tick so a busy guest cannot starve others.
                Ok(UpdateDeadline::Yield(1))
            }
        });
        store
    }
}

/// What every guest of one engine shares: how long instantiating takes (the sandbox's own cost
/// per request, over every request since start) and how many guests run now. The engine owns
/// it; its handlers write it, the metrics read it.
#[derive(Debug, Default)]
pub struct Activity {
    pub instantiation: AtomicHistogram,
    running: AtomicUsize,
}

impl Activity {
    /// Guests executing now, across all handlers of the engine.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }
}

/// Counts a guest in [`Activity::running`] while it lives.
struct Running<'a>(&'a Activity);

impl Running<'_> {
    fn enter(activity: &Activity) -> Running<'_> {
        activity.running.fetch_add(1, Ordering::Relaxed);
        Running(activity)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Aborts the guest's task when the caller goes away before the response: a client that
/// disconnected frees its sandbox, and its queued inference is skipped.
struct AbortOnDrop(Option<tokio::task::JoinHandle<Result<(), GuestError>>>);

impl AbortOnDrop {
    /// Lets the task run on by itself (a dropped JoinHandle detaches).
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Turns a failed guest call into the reason a person can act on.
fn classify(
    handler: &str,
    error: wasmtime::Error,
    state: &RequestState,
    limits: &SandboxLimits,
) -> GuestError {
    let handler = handler.to_owned();
    if error.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() {
        return GuestError::PoolFull { handler };
    }
    if state.deadline_hit {
        return GuestError::Deadline {
            handler,
            deadline: limits.deadline,
        };
    }
    if state.limits.memory_exceeded {
        return GuestError::MemoryLimit {
            handler,
            limit: limits.memory_limit_bytes,
        };
    }
    if let Some(over) = error.downcast_ref::<nn::HostBudgetExceeded>() {
        return GuestError::Trap { handler, reason: over.to_string() };
    }
    if let Some(nn::ComputeCallLimit(limit)) = error.downcast_ref::<nn::ComputeCallLimit>() {
        return GuestError::ComputeCalls {
            handler,
            limit: *limit,
        };
    }
    let reason = match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => {
            return GuestError::OutOfFuel {
                handler,
                fuel: limits.fuel.unwrap_or(u64::MAX),
            };
        }
        Some(Trap::StackOverflow) => "stack overflow".to_owned(),
        Some(Trap::UnreachableCodeReached) => "unreachable instruction (a guest panic)".to_owned(),
        Some(trap) => trap.to_string(),
        None => first_line(&format!("{error:#}")).to_owned(),
    };
    GuestError::Trap { handler, reason }
}

/// Where a handler came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A `[[handler]]` section of the config file.
    Config,
    /// The admin API.
    Deployed {
        sha256: String,
        deployed_at: u64,
        signed: bool,
    },
}

#[derive(Debug, Clone)]
pub struct HandlerConfig {
    pub name: String,
    /// The tenant that owns the handler: its key calls it, its quotas apply.
    pub tenant: String,
    pub component: PathBuf,
    /// The models this handler's guest may `load-by-name` (of those its tenant may use), or
    /// `None` for every model its tenant may use, now and as models are loaded later.
    pub models: Option<Vec<String>>,
    pub limits: SandboxLimits,
    /// Scheduling priority of this handler's inference (higher runs first).
    pub priority: u8,
    /// The highest priority a request may ask for with the `kiln-priority` header.
    pub max_priority: u8,
    /// Its response cache, if it has one.
    pub cache: Option<CachePolicy>,
}

