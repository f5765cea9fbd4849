//! The libtorch backend: loads a TorchScript module and runs `forward` on host tensors.
//!
//! Everything here blocks and must run on the model's own thread, never on an async worker.
//! Fallible `f_*` calls are used throughout: a shape the model rejects is an error, not a panic.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::sync::atomic::{AtomicU32, Ordering};

use tch::{CModule, Device as TchDevice, IValue, Kind, Tensor};

use super::{Backend, BackendError, LoadedModel};
use crate::model::device::Device;
use crate::model::spec::{Form, ModelConfig, Precision};
use crate::model::signature::warmup_inputs;
use crate::model::tensor::{DType, HostTensor};
use crate::sync::MutexExt;

/// The libtorch backend: TorchScript files, on the CPU or a CUDA device.
///
/// CPU replicas of one model share one copy of its weights: libtorch runs a module's forward
/// from several threads at once, so a second CPU replica costs a thread, not the model's memory
/// again. (Each GPU replica loads its own, on its own device.)
#[derive(Debug, Default)]
pub struct Torch {
    /// CPU modules by file and form.
    on_cpu: Mutex<HashMap<(PathBuf, Form), CpuEntry>>,
}

/// One file's module on the CPU while a replica uses it. The entry stays locked while the module
/// loads, so replicas that start together wait for the first one's instead of loading their own.
type CpuEntry = Arc<Mutex<Weak<CModule>>>;

impl Torch {
    /// The entry for `config`'s module on the CPU, made if there is none; entries whose module
    /// is gone and that nobody is loading are dropped on the way.
    fn cpu_entry(&self, config: &ModelConfig) -> CpuEntry {
        let mut cache = self.on_cpu.locked();
        cache.retain(|_, entry| {
            // A locked entry is loading: keep it.
            Arc::strong_count(entry) > 1 || entry.try_lock().map_or(true, |module| module.strong_count() > 0)
        });
        Arc::clone(cache.entry((config.path.clone(), config.form())).or_default())
    }
}

/// Sizes the calling thread's libtorch pool to `threads`. libtorch sizes a thread's pool lazily,
/// at its first parallel region, from the count last set by *any* thread: so without the first
/// call, a replica of another model setting its own `threads` meanwhile (as replicas loading
/// together do) would decide this thread's. Asking for the count makes the lazy sizing happen
/// now; setting it then holds for this thread alone.
pub fn use_threads(threads: u32) {
    tch::get_num_threads();
    tch::set_num_threads(threads as i32);
}

impl Backend for Torch {
    type Model = TorchModel;

    /// Loads the module, with this thread's libtorch pool sized to `config.threads`. In reduced
    /// precision, floating parameters are cast first; when a first pass on zero inputs then
    /// fails, the model needs its floating buffers cast too (batch norm's running statistics),
    /// and it is loaded again with everything cast.
    fn load(&self, config: &ModelConfig, device: Device) -> Result<TorchModel, BackendError> {
        // Applies to this thread's own parallel regions, so replicas do not share one pool.
        use_threads(config.threads);
        if device != Device::Cpu {
            return self.load_new(config, device);
        }
        let entry = self.cpu_entry(config);
        let mut cached = entry.locked();
        if let Some(module) = cached.upgrade() {
            return Ok(TorchModel::sharing(module, config));
        }
        let model = self.load_new(config, device)?;
        *cached = Arc::downgrade(&model.module);
        Ok(model)
    }
}

impl Torch {
    fn load_new(&self, config: &ModelConfig, device: Device) -> Result<TorchModel, BackendError> {
        load_checked(&Wanted::of(config), Module::File(&config.path), device, &warmup_inputs(&config.inputs))
    }
}

