//! The GPU inventory: which GPUs there are and how full and busy they are, from NVML (polled
//! every second) or from simulated devices (`[[gpus.simulated]]`) for tests and demos.
//!
//! Without an NVIDIA driver NVML cannot start; that is an empty inventory and one log line, and
//! every model runs on the CPU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use kiln_wire::GpuInfo;
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use crate::sync::{MutexExt, RwLockExt};

/// A source of GPU samples.
pub trait Inventory: Send + Sync {
    /// Every GPU now, by index.
    fn sample(&self) -> Vec<GpuInfo>;
    /// Replicas placed on these GPUs run on the CPU: the GPUs are stand-ins.
    fn simulated(&self) -> bool;
}

/// Memory Kiln has promised to its own replicas, per GPU index.
///
/// `pending` is booked by replicas still loading (NVML cannot see them yet); `loaded` by
/// replicas that run. Real GPUs report loaded replicas in their used memory by themselves;
/// simulated ones add `loaded` to their scripted use.
#[derive(Debug, Default)]
pub struct Ledger {
    books: Mutex<HashMap<u32, Books>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Books {
    pending: u64,
    loaded: u64,
}

impl Ledger {
    fn with<T>(&self, gpu: u32, f: impl FnOnce(&mut Books) -> T) -> T {
        let mut books = self.books.locked();
        f(books.entry(gpu).or_default())
    }

    pub fn pending(&self, gpu: u32) -> u64 {
        self.with(gpu, |b| b.pending)
    }

    pub fn loaded(&self, gpu: u32) -> u64 {
        self.with(gpu, |b| b.loaded)
    }

    /// Books `bytes` on `gpu` for a replica about to load; released when the booking drops.
    pub fn book(self: &Arc<Self>, gpu: u32, bytes: u64) -> Booking {
        self.with(gpu, |b| b.pending += bytes);
        Booking {
            ledger: Arc::clone(self),
            gpu,
            bytes,
            loaded: false,
        }
    }
}

/// One replica's share of a GPU's memory.
#[derive(Debug)]
pub struct Booking {
    ledger: Arc<Ledger>,
    gpu: u32,
    bytes: u64,
    loaded: bool,
}

impl crate::model::device::Reservation for Booking {
    /// The replica has loaded: its memory is now in use rather than promised.
    fn loaded(&mut self) {
        if !self.loaded {
            self.loaded = true;
            self.ledger.with(self.gpu, |b| {
                b.pending = b.pending.saturating_sub(self.bytes);
                b.loaded += self.bytes;
            });
        }
    }
}

impl Drop for Booking {
    fn drop(&mut self) {
        let (bytes, loaded) = (self.bytes, self.loaded);
        self.ledger.with(self.gpu, |b| {
            if loaded {
                b.loaded = b.loaded.saturating_sub(bytes);
            } else {
                b.pending = b.pending.saturating_sub(bytes);
            }
        });
    }
}

/// The shared view of the GPUs: the last sample, refreshed by a poller thread or on demand.
pub struct Gpus {
    inventory: Box<dyn Inventory>,
    latest: RwLock<Arc<Vec<GpuInfo>>>,
    pub ledger: Arc<Ledger>,
}

impl std::fmt::Debug for Gpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpus").field("latest", &self.latest()).finish()
    }
}

impl Gpus {
    /// Simulated GPUs when the config has any, else NVML, else none (CPU only).
    pub fn detect(config: &GpuConfig) -> Arc<Gpus> {
        let ledger = Arc::new(Ledger::default());
        let inventory: Box<dyn Inventory> = if !config.simulated.is_empty() {
            tracing::warn!(
                gpus = config.simulated.len(),
                "using simulated GPUs from [[gpus.simulated]]; their replicas run on the CPU"
            );
            Box::new(Simulated::new(config.simulated.clone(), Arc::clone(&ledger)))
        } else {
            match NvmlInventory::open() {
                Ok(nvml) => Box::new(nvml),
                Err(reason) => {
                    tracing::info!("no NVIDIA driver ({reason}); CPU-only inventory, models run on the CPU");
                    Box::new(NoGpus)
                }
            }
        };
        Gpus::with_inventory(inventory, ledger)
    }

