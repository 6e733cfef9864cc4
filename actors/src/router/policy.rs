//! Routing policies: given a request, the workers' loads and their KV overlap, pick one.
//!
//! The KV policy's cost of sending a request to worker `w` is
//! `overlap_weight × (request blocks − overlap(w)) + active_blocks(w)`:
//! the prefill work still to do there, plus the decode load it already carries. With
//! temperature 0 the cheapest worker wins; ties go to the lower load, then the lower
//! `WorkerId`, so the choice never depends on input order. With temperature > 0 the worker
//! is sampled from softmax(−cost / temperature) with a seeded generator.

use super::config::{PolicyKind, RouterConfig};
use crate::ids::{RequestId, WorkerId};
use crate::kv::hash::{BlockHash, BlockSize};
use crate::kv::indexer::OverlapScores;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A request as the router sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteRequest {
    pub id: RequestId,
    /// Sequence hashes of the prompt's full blocks (see [`crate::kv::hash::hash_blocks`]).
    pub hashes: Vec<BlockHash>,
    /// Prompt length in tokens (the trailing partial block counts as a block to compute).
    pub token_count: usize,
    /// Workers not to pick: those this request was already lost, stalled or released on
    /// (a migration), which the router may not know about yet. Empty for a new request.
    #[serde(default)]
    pub avoid: Vec<WorkerId>,
    /// This request's own overlap weight and temperature, where the client set them.
    #[serde(default)]
    pub overrides: RouteOverrides,
}

/// Per-request replacements for the router's `overlap_weight` and `temperature` (a client
/// that knows its prompt is unique can ask for load balance only, another for strict
/// cache affinity). `None` keeps the configured value. The KV policy picks with both; the
/// baselines (round robin, random) do not pick by cost, so they only report the cost of
/// their choice with the overridden weight, as they do with the configured one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteOverrides {
    pub overlap_weight: Option<f64>,
    pub temperature: Option<f64>,
}

/// An override out of range.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum OverrideError {
    #[error("overlap weight must be finite and >= 0, got {0}")]
    OverlapWeight(f64),
    #[error("router temperature must be finite and >= 0, got {0}")]
    Temperature(f64),
}

impl RouteOverrides {
    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        self.overlap_weight.is_none() && self.temperature.is_none()
    }

    /// The overridden overlap weight if set and in range, else `configured`.
    pub fn weight_or(&self, configured: f64) -> f64 {
        (self.overlap_weight)
            .filter(|v| v.is_finite() && *v >= 0.0)
            .unwrap_or(configured)
    }

    /// The overridden temperature if set and in range, else `configured`.
    pub fn temperature_or(&self, configured: f64) -> f64 {
        (self.temperature)
            .filter(|v| v.is_finite() && *v >= 0.0)
            .unwrap_or(configured)
    }

    /// The same bounds as the config's (see [`RouterConfig::validate`]).
    pub fn validate(&self) -> Result<(), OverrideError> {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        if let Some(w) = self.overlap_weight.filter(|w| !ok(*w)) {
            return Err(OverrideError::OverlapWeight(w));
        }
        if let Some(t) = self.temperature.filter(|t| !ok(*t)) {
            return Err(OverrideError::Temperature(t));
        }
        Ok(())
    }
}

impl RouteRequest {
    /// Blocks the request occupies: full blocks plus a partial one, at least `hashes.len()`.
    pub fn blocks(&self, block_size: BlockSize) -> u32 {
        let n = block_size
            .blocks_for(self.token_count)
            .max(self.hashes.len());
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// A candidate worker and its decode load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerLoad {
    pub worker: WorkerId,
    /// KV blocks held by running requests on the worker.
    pub active_blocks: u64,
    pub active_requests: u32,
}

/// The choice and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteDecision {
    pub worker: WorkerId,
    /// Leading request blocks the chosen worker already holds.
    pub overlap_blocks: u32,
    /// Blocks the request occupies.
    pub request_blocks: u32,
    /// The KV cost of the chosen worker (computed for every policy, for comparison).
    pub cost: f64,
}

