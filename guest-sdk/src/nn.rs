//! Models and tensors over `wasi:nn`.

use crate::{Error, ErrorCode};

#[allow(missing_docs, clippy::all, unreachable_pub)]
pub(crate) mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "wasi:nn/ml",
        generate_all,
    });
}

use bindings::wasi::nn::errors::{Error as NnError, ErrorCode as NnCode};
use bindings::wasi::nn::graph::Graph;
use bindings::wasi::nn::inference::GraphExecutionContext;
use bindings::wasi::nn::tensor::{Tensor as NnTensor, TensorType};

impl From<NnError> for Error {
    fn from(e: NnError) -> Error {
        let code = match e.code() {
            NnCode::InvalidArgument => ErrorCode::InvalidArgument,
            NnCode::InvalidEncoding => ErrorCode::InvalidEncoding,
            NnCode::Timeout => ErrorCode::Timeout,
            NnCode::RuntimeError => ErrorCode::RuntimeError,
            NnCode::UnsupportedOperation => ErrorCode::UnsupportedOperation,
            NnCode::TooLarge => ErrorCode::TooLarge,
            NnCode::NotFound => ErrorCode::NotFound,
            NnCode::Security => ErrorCode::Security,
            NnCode::Unknown => ErrorCode::Unknown,
        };
        Error::inference(code, e.data())
    }
}

/// Element types of a [`Tensor`]: the same type the server uses, so names and sizes agree.
pub use kiln_wire::DType;

/// wasi:nn's name for `dtype`.
fn nn_type(dtype: DType) -> TensorType {
    match dtype {
        DType::F16 => TensorType::Fp16,
        DType::F32 => TensorType::Fp32,
        DType::F64 => TensorType::Fp64,
        DType::BF16 => TensorType::Bf16,
        DType::U8 => TensorType::U8,
        DType::I32 => TensorType::I32,
        DType::I64 => TensorType::I64,
    }
}

fn from_nn_type(ty: TensorType) -> DType {
    match ty {
        TensorType::Fp16 => DType::F16,
        TensorType::Fp32 => DType::F32,
        TensorType::Fp64 => DType::F64,
        TensorType::Bf16 => DType::BF16,
        TensorType::U8 => DType::U8,
        TensorType::I32 => DType::I32,
        TensorType::I64 => DType::I64,
    }
}

/// A dense row-major tensor: shape, element type and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<u32>,
    dtype: DType,
    data: Vec<u8>,
}

macro_rules! typed {
    ($from:ident, $to:ident, $t:ty, $dtype:expr, $n:expr) => {
        #[doc = concat!("A `", stringify!($t), "` tensor of `shape` from row-major `values`.")]
        pub fn $from(shape: &[u32], values: &[$t]) -> Result<Tensor, Error> {
            let mut data = Vec::with_capacity(values.len() * $n);
            for v in values {
                data.extend_from_slice(&v.to_le_bytes());
            }
            Tensor::from_bytes(shape, $dtype, data)
        }

        #[doc = concat!("The elements as `", stringify!($t), "`; an error if the dtype differs.")]
        pub fn $to(&self) -> Result<Vec<$t>, Error> {
            self.expect($dtype)?;
            Ok(self
                .data
                .chunks_exact($n)
                .map(|c| {
                    let mut b = [0u8; $n];
                    b.copy_from_slice(c);
                    <$t>::from_le_bytes(b)
                })
                .collect())
        }
    };
}

impl Tensor {
    /// A tensor from raw little-endian bytes; the length must match `shape` and `dtype`.
    pub fn from_bytes(shape: &[u32], dtype: DType, data: Vec<u8>) -> Result<Tensor, Error> {
        // The same count the server checks tensors against.
        let elements = kiln_wire::dtype::element_count(shape)
            .ok_or_else(|| Error::bad_request(format!("tensor shape {shape:?} is too large")))?;
        if kiln_wire::dtype::byte_len(dtype, shape) != Some(data.len()) {
            return Err(Error::bad_request(format!(
                "a {dtype:?} tensor of shape {shape:?} needs {elements} elements, got {} bytes",
                data.len()
            )));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            data,
        })
    }

    typed!(from_f32, to_f32, f32, DType::F32, 4);
    typed!(from_f64, to_f64, f64, DType::F64, 8);
    typed!(from_i32, to_i32, i32, DType::I32, 4);
    typed!(from_i64, to_i64, i64, DType::I64, 8);

    /// A `u8` tensor of `shape` from row-major `values`.
    pub fn from_u8(shape: &[u32], values: &[u8]) -> Result<Tensor, Error> {
        Tensor::from_bytes(shape, DType::U8, values.to_vec())
    }

    /// The elements as `u8`; an error if the dtype differs.
    pub fn to_u8(&self) -> Result<Vec<u8>, Error> {
        self.expect(DType::U8)?;
        Ok(self.data.clone())
    }

    /// The shape.
    pub fn shape(&self) -> &[u32] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    fn expect(&self, dtype: DType) -> Result<(), Error> {
        if self.dtype == dtype {
            Ok(())
        } else {
            Err(Error::internal(format!(
                "tensor is {:?}, not {dtype:?}",
                self.dtype
            )))
        }
    }
}

