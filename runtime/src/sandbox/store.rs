//! Each request's store data: the WASI context that grants nothing, wasi:http without outgoing
//! requests, the guest's wasi:nn, its memory limiter; and the host interfaces linked for it.

use std::sync::Arc;

use wasmtime::Engine;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use super::first_line;
use super::limits::GuestLimits;
use super::log::LogBudget;
use super::nn::{self, NnCtx, NnLimits, NnState, NnView};
use crate::model::handle::InferOptions;

/// Kiln's host interfaces for handlers: the full WASI surface, so ordinary Rust guests
/// instantiate (std imports filesystem and environment), and a store's context then grants none
/// of it; wasi:http's types without outgoing requests; wasi:nn.
pub(super) fn host_linker(engine: &Engine) -> wasmtime::Result<Linker<RequestState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    nn::add_to_linker(&mut linker)?;
    Ok(linker)
}

/// Per-request store data.
pub struct RequestState {
    pub(super) table: ResourceTable,
    pub(super) wasi: WasiCtx,
    pub(super) http: WasiHttpCtx,
    pub(super) hooks: DenyOutgoing,
    pub(super) nn: NnCtx,
    pub(super) limits: GuestLimits,
    /// Set when the epoch callback stopped the guest at its deadline.
    pub(super) deadline_hit: bool,
}

impl RequestState {
    /// A store's data for running a handler at build time (pre-initialisation): nothing granted,
    /// no models (every `load-by-name` is `not-found`), outgoing HTTP refused; the guest's output
    /// goes to the building process's own, for the author to see.
    pub(super) fn at_build_time() -> RequestState {
        let name: Arc<str> = Arc::from("pre-initialisation");
        let tenant: Arc<str> = Arc::from("build");
        let budget = Arc::new(LogBudget::new(&name, &tenant, None));
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
pub(super) struct DenyOutgoing {
    pub(super) log: Arc<LogBudget>,
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
        let uri = request.uri().to_string();
        let uri = crate::telemetry::logging::printable(first_line(&uri), 200);
        if self.log.take(uri.len()) {
            tracing::info!(
                handler = %self.log.handler,
                tenant = %self.log.tenant,
                request_id = %self.log.request_id(),
                uri = %uri,
                "outgoing HTTP request denied"
            );
        }
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

