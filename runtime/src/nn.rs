//! Kiln's own `wasi:nn` host: graphs are models from the deployment config, `compute` goes to the
//! model's executor.
//!
//! Guests see only the models their handler is allowed (`load-by-name`); raw graph bytes are never
//! accepted. Every input problem is a `wasi:nn` error the guest can read, never a trap.

use std::collections::HashMap;
use std::sync::Arc;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::executor::{InferError, InferOptions, ModelHandle};
use crate::tensor::{DType, HostTensor};

mod generated {
    wasmtime::component::bindgen!({
        world: "wasi:nn/ml",
        path: "../wit/wasi-nn.wit",
        with: {
            "wasi:nn/graph.graph": super::Graph,
            "wasi:nn/tensor.tensor": super::Tensor,
            "wasi:nn/inference.graph-execution-context": super::ExecutionContext,
            "wasi:nn/errors.error": super::NnError,
        },
        imports: {
            "wasi:nn/inference.[method]graph-execution-context.compute": async | trappable,
            default: trappable,
        },
    });
}

use generated::wasi::nn::{errors, graph, inference, tensor};
pub use generated::wasi::nn::errors::ErrorCode;

/// A model a guest has loaded.
pub struct Graph {
    model: ModelHandle,
}

/// An execution context over a loaded model.
pub struct ExecutionContext {
    model: ModelHandle,
}

/// A guest-created or model-produced tensor.
pub type Tensor = HostTensor;

/// A `wasi:nn` error as the guest sees it: a code and a message.
#[derive(Debug, Clone)]
pub struct NnError {
    pub code: ErrorCode,
    pub message: String,
}

/// Per-request state for `wasi:nn`: which models this guest may see, and how its inference is
/// scheduled.
#[derive(Clone, Default)]
pub struct NnCtx {
    models: Arc<HashMap<String, ModelHandle>>,
    options: InferOptions,
}

impl NnCtx {
    /// `models` is the handler's allow-list, already resolved to executors.
    pub fn new(models: Arc<HashMap<String, ModelHandle>>, options: InferOptions) -> NnCtx {
        NnCtx { models, options }
    }
}

/// The borrow of store data the generated bindings work on.
pub struct NnView<'a> {
    pub ctx: &'a NnCtx,
    pub table: &'a mut ResourceTable,
}

/// Store data that offers a [`NnView`].
pub trait NnState: Send {
    fn nn(&mut self) -> NnView<'_>;
}

struct Nn;

impl HasData for Nn {
    type Data<'a> = NnView<'a>;
}

/// Adds Kiln's `wasi:nn` imports to a linker.
pub fn add_to_linker<T: NnState + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    generated::Ml::add_to_linker::<T, Nn>(linker, T::nn)
}

type NnResult<T> = wasmtime::Result<Result<T, Resource<NnError>>>;

impl NnView<'_> {
    fn fail<T>(&mut self, code: ErrorCode, message: impl Into<String>) -> NnResult<T> {
        let error = NnError {
            code,
            message: message.into(),
        };
        tracing::debug!(code = ?error.code, "wasi:nn error: {}", error.message);
        Ok(Err(self.table.push(error)?))
    }
}

fn dtype(ty: tensor::TensorType) -> DType {
    match ty {
        tensor::TensorType::Fp16 => DType::F16,
        tensor::TensorType::Fp32 => DType::F32,
        tensor::TensorType::Fp64 => DType::F64,
        tensor::TensorType::Bf16 => DType::BF16,
        tensor::TensorType::U8 => DType::U8,
        tensor::TensorType::I32 => DType::I32,
        tensor::TensorType::I64 => DType::I64,
    }
}

fn tensor_type(dtype: DType) -> tensor::TensorType {
    match dtype {
        DType::F16 => tensor::TensorType::Fp16,
        DType::F32 => tensor::TensorType::Fp32,
        DType::F64 => tensor::TensorType::Fp64,
        DType::BF16 => tensor::TensorType::Bf16,
        DType::U8 => tensor::TensorType::U8,
        DType::I32 => tensor::TensorType::I32,
        DType::I64 => tensor::TensorType::I64,
    }
}

/// The wasi:nn code for an executor failure.
fn error_code(e: &InferError) -> ErrorCode {
    match e {
        InferError::Overloaded(_) | InferError::Timeout { .. } => ErrorCode::Timeout,
        InferError::NotReady { .. } | InferError::Runtime { .. } | InferError::Closed(_) => {
            ErrorCode::RuntimeError
        }
    }
}

