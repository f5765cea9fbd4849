//! The sandbox: one wasmtime engine, handlers compiled and pre-instantiated once, and a fresh
//! store per request.
//!
//! All limits live here: the pooling allocator (copy-on-write memory images), a 1 ms epoch tick
//! that yields busy guests back to the runtime, slows long-running ones and enforces the
//! wall-clock deadline, per-store memory and fuel limits, the import allow-list checked before a
//! component is accepted, and the response-size cap. The WASI context grants nothing: no files,
//! no environment, no sockets, no outgoing HTTP.

pub mod cache;
mod limits;
mod log;
pub mod nn;
pub mod preinit;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store,
    Trap, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode as HttpErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::model::handle::{InferOptions, ModelHandle};
use crate::model::table::ModelTable;
use cache::{CachePolicy, ResponseCache};
use crate::telemetry::histogram::AtomicHistogram;
pub use limits::SandboxLimits;
use limits::{CappedBody, GuestLimits};
use log::{GuestLog, LogBudget};
use nn::{NnCtx, NnLimits, NnState, NnView};
use crate::sync::{MutexExt, RwLockExt};

/// How often the engine's epoch advances: the granularity of deadlines and of yielding. A busy
/// guest gives its worker thread back every tick, so this bounds how long it can delay others.
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// After about this many milliseconds of its own execution (epoch ticks), a guest that is still
/// computing while other guests run is slowed to a third of a core. Ordinary handlers finish well
/// within it.
const LONG_RUNNING_TICKS: u32 = 10;

/// The pause a slowed guest takes after each tick of execution: it keeps about a third of a core.
const THROTTLE_PAUSE: Duration = Duration::from_millis(2);

/// Interfaces a handler may import, without version. The wasi:http proxy world's imports and
/// wasi:nn, plus the wasi:cli start-up interfaces Rust's std and wasi-libc always import, which a
/// Kiln sandbox answers with nothing (no environment, no terminals; exit ends the request).
const ALLOWED_IMPORTS: &[&str] = &[
    "wasi:io/poll",
    "wasi:io/error",
    "wasi:io/streams",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:random/random",
    // Rust's std seeds every HashMap from here: randomness, no capability.
    "wasi:random/insecure-seed",
    "wasi:random/insecure",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/stdin",
    "wasi:http/types",
    "wasi:http/outgoing-handler",
    "wasi:nn/tensor",
    "wasi:nn/errors",
    "wasi:nn/inference",
    "wasi:nn/graph",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
];

/// The export every handler must have (any 0.2 version).
const HANDLER_EXPORT: &str = "wasi:http/incoming-handler@0.2.";

/// Bytes of each memory and stack slot kept mapped between requests and reset with memset: a
/// guest's 256 KiB stack (see .cargo/config.toml) plus its data and first heap pages. Measured:
/// 256 KiB leaves the heap to page faults (-25 % echo throughput); 1 MiB only adds memset time.
const KEEP_RESIDENT: usize = 384 << 10;

/// With Linux's PAGEMAP_SCAN (kernel 6.7+) a slot reset finds the pages a guest dirtied and
/// restores only those, so far more of a slot can stay mapped: up to this much of each memory.
/// Measured side by side (docs/BENCHMARKS.md): echo at concurrency 16 +40-60 %, digits at
/// concurrency 64 about +25 % over the memset of 384 KiB.
const KEEP_RESIDENT_SCANNED: usize = 4 << 20;

/// What `[server] slot_reset` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlotResetPolicy {
    /// PAGEMAP_SCAN where the kernel has it, the memset of a prefix elsewhere.
    #[default]
    Auto,
    /// The memset of a prefix everywhere (for comparison, or should a kernel's PAGEMAP_SCAN
    /// misbehave).
    Memset,
}

/// How a slot's memory is put back to its initial image between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotReset {
    /// PAGEMAP_SCAN: only dirtied pages, within [`KEEP_RESIDENT_SCANNED`].
    DirtyPages,
    /// memset of the first [`KEEP_RESIDENT`] bytes; the rest handed back to the kernel.
    Prefix,
}

