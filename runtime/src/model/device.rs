//! Where a replica runs.

use std::fmt;

/// Where one replica runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Device {
    /// Whether it is a GPU: what a model's precision is chosen by, GPUs alike.
    pub fn is_gpu(self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl std::str::FromStr for Device {
    type Err = String;

    /// `cpu` or `cuda:N`, as operators write and see devices.
    fn from_str(text: &str) -> Result<Device, String> {
        match text {
            "cpu" => Ok(Device::Cpu),
            _ => match text.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!("'{text}' is not a device: use \"cpu\" or \"cuda:N\"")),
            },
        }
    }
}

/// Where a replica goes, as the fleet decided, with what it reserved there.
#[derive(Debug)]
pub struct Placement {
    /// The device the operator sees (`cuda:N` for a simulated GPU too).
    pub device: Device,
    /// Where the backend runs it: the CPU for a simulated GPU.
    pub run_on: Device,
    /// Device memory booked for the replica; released when the replica (and so this) goes.
    pub reservation: Option<Box<dyn Reservation>>,
}

impl Placement {
    /// The CPU, which books nothing.
    pub fn cpu() -> Placement {
        Placement { device: Device::Cpu, run_on: Device::Cpu, reservation: None }
    }
}

/// Memory the fleet set aside for a replica before it loaded.
pub trait Reservation: Send + fmt::Debug {
    /// The replica has loaded: from now on its memory shows in the device's own figures.
    fn loaded(&mut self);
}
