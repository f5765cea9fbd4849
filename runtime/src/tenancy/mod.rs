//! Tenants: who they are and what they may use ([`TenantConfig`], [`Quota`]); at run time their
//! rate and concurrency quotas, their share of the sandbox pool, and the gate their long-running
//! guests take turns through for CPU. Beside them: API keys and signatures ([`keys`]) and the
//! audit log ([`audit`]).

pub mod audit;
pub mod keys;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::model::spec::DeviceChoice;
use crate::sandbox::SandboxLimits;

/// A tenant's live state.
#[derive(Debug)]
pub struct Tenant {
    pub config: TenantConfig,
    bucket: Mutex<TokenBucket>,
    in_flight: AtomicU32,
    /// Sandboxes this tenant's guests hold now.
    sandboxes: AtomicU32,
    /// One permit: the tenant's long-running guests run one at a time, in turn (FIFO), so a
    /// tenant with a hundred busy loops gets no more CPU than a tenant with one.
    cpu: Arc<tokio::sync::Semaphore>,
}

/// Why a request was refused before it started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuotaRefusal {
    #[error("tenant '{tenant}' is over its rate of {rate} requests per second")]
    Rate {
        tenant: String,
        rate: String,
        retry_after: Duration,
    },
    #[error("tenant '{tenant}' already has {limit} requests in flight, its limit")]
    Concurrency { tenant: String, limit: u32 },
    #[error("tenant '{tenant}' already holds {limit} sandboxes, its share of the pool")]
    Sandboxes { tenant: String, limit: u32 },
}

impl QuotaRefusal {
    /// Whole seconds a client should wait before retrying (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            QuotaRefusal::Rate { retry_after, .. } => retry_after.as_secs_f64().ceil().max(1.0) as u64,
            QuotaRefusal::Concurrency { .. } | QuotaRefusal::Sandboxes { .. } => 1,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            QuotaRefusal::Rate { .. } => "rate",
            QuotaRefusal::Concurrency { .. } => "concurrency",
            QuotaRefusal::Sandboxes { .. } => "sandboxes",
        }
    }
}

