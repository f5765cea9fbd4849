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
#[derive(Debug)]
pub struct Model {
    name: String,
    inner: Inner,
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
            Ok(Model { name: name.to_owned(), inner: Inner::StandIn(stand_in) })
        }
        #[cfg(target_arch = "wasm32")]
        {
            let graph = bindings::wasi::nn::graph::load_by_name(name)?;
            let context = graph.init_execution_context()?;
            Ok(Model { name: name.to_owned(), inner: Inner::Wasi { _graph: graph, context } })
        }
    }

    /// The name the model was loaded by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs the model on named inputs and returns its named outputs.
    ///
    /// Concurrent requests to the same model may be batched together by the host; each caller
    /// gets exactly its own rows back.
    pub fn infer(&self, inputs: &[(&str, Tensor)]) -> Result<Outputs, Error> {
        let context = match &self.inner {
            Inner::Wasi { context, .. } => context,
            #[cfg(not(target_arch = "wasm32"))]
            Inner::StandIn(stand_in) => return stand_in.infer(inputs).map(Outputs),
        };
        let named: Vec<(String, NnTensor)> = inputs
            .iter()
            .map(|(name, t)| {
                (
                    (*name).to_owned(),
                    NnTensor::new(&t.shape, nn_type(t.dtype), &t.data),
                )
            })
            .collect();
        let outputs = context.compute(named)?;
        Ok(Outputs(
            outputs
                .into_iter()
                .map(|(name, t)| {
                    let tensor = Tensor {
                        shape: t.dimensions(),
                        dtype: from_nn_type(t.ty()),
                        data: t.data(),
                    };
                    (name, tensor)
                })
                .collect(),
        ))
    }
}

/// Named outputs of one inference.
#[derive(Debug, Clone, PartialEq)]
pub struct Outputs(Vec<(String, Tensor)>);

impl Outputs {
    /// The output called `name`; an error naming the outputs there are if it is missing.
    pub fn get(&self, name: &str) -> Result<&Tensor, Error> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| {
                let names: Vec<&str> = self.0.iter().map(|(n, _)| n.as_str()).collect();
                Error::internal(format!("the model has no output '{name}' (it has {names:?})"))
            })
    }

    /// All outputs in the model's order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.0.iter().map(|(n, t)| (n.as_str(), t))
    }
}
