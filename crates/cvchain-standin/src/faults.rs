//! Faults the tests inject (`POST /_standin/faults`) and the call log they read back
//! (`GET /_standin/calls`).

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use uuid::Uuid;

/// Faults to inject, set with `POST /_standin/faults`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Faults {
    /// Share of API calls answered with an error: 429 (with Retry-After) or 500.
    pub failure_rate: f64,
    /// Share of those errors that are 429 (default one half).
    pub throttle_share: Option<f64>,
    /// Share of API calls answered after `slow_ms`.
    pub slow_rate: f64,
    pub slow_ms: u64,
    /// `Retry-After` on 429 answers, in seconds.
    pub retry_after_seconds: u64,
    /// Platforms whose exports end `Failed`.
    pub fail_export_platforms: Vec<String>,
    /// Trainings end `TrainingFailed`.
    pub fail_training: bool,
    /// The performance the next trainings report, in order (each taken once); when none is
    /// left, it is drawn from the seed. For tests that need a worse or a better iteration.
    pub next_metrics: Vec<Metrics>,
}

/// An iteration's performance, as GetIterationPerformance reports it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Metrics {
    pub precision: f64,
    pub recall: f64,
    pub average_precision: f64,
}

/// One ExportIteration call, as the stand-in saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExportCall {
    pub project_id: Uuid,
    pub iteration_id: Uuid,
    pub platform: String,
    pub flavor: Option<String>,
    /// `accepted`, `alreadyInProgress`, `rejected` or `fault`.
    pub outcome: String,
}

/// What `GET /_standin/calls` reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallLog {
    /// Calls per operation, faults included, refusals for rate not (those are in `throttled`).
    pub counts: HashMap<String, u64>,
    /// Calls per operation refused for rate (429: over the resource's calls per second).
    pub throttled: HashMap<String, u64>,
    /// Injected faults per operation.
    pub faults: HashMap<String, u64>,
    pub exports: Vec<ExportCall>,
    /// Milliseconds since start of each API call, for rate checks (refused ones included).
    pub timeline_ms: Vec<u64>,
    /// Milliseconds since start of each call refused for rate.
    pub throttled_ms: Vec<u64>,
}

/// xorshift64*: reproducible faults and metrics for a given seed.
pub fn next_f64(state: &mut u64) -> f64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
}
