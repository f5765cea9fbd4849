//! Kiln: a model server whose request handlers are WebAssembly components, each request in a
//! fresh sandbox, calling Kiln's own `wasi:nn` on libtorch.
//!
//! The request path flows one way: [`api`] (HTTP) → [`sandbox`] (wasmtime) → [`nn`] (the
//! `wasi:nn` host) → [`executor`] (the per-model queue) → [`backend`] (libtorch).

#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod backend;
pub mod batch;
pub mod bench;
pub mod cli;
pub mod config;
pub mod executor;
pub mod gpu;
pub mod histogram;
pub mod keys;
pub mod nn;
pub mod placement;
pub mod sandbox;
pub mod scaler;
pub mod server;
pub mod state;
pub mod telemetry;
pub mod tenancy;
pub mod tensor;
