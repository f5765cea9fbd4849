//! The sandbox: one wasmtime engine, handlers compiled and pre-instantiated once, and a fresh
//! store per request.
//!
//! All limits live here: the pooling allocator (copy-on-write memory images), a 1 ms epoch tick
//! that yields busy guests back to the runtime, slows long-running ones and enforces the
//! wall-clock deadline, per-store memory and fuel limits, the import allow-list checked before a
//! component is accepted, and the response-size cap. The WASI context grants nothing: no files,
//! no environment, no sockets, no outgoing HTTP.
//!
//! By owner: the [`engine`] (its pool, its epoch ticker, checking and linking components), what
//! a [`component`] may import and export, a [`handler`] and its calls, each request's [`store`]
//! data, and beside them the guest's `wasi:nn` ([`nn`]), its [`limits`] and [`log`], the
//! response [`cache`] and build-time [`preinit`]ialisation.

pub mod cache;
pub mod component;
pub mod engine;
pub mod handler;
mod limits;
mod log;
pub mod nn;
pub mod preinit;
mod store;

pub(crate) use component::component_interface;
pub use component::{ComponentError, forbidden_imports};
pub use engine::{Sandbox, SlotReset, SlotResetPolicy};
pub use handler::{Activity, CallOptions, GuestError, GuestResponse, Handler, HandlerConfig, Lease, Origin};
pub use limits::SandboxLimits;
pub use store::RequestState;

/// The first line of an error's text: what a log line or a refusal shows of it.
fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