/// Why no worker could be picked.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteError {
    #[error("no workers available")]
    NoWorkers,
    /// Every routable worker is at `router.busy_threshold`: hold the request up to
    /// `hold_ms` (the router's `queue_timeout_ms`) and ask again.
    #[error("every worker is busy")]
    AllBusy { hold_ms: u64 },
}

/// Picks a worker. Implementations are deterministic given their seed and call sequence.
pub trait RoutingPolicy: Send {
    fn select(
        &mut self,
        now: Duration,
        request: &RouteRequest,
        workers: &[WorkerLoad],
        overlaps: &OverlapScores,
    ) -> Result<RouteDecision, RouteError>;
}

/// KV cost of `load` for a request of `request_blocks` blocks with `overlap` cached.
pub fn kv_cost(overlap_weight: f64, request_blocks: u32, overlap: u32, load: &WorkerLoad) -> f64 {
    let prefill = f64::from(request_blocks.saturating_sub(overlap));
    overlap_weight * prefill + load.active_blocks as f64
}

fn decision(
    w: &WorkerLoad,
    request_blocks: u32,
    overlaps: &OverlapScores,
    weight: f64,
) -> RouteDecision {
    let overlap = overlaps.get(w.worker).min(request_blocks);
    RouteDecision {
        worker: w.worker,
        overlap_blocks: overlap,
        request_blocks,
        cost: kv_cost(weight, request_blocks, overlap, w),
    }
}

/// Workers sorted by id: every policy sees the same order whatever the caller passed.
fn sorted(workers: &[WorkerLoad]) -> Vec<WorkerLoad> {
    let mut v = workers.to_vec();
    v.sort_by_key(|w| w.worker);
    v.dedup_by_key(|w| w.worker);
    v
}

/// KV-overlap and load aware policy.
#[derive(Clone, Debug)]
pub struct KvPolicy {
    overlap_weight: f64,
    temperature: f64,
    block_size: BlockSize,
    rng: ChaCha8Rng,
}