    /// An inventory from any source; `ledger` must be the one a simulated source reads.
    pub fn with_inventory(inventory: Box<dyn Inventory>, ledger: Arc<Ledger>) -> Arc<Gpus> {
        let gpus = Arc::new(Gpus {
            inventory,
            latest: RwLock::new(Arc::new(Vec::new())),
            ledger,
        });
        let first = gpus.refresh();
        for gpu in first.iter() {
            tracing::info!(
                gpu = gpu.index,
                name = %gpu.name,
                memory_mib = gpu.memory_total_bytes >> 20,
                simulated = gpu.simulated,
                "GPU found"
            );
        }
        gpus
    }

    /// Samples now and keeps the sample as the latest.
    pub fn refresh(&self) -> Arc<Vec<GpuInfo>> {
        let sample = Arc::new(self.inventory.sample());
        *self.latest.writing() = Arc::clone(&sample);
        sample
    }

    pub fn latest(&self) -> Arc<Vec<GpuInfo>> {
        Arc::clone(&self.latest.reading())
    }

    pub fn simulated(&self) -> bool {
        self.inventory.simulated()
    }

    /// Refreshes the sample every `every` until the last `Arc<Gpus>` is gone.
    pub fn spawn_poller(self: &Arc<Self>, every: Duration) -> std::io::Result<()> {
        let weak: Weak<Gpus> = Arc::downgrade(self);
        thread::Builder::new().name("kiln-gpu-poll".into()).spawn(move || {
            loop {
                thread::sleep(every);
                match weak.upgrade() {
                    Some(gpus) => {
                        gpus.refresh();
                    }
                    None => return,
                }
            }
        })?;
        Ok(())
    }
}

/// No driver, no GPUs.
struct NoGpus;

impl Inventory for NoGpus {
    fn sample(&self) -> Vec<GpuInfo> {
        Vec::new()
    }

    fn simulated(&self) -> bool {
        false
    }
}

/// The real thing, through the driver's NVML library (loaded at run time).
struct NvmlInventory {
    nvml: Nvml,
    /// GPUs libtorch can use; NVML may see more (a CPU-only libtorch sees none).
    usable: u32,
}

impl NvmlInventory {
    fn open() -> Result<NvmlInventory, String> {
        let nvml = Nvml::init().map_err(|e| e.to_string())?;
        let seen = nvml.device_count().map_err(|e| e.to_string())?;
        let usable = (crate::model::backend::torch::cuda::device_count() as u32).min(seen);
        if usable < seen {
            tracing::warn!(
                nvml = seen,
                libtorch = usable,
                "libtorch sees fewer GPUs than the driver; only the first {usable} are used"
            );
        }
        Ok(NvmlInventory { nvml, usable })
    }
}

impl Inventory for NvmlInventory {
    fn sample(&self) -> Vec<GpuInfo> {
        (0..self.usable)
            .filter_map(|index| {
                let device = match self.nvml.device_by_index(index) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(gpu = index, "NVML cannot read the GPU: {e}");
                        return None;
                    }
                };
                let memory = device.memory_info().ok()?;
                let utilization = device.utilization_rates().map(|u| u.gpu).unwrap_or(0);
                Some(GpuInfo {
                    index,
                    name: device.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
                    uuid: device.uuid().unwrap_or_default(),
                    memory_total_bytes: memory.total,
                    memory_used_bytes: memory.used,
                    memory_free_bytes: memory.free,
                    utilization_percent: utilization,
                    temperature_celsius: device.temperature(TemperatureSensor::Gpu).unwrap_or(0),
                    power_watts: f64::from(device.power_usage().unwrap_or(0)) / 1000.0,
                    power_limit_watts: f64::from(device.enforced_power_limit().unwrap_or(0)) / 1000.0,
                    simulated: false,
                })
            })
            .collect()
    }

    fn simulated(&self) -> bool {
        false
    }
}

/// Stand-in GPUs whose outside load follows a script; Kiln's own loaded replicas add to their
/// used memory as they would on a real GPU.
pub struct Simulated {
    gpus: Vec<SimulatedGpuConfig>,
    started: Instant,
    ledger: Arc<Ledger>,
}

impl Simulated {
    pub fn new(gpus: Vec<SimulatedGpuConfig>, ledger: Arc<Ledger>) -> Simulated {
        Simulated {
            gpus,
            started: Instant::now(),
            ledger,
        }
    }
}

