//! Placement: which device a model's next replica goes to.
//!
//! `cpu` is always the CPU. `auto` and GPU lists pick the GPU with the most free memory that
//! fits the replica: its weights (measured once a replica has loaded, estimated from the file
//! before) plus the model's headroom. `auto` falls back to the CPU only where there is no GPU at
//! all; a model that fits on no allowed GPU is refused with the numbers that ruled each one out.

use std::fmt::Write as _;
use std::sync::Arc;

use kiln_wire::GpuInfo;

use crate::model::device::{Device, Placement};

use crate::model::spec::{DeviceChoice, ModelConfig};
use crate::fleet::gpu::Gpus;

/// Why no device could take a replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    #[error("model '{model}' needs {need_mib} MiB of GPU memory ({weights_mib} MiB of weights + {headroom_mib} MiB headroom) and fits on no GPU: {seen}")]
    NoMemory {
        model: String,
        need_mib: u64,
        weights_mib: u64,
        headroom_mib: u64,
        seen: String,
    },
    #[error("model '{model}' may only use {allowed}, but there is no such GPU ({found})")]
    NoSuchGpu {
        model: String,
        allowed: String,
        found: String,
    },
    #[error("every GPU model '{model}' may use is over {limit}% busy: {seen}")]
    Busy { model: String, limit: u32, seen: String },
}

impl PlacementError {
    /// A short reason for the scaler's log.
    pub fn short(&self) -> &'static str {
        match self {
            PlacementError::NoMemory { .. } => "no GPU memory",
            PlacementError::NoSuchGpu { .. } => "no such GPU",
            PlacementError::Busy { .. } => "GPUs busy",
        }
    }
}

/// Places replicas on the inventory's GPUs.
#[derive(Debug, Clone)]
pub struct Placer {
    gpus: Arc<Gpus>,
    /// A GPU busier than this (percent) takes no scaled-up replica.
    max_gpu_utilization: u32,
}

/// Why a replica is placed: scale-ups also avoid GPUs that are already saturated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Start,
    ScaleUp,
}

impl Placer {
    pub fn new(gpus: Arc<Gpus>, max_gpu_utilization: u32) -> Placer {
        Placer { gpus, max_gpu_utilization }
    }

    /// The GPUs `model` may use, from the latest sample.
    pub fn candidates(&self, model: &ModelConfig) -> Vec<GpuInfo> {
        let all = self.gpus.latest();
        match &model.device {
            DeviceChoice::Cpu => Vec::new(),
            DeviceChoice::Auto => all.to_vec(),
            DeviceChoice::Gpus(list) => all.iter().filter(|g| list.contains(&(g.index as usize))).cloned().collect(),
        }
    }

