//! Write Kiln request handlers in a few lines.
//!
//! A handler is a `wasm32-wasip2` component that exports `wasi:http/incoming-handler` and imports
//! `wasi:nn`. This crate hides both behind a [`Request`] → [`Response`] function, with
//! [`Model::load`] and [`Model::infer`] for inference. The component stays standard: it runs
//! under Kiln and under `wasmtime serve -S nn` alike.
//!
//! # Example
//!
//! ```no_run
//! use kiln_guest::{Error, Handler, Model, Request, Response, Tensor};
//!
//! struct Doubler;
//!
//! impl Handler for Doubler {
//!     fn handle(request: Request) -> Result<Response, Error> {
//!         let values: Vec<f32> = request.json()?;
//!         let model = Model::load("doubler")?;
//!         let input = Tensor::from_f32(&[1, values.len() as u32], &values)?;
//!         let outputs = model.infer(&[("x", input)])?;
//!         let doubled = outputs.get("y")?.to_f32()?;
//!         Response::json(200, &doubled)
//!     }
//! }
//!
//! kiln_guest::export_handler!(Doubler);
//! ```

#![warn(missing_docs)]

mod http;
mod nn;
mod route;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use crate::http::{Request, Response};
pub use crate::nn::{DType, Model, Outputs, Tensor};
pub use crate::route::{RouteFn, Router};

use std::fmt;

/// A request handler. Each request runs `handle` in a fresh instance of the component.
pub trait Handler {
    /// Answers one request. An `Err` becomes a JSON `{"error": ...}` response with the error's
    /// [status](Error::status).
    fn handle(request: Request) -> Result<Response, Error>;
}

/// What went wrong, with the HTTP status it maps to and, for inference failures, wasi:nn's code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    status: u16,
    code: Option<ErrorCode>,
    message: String,
}

/// wasi:nn's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The inputs did not match the model.
    InvalidArgument,
    /// The graph encoding is not supported.
    InvalidEncoding,
    /// The operation timed out, or the model is overloaded.
    Timeout,
    /// The model failed while running.
    RuntimeError,
    /// The operation is not supported.
    UnsupportedOperation,
    /// A tensor or graph is too large.
    TooLarge,
    /// No model has that name (for this handler).
    NotFound,
    /// The operation is not allowed (for example loading a graph from bytes).
    Security,
    /// Anything else.
    Unknown,
}

impl Error {
    /// The client sent something the handler cannot use (HTTP 400).
    pub fn bad_request(message: impl Into<String>) -> Error {
        Error {
            status: 400,
            code: None,
            message: message.into(),
        }
    }

    /// The handler itself failed (HTTP 500).
    pub fn internal(message: impl Into<String>) -> Error {
        Error {
            status: 500,
            code: None,
            message: message.into(),
        }
    }

    /// An error with an explicit HTTP status.
    pub fn with_status(status: u16, message: impl Into<String>) -> Error {
        Error {
            status,
            code: None,
            message: message.into(),
        }
    }

    /// An inference error as wasi:nn reported it.
    pub fn inference(code: ErrorCode, message: impl Into<String>) -> Error {
        let status = match code {
            ErrorCode::InvalidArgument | ErrorCode::TooLarge => 400,
            ErrorCode::Timeout => 503,
            _ => 500,
        };
        Error {
            status,
            code: Some(code),
            message: message.into(),
        }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// wasi:nn's code, when the error came from inference.
    pub fn code(&self) -> Option<ErrorCode> {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "{code:?}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Error {
        Error::bad_request(format!("invalid JSON: {e}"))
    }
}

/// Exports a [`Handler`] as the component's `wasi:http/incoming-handler`.
///
/// # Pre-initialisation
///
/// `export_handler!(H, init = f)`, at the crate's top level, also exports `f` as
/// `wizer-initialize`. `kiln build` then runs
/// `f` once at build time and ships the memory it leaves (Wizer), so every request's fresh
/// instance starts with it: the place to build a vocabulary's hash map or parse an embedded
/// table, work a handler would otherwise redo on every request.
///
/// `f` should only fill what `handle` would also build on first use (a `OnceLock`, say): a
/// component built with plain `cargo build` is never pre-initialised and must answer the same.
/// While `f` runs there are no models, no HTTP and no files (such calls fail the build), and what
/// it reads from WASI's clocks or randomness is fixed at build time for every request (so is a
/// `HashMap`'s hash seed: fine for a table the handler only reads).
///
/// ```no_run
/// use std::collections::HashMap;
/// use std::sync::OnceLock;
/// use kiln_guest::{Error, Handler, Request, Response};
///
/// const VOCAB: &str = "[PAD]\n[UNK]\nhello\nworld";
///
/// fn vocabulary() -> &'static HashMap<&'static str, i64> {
///     static IDS: OnceLock<HashMap<&'static str, i64>> = OnceLock::new();
///     IDS.get_or_init(|| VOCAB.lines().zip(0..).collect())
/// }
///
/// struct Lookup;
///
/// impl Handler for Lookup {
///     fn handle(request: Request) -> Result<Response, Error> {
///         let word: String = request.json()?;
///         Response::json(200, &vocabulary().get(word.as_str()).copied().unwrap_or(1))
///     }
/// }
///
/// fn warm() {
///     vocabulary();
/// }
///
/// kiln_guest::export_handler!(Lookup, init = warm);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        struct __KilnIncomingHandler;

        impl $crate::__private::IncomingHandler for __KilnIncomingHandler {
            fn handle(
                request: $crate::__private::IncomingRequest,
                out: $crate::__private::ResponseOutparam,
            ) {
                $crate::__private::serve::<$handler>(request, out)
            }
        }

        $crate::__private::wasi::http::proxy::export!(__KilnIncomingHandler);
    };
    ($handler:ty, init = $init:path $(,)?) => {
        $crate::export_handler!($handler);

        fn __kiln_initialize() {
            $init()
        }

        #[allow(missing_docs, clippy::all, unreachable_pub, dead_code)]
        mod __kiln_pre_initialise {
            $crate::__private::wit_bindgen::generate!({
                inline: "package kiln:pre-initialise; world pre-initialise { export wizer-initialize: func(); }",
                world: "pre-initialise",
                runtime_path: "::kiln_guest::__private::wit_bindgen::rt",
            });

            struct Initialise;

            impl Guest for Initialise {
                fn wizer_initialize() {
                    super::__kiln_initialize()
                }
            }

            export!(Initialise);
        }
    };
}

/// The raw `wasi:nn` bindings, for what the typed API does not cover (for example calling
/// `load` with graph bytes, which Kiln refuses with `security`).
pub mod raw {
    pub use crate::nn::bindings::wasi::nn::*;
}

#[doc(hidden)]
pub mod __private {
    pub use crate::http::serve;
    pub use wasi;
    pub use wit_bindgen;
    pub use wasi::exports::http::incoming_handler::Guest as IncomingHandler;
    pub use wasi::http::types::{IncomingRequest, ResponseOutparam};
}
