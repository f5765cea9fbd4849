//! The wire types of Kiln's admin endpoints (`/v1/stats`, `/v1/scaler`): what the server sends and
//! `kiln-top` reads. Plain data with serde; no libtorch or wasmtime, so the dashboard stays small.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// One GPU as the inventory last saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// The CUDA index, `cuda:N`.
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub memory_free_bytes: u64,
    /// Percent of the last sample period a kernel was running.
    pub utilization_percent: u32,
    pub temperature_celsius: u32,
    pub power_watts: f64,
    pub power_limit_watts: f64,
    /// A stand-in from `[[gpus.simulated]]`; its replicas run on the CPU.
    pub simulated: bool,
}

/// What the scaler did about one model at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleAction {
    Up,
    Down,
    Hold,
}

impl ScaleAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ScaleAction::Up => "up",
            ScaleAction::Down => "down",
            ScaleAction::Hold => "hold",
        }
    }
}

/// One scaling decision, with the inputs that produced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingDecision {
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    pub model: String,
    pub action: ScaleAction,
    /// Replica counts before and after (equal for a hold).
    pub from: u32,
    pub to: u32,
    /// Why, in a few words ("queue wait p95 80 ms over the 50 ms objective", "at max", ...).
    pub reason: String,
    /// The device a new replica went to, for a scale-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    pub inputs: ScalingInputs,
}

/// What the scaler looked at, over the interval that ended with the decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingInputs {
    /// Requests waiting when the interval ended.
    pub queue_depth: u64,
    /// Requests that started a forward pass during the interval.
    pub requests: u64,
    /// Queue-wait 95th percentile over the interval, in milliseconds (0 without requests).
    pub queue_wait_p95_ms: f64,
    pub latency_objective_ms: f64,
    /// Fraction of the interval the replicas spent in forward passes, averaged over them.
    pub utilization: f64,
    /// The GPUs the model may use, as seen then.
    pub gpus: Vec<GpuBrief>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuBrief {
    pub device: String,
    pub utilization_percent: u32,
    pub memory_free_bytes: u64,
}

/// `GET /v1/scaler`: the most recent decisions, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalerReport {
    pub decisions: Vec<ScalingDecision>,
}

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    Loading,
    Ready,
    /// Finishing its last batch before it is removed.
    Draining,
}

/// One replica of a model, for stats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub id: u32,
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub state: ReplicaState,
    pub busy: bool,
    pub batches: u64,
    pub rows: u64,
    /// Seconds spent in forward passes.
    pub busy_seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_round_trips_with_lowercase_actions() {
        let decision = ScalingDecision {
            at_unix_ms: 1,
            model: "m".into(),
            action: ScaleAction::Up,
            from: 1,
            to: 2,
            reason: "queue".into(),
            device: Some("cuda:0".into()),
            inputs: ScalingInputs {
                queue_depth: 3,
                requests: 10,
                queue_wait_p95_ms: 80.0,
                latency_objective_ms: 50.0,
                utilization: 0.9,
                gpus: vec![GpuBrief { device: "cuda:0".into(), utilization_percent: 50, memory_free_bytes: 1 }],
            },
        };
        let text = serde_json::to_string(&decision).expect("serialize");
        assert!(text.contains("\"action\":\"up\""), "{text}");
        let back: ScalingDecision = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, decision);
    }
}
