//! The sandbox: one wasmtime engine, handlers compiled and pre-instantiated once, and a fresh
//! store per request.
//!
//! All limits live here: the pooling allocator (copy-on-write memory images), a 10 ms epoch tick
//! that both yields busy guests back to the runtime and enforces the wall-clock deadline, and a
//! per-store memory limit. The WASI context grants nothing: no files, no environment, no
//! sockets, no outgoing HTTP.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use tokio::io::AsyncWrite;
use tokio::sync::oneshot;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    Trap, UpdateDeadline,
};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode as HttpErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::config::HandlerConfig;
use crate::executor::{InferOptions, ModelHandle};
use crate::nn::{self, NnCtx, NnState, NnView};

/// How often the engine's epoch advances: the granularity of deadlines and of yielding.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Bytes of each memory and stack slot kept mapped between requests: a guest's 256 KiB stack
/// (see .cargo/config.toml) plus its data and first heap pages. Measured: 256 KiB leaves the
/// heap to page faults (-25 % echo throughput); 1 MiB only adds memset time.
const KEEP_RESIDENT: usize = 384 << 10;

/// Guest tables never need more than this many elements; more is an attack.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Lines a guest writes to stdout/stderr are cut at this length in the log.
const MAX_LOG_LINE: usize = 4096;

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
    #[error("handler '{handler}' answered with an error: {code:?}")]
    ErrorCode {
        handler: String,
        code: HttpErrorCode,
    },
    #[error("sandbox failure in handler '{handler}': {reason}")]
    Internal { handler: String, reason: String },
}

/// The shared engine and linker. Cheap to clone.
#[derive(Clone)]
pub struct Sandbox {
    engine: Engine,
    linker: Arc<Linker<RequestState>>,
}