impl Inventory for Simulated {
    fn sample(&self) -> Vec<GpuInfo> {
        let now = self.started.elapsed();
        self.gpus
            .iter()
            .enumerate()
            .map(|(i, gpu)| {
                let index = i as u32;
                // The last step that has started; before the first, an idle GPU.
                let (outside, utilization) = gpu
                    .script
                    .iter()
                    .rev()
                    .find(|s| s.at <= now)
                    .map_or((0, 0), |s| (s.memory_used_bytes, s.utilization));
                let used = (outside + self.ledger.loaded(index)).min(gpu.memory_total_bytes);
                GpuInfo {
                    index,
                    name: gpu.name.clone(),
                    uuid: format!("GPU-simulated-{index}"),
                    memory_total_bytes: gpu.memory_total_bytes,
                    memory_used_bytes: used,
                    memory_free_bytes: gpu.memory_total_bytes - used,
                    utilization_percent: utilization,
                    temperature_celsius: 30 + utilization / 2,
                    power_watts: 50.0 + 3.0 * f64::from(utilization),
                    power_limit_watts: 350.0,
                    simulated: true,
                }
            })
            .collect()
    }

    fn simulated(&self) -> bool {
        true
    }
}

/// Where the GPU inventory comes from (`[gpus]`).
#[derive(Debug, Clone, PartialEq)]
pub struct GpuConfig {
    pub poll_interval: Duration,
    /// When not empty, these stand in for NVML: for tests and demos of placement and scaling on
    /// machines without GPUs. Replicas placed on them run on the CPU.
    pub simulated: Vec<SimulatedGpuConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimulatedGpuConfig {
    pub name: String,
    pub memory_total_bytes: u64,
    /// Memory and utilization used by others over time, as steps from the server's start.
    pub script: Vec<SimulatedStep>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimulatedStep {
    pub at: Duration,
    pub memory_used_bytes: u64,
    pub utilization: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::device::Reservation as _;

    #[test]
    fn a_simulated_gpu_follows_its_script_and_counts_loaded_replicas() {
        let gpu = SimulatedGpuConfig {
            name: "Sim".into(),
            memory_total_bytes: 1000 << 20,
            script: vec![
                SimulatedStep { at: Duration::ZERO, memory_used_bytes: 100 << 20, utilization: 10 },
                SimulatedStep { at: Duration::from_millis(150), memory_used_bytes: 600 << 20, utilization: 90 },
            ],
        };
        let ledger = Arc::new(Ledger::default());
        let gpus = Gpus::with_inventory(Box::new(Simulated::new(vec![gpu], Arc::clone(&ledger))), Arc::clone(&ledger));
        let first = gpus.refresh();
        assert_eq!(first[0].memory_free_bytes, 900 << 20);
        assert_eq!(first[0].utilization_percent, 10);
        assert!(first[0].simulated && gpus.simulated());

        // Booked memory shows once the replica has loaded, and goes when it is dropped.
        let mut booking = ledger.book(0, 50 << 20);
        assert_eq!((ledger.pending(0), gpus.refresh()[0].memory_free_bytes), (50 << 20, 900 << 20));
        booking.loaded();
        assert_eq!((ledger.pending(0), gpus.refresh()[0].memory_free_bytes), (0, 850 << 20));
        drop(booking);
        assert_eq!(gpus.refresh()[0].memory_free_bytes, 900 << 20);

        thread::sleep(Duration::from_millis(200));
        let later = gpus.refresh();
        assert_eq!((later[0].memory_free_bytes, later[0].utilization_percent), (400 << 20, 90));
        assert_eq!(gpus.latest()[0].utilization_percent, 90);
    }

    #[test]
    fn without_a_driver_the_inventory_is_empty_not_an_error() {
        // This machine has no NVIDIA driver (or, on a GPU host, a real one): either way
        // detection returns, and only real GPUs are listed.
        let gpus = Gpus::detect(&GpuConfig { poll_interval: Duration::from_secs(1), simulated: Vec::new() });
        assert!(!gpus.simulated());
        assert!(gpus.latest().iter().all(|g| !g.simulated));
        if std::env::var_os("KILN_EXPECT_GPU").is_none() && crate::model::backend::torch::cuda::device_count() == 0 {
            assert!(gpus.latest().is_empty());
        }
    }
}
