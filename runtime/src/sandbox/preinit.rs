//! Build-time pre-initialisation (Wizer) of a handler component, for `kiln build`.
//!
//! A handler that opts in exports `wizer-initialize` (kiln-guest's `export_handler!(H, init =
//! f)`). It is instantiated once here, that function runs, and the component is rewritten with
//! the memory and globals it left, so every request's fresh instance starts from that state
//! instead of building it again.
//!
//! Only the snapshot needs wasmtime-wizer's own code; Kiln instantiates and calls the component
//! itself, on an engine of its own, so the crate's `wasmtime` feature (which would turn on
//! threads and GC in the server's engine too) is not needed. While initialising, the component
//! is linked against the same host interfaces a request gets, with less: no models (`load-by-name`
//! is `not-found`), no outgoing HTTP, no files or environment; its output goes to the terminal.
//! A request's state cannot be made in advance, and a build has no models.

use wasmtime::component::{Component, Instance, WasmList};
use wasmtime::{Config, Engine, Store};
use wasmtime_wizer::{ComponentInstanceState, Wizer};

use super::store::RequestState;

/// The export a handler opts in with: Wizer's default name, so `wasmtime-wizer`'s own command
/// line pre-initialises the same components.
pub const INIT_EXPORT: &str = "wizer-initialize";

/// Whether the component asks to be pre-initialised.
pub fn wants_pre_initialisation(bytes: &[u8]) -> Result<bool, String> {
    let (_, exports) = super::component::component_interface(bytes)?;
    Ok(exports.iter().any(|name| name == INIT_EXPORT))
}

/// Runs the component's `wizer-initialize` and returns the component rewritten with the state it
/// left. Fails, naming the cause, when the component is not a shape Wizer handles, or the
/// function traps (for example by panicking) or runs past `timeout`.
pub fn pre_initialise(bytes: &[u8], timeout: std::time::Duration) -> anyhow::Result<Vec<u8>> {
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    runtime.block_on(snapshot(bytes, timeout)).map_err(|e| anyhow::anyhow!("{e:#}"))
}

async fn snapshot(bytes: &[u8], timeout: std::time::Duration) -> wasmtime::Result<Vec<u8>> {
    let mut wizer = Wizer::new();
    // Wizer removes the function from the core module and from the component alike, but a
    // component made by wit-bindgen lifts the core export of the same name, which would then
    // point at nothing. Kept, it is harmless: no host calls it, and calling it again finds the
    // state already built.
    wizer.keep_init_func(true);
    let (context, instrumented) = wizer
        .instrument_component(bytes)
        .map_err(|e| e.context("Wizer cannot pre-initialise this component"))?;

    let mut config = Config::new();
    config.wasm_component_model(true).epoch_interruption(true);
    let engine = Engine::new(&config)?;
    let component = Component::new(&engine, &instrumented)?;
    let linker = super::store::host_linker(&engine)?;
    let mut store = Store::new(&engine, RequestState::at_build_time());
    // Nothing ticks until the function is called below.
    store.set_epoch_deadline(1);
    let instance = linker.instantiate_async(&mut store, &component).await?;
    let init = instance
        .get_typed_func::<(), ()>(&mut store, INIT_EXPORT)
        .map_err(|e| e.context(format!("`{INIT_EXPORT}` must be a function without parameters or results")))?;
    // One epoch tick at the timeout, counted from the call, ends a function that never returns.
    let ticker = engine.weak();
    std::thread::Builder::new().name("kiln-preinit-timeout".into()).spawn(move || {
        std::thread::sleep(timeout);
        if let Some(engine) = ticker.upgrade() {
            engine.increment_epoch();
        }
    })?;
    init.call_async(&mut store, ()).await.map_err(|e| {
        let timed_out = e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt);
        let why = if timed_out {
            format!("`{INIT_EXPORT}` ran past {} s (kiln build --init-timeout)", timeout.as_secs_f64())
        } else {
            format!(
                "`{INIT_EXPORT}` failed (while pre-initialising there are no models, no outgoing \
                 HTTP and no files)"
            )
        };
        e.context(why)
    })?;
    // Reading the state back is Wizer's own code: no deadline for it.
    store.set_epoch_deadline(1 << 40);
    let mut state = Snapshotting { store: &mut store, instance, failed: None };
    let snapshot = wizer.snapshot_component(&context, &mut state).await?;
    match state.failed {
        Some(e) => Err(e),
        None => Ok(snapshot),
    }
}

/// Wizer reads the instance's state through functions its instrumentation exported: one
/// instance export per core module, one function per memory or global. The snapshot API has no
/// error path, so the first failure is kept and returned once the snapshot ends.
struct Snapshotting<'a> {
    store: &'a mut Store<RequestState>,
    instance: Instance,
    failed: Option<wasmtime::Error>,
}

impl Snapshotting<'_> {
    /// Calls `instance#func`, or records why it could not.
    async fn call<R: wasmtime::component::Lift + Send + Sync + 'static>(&mut self, instance: &str, func: &str) -> Option<R> {
        if self.failed.is_some() {
            return None;
        }
        let result = async {
            let index = self
                .instance
                .get_export_index(&mut *self.store, None, instance)
                .and_then(|parent| self.instance.get_export_index(&mut *self.store, Some(&parent), func))
                .ok_or_else(|| wasmtime::format_err!("Wizer's instrumentation exports no {instance}#{func}"))?;
            let typed = self.instance.get_typed_func::<(), (R,)>(&mut *self.store, index)?;
            typed.call_async(&mut *self.store, ()).await.map(|(value,)| value)
        }
        .await;
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                self.failed = Some(e.context(format!("cannot read {instance}#{func} for the snapshot")));
                None
            }
        }
    }
}

impl ComponentInstanceState for Snapshotting<'_> {
    async fn call_func_ret_list_u8(&mut self, instance: &str, func: &str, contents: impl FnOnce(&[u8]) + Send) {
        if let Some(list) = self.call::<WasmList<u8>>(instance, func).await {
            contents(list.as_le_slice(&*self.store));
        }
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func).await.unwrap_or_default()
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func).await.unwrap_or_default()
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call::<f32>(instance, func).await.unwrap_or_default().to_bits()
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call::<f64>(instance, func).await.unwrap_or_default().to_bits()
    }
}