    /// Picks a device for one more replica of `model` whose weights take `weights` bytes, and
    /// books its memory there.
    pub fn place(&self, model: &ModelConfig, weights: u64, purpose: Purpose) -> Result<Placement, PlacementError> {
        let sample = match model.device {
            DeviceChoice::Cpu => return Ok(Placement::cpu()),
            // A fresh sample: a decision on a second-old one could double-book a GPU.
            _ => self.gpus.refresh(),
        };
        let allowed: Vec<&GpuInfo> = match &model.device {
            DeviceChoice::Cpu => Vec::new(),
            DeviceChoice::Auto if sample.is_empty() => return Ok(Placement::cpu()),
            DeviceChoice::Auto => sample.iter().collect(),
            DeviceChoice::Gpus(list) => {
                let allowed: Vec<&GpuInfo> = sample.iter().filter(|g| list.contains(&(g.index as usize))).collect();
                if allowed.is_empty() {
                    return Err(PlacementError::NoSuchGpu {
                        model: model.name.clone(),
                        allowed: model.device.to_string(),
                        found: match sample.len() {
                            0 => "no GPU found".to_owned(),
                            n => format!("GPUs found: cuda:0 to cuda:{}", n - 1),
                        },
                    });
                }
                allowed
            }
        };
        let need = weights + model.memory_headroom_bytes;
        let free = |g: &GpuInfo| g.memory_free_bytes.saturating_sub(self.gpus.ledger.pending(g.index));
        let mut seen = String::new();
        let mut best: Option<(&GpuInfo, u64)> = None;
        let mut fits_but_busy = false;
        for gpu in &allowed {
            let free = free(gpu);
            let _ = write!(seen, "{}cuda:{} has {} MiB free, {}% busy", if seen.is_empty() { "" } else { "; " }, gpu.index, free >> 20, gpu.utilization_percent);
            if free < need {
                continue;
            }
            if purpose == Purpose::ScaleUp && gpu.utilization_percent > self.max_gpu_utilization {
                fits_but_busy = true;
                continue;
            }
            if best.is_none_or(|(_, most)| free > most) {
                best = Some((gpu, free));
            }
        }
        match best {
            Some((gpu, _)) => {
                let device = Device::Cuda(gpu.index as usize);
                Ok(Placement {
                    device,
                    run_on: if gpu.simulated { Device::Cpu } else { device },
                    reservation: Some(Box::new(self.gpus.ledger.book(gpu.index, need))),
                })
            }
            None if fits_but_busy => Err(PlacementError::Busy {
                model: model.name.clone(),
                limit: self.max_gpu_utilization,
                seen,
            }),
            None => Err(PlacementError::NoMemory {
                model: model.name.clone(),
                need_mib: need.div_ceil(1 << 20),
                weights_mib: weights.div_ceil(1 << 20),
                headroom_mib: model.memory_headroom_bytes >> 20,
                seen,
            }),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::spec::{BatchPolicy, Precision, Replicas};
    use crate::fleet::gpu::{SimulatedGpuConfig, SimulatedStep};
    use crate::fleet::gpu::{Ledger, Simulated};
    use std::time::Duration;

    /// Simulated GPUs with `(total MiB, used MiB, utilization %)`, constant over time.
    pub(crate) fn simulated(gpus: &[(u64, u64, u32)]) -> Arc<Gpus> {
        let configs = gpus
            .iter()
            .map(|&(total, used, utilization)| SimulatedGpuConfig {
                name: "Sim".into(),
                memory_total_bytes: total << 20,
                script: vec![SimulatedStep { at: Duration::ZERO, memory_used_bytes: used << 20, utilization }],
            })
            .collect();
        let ledger = Arc::new(Ledger::default());
        Gpus::with_inventory(Box::new(Simulated::new(configs, Arc::clone(&ledger))), ledger)
    }

    pub(crate) fn model(device: DeviceChoice, headroom_mib: u64) -> ModelConfig {
        ModelConfig {
            worker: false,
            name: "m".into(),
            path: "m.pt".into(),
            source: None,
            sha256: None,
            version: 1,
            device,
            inputs: Vec::new(),
            outputs: Vec::new(),
            warmup_runs: 0,
            batching: BatchPolicy {
                max_batch_size: 1,
                max_queue_delay: Duration::ZERO,
                preferred_batch_sizes: Vec::new(),
                max_queue_size: 1,
                max_rows: 1,
            },
            replicas: Replicas::fixed(1),
            threads: 1,
            timeout: Duration::from_secs(1),
            precision: Precision::Fp32,
            channels_last: false,
            auto_precision: None,
            latency_objective: Duration::from_millis(50),
            memory_headroom_bytes: headroom_mib << 20,
        }
    }

    #[test]
    fn auto_takes_the_gpu_with_most_free_memory_and_books_it() {
        let placer = Placer::new(simulated(&[(1000, 600, 0), (1000, 200, 0), (1000, 400, 0)]), 95);
        let m = model(DeviceChoice::Auto, 300);
        let first = placer.place(&m, 0, Purpose::Start).expect("fits");
        assert_eq!((first.device, first.run_on), (Device::Cuda(1), Device::Cpu));
        // cuda:1 now has 800 - 300 booked = 500 free, less than cuda:2's 600.
        let second = placer.place(&m, 0, Purpose::Start).expect("fits");
        assert_eq!(second.device, Device::Cuda(2));
        // Free now 400, 500, 300: cuda:1 again (to 200), then cuda:0 (to 100), then cuda:2 (to 0).
        // Bookings last as long as their placements, so these are kept.
        let kept: Vec<Placement> = (0..3).map(|_| placer.place(&m, 0, Purpose::Start).expect("fits")).collect();
        let order: Vec<Device> = kept.iter().map(|p| p.device).collect();
        assert_eq!(order, vec![Device::Cuda(1), Device::Cuda(0), Device::Cuda(2)]);
        let refused = placer.place(&m, 0, Purpose::Start).expect_err("full");
        assert_eq!(refused.short(), "no GPU memory");
        let text = refused.to_string();
        assert!(text.contains("needs 300 MiB") && text.contains("cuda:0 has 100 MiB free"), "{text}");
        // Releasing a booking frees its memory again.
        drop(second);
        assert_eq!(placer.place(&m, 0, Purpose::Start).expect("fits again").device, Device::Cuda(2));
    }

    #[test]
    fn lists_cpu_and_the_no_gpu_case() {
        let placer = Placer::new(simulated(&[(1000, 0, 0), (2000, 0, 0)]), 95);
        // A list restricts the choice even when another GPU has more room.
        let listed = placer.place(&model(DeviceChoice::Gpus(vec![0]), 100), 10 << 20, Purpose::Start).expect("fits");
        assert_eq!(listed.device, Device::Cuda(0));
        assert_eq!(placer.place(&model(DeviceChoice::Cpu, 100), 0, Purpose::Start).expect("cpu").device, Device::Cpu);
        let missing = placer.place(&model(DeviceChoice::Gpus(vec![3]), 100), 0, Purpose::Start).expect_err("no cuda:3");
        assert!(missing.to_string().contains("cuda:3") && missing.to_string().contains("cuda:0 to cuda:1"), "{missing}");
        // Weights count as well as headroom.
        let big = placer.place(&model(DeviceChoice::Gpus(vec![0]), 100), 950 << 20, Purpose::Start).expect_err("too big");
        assert!(big.to_string().contains("950 MiB of weights + 100 MiB headroom"), "{big}");

        let none = Placer::new(simulated(&[]), 95);
        assert_eq!(none.place(&model(DeviceChoice::Auto, 100), 0, Purpose::Start).expect("cpu").device, Device::Cpu);
        assert!(none.place(&model(DeviceChoice::Gpus(vec![0]), 100), 0, Purpose::Start).is_err());
    }

    #[test]
    fn scale_ups_skip_saturated_gpus() {
        let placer = Placer::new(simulated(&[(1000, 0, 99), (1000, 500, 20)]), 95);
        let m = model(DeviceChoice::Auto, 100);
        assert_eq!(placer.place(&m, 0, Purpose::ScaleUp).expect("fits").device, Device::Cuda(1));
        let busy = Placer::new(simulated(&[(1000, 0, 99)]), 95);
        assert_eq!(busy.place(&m, 0, Purpose::ScaleUp).expect_err("busy").short(), "GPUs busy");
        assert_eq!(busy.place(&m, 0, Purpose::Start).expect("start ignores load").device, Device::Cuda(0));
    }
}
