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
pub struct Tensor {
    tensor: HostTensor,
    /// Bytes counted against the request's tensor budget (guest-created tensors only).
    counted: u64,
    /// Set when the guest's tensor was over the byte limit: its data was dropped on arrival,
    /// and `compute` answers `too-large`.
    oversize: Option<u64>,
}

impl Tensor {
    fn produced(tensor: HostTensor) -> Tensor {
        Tensor {
            tensor,
            counted: 0,
            oversize: None,
        }
    }
}

/// A `wasi:nn` error as the guest sees it: a code and a message.
#[derive(Debug, Clone)]
pub struct NnError {
    pub code: ErrorCode,
    pub message: String,
}

/// What one request may do with `wasi:nn`.
#[derive(Debug, Clone, Copy)]
pub struct NnLimits {
    /// Input bytes per `compute`, and bytes of guest-created tensors alive at once.
    pub max_compute_bytes: u64,
    pub max_compute_calls: u32,
}

/// The error that stops a guest calling `compute` once too often (it traps the guest).
#[derive(Debug, thiserror::Error)]
#[error("more than {0} compute calls in one request")]
pub struct ComputeCallLimit(pub u32);

/// Per-request state for `wasi:nn`: which models this guest may see, how its inference is
/// scheduled, and what it has used of its limits.
pub struct NnCtx {
    models: Arc<HashMap<String, ModelHandle>>,
    options: InferOptions,
    limits: NnLimits,
    handler: Arc<str>,
    tenant: Arc<str>,
    compute_calls: u32,
    /// Bytes of guest-created tensors alive now.
    live_bytes: u64,
}

impl NnCtx {
    /// `models` is the handler's allow-list, already resolved to executors; `handler` and
    /// `tenant` tag log lines.
    pub fn new(
        models: Arc<HashMap<String, ModelHandle>>,
        options: InferOptions,
        limits: NnLimits,
        handler: Arc<str>,
        tenant: Arc<str>,
    ) -> NnCtx {
        NnCtx {
            models,
            options,
            limits,
            handler,
            tenant,
            compute_calls: 0,
            live_bytes: 0,
        }
    }
}

/// The borrow of store data the generated bindings work on.
pub struct NnView<'a> {
    pub ctx: &'a mut NnCtx,
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
        // Refusals by policy are worth an operator's eye; input mistakes are the guest's business.
        if matches!(code, ErrorCode::Security | ErrorCode::NotFound | ErrorCode::TooLarge) {
            tracing::info!(
                handler = %self.ctx.handler,
                tenant = %self.ctx.tenant,
                code = ?error.code,
                "wasi:nn refused: {}",
                error.message
            );
        } else {
            tracing::debug!(
                handler = %self.ctx.handler,
                tenant = %self.ctx.tenant,
                code = ?error.code,
                "wasi:nn error: {}",
                error.message
            );
        }
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
        self.ctx.compute_calls += 1;
        if self.ctx.compute_calls > self.ctx.limits.max_compute_calls {
            // A guest that ignores errors would go on calling until its deadline: stop it here.
            return Err(ComputeCallLimit(self.ctx.limits.max_compute_calls).into());
        }
        // Inputs are consumed: their resources are freed whether or not the call succeeds.
        let limit = self.ctx.limits.max_compute_bytes;
        let mut named = Vec::with_capacity(inputs.len());
        let mut oversize = None;
        let mut total: u64 = 0;
        for (name, tensor) in inputs {
            let tensor = self.table.delete(tensor)?;
            self.ctx.live_bytes -= tensor.counted;
            if let Some(bytes) = tensor.oversize {
                oversize.get_or_insert((name.clone(), bytes));
            }
            total = total.saturating_add(tensor.tensor.data.len() as u64);
            named.push((name, tensor.tensor));
        }
        if let Some((name, bytes)) = oversize {
            return self.fail(
                ErrorCode::TooLarge,
                format!("tensor '{name}' needs {bytes} bytes, over the limit of {limit} bytes per compute"),
            );
        }
        if total > limit {
            return self.fail(
                ErrorCode::TooLarge,
                format!("inputs total {total} bytes, over the limit of {limit} bytes per compute"),
            );
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
            named.push((spec.name.clone(), self.table.push(Tensor::produced(tensor))?));
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
        // The constructor cannot return an error; every problem is reported by `compute`, so the
        // guest gets `too-large` or `invalid-argument` and not a trap. Nothing is allocated from
        // the declared dimensions, and data over the limit is dropped at once, so a request holds
        // at most its limit in tensors however many it makes.
        let dtype = dtype(ty);
        let declared = dimensions
            .iter()
            .try_fold(dtype.size() as u64, |n, &d| n.checked_mul(u64::from(d)))
            .unwrap_or(u64::MAX);
        let bytes = data.len() as u64;
        let limit = self.ctx.limits.max_compute_bytes;
        let needed = declared.max(bytes);
        let tensor = if needed > limit || self.ctx.live_bytes.saturating_add(bytes) > limit {
            drop(data);
            Tensor {
                tensor: HostTensor {
                    dtype,
                    shape: dimensions,
                    data: Vec::new(),
                },
                counted: 0,
                oversize: Some(needed.max(self.ctx.live_bytes.saturating_add(bytes))),
            }
        } else {
            self.ctx.live_bytes += bytes;
            Tensor {
                tensor: HostTensor {
                    dtype,
                    shape: dimensions,
                    data,
                },
                counted: bytes,
                oversize: None,
            }
        };
        Ok(self.table.push(tensor)?)
    }

    fn dimensions(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&tensor)?.tensor.shape.clone())
    }

    fn ty(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<tensor::TensorType> {
        Ok(tensor_type(self.table.get(&tensor)?.tensor.dtype))
    }

    fn data(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&tensor)?.tensor.data.clone())
    }

    fn drop(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<()> {
        let tensor = self.table.delete(tensor)?;
        self.ctx.live_bytes -= tensor.counted;
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
