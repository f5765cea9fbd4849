//! The worker's side: `kiln model-worker NAME`, started by the server with its socket as stdin.
//!
//! It maps the regions it is handed, reads the model's bytes, confines itself (no file but what
//! libtorch reads about the machine, no network, no new processes, bounded address space, no file
//! it can grow), loads the module from the bytes, and then runs one pass per request until the
//! socket closes. Its stderr goes to the server, which logs it bounded and escaped.

use std::ffi::CString;
use std::io;
use std::os::fd::AsFd as _;
use std::os::unix::net::UnixStream;

use super::protocol::{Channel, FailureKind, Load, Reply, Request, Slot, Which, layout};
use crate::model::backend::torch::{self, Module, TorchModel, Wanted};
use crate::model::backend::{BackendError, LoadedModel as _};
use crate::model::device::Device;
use crate::model::spec::Precision;
use crate::model::tensor::HostTensor;
use kiln_torchscan::shm::Region;

/// What libtorch reads about the machine on a CPU (its cpuinfo and OpenMP): readable, as nothing
/// in them belongs to anyone.
const CPU_FILES: &[&str] = &["/proc/cpuinfo", "/sys/devices/system/cpu", "/sys/devices/system/node"];

/// What CUDA reads besides (its driver's state, the devices' PCI entries, the libraries it opens
/// late), and the device files it opens.
const CUDA_FILES: &[&str] = &["/proc/driver/nvidia", "/sys/bus/pci", "/sys/devices", "/etc/ld.so.cache", "/usr/lib", "/lib", "/usr/local/cuda"];
const CUDA_DEVICES: &[&str] = &["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"];

