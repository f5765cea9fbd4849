//! The engine every handler runs on: its pool of sandbox slots and how they are reset, the epoch
//! ticker that enforces deadlines, and checking and linking a component before it becomes a
//! handler.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use super::component::{ComponentError, HANDLER_EXPORT, component_interface, forbidden_imports};
use super::first_line;
use super::handler::{Activity, Handler, HandlerConfig, Origin};
use super::store::{RequestState, host_linker};
use crate::model::table::ModelTable;

/// How often the engine's epoch advances: the granularity of deadlines and of yielding. A busy
/// guest gives its worker thread back every tick, so this bounds how long it can delay others.
const EPOCH_TICK: Duration = Duration::from_millis(1);

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

impl SlotResetPolicy {
    /// As `[server] slot_reset` spells it.
    pub fn name(self) -> &'static str {
        match self {
            SlotResetPolicy::Auto => "auto",
            SlotResetPolicy::Memset => "memset",
        }
    }
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

/// The shared engine and linker. Cheap to clone.
#[derive(Clone)]
pub struct Sandbox {
    engine: Engine,
    linker: Arc<Linker<RequestState>>,
    metered: bool,
    reset: SlotReset,
    activity: Arc<Activity>,
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
        Ok(Handler::new(config, pre, models, origin, self.metered, Arc::clone(&self.activity)))
    }

    /// Instantiation times and running guests, over every handler of this engine.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::limits::GuestLimits;
    use wasmtime::Store;

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