/// A model this handler may use, loaded by its deployment name.
///
/// # Staying portable
///
/// Kiln passes inputs and outputs by name. Other `wasi:nn` hosts may not: `wasmtime serve -S nn`
/// with its PyTorch backend passes inputs by position and answers with one output named
/// `output`. A handler that declares the model's signature with [`Model::with_signature`] runs
/// unchanged on both: its inputs are sent in the declared order whatever order it lists them
/// in, and [`Outputs::get`] finds an output by its declared name on a host that names outputs
/// otherwise (see there for the exact rule).
#[derive(Debug)]
pub struct Model {
    name: String,
    inner: Inner,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

#[derive(Debug)]
enum Inner {
    // On the host only stand-ins are made.
    #[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
    Wasi {
        // Kept alive for as long as the execution context that came from it.
        _graph: Graph,
        context: GraphExecutionContext,
    },
    /// A stand-in from [`crate::testing::serve_model`], in a test on the host.
    #[cfg(not(target_arch = "wasm32"))]
    StandIn(crate::testing::StandIn),
}

impl Model {
    /// Loads a model by the name it was deployed under: `"m"` is its latest version served,
    /// `"m@2"` version 2. Handlers only see the models their deployment allows; any other name
    /// is `not-found`, and a string that is not a name (`NAME` or `NAME@VERSION`, NAME being 1-64
    /// of `a-z A-Z 0-9 - _ .` not starting with `.`; so no `/`, `..` or NUL) is
    /// `invalid-argument`.
    pub fn load(name: &str) -> Result<Model, Error> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            // On the host there is no wasi:nn: only the test's stand-ins answer.
            let stand_in = crate::testing::stand_in(name)?;
            Ok(Model { name: name.to_owned(), inner: Inner::StandIn(stand_in), inputs: Vec::new(), outputs: Vec::new() })
        }
        #[cfg(target_arch = "wasm32")]
        {
            let graph = bindings::wasi::nn::graph::load_by_name(name)?;
            let context = graph.init_execution_context()?;
            Ok(Model { name: name.to_owned(), inner: Inner::Wasi { _graph: graph, context }, inputs: Vec::new(), outputs: Vec::new() })
        }
    }

    /// Declares the model's inputs and outputs by name, each in the model's own order (a
    /// TorchScript module's `forward` arguments, and what it returns): what keeps the handler
    /// portable to hosts that pass tensors by position (see [`Model`]).
    ///
    /// ```no_run
    /// # use kiln_guest::{Model, Tensor};
    /// # fn run(ids: Tensor, mask: Tensor) -> Result<(), kiln_guest::Error> {
    /// let model = Model::load("minilm")?.with_signature(&["input_ids", "attention_mask"], &["last_hidden_state"]);
    /// // Sent as input_ids, attention_mask, whatever the order here.
    /// let outputs = model.infer(&[("attention_mask", mask), ("input_ids", ids)])?;
    /// let hidden = outputs.get("last_hidden_state")?;
    /// # Ok(()) }
    /// ```
    pub fn with_signature(mut self, inputs: &[&str], outputs: &[&str]) -> Model {
        self.inputs = inputs.iter().map(|&name| name.to_owned()).collect();
        self.outputs = outputs.iter().map(|&name| name.to_owned()).collect();
        self
    }

    /// The name the model was loaded by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs the model on named inputs and returns its named outputs.
    ///
    /// With a declared signature ([`Model::with_signature`]) the inputs are sent in its order,
    /// and each declared input must be given exactly once; without one, in the order given.
    ///
    /// Concurrent requests to the same model may be batched together by the host; each caller
    /// gets exactly its own rows back.
    pub fn infer(&self, inputs: &[(&str, Tensor)]) -> Result<Outputs, Error> {
        let ordered = in_declared_order(&self.name, &self.inputs, inputs)?;
        let declared = self.outputs.clone();
        let context = match &self.inner {
            Inner::Wasi { context, .. } => context,
            #[cfg(not(target_arch = "wasm32"))]
            Inner::StandIn(stand_in) => {
                let given: Vec<(&str, Tensor)> = ordered.iter().map(|&(name, t)| (name, t.clone())).collect();
                return stand_in.infer(&given).map(|tensors| Outputs { tensors, declared });
            }
        };
        let named: Vec<(String, NnTensor)> = ordered
            .iter()
            .map(|(name, t)| {
                (
                    (*name).to_owned(),
                    NnTensor::new(&t.shape, nn_type(t.dtype), &t.data),
                )
            })
            .collect();
        let outputs = context.compute(named)?;
        let tensors = outputs
            .into_iter()
            .map(|(name, t)| {
                let tensor = Tensor {
                    shape: t.dimensions(),
                    dtype: from_nn_type(t.ty()),
                    data: t.data(),
                };
                (name, tensor)
            })
            .collect();
        Ok(Outputs { tensors, declared })
    }
}