/// A slot in a tenant's concurrency quota, released on drop.
#[derive(Debug)]
pub struct Permit(Arc<Tenant>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One of a tenant's sandbox slots, released on drop.
#[derive(Debug)]
pub struct SandboxSlot(Arc<Tenant>);

impl Drop for SandboxSlot {
    fn drop(&mut self) {
        self.0.sandboxes.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Tenant {
    pub fn new(config: TenantConfig) -> Tenant {
        let bucket = TokenBucket::new(config.quota.requests_per_second, config.quota.burst, Instant::now());
        Tenant {
            config,
            bucket: Mutex::new(bucket),
            in_flight: AtomicU32::new(0),
            sandboxes: AtomicU32::new(0),
            cpu: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    /// Takes one of the tenant's sandbox slots for a guest's whole life.
    pub fn sandbox_slot(self: &Arc<Self>) -> Result<SandboxSlot, QuotaRefusal> {
        let limit = self.config.quota.max_instances;
        let previous = self.sandboxes.fetch_add(1, Ordering::AcqRel);
        let slot = SandboxSlot(Arc::clone(self));
        if previous >= limit {
            return Err(QuotaRefusal::Sandboxes {
                tenant: self.config.name.clone(),
                limit,
            });
        }
        Ok(slot)
    }

    /// Sandboxes held now.
    pub fn sandboxes(&self) -> u32 {
        self.sandboxes.load(Ordering::Acquire)
    }

    /// The gate the tenant's long-running guests take turns through.
    pub fn cpu_gate(&self) -> Arc<tokio::sync::Semaphore> {
        Arc::clone(&self.cpu)
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Admits one request, or says which quota refuses it. A refused request uses up nothing.
    pub fn admit(self: &Arc<Self>) -> Result<Permit, QuotaRefusal> {
        let limit = self.config.quota.max_concurrent;
        let previous = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let permit = Permit(Arc::clone(self));
        if previous >= limit {
            return Err(QuotaRefusal::Concurrency {
                tenant: self.config.name.clone(),
                limit,
            });
        }
        let taken = match self.bucket.lock() {
            Ok(mut bucket) => bucket.take(Instant::now()),
            // A panic while holding this lock cannot leave the bucket inconsistent.
            Err(poisoned) => poisoned.into_inner().take(Instant::now()),
        };
        match taken {
            Ok(()) => Ok(permit),
            Err(retry_after) => {
                Err(QuotaRefusal::Rate {
                    tenant: self.config.name.clone(),
                    rate: format!("{}", self.config.quota.requests_per_second),
                    retry_after,
                })
            }
        }
    }
}

/// Refills at `rate` tokens per second up to `burst`; each request takes one.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes a token, or returns how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// A tenant: who may call which handlers, see which models, and within what limits.
#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub name: String,
    /// The models this tenant's handlers (and its OIP calls) may use.
    pub models: Vec<String>,
    /// When set, every deployment for this tenant must carry an Ed25519 signature by this key.
    pub signing_key: Option<[u8; 32]>,
    pub quota: Quota,
}

/// A tenant's limits. Handlers may tighten the sandbox limits, never loosen them.
#[derive(Debug, Clone, PartialEq)]
pub struct Quota {
    /// Sustained request rate (token bucket refill); over it → 429 with `Retry-After`.
    pub requests_per_second: f64,
    /// Requests that may arrive at once above the sustained rate (bucket size).
    pub burst: u32,
    /// Requests in flight at once, response bodies and guests still running included; over it
    /// → 429.
    pub max_concurrent: u32,
    /// Sandboxes of the server's pool this tenant's guests may hold at once; over it → 429.
    pub max_instances: u32,
    pub max_body_bytes: usize,
    pub limits: SandboxLimits,
    /// Models it may load into its own namespace, and their files' bytes in all.
    pub max_models: u32,
    pub max_model_bytes: u64,
    /// Its own models' versions served, instances (their `instances` maximum) and threads
    /// (instances times `threads`), each counted across all of them.
    pub max_model_versions: u32,
    pub max_model_instances: u32,
    pub max_model_threads: u32,
    /// Where its own models may run (the CPU alone by default).
    pub model_devices: ModelDevices,
    /// The smallest `latency_objective_ms` its own models may ask for (a small objective makes
    /// the scaler add instances sooner).
    pub min_latency_objective_ms: u64,
}

/// Where a tenant's own models may run: the CPU, any GPU, or some GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDevices {
    cpu: bool,
    any_gpu: bool,
    gpus: Vec<usize>,
}

impl ModelDevices {
    pub fn cpu_only() -> ModelDevices {
        ModelDevices { cpu: true, any_gpu: false, gpus: Vec::new() }
    }

    /// Reads `["cpu", "cuda", "cuda:N", ...]`.
    pub fn parse(list: &[String]) -> Result<ModelDevices, String> {
        let mut devices = ModelDevices { cpu: false, any_gpu: false, gpus: Vec::new() };
        for item in list {
            match item.as_str() {
                "cpu" => devices.cpu = true,
                "cuda" => devices.any_gpu = true,
                other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
                    Some(n) => devices.gpus.push(n),
                    None => return Err(format!("'{other}' is not a device; use \"cpu\", \"cuda\" (any GPU) or \"cuda:N\"")),
                },
            }
        }
        if list.is_empty() {
            return Err("an empty list allows no device; leave it out for the CPU alone".to_owned());
        }
        Ok(devices)
    }

    /// Whether a model asking for `choice` stays within these devices. `auto` may land on the
    /// CPU or any GPU, so it needs both.
    pub fn allows(&self, choice: &DeviceChoice) -> bool {
        let gpu = |n: &usize| self.any_gpu || self.gpus.contains(n);
        match choice {
            DeviceChoice::Cpu => self.cpu,
            DeviceChoice::Auto => self.cpu && self.any_gpu,
            DeviceChoice::Gpus(list) => !list.is_empty() && list.iter().all(gpu),
        }
    }
}

impl std::fmt::Display for ModelDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<String> = Vec::new();
        if self.cpu {
            names.push("cpu".to_owned());
        }
        if self.any_gpu {
            names.push("cuda".to_owned());
        }
        names.extend(self.gpus.iter().map(|n| format!("cuda:{n}")));
        f.write_str(&names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn tenant(quota: &str) -> Arc<Tenant> {
        let text = format!("[[tenant]]\nname = \"t\"\nquota = {{ {quota} }}\n");
        let config = Config::parse(&text, Path::new("t.toml"), Path::new("/")).expect("config");
        Arc::new(Tenant::new(config.tenants[0].clone()))
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3, start);
        for _ in 0..3 {
            assert_eq!(bucket.take(start), Ok(()));
        }
        let wait = bucket.take(start).expect_err("empty");
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        assert_eq!(bucket.take(start + Duration::from_millis(100)), Ok(()));
        assert!(bucket.take(start + Duration::from_millis(150)).is_err());
        // Idle time refills only up to the burst.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(bucket.take(later), Ok(()));
        }
        assert!(bucket.take(later).is_err());
    }

    #[test]
    fn concurrency_is_released_when_permits_drop_and_refusals_cost_nothing() {
        let t = tenant("max_concurrent = 2, requests_per_second = 1000000");
        let a = t.admit().expect("first");
        let b = t.admit().expect("second");
        let refused = t.admit().expect_err("third");
        assert_eq!(refused.kind(), "concurrency");
        assert_eq!(t.in_flight(), 2);
        drop(a);
        let c = t.admit().expect("after a release");
        drop((b, c));
        assert_eq!(t.in_flight(), 0);

        let t = tenant("requests_per_second = 1, burst = 1");
        let first = t.admit().expect("first");
        drop(first);
        let refused = t.admit().expect_err("over the rate");
        assert_eq!(refused.kind(), "rate");
        assert_eq!(refused.retry_after_secs(), 1);
        assert_eq!(t.in_flight(), 0, "a refused request holds no slot");
    }

    #[test]
    fn sandbox_slots_are_capped_at_the_tenant_share_and_half_the_pool_by_default() {
        let t = tenant("max_instances = 2");
        let (a, b) = (t.sandbox_slot().expect("first"), t.sandbox_slot().expect("second"));
        assert_eq!(t.sandbox_slot().expect_err("third").kind(), "sandboxes");
        drop(a);
        let c = t.sandbox_slot().expect("after a release");
        drop((b, c));
        assert_eq!(t.sandboxes(), 0);
        assert_eq!(tenant("").config.quota.max_instances, crate::config::DEFAULT_MAX_INSTANCES / 2);
        let text = "[server]\nmax_instances = 10\n[[tenant]]\nname = \"t\"\nquota = { max_instances = 11 }\n";
        let e = Config::parse(text, Path::new("t.toml"), Path::new("/")).expect_err("over the pool");
        assert_eq!(e.to_string(), "t.toml: tenant 't'.quota.max_instances: 11 is out of range (1 ..= 10)");
    }
}