/// Per-component pool limits. A Rust wasm32-wasip2 component is one main core module and a few
/// adapter shims sharing one memory.
const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 16;
const MAX_MEMORIES_PER_COMPONENT: u32 = 2;
const MAX_TABLES_PER_COMPONENT: u32 = 8;

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

/// Why a component cannot be a handler.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ComponentError {
    #[error("not a valid WebAssembly component: {0}")]
    Invalid(String),
    #[error(
        "the component imports {}, which Kiln does not provide; handlers may import only the wasi:http proxy interfaces and wasi:nn",
        .0.join(", ")
    )]
    ForbiddenImports(Vec<String>),
    #[error("the component does not export wasi:http/incoming-handler@0.2.x")]
    NoHandlerExport,
    #[error("the component cannot be linked: {0}")]
    Link(String),
}

/// The imports of `names` that a handler may not have, in order.
pub fn forbidden_imports<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    names
        .into_iter()
        .filter(|name| {
            let base = name.split_once('@').map_or(*name, |(base, _)| base);
            !ALLOWED_IMPORTS.contains(&base)
        })
        .map(str::to_owned)
        .collect()
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

/// The names a component imports and exports at its top level (nested components and modules
/// are the component's own business).
pub(crate) fn component_interface(bytes: &[u8]) -> Result<(Vec<String>, Vec<String>), String> {
    use wasmparser::{Encoding, Parser, Payload};
    let mut imports = Vec::new();
    let mut exports = Vec::new();
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| e.to_string())? {
            Payload::Version { encoding, .. } => {
                if depth == 0 && encoding != Encoding::Component {
                    return Err("this is a core module; a handler must be a component".to_owned());
                }
                depth += 1;
            }
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(section) if depth == 1 => {
                for import in section {
                    imports.push(import.map_err(|e| e.to_string())?.name.name.to_owned());
                }
            }
            Payload::ComponentExportSection(section) if depth == 1 => {
                for export in section {
                    exports.push(export.map_err(|e| e.to_string())?.name.name.to_owned());
                }
            }
            _ => {}
        }
    }
    Ok((imports, exports))
}