/// Runs the worker until the server closes the socket. An error here is the worker's own failure
/// (no socket, a broken one); the server sees it as the worker exiting.
///
/// Must run before the process starts any thread (confining needs a single-threaded process).
pub fn serve_worker() -> io::Result<()> {
    let socket = UnixStream::from(io::stdin().as_fd().try_clone_to_owned()?);
    let mut worker = Worker { channel: Channel::taking_fds(socket), inputs: None, outputs: None, model: None };
    loop {
        let request = match worker.channel.receive::<Request>() {
            Ok(request) => request,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        match request {
            Request::Region { which, len } => {
                let region = Region::map(worker.channel.take_fd()?, len)?;
                match which {
                    Which::Inputs => worker.inputs = Some(region),
                    Which::Outputs => worker.outputs = Some(region),
                }
            }
            Request::Load(request) => {
                let reply = worker.load(request);
                let done = matches!(reply, Ok(Reply::Loaded { .. }));
                worker.channel.send(&reply.unwrap_or_else(failed), &[], None)?;
                if !done {
                    return Ok(());
                }
            }
            Request::Forward { inputs } => {
                let (reply, payload) = match worker.forward(&inputs) {
                    Ok(answer) => answer,
                    Err(e) => (failed(e), Vec::new()),
                };
                let fatal = matches!(reply, Reply::Failed { fatal: true, .. });
                worker.channel.send(&reply, &payload, None)?;
                if fatal {
                    return Ok(());
                }
            }
        }
    }
}

struct Worker {
    channel: Channel,
    inputs: Option<Region>,
    outputs: Option<Region>,
    model: Option<TorchModel>,
}

fn failed(e: BackendError) -> Reply {
    let kind = match &e {
        BackendError::Device(_) => FailureKind::Device,
        BackendError::Load(_) => FailureKind::Load,
        BackendError::Output(_) => FailureKind::Output,
        _ => FailureKind::Forward,
    };
    let reason = e.to_string();
    // After a device-side assert, every later CUDA call in this process fails: start afresh.
    let fatal = reason.contains("device-side assert") || reason.contains("CUDA error: an illegal memory access");
    Reply::Failed { kind, reason, fatal }
}

fn io_failure(kind: fn(String) -> BackendError) -> impl Fn(io::Error) -> BackendError {
    move |e| kind(format!("model worker: {e}"))
}

impl Worker {
    fn load(&mut self, request: Load) -> Result<Reply, BackendError> {
        let load_error = io_failure(BackendError::Load);
        let len = usize::try_from(request.bytes).map_err(|_| BackendError::Load("the model is too large".into()))?;
        let mut archive = vec![0u8; len];
        self.channel.read_exact(&mut archive).map_err(&load_error)?;
        let probe = self.read_inputs(&request.probe)?;
        let device: Device = request.device.parse().map_err(BackendError::Device)?;
        let precision: Precision = request.precision.parse().map_err(BackendError::Load)?;
        let mut limits = kiln_torchscan::Limits {
            memory_bytes: request.memory_bytes,
            file_bytes: Some(0),
            readable: paths(CPU_FILES),
            ..kiln_torchscan::Limits::default()
        };
        if let Device::Cuda(_) = device {
            limits.readable.extend(paths(CUDA_FILES));
            limits.readable.extend(library_folders());
            limits.devices = paths(CUDA_DEVICES);
            limits.devices.extend((0..64).filter_map(|n| CString::new(format!("/dev/nvidia{n}")).ok()));
        }
        let confinement = kiln_torchscan::confine(limits).map_err(|e| BackendError::Load(e.to_string()))?;
        torch::use_threads(request.threads.max(1));
        let wanted = Wanted { label: request.model, precision, channels_last: request.channels_last, outputs: request.outputs };
        let model = torch::load_checked(&wanted, Module::Bytes(&archive), device, &probe)?;
        drop(archive);
        let reply = Reply::Loaded {
            weight_bytes: model.weight_bytes(),
            parameters: model.parameters(),
            complete: confinement.is_complete(),
            confinement: confinement.report,
        };
        self.model = Some(model);
        Ok(reply)
    }

    fn read_inputs(&self, slots: &[Slot]) -> Result<Vec<HostTensor>, BackendError> {
        let error = io_failure(BackendError::Forward);
        slots
            .iter()
            .map(|slot| {
                let (dtype, bytes) = slot.extent().map_err(&error)?;
                let region = self.inputs.as_ref().ok_or_else(|| BackendError::Forward("model worker: no inputs region".into()))?;
                let mut data = vec![0u8; bytes];
                region.read(slot.offset, &mut data).map_err(&error)?;
                Ok(HostTensor { dtype, shape: slot.shape.clone(), data })
            })
            .collect()
    }

    /// One pass: inputs viewed in place in the inputs region, outputs copied once into the
    /// outputs region (or after the reply, when they do not fit there).
    fn forward(&mut self, slots: &[Slot]) -> Result<(Reply, Vec<u8>), BackendError> {
        let model = self.model.as_ref().ok_or_else(|| BackendError::Forward("model worker: no model loaded".into()))?;
        let inputs = self.inputs.as_ref().ok_or_else(|| BackendError::Forward("model worker: no inputs region".into()))?;
        let error = io_failure(BackendError::Forward);
        tch::no_grad(|| {
            let args = slots
                .iter()
                .map(|slot| {
                    let (dtype, _) = slot.extent().map_err(&error)?;
                    let shape: Vec<i64> = slot.shape.iter().map(|&d| i64::from(d)).collect();
                    inputs.tensor(slot.offset, &shape, torch::kind(dtype)).map_err(&error)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let outputs = model.forward_tensors(args)?;
            let mut kinds = Vec::with_capacity(outputs.len());
            let mut shapes = Vec::with_capacity(outputs.len());
            for t in &outputs {
                let dtype = torch::dtype(t.kind())
                    .ok_or_else(|| BackendError::Output(format!("the model returned a {:?} tensor, which Kiln cannot carry", t.kind())))?;
                let shape = t
                    .size()
                    .iter()
                    .map(|&d| u32::try_from(d).map_err(|_| BackendError::Output(format!("output dimension {d} is out of range"))))
                    .collect::<Result<Vec<u32>, _>>()?;
                kinds.push(dtype);
                shapes.push(shape);
            }
            let (slots, end) = layout(kinds.iter().copied().zip(shapes.iter().map(Vec::as_slice)));
            let output_error = io_failure(BackendError::Output);
            match self.outputs.as_ref().filter(|region| region.len() >= end) {
                Some(region) => {
                    for (slot, t) in slots.iter().zip(&outputs) {
                        let shape: Vec<i64> = slot.shape.iter().map(|&d| i64::from(d)).collect();
                        let mut view = region.tensor(slot.offset, &shape, t.kind()).map_err(&output_error)?;
                        view.f_copy_(t).map_err(|e| BackendError::Output(format!("cannot copy an output: {e}")))?;
                    }
                    Ok((Reply::Outputs { outputs: slots, inline: false }, Vec::new()))
                }
                None => {
                    let mut payload = vec![0u8; end];
                    for (slot, t) in slots.iter().zip(&outputs) {
                        let t = t
                            .f_to_device(tch::Device::Cpu)
                            .and_then(|t| t.f_contiguous())
                            .map_err(|e| BackendError::Output(format!("cannot read an output: {e}")))?;
                        let (_, bytes) = slot.extent().map_err(&output_error)?;
                        t.f_copy_data_u8(&mut payload[slot.offset..slot.offset + bytes], t.numel())
                            .map_err(|e| BackendError::Output(format!("cannot copy an output: {e}")))?;
                    }
                    Ok((Reply::Outputs { outputs: slots, inline: true }, payload))
                }
            }
        })
    }
}

fn paths(list: &[&str]) -> Vec<CString> {
    list.iter().filter_map(|p| CString::new(*p).ok()).collect()
}

/// The folders of the shared libraries this process has mapped (libtorch's, and the site-packages
/// folder of a wheel's), where CUDA's own libraries are opened from later.
fn library_folders() -> Vec<CString> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut folders: Vec<std::path::PathBuf> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| path.contains(".so"))
        .filter_map(|path| std::path::Path::new(path).parent().map(std::path::Path::to_path_buf))
        .collect();
    // A wheel's libraries sit in site-packages/torch/lib; CUDA's in site-packages/nvidia/*/lib.
    let wheels: Vec<_> = folders
        .iter()
        .filter(|f| f.ends_with("torch/lib"))
        .filter_map(|f| f.parent().and_then(std::path::Path::parent).map(|p| p.join("nvidia")))
        .collect();
    folders.extend(wheels);
    folders.sort();
    folders.dedup();
    folders.into_iter().filter_map(|f| CString::new(f.into_os_string().into_encoded_bytes()).ok()).collect()
}