impl Sandbox {
    /// Builds the engine with a pool of `max_instances` sandbox slots, each able to hold up to
    /// `max_memory_bytes` of linear memory, and starts the epoch ticker.
    pub fn new(max_instances: u32, max_memory_bytes: u64) -> wasmtime::Result<Sandbox> {
        let mut pool = PoolingAllocationConfig::default();
        // A Rust wasm32-wasip2 component is one main core module plus a few small adapter
        // modules; these totals leave room for that shape in every slot.
        pool.total_component_instances(max_instances)
            .total_core_instances(max_instances.saturating_mul(8))
            .total_memories(max_instances.saturating_mul(2))
            .total_tables(max_instances.saturating_mul(4))
            .total_stacks(max_instances)
            .max_memory_size(usize::try_from(max_memory_bytes).unwrap_or(usize::MAX))
            // Reset the first pages of a slot with memset instead of handing them back to the
            // kernel: a guest touches its stack and heap start on every request, and page
            // faults to map them again would cost more than the guest's own work.
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(64 << 10)
            .async_stack_keep_resident(KEEP_RESIDENT)
            .decommit_batch_size(64);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .memory_init_cow(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        start_epoch_ticker(&engine)
            .map_err(|e| wasmtime::format_err!("cannot start the epoch ticker thread: {e}"))?;

        let mut linker = Linker::new(&engine);
        // The full WASI surface is linked so ordinary Rust guests instantiate (std imports
        // filesystem and environment); the per-request context then grants none of it.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        nn::add_to_linker(&mut linker)?;
        Ok(Sandbox {
            engine,
            linker: Arc::new(linker),
        })
    }

    /// Compiles and pre-instantiates a handler's component. `models` is its allow-list.
    pub fn load_handler(
        &self,
        config: &HandlerConfig,
        models: HashMap<String, ModelHandle>,
    ) -> wasmtime::Result<Handler> {
        let bytes = std::fs::read(&config.component).map_err(|e| {
            wasmtime::format_err!("cannot read {}: {e}", config.component.display())
        })?;
        self.compile_handler(config, &bytes, models)
    }

    /// Compiles component bytes into a handler.
    pub fn compile_handler(
        &self,
        config: &HandlerConfig,
        bytes: &[u8],
        models: HashMap<String, ModelHandle>,
    ) -> wasmtime::Result<Handler> {
        let component = Component::new(&self.engine, bytes)?;
        let pre = ProxyPre::new(self.linker.instantiate_pre(&component)?)?;
        Ok(Handler {
            name: config.name.as_str().into(),
            pre,
            memory_limit: config.memory_limit_bytes,
            deadline: config.deadline,
            priority: config.priority,
            max_priority: config.max_priority,
            models: Arc::new(models),
        })
    }
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
    pre: ProxyPre<RequestState>,
    memory_limit: u64,
    deadline: Duration,
    priority: u8,
    max_priority: u8,
    models: Arc<HashMap<String, ModelHandle>>,
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
    ) -> Result<GuestResponse, GuestError> {
        let started = Instant::now();
        let deadline = started + self.deadline;
        let mut store = self.new_store(deadline, self.infer_options(options));
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
        let name = Arc::clone(&self.name);
        let limit = self.memory_limit;
        let budget = self.deadline;
        let mut guest = AbortOnDrop(Some(tokio::spawn(async move {
            let run = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, incoming, outparam)
                    .await
            };
            match tokio::time::timeout_at(deadline.into(), run).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(classify(&name, e, store.data(), limit, budget)),
                Err(_) => Err(GuestError::Deadline {
                    handler: name.to_string(),
                    deadline: budget,
                }),
            }
        })));

        let outcome = match receiver.await {
            Ok(Ok(response)) => Ok(response),
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

    fn new_store(&self, deadline: Instant, options: InferOptions) -> Store<RequestState> {
        let mut wasi = WasiCtx::builder();
        wasi.stdout(GuestLog::new(&self.name, "stdout"))
            .stderr(GuestLog::new(&self.name, "stderr"))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }));
        let state = RequestState {
            table: ResourceTable::new(),
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            hooks: DenyOutgoing,
            nn: NnCtx::new(Arc::clone(&self.models), options),
            limits: GuestLimits {
                memory: usize::try_from(self.memory_limit).unwrap_or(usize::MAX),
                memory_exceeded: false,
            },
            deadline_hit: false,
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|state| &mut state.limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut ctx| {
            if Instant::now() >= deadline {
                ctx.data_mut().deadline_hit = true;
                Err(Trap::Interrupt.into())
            } else {
                // Give the async worker back every tick so a busy guest cannot starve others.
                Ok(UpdateDeadline::Yield(1))
            }
        });
        store
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
    limit: u64,
    deadline: Duration,
) -> GuestError {
    let handler = handler.to_owned();
    if state.deadline_hit {
        return GuestError::Deadline { handler, deadline };
    }
    if state.limits.memory_exceeded {
        return GuestError::MemoryLimit { handler, limit };
    }
    let reason = match error.downcast_ref::<Trap>() {
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
            ctx: &self.nn,
            table: &mut self.table,
        }
    }
}

/// Guests may not make outgoing HTTP requests.
struct DenyOutgoing;

impl WasiHttpHooks for DenyOutgoing {
    fn send_request(
        &mut self,
        _request: http::Request<wasmtime_wasi_http::WasiBody>,
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
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

/// Memory and table limits for one store. A growth past the limit traps the guest.
struct GuestLimits {
    memory: usize,
    memory_exceeded: bool,
}

impl ResourceLimiter for GuestLimits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory {
            self.memory_exceeded = true;
            wasmtime::bail!("memory limit of {} MiB exceeded", self.memory >> 20);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// A guest's stdout or stderr, forwarded line by line to the server log, tagged with the handler.
#[derive(Clone)]
struct GuestLog {
    handler: Arc<str>,
    stream: &'static str,
}

impl GuestLog {
    fn new(handler: &Arc<str>, stream: &'static str) -> GuestLog {
        GuestLog {
            handler: Arc::clone(handler),
            stream,
        }
    }
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(GuestLogWriter {
            log: self.clone(),
            line: Vec::new(),
        })
    }
}

struct GuestLogWriter {
    log: GuestLog,
    line: Vec<u8>,
}

impl GuestLogWriter {
    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end_matches(['\r', '\n']);
        tracing::info!(target: "kiln::guest", handler = %self.log.handler, stream = self.log.stream, "{text}");
        self.line.clear();
    }
}

impl AsyncWrite for GuestLogWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        for &b in buf {
            if b == b'\n' {
                this.emit();
            } else if this.line.len() < MAX_LOG_LINE {
                this.line.push(b);
            }
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.line.is_empty() {
            this.emit();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for GuestLogWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}