/// The shared engine and linker. Cheap to clone.
#[derive(Clone)]
pub struct Sandbox {
    engine: Engine,
    linker: Arc<Linker<RequestState>>,
    metered: bool,
    reset: SlotReset,
    activity: Arc<Activity>,
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

impl Sandbox {
    /// Builds the engine with a pool of `max_instances` sandbox slots, each able to hold up to
    /// `max_memory_bytes` of linear memory, and starts the epoch ticker. `metered` turns on fuel
    /// accounting (it slows every guest, so only when some tenant has a fuel quota); `policy`
    /// says how slots are reset between requests.
    pub fn new(max_instances: u32, max_memory_bytes: u64, metered: bool, policy: SlotResetPolicy) -> wasmtime::Result<Sandbox> {
        let memset = || {
            Engine::new(&engine_config(max_instances, max_memory_bytes, metered, SlotReset::Prefix))
                .map(|engine| (engine, SlotReset::Prefix))
        };
        let (engine, reset) = match policy {
            // PAGEMAP_SCAN where the kernel has it (wasmtime refuses `Yes` where it does not),
            // the memset of a prefix elsewhere.
            SlotResetPolicy::Auto => Engine::new(&engine_config(max_instances, max_memory_bytes, metered, SlotReset::DirtyPages))
                .map(|engine| (engine, SlotReset::DirtyPages))
                .or_else(|scan_error| {
                    tracing::info!("PAGEMAP_SCAN is not available ({scan_error}); slots are reset with memset");
                    memset()
                })?,
            SlotResetPolicy::Memset => memset()?,
        };
        tracing::info!(reset = ?reset, "sandbox engine ready");
        Sandbox::with_engine(engine, reset, metered)
    }
}

/// The engine's settings: a pool of `max_instances` slots of up to `max_memory_bytes` each,
/// reset between requests as `reset` says.
fn engine_config(max_instances: u32, max_memory_bytes: u64, metered: bool, reset: SlotReset) -> Config {
    let mut pool = PoolingAllocationConfig::default();
    // A Rust wasm32-wasip2 component is one main core module plus a few small adapter
    // modules; these totals leave room for that shape in every slot.
    pool.total_component_instances(max_instances)
        .total_core_instances(max_instances.saturating_mul(8))
        .total_memories(max_instances.saturating_mul(2))
        .total_tables(max_instances.saturating_mul(4))
        .total_stacks(max_instances)
        // Per component, so one component cannot take the pool's memories, instances or
        // tables from the others: room for a Rust guest's shape, little more.
        .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
        .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
        .max_tables_per_component(MAX_TABLES_PER_COMPONENT)
        .max_memory_size(usize::try_from(max_memory_bytes).unwrap_or(usize::MAX))
        // Reset the first pages of a slot in place instead of handing them back to the
        // kernel: a guest touches its stack and heap start on every request, and page
        // faults to map them again would cost more than the guest's own work.
        .linear_memory_keep_resident(match reset {
            SlotReset::DirtyPages => KEEP_RESIDENT_SCANNED,
            SlotReset::Prefix => KEEP_RESIDENT,
        })
        .pagemap_scan(match reset {
            SlotReset::DirtyPages => wasmtime::Enabled::Yes,
            SlotReset::Prefix => wasmtime::Enabled::No,
        })
        .table_keep_resident(64 << 10)
        .async_stack_keep_resident(KEEP_RESIDENT)
        .decommit_batch_size(64);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .consume_fuel(metered)
        .memory_init_cow(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

impl Sandbox {
    fn with_engine(engine: Engine, reset: SlotReset, metered: bool) -> wasmtime::Result<Sandbox> {
        start_epoch_ticker(&engine)
            .map_err(|e| wasmtime::format_err!("cannot start the epoch ticker thread: {e}"))?;

        let linker = host_linker(&engine)?;
        Ok(Sandbox {
            engine,
            linker: Arc::new(linker),
            metered,
            reset,
            activity: Arc::default(),
        })
    }

    /// How this engine's slots are reset between requests.
    pub fn slot_reset(&self) -> SlotReset {
        self.reset
    }

    /// Compiles a component and checks that it can be a handler: it imports nothing beyond the
    /// proxy interfaces and wasi:nn, and exports the incoming handler. CPU-heavy: call it off
    /// the async workers. It uses one core (the engine compiles functions serially), so a deploy
    /// never takes every core from the requests being served.
    pub fn check_component(&self, bytes: &[u8]) -> Result<Component, ComponentError> {
        // Imports and exports are read first, without compiling: refusing a component costs
        // next to nothing, however large it is.
        let (imports, exports) = component_interface(bytes).map_err(ComponentError::Invalid)?;
        let forbidden = forbidden_imports(imports.iter().map(String::as_str));
        if !forbidden.is_empty() {
            return Err(ComponentError::ForbiddenImports(forbidden));
        }
        if !exports.iter().any(|name| name.starts_with(HANDLER_EXPORT)) {
            return Err(ComponentError::NoHandlerExport);
        }
        Component::new(&self.engine, bytes)
            .map_err(|e| ComponentError::Invalid(first_line(&format!("{e:#}")).to_owned()))
    }

    /// Links a checked component against Kiln's host interfaces, as a deploy would, without
    /// making a handler of it.
    pub fn check_links(&self, component: &Component) -> Result<(), ComponentError> {
        self.proxy_pre(component).map(drop)
    }

    /// The component linked against Kiln's host interfaces, ready to instantiate.
    fn proxy_pre(&self, component: &Component) -> Result<ProxyPre<RequestState>, ComponentError> {
        let link = |e: wasmtime::Error| ComponentError::Link(first_line(&format!("{e:#}")).to_owned());
        ProxyPre::new(self.linker.instantiate_pre(component).map_err(link)?).map_err(link)
    }

    /// Pre-instantiates a checked component as the handler `config` describes; its guest sees
    /// the models of `models` that its tenant may use and `config` names.
    pub fn handler(
        &self,
        config: &HandlerConfig,
        component: &Component,
        models: Arc<ModelTable>,
        origin: Origin,
    ) -> Result<Handler, ComponentError> {
        let pre = self.proxy_pre(component)?;
        Ok(Handler {
            name: config.name.as_str().into(),
            tenant: config.tenant.as_str().into(),
            pre,
            limits: config.limits.clone(),
            metered: self.metered,
            priority: config.priority,
            max_priority: config.max_priority,
            models: ModelView::new(models, &config.tenant, config.models.clone()),
            cache: config.cache.map(ResponseCache::new),
            origin,
            activity: Arc::clone(&self.activity),
        })
    }

    /// Instantiation times and running guests, over every handler of this engine.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
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

/// Advances the epoch every tick for as long as the engine lives.
fn start_epoch_ticker(engine: &Engine) -> std::io::Result<()> {
    let engine = engine.weak();
    std::thread::Builder::new()
        .name("kiln-epoch".into())
        .spawn(move || {
            while let Some(engine) = engine.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })?;
    Ok(())
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
    cache: Option<ResponseCache>,
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

    pub fn cache(&self) -> Option<&ResponseCache> {
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
        let mut guest = AbortOnDrop(Some(tokio::spawn(async move {
            // The tenant's slots stay taken until the guest is gone, not just its answer: a
            // guest that answers and then computes on still holds a sandbox and a core.
            let _held = held;
            let _running = Running::enter(&activity);
            let run = async {
                let instantiating = Instant::now();
                let proxy = pre.instantiate_async(&mut store).await?;
                activity.instantiation.record(instantiating.elapsed());
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, incoming, outparam)
                    .await
            };
            match tokio::time::timeout_at(deadline.into(), run).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(classify(&name, e, store.data(), &limits)),
                Err(_) => Err(GuestError::Deadline {
                    handler: name.to_string(),
                    deadline: budget,
                }),
            }
        })));

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
        let budget = Arc::new(LogBudget::new(&self.name, &self.tenant));
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

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// Kiln's host interfaces for handlers: the full WASI surface, so ordinary Rust guests
/// instantiate (std imports filesystem and environment), and a store's context then grants none
/// of it; wasi:http's types without outgoing requests; wasi:nn.
fn host_linker(engine: &Engine) -> wasmtime::Result<Linker<RequestState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    nn::add_to_linker(&mut linker)?;
    Ok(linker)
}

/// Per-request store data.
pub struct RequestState {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: DenyOutgoing,
    nn: NnCtx,
    limits: GuestLimits,
    deadline_hit: bool,
}

impl RequestState {
    /// A store's data for running a handler at build time (pre-initialisation): nothing granted,
    /// no models (every `load-by-name` is `not-found`), outgoing HTTP refused; the guest's output
    /// goes to the building process's own, for the author to see.
    fn at_build_time() -> RequestState {
        let name: Arc<str> = Arc::from("pre-initialisation");
        let tenant: Arc<str> = Arc::from("build");
        let budget = Arc::new(LogBudget::new(&name, &tenant));
        let limits = NnLimits { max_compute_bytes: 64 << 20, max_compute_calls: 0 };
        RequestState {
            table: ResourceTable::new(),
            wasi: WasiCtx::builder().inherit_stdout().inherit_stderr().allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false).build(),
            http: WasiHttpCtx::new(),
            hooks: DenyOutgoing { log: budget },
            nn: NnCtx::new(Arc::default(), InferOptions::default(), limits, name, tenant),
            limits: GuestLimits { memory: usize::MAX, used: 0, memory_exceeded: false },
            deadline_hit: false,
        }
    }
}

impl WasiView for RequestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for RequestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

impl NnState for RequestState {
    fn nn(&mut self) -> NnView<'_> {
        NnView {
            ctx: &mut self.nn,
            table: &mut self.table,
        }
    }
}

/// Guests may not make outgoing HTTP requests.
struct DenyOutgoing {
    log: Arc<LogBudget>,
}

impl WasiHttpHooks for DenyOutgoing {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        let uri = first_line(&request.uri().to_string()).chars().take(200).collect::<String>();
        if self.log.take(uri.len()) {
            tracing::info!(
                handler = %self.log.handler,
                tenant = %self.log.tenant,
                uri = %uri,
                "outgoing HTTP request denied"
            );
        }
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A component of `n` core modules, each with its own memory and a `grow-I` export that
    /// grows it by a number of 64 KiB pages.
    fn memories(n: usize) -> Vec<u8> {
        let mut text = String::from("(component\n");
        for i in 0..n {
            text += &format!(
                "(core module $m{i} (memory 1) (func (export \"grow\") (param i32) (result i32) (memory.grow (local.get 0))))\n\
                 (core instance $i{i} (instantiate $m{i}))\n\
                 (func (export \"grow-{i}\") (param \"pages\" u32) (result s32) (canon lift (core func $i{i} \"grow\")))\n"
            );
        }
        text += ")";
        wat::parse_str(text).expect("valid component text")
    }

