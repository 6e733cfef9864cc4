//! Router settings, as they appear under `router:` in the cluster YAML.

use crate::kv::approx::ApproxConfig;
use crate::kv::hash::BlockSize;
use serde::{Deserialize, Serialize};

/// Which policy picks the worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// KV-overlap and load aware (the default).
    #[default]
    Kv,
    /// Baseline: workers in id order, one after another.
    RoundRobin,
    /// Baseline: uniform over workers (seeded).
    Random,
}

impl PolicyKind {
    /// Every policy, in the order comparisons list them.
    pub const ALL: [PolicyKind; 3] = [PolicyKind::Kv, PolicyKind::RoundRobin, PolicyKind::Random];

    /// The name as the cluster file spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Kv => "kv",
            PolicyKind::RoundRobin => "round_robin",
            PolicyKind::Random => "random",
        }
    }

    /// Parses a policy name; `-` and `_` are interchangeable (`round-robin` on a command
    /// line, `round_robin` in a file).
    pub fn parse(name: &str) -> Option<PolicyKind> {
        let name = name.replace('-', "_");
        PolicyKind::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

/// Where the KV overlap comes from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum RouterIndexMode {
    /// Workers publish KV events into a [`FlashIndexer`](crate::kv::indexer::FlashIndexer).
    #[default]
    Events,
    /// No events: remember what was routed where, for a TTL.
    Approximate(ApproxConfig),
}

/// Router settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    pub policy: PolicyKind,
    /// Cost of one prefill block relative to one active decode block. Higher favours KV
    /// reuse over load balance.
    pub overlap_weight: f64,
    /// 0 picks the cheapest worker; above 0 samples from softmax(-cost / temperature).
    pub temperature: f64,
    /// Seed of the sampling generator (softmax and `random`), for reproducible runs.
    pub seed: u64,
    /// Tokens per KV block; must equal the workers'.
    pub block_size: BlockSize,
    pub index: RouterIndexMode,
    /// Served by a separate `turbine worker --role router` process, which registers with
    /// the frontend's registry and follows the workers' events; the frontend reaches it
    /// over the request plane. Every worker group must then be `remote` too.
    pub remote: bool,
    /// A worker with this many requests (running, waiting, and routed since its last load
    /// report) is busy: not routed to. While every routable worker is busy a request is
    /// held at the frontend (up to `queue_timeout_ms`) instead of piling onto one. `None`:
    /// no worker is ever busy.
    pub busy_threshold: Option<u32>,
    /// How long a request is held while every worker is busy before it is refused
    /// (retryable: HTTP 503 with `Retry-After`).
    pub queue_timeout_ms: u64,
    /// Several routers (one per frontend, or several router processes) keep one view:
    /// each publishes its decisions and finished requests on the event plane and applies
    /// the others' (see `router::replica_sync`).
    pub replica_sync: bool,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            policy: PolicyKind::Kv,
            overlap_weight: 1.0,
            temperature: 0.0,
            seed: 0,
            block_size: BlockSize::DEFAULT,
            index: RouterIndexMode::Events,
            remote: false,
            busy_threshold: None,
            queue_timeout_ms: 30_000,
            replica_sync: false,
        }
    }
}

/// A setting out of range.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouterConfigError {
    #[error("overlap_weight must be finite and >= 0, got {0}")]
    OverlapWeight(f64),
    #[error("temperature must be finite and >= 0, got {0}")]
    Temperature(f64),
    #[error("approximate-mode ttl_secs must be finite and > 0, got {0}")]
    Ttl(f64),
    #[error("busy_threshold must be >= 1 (a worker with 0 requests is never busy), got 0")]
    BusyThreshold,
}

impl RouterConfig {
    pub fn validate(&self) -> Result<(), RouterConfigError> {
        if !(self.overlap_weight.is_finite() && self.overlap_weight >= 0.0) {
            return Err(RouterConfigError::OverlapWeight(self.overlap_weight));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(RouterConfigError::Temperature(self.temperature));
        }
        if self.busy_threshold == Some(0) {
            return Err(RouterConfigError::BusyThreshold);
        }
        if let RouterIndexMode::Approximate(a) = &self.index {
            if !(a.ttl_secs.is_finite() && a.ttl_secs > 0.0) {
                return Err(RouterConfigError::Ttl(a.ttl_secs));
            }
        }
        Ok(())
    }
}
