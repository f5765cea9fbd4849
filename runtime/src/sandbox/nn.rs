//! Kiln's own `wasi:nn` host: graphs are models from the deployment config, `compute` goes to the
//! model's executor.
//!
//! Guests see only the models their handler is allowed (`load-by-name`); raw graph bytes are never
//! accepted. Every input problem is a `wasi:nn` error the guest can read, never a trap.

use std::collections::HashMap;
use std::sync::Arc;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::model::error::InferError;
use crate::model::handle::{Expectation, InferOptions, ModelHandle};
use crate::model::tensor::{DType, HostTensor};

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
    /// Bytes counted against the request's host budget.
    counted: u64,
    /// Set when the guest's tensor could not be taken as it was: its data (or dimensions) were
    /// dropped on arrival, and `compute` says why.
    problem: Option<TensorProblem>,
}

/// Why a guest-created tensor was not kept as given.
#[derive(Debug, Clone, Copy)]
enum TensorProblem {
    /// It needed this many bytes, over the limit.
    TooLarge(u64),
    /// It had this many dimensions, over [`MAX_DIMENSIONS`].
    TooManyDimensions(usize),
}

/// A `wasi:nn` error as the guest sees it: a code and a message.
#[derive(Debug, Clone)]
pub struct NnError {
    pub code: ErrorCode,
    pub message: String,
}

/// Longest model name `load-by-name` looks up; a longer one is not a name that exists.
pub const MAX_NAME_BYTES: usize = 256;

/// Whether `name` has the form of a model name a guest may ask for: `NAME` or `NAME@VERSION`.
fn model_name_grammar(name: &str) -> bool {
    name.len() <= MAX_NAME_BYTES
        && crate::model::spec::split_version(name).is_some_and(|(base, _)| crate::model::spec::is_name(base))
}

/// Most dimensions a tensor may have (the config allows no model more).
pub const MAX_DIMENSIONS: usize = 8;

/// What each resource a guest holds (graph, context, error, tensor) costs against the request's
/// host budget beyond its own bytes: the table entry and bookkeeping.
const RESOURCE_OVERHEAD: u64 = 256;

/// The error that stops a guest whose `wasi:nn` resources outgrow its host budget (it traps).
#[derive(Debug, thiserror::Error)]
#[error("wasi:nn resources over the request's host budget of {0} bytes")]
pub struct HostBudgetExceeded(pub u64);

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
    /// Host bytes the request's `wasi:nn` resources hold now (tensors both ways, errors,
    /// graphs, contexts), against `limits.max_compute_bytes`.
    live_bytes: u64,
    /// One per allowed model until this guest first calls it: the model's scheduler may hold a
    /// partial batch for rows on their way.
    expected: Vec<Expectation>,
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
            expected: models.values().map(ModelHandle::expect).collect(),
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