impl KvPolicy {
    pub fn new(overlap_weight: f64, temperature: f64, block_size: BlockSize, seed: u64) -> Self {
        KvPolicy {
            overlap_weight,
            temperature,
            block_size,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
}

impl RoutingPolicy for KvPolicy {
    fn select(
        &mut self,
        _now: Duration,
        request: &RouteRequest,
        workers: &[WorkerLoad],
        overlaps: &OverlapScores,
    ) -> Result<RouteDecision, RouteError> {
        let workers = sorted(workers);
        let request_blocks = request.blocks(self.block_size);
        // An override out of range (a caller that skipped validation) keeps the config's.
        let weight = request.overrides.weight_or(self.overlap_weight);
        let temperature = request.overrides.temperature_or(self.temperature);
        let candidates: Vec<(RouteDecision, u64)> = workers
            .iter()
            .map(|w| {
                (
                    decision(w, request_blocks, overlaps, weight),
                    w.active_blocks,
                )
            })
            .collect();
        if candidates.is_empty() {
            return Err(RouteError::NoWorkers);
        }
        if temperature > 0.0 {
            let min = candidates
                .iter()
                .map(|(d, _)| d.cost)
                .fold(f64::INFINITY, f64::min);
            // exp(-(cost - min)/T): the cheapest gets weight 1, so the sum never underflows.
            let weights: Vec<f64> = candidates
                .iter()
                .map(|(d, _)| (-(d.cost - min) / temperature).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            let mut pick = self.rng.gen::<f64>() * total;
            for ((d, _), wgt) in candidates.iter().zip(&weights) {
                if pick < *wgt {
                    return Ok(d.clone());
                }
                pick -= wgt;
            }
            // Rounding left `pick` past the end: fall through to the cheapest.
        }
        candidates
            .into_iter()
            .min_by(|(a, la), (b, lb)| {
                a.cost
                    .total_cmp(&b.cost)
                    .then(la.cmp(lb))
                    .then(a.worker.cmp(&b.worker))
            })
            .map(|(d, _)| d)
            .ok_or(RouteError::NoWorkers)
    }
}

/// Baseline: workers in id order, one after another.
#[derive(Clone, Debug)]
pub struct RoundRobinPolicy {
    next: u64,
    overlap_weight: f64,
    block_size: BlockSize,
}

impl RoundRobinPolicy {
    pub fn new(overlap_weight: f64, block_size: BlockSize) -> Self {
        RoundRobinPolicy {
            next: 0,
            overlap_weight,
            block_size,
        }
    }
}

impl RoutingPolicy for RoundRobinPolicy {
    fn select(
        &mut self,
        _now: Duration,
        request: &RouteRequest,
        workers: &[WorkerLoad],
        overlaps: &OverlapScores,
    ) -> Result<RouteDecision, RouteError> {
        let workers = sorted(workers);
        let n = workers.len() as u64;
        if n == 0 {
            return Err(RouteError::NoWorkers);
        }
        let i = usize::try_from(self.next % n).unwrap_or(0);
        self.next = self.next.wrapping_add(1);
        let w = workers.get(i).ok_or(RouteError::NoWorkers)?;
        Ok(decision(
            w,
            request.blocks(self.block_size),
            overlaps,
            request.overrides.weight_or(self.overlap_weight),
        ))
    }
}

/// Baseline: uniform over workers, from a seeded generator.
#[derive(Clone, Debug)]
pub struct RandomPolicy {
    rng: ChaCha8Rng,
    overlap_weight: f64,
    block_size: BlockSize,
}

impl RandomPolicy {
    pub fn new(seed: u64, overlap_weight: f64, block_size: BlockSize) -> Self {
        RandomPolicy {
            rng: ChaCha8Rng::seed_from_u64(seed),
            overlap_weight,
            block_size,
        }
    }
}

impl RoutingPolicy for RandomPolicy {
    fn select(
        &mut self,
        _now: Duration,
        request: &RouteRequest,
        workers: &[WorkerLoad],
        overlaps: &OverlapScores,
    ) -> Result<RouteDecision, RouteError> {
        let workers = sorted(workers);
        if workers.is_empty() {
            return Err(RouteError::NoWorkers);
        }
        let i = self.rng.gen_range(0..workers.len());
        let w = workers.get(i).ok_or(RouteError::NoWorkers)?;
        Ok(decision(
            w,
            request.blocks(self.block_size),
            overlaps,
            request.overrides.weight_or(self.overlap_weight),
        ))
    }
}

/// The configured policy (one of the three behind the same trait).
#[derive(Clone, Debug)]
pub enum Policy {
    Kv(KvPolicy),
    RoundRobin(RoundRobinPolicy),
    Random(RandomPolicy),
}

impl Policy {
    pub fn from_config(c: &RouterConfig) -> Policy {
        match c.policy {
            PolicyKind::Kv => Policy::Kv(KvPolicy::new(
                c.overlap_weight,
                c.temperature,
                c.block_size,
                c.seed,
            )),
            PolicyKind::RoundRobin => {
                Policy::RoundRobin(RoundRobinPolicy::new(c.overlap_weight, c.block_size))
            }
            PolicyKind::Random => {
                Policy::Random(RandomPolicy::new(c.seed, c.overlap_weight, c.block_size))
            }
        }
    }
}

impl RoutingPolicy for Policy {
    fn select(
        &mut self,
        now: Duration,
        request: &RouteRequest,
        workers: &[WorkerLoad],
        overlaps: &OverlapScores,
    ) -> Result<RouteDecision, RouteError> {
        match self {
            Policy::Kv(p) => p.select(now, request, workers, overlaps),
            Policy::RoundRobin(p) => p.select(now, request, workers, overlaps),
            Policy::Random(p) => p.select(now, request, workers, overlaps),
        }
    }
}