/// `given` in the `declared` order; as given when nothing is declared. Every declared input must
/// be given once, and nothing else.
fn in_declared_order<'a>(model: &str, declared: &[String], given: &'a [(&'a str, Tensor)]) -> Result<Vec<(&'a str, &'a Tensor)>, Error> {
    if declared.is_empty() {
        return Ok(given.iter().map(|(name, t)| (*name, t)).collect());
    }
    if let Some((extra, _)) = given.iter().find(|(name, _)| !declared.iter().any(|d| d == name)) {
        return Err(Error::internal(format!("model '{model}' declares no input '{extra}' (it declares {declared:?})")));
    }
    declared
        .iter()
        .map(|name| {
            let mut found = given.iter().filter(|(n, _)| n == name);
            match (found.next(), found.next()) {
                (Some((n, t)), None) => Ok((*n, t)),
                (None, _) => Err(Error::internal(format!("model '{model}' needs input '{name}', which was not given"))),
                (Some(_), Some(_)) => Err(Error::internal(format!("input '{name}' of model '{model}' was given twice"))),
            }
        })
        .collect()
}

/// Named outputs of one inference, and the output names the handler declared for its model.
#[derive(Debug, Clone, PartialEq)]
pub struct Outputs {
    tensors: Vec<(String, Tensor)>,
    declared: Vec<String>,
}

impl Outputs {
    /// The output called `name`, found the same way on every host:
    ///
    /// 1. the output the host gave that name (Kiln names every output as the model's config
    ///    does);
    /// 2. else, when the host named none of the outputs by a declared name and gave as many as
    ///    were declared ([`Model::with_signature`]), the one at `name`'s declared position (a
    ///    host that names outputs by position, or `output` for the only one, as `wasmtime serve
    ///    -S nn` does);
    /// 3. else, when nothing was declared and the host gave exactly one output, that one.
    ///
    /// Anything else is an error naming what the host gave: with several outputs and no way
    /// to tell which is which, it never guesses.
    pub fn get(&self, name: &str) -> Result<&Tensor, Error> {
        if let Some((_, tensor)) = self.tensors.iter().find(|(n, _)| n == name) {
            return Ok(tensor);
        }
        let given: Vec<&str> = self.tensors.iter().map(|(n, _)| n.as_str()).collect();
        if self.declared.is_empty() {
            return match self.tensors.as_slice() {
                [(_, only)] => Ok(only),
                _ => Err(Error::internal(format!("the model has no output '{name}' (it has {given:?})"))),
            };
        }
        let Some(position) = self.declared.iter().position(|d| d == name) else {
            return Err(Error::internal(format!(
                "'{name}' is not one of the model's declared outputs {:?} (the host gave {given:?})",
                self.declared
            )));
        };
        let named_by_declaration = given.iter().any(|g| self.declared.iter().any(|d| d == g));
        if named_by_declaration {
            return Err(Error::internal(format!("the model has no output '{name}' (the host gave {given:?})")));
        }
        if self.tensors.len() == self.declared.len() {
            return Ok(&self.tensors[position].1);
        }
        Err(Error::internal(format!(
            "the model has no output '{name}': the host gave {given:?} for declared outputs {:?}, \
             so which is which cannot be told",
            self.declared
        )))
    }

    /// All outputs in the order the host gave them (Kiln: the model's order).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(value: f32) -> Tensor {
        Tensor::from_f32(&[1], &[value]).expect("one value")
    }

    fn outputs(names: &[&str], declared: &[&str]) -> Outputs {
        Outputs {
            tensors: names.iter().zip(0..).map(|(n, i)| ((*n).to_owned(), tensor(i as f32))).collect(),
            declared: declared.iter().map(|&name| name.to_owned()).collect(),
        }
    }

    fn value(result: Result<&Tensor, Error>) -> Result<f32, String> {
        result.map(|t| t.to_f32().expect("f32")[0]).map_err(|e| e.message().to_owned())
    }

    #[test]
    fn an_output_is_found_by_its_name_first_on_every_host() {
        assert_eq!(value(outputs(&["logits"], &[]).get("logits")), Ok(0.0));
        assert_eq!(value(outputs(&["a", "b"], &["a", "b"]).get("b")), Ok(1.0));
        // The host's names win over positions: b is where the host says, not where declared.
        assert_eq!(value(outputs(&["b", "a"], &["a", "b"]).get("b")), Ok(0.0));
    }

    #[test]
    fn the_only_output_under_another_name_is_that_output() {
        // wasmtime serve -S nn: one output, named "output".
        assert_eq!(value(outputs(&["output"], &[]).get("logits")), Ok(0.0));
        assert_eq!(value(outputs(&["output"], &["logits"]).get("logits")), Ok(0.0));
    }

    #[test]
    fn several_outputs_under_other_names_are_taken_by_declared_position_only() {
        // A host naming outputs by position, with as many as were declared.
        assert_eq!(value(outputs(&["0", "1"], &["scores", "boxes"]).get("boxes")), Ok(1.0));
        // Undeclared: several outputs, none of that name, so no guess.
        let error = value(outputs(&["0", "1"], &[]).get("boxes")).expect_err("ambiguous");
        assert!(error.contains("no output 'boxes'") && error.contains("[\"0\", \"1\"]"), "{error}");
        // Declared two, the host gave one: which one it is cannot be told.
        let error = value(outputs(&["output"], &["scores", "boxes"]).get("scores")).expect_err("ambiguous");
        assert!(error.contains("cannot be told"), "{error}");
    }

    #[test]
    fn a_missing_name_is_an_error_naming_what_there_is() {
        // Named by declaration, and this one is not among them: missing, not guessed.
        let error = value(outputs(&["scores", "extra"], &["scores", "boxes"]).get("boxes")).expect_err("missing");
        assert!(error.contains("no output 'boxes'") && error.contains("\"extra\""), "{error}");
        let error = value(outputs(&["scores"], &["scores"]).get("labels")).expect_err("not declared");
        assert!(error.contains("not one of the model's declared outputs"), "{error}");
        let error = value(outputs(&["a", "b"], &[]).get("c")).expect_err("missing");
        assert!(error.contains("no output 'c'") && error.contains("\"a\""), "{error}");
    }

    #[test]
    fn inputs_go_in_the_declared_order_whatever_order_they_are_given_in() {
        let given = [("attention_mask", tensor(1.0)), ("input_ids", tensor(0.0))];
        let declared = ["input_ids".to_owned(), "attention_mask".to_owned()];
        let ordered = in_declared_order("minilm", &declared, &given).expect("all given");
        assert_eq!(ordered.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["input_ids", "attention_mask"]);
        // Undeclared: as given.
        let as_given = in_declared_order("minilm", &[], &given).expect("as given");
        assert_eq!(as_given.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["attention_mask", "input_ids"]);
        let missing = in_declared_order("minilm", &declared, &given[..1]).expect_err("one missing");
        assert!(missing.message().contains("needs input 'input_ids'"), "{}", missing.message());
        let extra = [("input_ids", tensor(0.0)), ("attention_mask", tensor(1.0)), ("token_type_ids", tensor(0.0))];
        let error = in_declared_order("minilm", &declared, &extra).expect_err("undeclared input");
        assert!(error.message().contains("declares no input 'token_type_ids'"), "{}", error.message());
        let twice = [("input_ids", tensor(0.0)), ("input_ids", tensor(0.0)), ("attention_mask", tensor(1.0))];
        assert!(in_declared_order("minilm", &declared, &twice).is_err());
    }
}
