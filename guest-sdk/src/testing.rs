//! Runs a handler on the host, in an ordinary `cargo test`, with stand-in models: the whole
//! request path of the guest (routing, parsing, pre- and post-processing, errors as the client
//! sees them) without a server. Only on non-wasm targets.
//!
//! ```
//! use kiln_guest::testing::{call, serve_model};
//! use kiln_guest::{Error, Handler, Model, Request, Response, Tensor};
//!
//! struct Doubler;
//!
//! impl Handler for Doubler {
//!     fn handle(request: Request) -> Result<Response, Error> {
//!         let values: Vec<f32> = request.json()?;
//!         let input = Tensor::from_f32(&[1, values.len() as u32], &values)?;
//!         let outputs = Model::load("doubler")?.infer(&[("x", input)])?;
//!         Response::json(200, &outputs.get("y")?.to_f32()?)
//!     }
//! }
//!
//! // The model the handler loads, answered here: each value doubled.
//! serve_model("doubler", |inputs| {
//!     let x = inputs[0].1.to_f32()?;
//!     let y: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
//!     Ok(vec![("y".to_owned(), Tensor::from_f32(&[1, y.len() as u32], &y)?)])
//! });
//! let response = call::<Doubler>(Request::new("POST", "/", b"[1.5, 2]".to_vec()));
//! assert_eq!((response.status(), response.body()), (200, &b"[3.0,4.0]"[..]));
//! // A body that is not JSON is the 400 a client would get.
//! let response = call::<Doubler>(Request::new("POST", "/", b"oops".to_vec()));
//! assert_eq!(response.status(), 400);
//! ```

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::{Error, ErrorCode, Handler, Request, Response, Tensor};

/// What a stand-in model computes: named inputs in, named outputs out.
type Compute = dyn Fn(&[(&str, Tensor)]) -> Result<Vec<(String, Tensor)>, Error>;

/// A model served by [`serve_model`].
#[derive(Clone)]
pub(crate) struct StandIn(Rc<Compute>);

impl std::fmt::Debug for StandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StandIn")
    }
}

impl StandIn {
    pub(crate) fn infer(&self, inputs: &[(&str, Tensor)]) -> Result<Vec<(String, Tensor)>, Error> {
        (self.0)(inputs)
    }
}

thread_local! {
    // Per test thread, so tests running side by side keep their own models.
    static MODELS: RefCell<HashMap<String, StandIn>> = RefCell::new(HashMap::new());
}

/// Serves `name` (as `Model::load` asks for it) with `compute`, on this thread, until the
/// thread ends or another call replaces it.
pub fn serve_model(name: &str, compute: impl Fn(&[(&str, Tensor)]) -> Result<Vec<(String, Tensor)>, Error> + 'static) {
    MODELS.with(|models| models.borrow_mut().insert(name.to_owned(), StandIn(Rc::new(compute))));
}

/// Serves `name` as a host that passes tensors by position does (`wasmtime serve -S nn` with
/// its PyTorch backend): `compute` sees the inputs in the order the handler sent them, named
/// `"0"`, `"1"`, ...; it may answer with only one output, which the handler gets named
/// `output`. A handler whose tests pass against this and [`serve_model`] alike runs on both
/// hosts (docs/PORTABILITY.md in Kiln's repository).
pub fn serve_model_positionally(name: &str, compute: impl Fn(&[(&str, Tensor)]) -> Result<Vec<(String, Tensor)>, Error> + 'static) {
    let model = name.to_owned();
    serve_model(name, move |inputs| {
        let positions: Vec<String> = (0..inputs.len()).map(|i| i.to_string()).collect();
        let positional: Vec<(&str, Tensor)> = positions.iter().map(String::as_str).zip(inputs.iter().map(|(_, t)| t.clone())).collect();
        match compute(&positional)?.as_slice() {
            [(_, only)] => Ok(vec![("output".to_owned(), only.clone())]),
            outputs => Err(Error::inference(
                ErrorCode::RuntimeError,
                format!("model '{model}' answered {} outputs; a positional host returns exactly one", outputs.len()),
            )),
        }
    });
}

pub(crate) fn stand_in(name: &str) -> Result<StandIn, Error> {
    MODELS.with(|models| models.borrow().get(name).cloned()).ok_or_else(|| {
        Error::inference(
            ErrorCode::NotFound,
            format!("no model '{name}' here: a test serves one with kiln_guest::testing::serve_model"),
        )
    })
}

/// Runs handler `H` on `request` and answers as the component would: its response, or its
/// error as `{"error": ...}` with the error's status.
pub fn call<H: Handler>(request: Request) -> Response {
    crate::http::respond(H::handle(request))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Model;

    #[test]
    fn a_model_no_test_serves_is_not_found_naming_how_to_serve_one() {
        let error = Model::load("unserved").expect_err("nothing serves it");
        assert_eq!(error.code(), Some(ErrorCode::NotFound));
        assert!(error.message().contains("serve_model"), "{error}");
    }

    #[test]
    fn a_stand_in_answers_with_named_outputs_and_its_errors_reach_the_client() {
        serve_model("echo", |inputs| Ok(vec![("same".to_owned(), inputs[0].1.clone())]));
        let input = Tensor::from_i64(&[2], &[4, 5]).expect("tensor");
        let model = Model::load("echo").expect("served").with_signature(&["x"], &["same"]);
        let outputs = model.infer(&[("x", input)]).expect("answers");
        assert_eq!(outputs.get("same").expect("named").to_i64().expect("i64"), vec![4, 5]);
        assert!(outputs.get("other").is_err(), "not a declared output");

        // As a positional host: inputs by position, the one output named "output".
        serve_model_positionally("echo", |inputs| {
            assert_eq!(inputs.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["0", "1"]);
            Ok(vec![("anything".to_owned(), inputs[1].1.clone())])
        });
        let model = Model::load("echo").expect("served").with_signature(&["a", "b"], &["same"]);
        let b = Tensor::from_i64(&[1], &[7]).expect("tensor");
        let a = Tensor::from_i64(&[1], &[6]).expect("tensor");
        let outputs = model.infer(&[("b", b), ("a", a)]).expect("answers");
        assert_eq!(outputs.iter().map(|(n, _)| n).collect::<Vec<_>>(), ["output"]);
        assert_eq!(outputs.get("same").expect("by declared position").to_i64().expect("i64"), vec![7]);

        struct Failing;
        impl Handler for Failing {
            fn handle(_: Request) -> Result<Response, Error> {
                Err(Model::load("broken")?.infer(&[]).expect_err("fails"))
            }
        }
        serve_model("broken", |_| Err(Error::inference(ErrorCode::InvalidArgument, "input 'x' is missing")));
        let response = call::<Failing>(Request::new("GET", "/", Vec::new()));
        assert_eq!(response.status(), 400);
        assert!(String::from_utf8_lossy(response.body()).contains("input 'x' is missing"));
    }
}