impl NnCtx {
    /// This guest has computed for long without calling a model: schedulers stop holding
    /// batches for it.
    pub fn not_expected(&mut self) {
        self.expected.clear();
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
    /// Counts `bytes` more against the request's host budget, or traps the guest: one that
    /// hoards resources (errors it never drops, contexts by the thousand) is not making progress.
    fn charge(&mut self, bytes: u64) -> wasmtime::Result<()> {
        let limit = self.ctx.limits.max_compute_bytes;
        let live = self.ctx.live_bytes.saturating_add(bytes);
        if live > limit {
            return Err(HostBudgetExceeded(limit).into());
        }
        self.ctx.live_bytes = live;
        Ok(())
    }

    fn release(&mut self, bytes: u64) {
        self.ctx.live_bytes = self.ctx.live_bytes.saturating_sub(bytes);
    }

    fn fail<T>(&mut self, code: ErrorCode, message: impl Into<String>) -> NnResult<T> {
        let error = NnError {
            code,
            message: message.into(),
        };
        self.charge(error_cost(&error))?;
        // Refusals by policy are worth an operator's eye; input mistakes are the guest's business.
        if matches!(code, ErrorCode::Security | ErrorCode::NotFound | ErrorCode::TooLarge) {
            tracing::info!(
                handler = %self.ctx.handler,
                tenant = %self.ctx.tenant,
                code = ?error.code,
                "wasi:nn refused: {}",
                crate::telemetry::loggable(&error.message, crate::telemetry::MAX_LOGGED)
            );
        } else {
            tracing::debug!(
                handler = %self.ctx.handler,
                tenant = %self.ctx.tenant,
                code = ?error.code,
                "wasi:nn error: {}",
                crate::telemetry::loggable(&error.message, crate::telemetry::MAX_LOGGED)
            );
        }
        Ok(Err(self.table.push(error)?))
    }
}

fn error_cost(error: &NnError) -> u64 {
    RESOURCE_OVERHEAD + error.message.len() as u64
}

fn tensor_cost(tensor: &HostTensor) -> u64 {
    RESOURCE_OVERHEAD + tensor.data.len() as u64 + 4 * tensor.shape.len() as u64
}

/// At most `max` bytes of `text`, cut at a character boundary, for messages and logs.
fn truncated(text: &str, max: usize) -> &str {
    &text[..text.floor_char_boundary(max)]
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
        InferError::NotReady { .. }
        | InferError::Runtime { .. }
        | InferError::Closed(_)
        | InferError::Flushed(_)
        | InferError::Unavailable { .. } => {
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

    /// `NAME` (the model's latest version) or `NAME@VERSION`. Anything else (a path, `..`, a NUL)
    /// is refused by its form; a well-formed name is looked up in the guest's allow-list only.
    fn load_by_name(&mut self, name: String) -> NnResult<Resource<Graph>> {
        if !model_name_grammar(&name) {
            let shown = truncated(&name, 64);
            let more = if shown.len() < name.len() { "..." } else { "" };
            return self.fail(
                ErrorCode::InvalidArgument,
                format!(
                    "'{}{more}' is not a model name: NAME or NAME@VERSION, where NAME is 1-64 of a-z A-Z 0-9 - _ . \
                     not starting with '.', and VERSION a number",
                    shown.escape_debug()
                ),
            );
        }
        let found = self.ctx.models.get(&name);
        match found {
            Some(model) => {
                let model = model.clone();
                self.charge(RESOURCE_OVERHEAD)?;
                Ok(Ok(self.table.push(Graph { model })?))
            }
            None => {
                let shown = truncated(&name, 64);
                let more = if shown.len() < name.len() { "..." } else { "" };
                self.fail(ErrorCode::NotFound, format!("model '{shown}{more}' not found"))
            }
        }
    }
}

impl graph::HostGraph for NnView<'_> {
    fn init_execution_context(
        &mut self,
        graph: Resource<Graph>,
    ) -> NnResult<Resource<ExecutionContext>> {
        let model = self.table.get(&graph)?.model.clone();
        self.charge(RESOURCE_OVERHEAD)?;
        Ok(Ok(self.table.push(ExecutionContext { model })?))
    }

    fn drop(&mut self, graph: Resource<Graph>) -> wasmtime::Result<()> {
        self.table.delete(graph)?;
        self.release(RESOURCE_OVERHEAD);
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
            self.release(tensor.counted);
            if let Some(problem) = tensor.problem {
                oversize.get_or_insert((truncated(&name, 64).to_owned(), problem));
            }
            total = total.saturating_add(tensor.tensor.data.len() as u64);
            named.push((name, tensor.tensor));
        }
        match oversize {
            Some((name, TensorProblem::TooLarge(bytes))) => {
                return self.fail(
                    ErrorCode::TooLarge,
                    format!("tensor '{name}' needs {bytes} bytes, over the limit of {limit} bytes per compute"),
                );
            }
            Some((name, TensorProblem::TooManyDimensions(n))) => {
                return self.fail(
                    ErrorCode::InvalidArgument,
                    format!("tensor '{name}' has {n} dimensions; at most {MAX_DIMENSIONS} are allowed"),
                );
            }
            None => {}
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
        for expectation in &mut self.ctx.expected {
            expectation.arrived(&model);
        }
        // Its guest's core is free while the call waits (the guest holds one while it runs).
        let waiting = crate::model::cores::machine().wait();
        let answered = model.infer(arranged, self.ctx.options).await;
        drop(waiting);
        let outputs = match answered {
            Ok(outputs) => outputs,
            Err(e) => return self.fail(error_code(&e), e.to_string()),
        };
        // Outputs count against the budget like everything else the guest holds: the call is
        // answered `too-large` if they would not fit beside what it keeps already.
        let cost: u64 = outputs.iter().map(tensor_cost).sum();
        if self.ctx.live_bytes.saturating_add(cost) > limit {
            return self.fail(
                ErrorCode::TooLarge,
                format!(
                    "outputs of {cost} bytes do not fit beside the {} bytes of wasi:nn resources this request holds (limit {limit})",
                    self.ctx.live_bytes
                ),
            );
        }
        let mut named = Vec::with_capacity(outputs.len());
        for (spec, tensor) in model.config().outputs.iter().zip(outputs) {
            let counted = tensor_cost(&tensor);
            self.charge(counted)?;
            let tensor = Tensor { tensor, counted, problem: None };
            named.push((spec.name.clone(), self.table.push(tensor)?));
        }
        Ok(Ok(named))
    }

    fn drop(&mut self, ctx: Resource<ExecutionContext>) -> wasmtime::Result<()> {
        self.table.delete(ctx)?;
        self.release(RESOURCE_OVERHEAD);
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
        // the declared dimensions, and what is over the limits is dropped at once, so a request
        // holds at most its budget in tensors however many it makes.
        let dtype = dtype(ty);
        let limit = self.ctx.limits.max_compute_bytes;
        if dimensions.len() > MAX_DIMENSIONS {
            let problem = TensorProblem::TooManyDimensions(dimensions.len());
            drop((dimensions, data));
            self.charge(RESOURCE_OVERHEAD)?;
            let tensor = HostTensor { dtype, shape: Vec::new(), data: Vec::new() };
            return Ok(self.table.push(Tensor { tensor, counted: RESOURCE_OVERHEAD, problem: Some(problem) })?);
        }
        let declared = dimensions
            .iter()
            .try_fold(dtype.size() as u64, |n, &d| n.checked_mul(u64::from(d)))
            .unwrap_or(u64::MAX);
        let tensor = HostTensor { dtype, shape: dimensions, data };
        let cost = tensor_cost(&tensor);
        let needed = declared.max(tensor.data.len() as u64);
        let tensor = if needed > limit || self.ctx.live_bytes.saturating_add(cost) > limit {
            // The tensor's own size when that is what is over; else what the request would hold.
            let problem = TensorProblem::TooLarge(if needed > limit { needed } else { self.ctx.live_bytes.saturating_add(cost) });
            let emptied = HostTensor { dtype, shape: tensor.shape, data: Vec::new() };
            self.charge(tensor_cost(&emptied))?;
            Tensor { counted: tensor_cost(&emptied), tensor: emptied, problem: Some(problem) }
        } else {
            self.charge(cost)?;
            Tensor { tensor, counted: cost, problem: None }
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
        self.release(tensor.counted);
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
        let error = self.table.delete(error)?;
        self.release(error_cost(&error));
        Ok(())
    }
}