impl graph::Host for NnView<'_> {
    fn load(
        &mut self,
        _builder: Vec<graph::GraphBuilder>,
        _encoding: graph::GraphEncoding,
        _target: graph::ExecutionTarget,
    ) -> NnResult<Resource<Graph>> {
        self.fail(
            ErrorCode::Security,
            "loading a graph from bytes is not allowed; use load-by-name with a deployed model",
        )
    }

    fn load_by_name(&mut self, name: String) -> NnResult<Resource<Graph>> {
        // Only the allow-list is consulted: a path-like name is simply a name that isn't there.
        match self.ctx.models.get(&name) {
            Some(model) => {
                let model = model.clone();
                Ok(Ok(self.table.push(Graph { model })?))
            }
            None => self.fail(ErrorCode::NotFound, format!("model '{name}' not found")),
        }
    }
}

impl graph::HostGraph for NnView<'_> {
    fn init_execution_context(
        &mut self,
        graph: Resource<Graph>,
    ) -> NnResult<Resource<ExecutionContext>> {
        let model = self.table.get(&graph)?.model.clone();
        Ok(Ok(self.table.push(ExecutionContext { model })?))
    }

    fn drop(&mut self, graph: Resource<Graph>) -> wasmtime::Result<()> {
        self.table.delete(graph)?;
        Ok(())
    }
}

impl inference::Host for NnView<'_> {}

impl inference::HostGraphExecutionContext for NnView<'_> {
    async fn compute(
        &mut self,
        ctx: Resource<ExecutionContext>,
        inputs: Vec<inference::NamedTensor>,
    ) -> NnResult<Vec<inference::NamedTensor>> {
        let model = self.table.get(&ctx)?.model.clone();
        // Inputs are consumed: their resources are freed whether or not the call succeeds.
        let mut named = Vec::with_capacity(inputs.len());
        for (name, tensor) in inputs {
            named.push((name, self.table.delete(tensor)?));
        }
        let arranged = match model.arrange_inputs(named) {
            Ok(arranged) => arranged,
            Err(e) => {
                return self.fail(
                    ErrorCode::InvalidArgument,
                    format!("model '{}': {e}", model.name()),
                );
            }
        };
        let outputs = match model.infer(arranged, self.ctx.options).await {
            Ok(outputs) => outputs,
            Err(e) => return self.fail(error_code(&e), e.to_string()),
        };
        let mut named = Vec::with_capacity(outputs.len());
        for (spec, tensor) in model.config().outputs.iter().zip(outputs) {
            named.push((spec.name.clone(), self.table.push(tensor)?));
        }
        Ok(Ok(named))
    }

    fn drop(&mut self, ctx: Resource<ExecutionContext>) -> wasmtime::Result<()> {
        self.table.delete(ctx)?;
        Ok(())
    }
}

impl tensor::Host for NnView<'_> {}

impl tensor::HostTensor for NnView<'_> {
    fn new(
        &mut self,
        dimensions: tensor::TensorDimensions,
        ty: tensor::TensorType,
        data: tensor::TensorData,
    ) -> wasmtime::Result<Resource<Tensor>> {
        // The constructor cannot return an error; a size mismatch is reported by `compute`,
        // which re-checks every input, so the guest gets `invalid-argument` and not a trap.
        let tensor = HostTensor {
            dtype: dtype(ty),
            shape: dimensions,
            data,
        };
        Ok(self.table.push(tensor)?)
    }

    fn dimensions(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&tensor)?.shape.clone())
    }

    fn ty(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<tensor::TensorType> {
        Ok(tensor_type(self.table.get(&tensor)?.dtype))
    }

    fn data(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&tensor)?.data.clone())
    }

    fn drop(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<()> {
        self.table.delete(tensor)?;
        Ok(())
    }
}

impl errors::Host for NnView<'_> {}

impl errors::HostError for NnView<'_> {
    fn code(&mut self, error: Resource<NnError>) -> wasmtime::Result<ErrorCode> {
        Ok(self.table.get(&error)?.code)
    }

    fn data(&mut self, error: Resource<NnError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&error)?.message.clone())
    }

    fn drop(&mut self, error: Resource<NnError>) -> wasmtime::Result<()> {
        self.table.delete(error)?;
        Ok(())
    }
}