    /// Grows each memory of a fresh two-memory instance by `pages` under a 128 MiB store limit:
    /// what the second grow returned (`Err` is a trap), and whether the limiter saw it exceeded.
    async fn grow_both(sandbox: &Sandbox, pages: u32) -> (Result<i32, wasmtime::Error>, bool) {
        let component = Component::new(&sandbox.engine, memories(2)).expect("compile");
        let limits = GuestLimits { memory: 128 << 20, used: 0, memory_exceeded: false };
        let mut store = Store::new(&sandbox.engine, limits);
        store.limiter(|limits| limits);
        store.set_epoch_deadline(10_000);
        let linker: Linker<GuestLimits> = Linker::new(&sandbox.engine);
        let instance = linker.instantiate_async(&mut store, &component).await.expect("instantiate");
        let mut last = Ok(0);
        for export in ["grow-0", "grow-1"] {
            let grow = instance.get_typed_func::<(u32,), (i32,)>(&mut store, export).expect("export");
            last = grow.call_async(&mut store, (pages,)).await.map(|(r,)| r);
            if last.is_err() {
                break;
            }
        }
        (last, store.data().memory_exceeded)
    }

    /// The memory limit is the store's, whatever the component's shape: two memories of 100 MiB
    /// each under a 128 MiB limit trap, where 2 x 50 MiB is fine.
    #[tokio::test]
    async fn two_memories_share_one_limit() {
        let sandbox = Sandbox::new(4, 256 << 20, false, SlotResetPolicy::Auto).expect("sandbox");
        let (result, exceeded) = grow_both(&sandbox, 1600).await;
        assert!(result.is_err() && exceeded, "2 x 100 MiB under 128 MiB: {result:?}");
        let (result, exceeded) = grow_both(&sandbox, 800).await;
        assert!(matches!(result, Ok(old) if old == 1) && !exceeded, "2 x 50 MiB: {result:?}");
    }

    /// A component with more memories than a handler needs is refused by the pool's
    /// per-component limit.
    #[tokio::test]
    async fn a_component_over_the_per_component_limits_cannot_instantiate() {
        let sandbox = Sandbox::new(4, 256 << 20, false, SlotResetPolicy::Auto).expect("sandbox");
        let bytes = memories(MAX_MEMORIES_PER_COMPONENT as usize + 1);
        let refused = match Component::new(&sandbox.engine, bytes) {
            Err(refused) => refused,
            Ok(component) => {
                let mut store = Store::new(&sandbox.engine, ());
                store.set_epoch_deadline(10_000);
                let linker: Linker<()> = Linker::new(&sandbox.engine);
                linker.instantiate_async(&mut store, &component).await.expect_err("too many memories")
            }
        };
        assert!(format!("{refused:#}").contains("memories"), "{refused:#}");
    }
}