/// Where a module's TorchScript comes from: a file the server reads, or the bytes a model
/// worker was handed (it can open no file).
#[derive(Debug, Clone, Copy)]
pub enum Module<'a> {
    File(&'a std::path::Path),
    Bytes(&'a [u8]),
}

/// What a load needs of a model's configuration.
#[derive(Debug, Clone)]
pub struct Wanted {
    /// What error messages call the module (its file, or the model's name).
    pub label: String,
    pub precision: Precision,
    /// Lay 4-D floating weights and inputs out channels-last.
    pub channels_last: bool,
    /// Outputs configured: a pass returns this many tensors.
    pub outputs: usize,
}

impl Wanted {
    pub fn of(config: &ModelConfig) -> Wanted {
        Wanted {
            label: config.path.display().to_string(),
            precision: config.precision,
            channels_last: config.channels_last,
            outputs: config.outputs.len(),
        }
    }
}

/// Loads `module` as `wanted` onto `device`. In reduced precision, floating parameters are cast
/// first; when a first pass on `probe` then fails, the model needs its floating buffers cast too
/// (batch norm's running statistics), and it is loaded again with everything cast.
pub fn load_checked(wanted: &Wanted, module: Module<'_>, device: Device, probe: &[HostTensor]) -> Result<TorchModel, BackendError> {
    let model = TorchModel::load_module(wanted, module, device, Cast::Parameters)?;
    if reduced_kind(wanted.precision).is_none() {
        return Ok(model);
    }
    match model.forward(probe) {
        Err(BackendError::Forward(first)) => {
            TorchModel::load_module(wanted, module, device, Cast::Everything).and_then(|model| match model.forward(probe) {
                Ok(_) => Ok(model),
                Err(_) => Err(BackendError::Forward(first)),
            })
        }
        _ => Ok(model),
    }
}

impl LoadedModel for TorchModel {
    fn forward(&self, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, BackendError> {
        TorchModel::forward(self, inputs)
    }

    fn weight_bytes(&self) -> u64 {
        TorchModel::weight_bytes(self)
    }

    fn parameters(&self) -> u64 {
        self.module.named_parameters().map_or(0, |params| params.iter().map(|(_, t)| t.numel() as u64).sum())
    }

    fn on_cpu(&self) -> bool {
        self.device == TchDevice::Cpu
    }

    fn sets_threads(&self) -> bool {
        self.on_cpu()
    }

    fn use_threads(&self, threads: u32) {
        if self.on_cpu() && self.threads.swap(threads, Ordering::Relaxed) != threads {
            use_threads(threads);
        }
    }
}

/// What a reduced precision converts. libtorch's C++ API casts a module's parameters and
/// buffers alike, integer buffers included (position ids, for one), and tch cannot reach the
/// buffers alone; so floating parameters are cast first, and everything only when the model
/// needs its floating buffers cast too (batch norm's running statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cast {
    Parameters,
    Everything,
}

/// A loaded TorchScript module, in eval mode on its device.
pub struct TorchModel {
    module: Arc<CModule>,
    device: TchDevice,
    output_names: usize,
    /// The kind floating tensors are cast to, when the model runs in reduced precision.
    reduced: Option<Kind>,
    /// Whether its passes run under bf16 autocast.
    autocast: bool,
    /// Whether 4-D floating inputs are laid out channels-last, as its weights are.
    channels_last: bool,
    /// The libtorch threads its replica's thread was last set to by [`LoadedModel::use_threads`]
    /// (0 before then).
    threads: AtomicU32,
}

fn tch_device(device: Device) -> Result<TchDevice, BackendError> {
    match device {
        Device::Cpu => Ok(TchDevice::Cpu),
        Device::Cuda(n) => {
            let available = cuda::device_count();
            if n < available {
                Ok(TchDevice::Cuda(n))
            } else {
                Err(BackendError::Device(format!(
                    "device cuda:{n} is not available (libtorch sees {available} CUDA devices)"
                )))
            }
        }
    }
}

/// The kind a reduced precision casts floating tensors to; `None` where the weights stay FP32.
fn reduced_kind(precision: Precision) -> Option<Kind> {
    match precision {
        Precision::Fp32 | Precision::Bf16Autocast => None,
        Precision::Fp16 => Some(Kind::Half),
        Precision::Bf16 => Some(Kind::BFloat16),
    }
}

/// libtorch's kind for a Kiln dtype.
pub fn kind(dtype: DType) -> Kind {
    match dtype {
        DType::F16 => Kind::Half,
        DType::F32 => Kind::Float,
        DType::F64 => Kind::Double,
        DType::BF16 => Kind::BFloat16,
        DType::U8 => Kind::Uint8,
        DType::I32 => Kind::Int,
        DType::I64 => Kind::Int64,
    }
}

/// The Kiln dtype of a libtorch kind, for the kinds Kiln carries.
pub fn dtype(kind: Kind) -> Option<DType> {
    Some(match kind {
        Kind::Half => DType::F16,
        Kind::Float => DType::F32,
        Kind::Double => DType::F64,
        Kind::BFloat16 => DType::BF16,
        Kind::Uint8 => DType::U8,
        Kind::Int => DType::I32,
        Kind::Int64 => DType::I64,
        _ => return None,
    })
}

impl TorchModel {
    /// Loads the module named by `config` onto `device`; in reduced precision, `cast` says what
    /// is converted.
    pub fn load(config: &ModelConfig, device: Device, cast: Cast) -> Result<TorchModel, BackendError> {
        TorchModel::load_module(&Wanted::of(config), Module::File(&config.path), device, cast)
    }

    /// [`TorchModel::load`] from `module`.
    pub fn load_module(wanted: &Wanted, module: Module<'_>, device: Device, cast: Cast) -> Result<TorchModel, BackendError> {
        // The profiling executor specializes a graph to the shapes of its first runs and falls
        // back to a slow path for any other shape; served shapes vary (batch sizes, sequence
        // lengths), which made MiniLM ~60% slower than the same forward at a fixed shape.
        tch::jit::set_profiling_mode(false);
        let device = tch_device(device)?;
        let loaded = match module {
            Module::File(path) => CModule::load_on_device(path, device),
            Module::Bytes(mut bytes) => CModule::load_data_on_device(&mut bytes, device),
        };
        let mut module = loaded.map_err(|e| {
            BackendError::Load(format!(
                "cannot load TorchScript file {}: {}",
                wanted.label,
                torch_reason(&e.to_string())
            ))
        })?;
        module.set_eval();
        let reduced = reduced_kind(wanted.precision);
        if let Some(kind) = reduced {
            let params = module
                .named_parameters()
                .map_err(|e| BackendError::Load(format!("cannot read the module's parameters: {e}")))?;
            let floating: Vec<Tensor> = params.into_iter().map(|(_, t)| t).filter(Tensor::is_floating_point).collect();
            if floating.is_empty() {
                return Err(BackendError::Load(format!(
                    "precision {} needs floating-point parameters to cast, and {} has none: a frozen \
                     TorchScript module (torch.jit.freeze) keeps its weights as constants. Export it \
                     without freezing, or in the precision wanted and serve it as fp32",
                    wanted.precision,
                    wanted.label
                )));
            }
            match cast {
                Cast::Parameters => {
                    for mut t in floating {
                        let cast = t
                            .f_to_kind(kind)
                            .map_err(|e| BackendError::Load(format!("cannot cast a parameter to {kind:?}: {e}")))?;
                        t.set_data(&cast);
                    }
                }
                // libtorch's Module::to casts every buffer too, integer ones included.
                Cast::Everything => module.to(device, kind, false),
            }
        }
        if wanted.channels_last {
            let params = module
                .named_parameters()
                .map_err(|e| BackendError::Load(format!("cannot read the module's parameters: {e}")))?;
            for (_, mut t) in params.into_iter().filter(|(_, t)| t.dim() == 4 && t.is_floating_point()) {
                let laid = channels_last(&t).map_err(|e| BackendError::Load(format!("cannot lay a weight out channels-last: {e}")))?;
                t.set_data(&laid);
            }
        }
        Ok(TorchModel {
            module: Arc::new(module),
            device,
            output_names: wanted.outputs,
            reduced,
            autocast: wanted.precision == Precision::Bf16Autocast,
            channels_last: wanted.channels_last,
            threads: AtomicU32::new(0),
        })
    }

    /// Another CPU replica of `config`'s model, on the same module as one already loaded.
    fn sharing(module: Arc<CModule>, config: &ModelConfig) -> TorchModel {
        TorchModel {
            module,
            device: TchDevice::Cpu,
            output_names: config.outputs.len(),
            reduced: reduced_kind(config.precision),
            autocast: config.precision == Precision::Bf16Autocast,
            channels_last: config.channels_last,
            threads: AtomicU32::new(0),
        }
    }

    /// Whether two replicas run on one copy of the weights.
    pub fn shares_weights_with(&self, other: &TorchModel) -> bool {
        Arc::ptr_eq(&self.module, &other.module)
    }

    /// Bytes of the module's parameters as loaded (in its precision): what a replica needs on
    /// its device before any activation.
    pub fn weight_bytes(&self) -> u64 {
        match self.module.named_parameters() {
            Ok(params) => params
                .iter()
                .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
                .sum(),
            Err(_) => 0,
        }
    }

    /// Runs `forward` with `inputs` as positional arguments, under no-grad.
    ///
    /// Returns one tensor per configured output name, in order; a module that returns fewer
    /// tensors than configured is an error, extra ones are ignored.
    pub fn forward(&self, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, BackendError> {
        tch::no_grad(|| {
            let args = inputs.iter().map(|t| self.to_torch(t)).collect::<Result<Vec<_>, _>>()?;
            self.forward_tensors(args)?.iter().map(from_torch).collect()
        })
    }

    /// [`TorchModel::forward`] on CPU tensors: `args` are moved to the model's device and cast to
    /// its precision; the outputs come back in FP32 when the model runs in reduced precision,
    /// still on the model's device. Call it under no-grad.
    pub fn forward_tensors(&self, args: Vec<Tensor>) -> Result<Vec<Tensor>, BackendError> {
        let args = args.into_iter().map(|t| self.prepare(t).map(IValue::Tensor)).collect::<Result<Vec<_>, _>>()?;
        let out = {
            let _autocast = self.autocast.then(|| autocast::Bf16::enter(self.device));
            self.module.forward_is(&args)
        }
        .map_err(|e| BackendError::Forward(format!("forward failed: {}", torch_reason(&e.to_string()))))?;
        let mut tensors = Vec::with_capacity(self.output_names);
        flatten_outputs(out, &mut tensors)?;
        if tensors.len() < self.output_names {
            return Err(BackendError::Output(format!(
                "the model returned {} tensors but {} outputs are configured",
                tensors.len(),
                self.output_names
            )));
        }
        tensors.truncate(self.output_names);
        tensors
            .into_iter()
            .map(|t| {
                // Back to the FP32 a guest expects of a model served in reduced precision (under
                // autocast, only what autocast made half).
                let to_fp32 = match t.kind() {
                    Kind::Float => false,
                    Kind::Half | Kind::BFloat16 => self.reduced.is_some() || self.autocast,
                    _ => self.reduced.is_some() && t.is_floating_point(),
                };
                if to_fp32 {
                    t.f_to_kind(Kind::Float).map_err(|e| BackendError::Output(format!("cannot cast output to FP32: {e}")))
                } else {
                    Ok(t)
                }
            })
            .collect()
    }

    fn to_torch(&self, t: &HostTensor) -> Result<Tensor, BackendError> {
        let shape: Vec<i64> = t.shape.iter().map(|&d| i64::from(d)).collect();
        Tensor::f_from_data_size(&t.data, &shape, kind(t.dtype))
            .map_err(|e| BackendError::Forward(format!("cannot build input tensor: {e}")))
    }

    /// A CPU input on the model's device, floating ones in its precision.
    fn prepare(&self, cpu: Tensor) -> Result<Tensor, BackendError> {
        let on_device = if self.device == TchDevice::Cpu {
            cpu
        } else {
            cpu.f_to_device(self.device)
                .map_err(|e| BackendError::Forward(format!("cannot move input to {:?}: {e}", self.device)))?
        };
        let cast = match self.reduced {
            Some(kind) if on_device.is_floating_point() => on_device
                .f_to_kind(kind)
                .map_err(|e| BackendError::Forward(format!("cannot cast input to {kind:?}: {e}")))?,
            _ => on_device,
        };
        if self.channels_last && cast.dim() == 4 && cast.is_floating_point() {
            return channels_last(&cast).map_err(|e| BackendError::Forward(format!("cannot lay an input out channels-last: {e}")));
        }
        Ok(cast)
    }
}

/// `t` (N, C, H, W) with the same shape and values, laid out channels-last in memory (strides of
/// N, H, W, C), which libtorch's convolutions recognise and keep. tch has no memory-format
/// argument, so the layout is made by permuting, copying and permuting back.
fn channels_last(t: &Tensor) -> Result<Tensor, tch::TchError> {
    t.f_permute([0, 2, 3, 1])?.f_contiguous()?.f_permute([0, 3, 1, 2])
}

fn flatten_outputs(value: IValue, out: &mut Vec<Tensor>) -> Result<(), BackendError> {
    match value {
        IValue::Tensor(t) => out.push(t),
        IValue::Tuple(items) | IValue::GenericList(items) => {
            for item in items {
                flatten_outputs(item, out)?;
            }
        }
        IValue::TensorList(ts) => out.extend(ts),
        other => {
            return Err(BackendError::Output(format!(
                "the model returned a value Kiln cannot map to tensors: {}",
                ivalue_kind(&other)
            )));
        }
    }
    Ok(())
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Bool(_) => "bool",
        IValue::Int(_) => "int",
        IValue::Double(_) => "float",
        IValue::String(_) => "string",
        IValue::GenericDict(_) => "dict",
        IValue::Object(_) => "object",
        _ => "value",
    }
}

fn from_torch(t: &Tensor) -> Result<HostTensor, BackendError> {
    let output = |message: String| BackendError::Output(message);
    let dtype = dtype(t.kind())
        .ok_or_else(|| output(format!("the model returned a {:?} tensor, which Kiln cannot carry", t.kind())))?;
    let t = t
        .f_to_device(TchDevice::Cpu)
        .and_then(|t| t.f_contiguous())
        .map_err(|e| output(format!("cannot read output: {e}")))?;
    let shape = t
        .size()
        .iter()
        .map(|&d| u32::try_from(d).map_err(|_| output(format!("output dimension {d} is out of range"))))
        .collect::<Result<Vec<u32>, BackendError>>()?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * dtype.size()];
    t.f_copy_data_u8(&mut data, numel)
        .map_err(|e| output(format!("cannot copy output: {e}")))?;
    Ok(HostTensor { dtype, shape, data })
}

/// libtorch errors carry a TorchScript traceback and a C++ backtrace; callers only need the
/// reason, which is the last `...Error: ...` line when there is one.
fn torch_reason(s: &str) -> &str {
    s.lines()
        .rev()
        .find(|l| l.contains("Error: "))
        .or_else(|| s.lines().next())
        .map_or(s, str::trim)
}

mod autocast;
pub mod cuda;
#[cfg(test)]
mod tests;
