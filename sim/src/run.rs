//! A simulated run: its configuration, what it records, and how it fails. The run itself is
//! [`crate::shells`]: turbine's own nodes, composed by `turbine_actors::node`, on virtual
//! time.

use crate::faults::FaultPlan;
use crate::network::{NetConfig, NetStats};
use crate::profile::Profile;
use crate::time::{SimDuration, SimTime};
use crate::workload::RequestSpec;
use turbine_actors::ids::WorkerId;
use turbine_actors::kv::BlockSize;
use turbine_actors::router::{MigrationConfig, PolicyKind, RouterConfig, RouterIndexMode};

/// Everything that shapes a run besides the workload.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub workers: u32,
    pub profile: Profile,
    pub policy: PolicyKind,
    pub net: NetConfig,
    pub faults: FaultPlan,
    pub max_attempts: u32,
    /// The frontend's migration settings (the liveness timeout is simulated time).
    pub migration: MigrationConfig,
    pub heartbeat: SimDuration,
    pub lease: SimDuration,
    pub settle: SimDuration,
    /// Keep the event log as text lines too (memory grows with the run).
    pub keep_event_log: bool,
    /// Of `workers`, how many are prefill workers (slots 1..=N); the rest are decode
    /// workers. 0: every worker is aggregated.
    pub prefill_workers: u32,
    /// The disaggregation policy and transfer settings (used when `prefill_workers > 0`).
    pub disagg: turbine_actors::disagg::DisaggregationConfig,
    /// The KV pool's shape for pricing transfers: bytes per block cross the simulated link.
    pub kv_shape: turbine_kernels::backend::KvLayout,
    /// Size the fleet with the planner (`workers` is then the starting size).
    pub planner: Option<SimPlanner>,
}

/// The planner in a simulated run: its section, acting through the simulator's connector
/// (workers added after `startup_delay`, removed after draining).
#[derive(Clone, Debug)]
pub struct SimPlanner {
    pub config: turbine_actors::planner::PlannerConfig,
    pub startup_delay: SimDuration,
}

/// What the planner did in a run.
#[derive(Clone, Debug, Default)]
pub struct PlannerOutcome {
    pub decisions: Vec<turbine_actors::planner::actor::DecisionRecord>,
    /// (workload time, workers provisioned: starting, serving or draining) at each change.
    pub timeline: Vec<(SimTime, turbine_actors::planner::Replicas)>,
}

impl SimConfig {
    pub fn new(seed: u64, workers: u32, profile: Profile) -> Self {
        let block_size = profile.block_size().as_usize();
        SimConfig {
            seed,
            workers,
            profile,
            policy: PolicyKind::Kv,
            net: NetConfig::default(),
            faults: FaultPlan::default(),
            max_attempts: 3,
            migration: MigrationConfig {
                migration_limit: 3,
                liveness_timeout_ms: 2_000,
            },
            heartbeat: SimDuration::from_millis(250),
            lease: SimDuration::from_millis(1000),
            settle: SimDuration::from_millis(3000),
            keep_event_log: false,
            planner: None,
            prefill_workers: 0,
            disagg: turbine_actors::disagg::DisaggregationConfig::default(),
            // Llama-3-8B's KV: 32 layers, 8 KV heads of 128, bf16 (2 MiB per 16-token block).
            kv_shape: turbine_kernels::backend::KvLayout {
                block_size,
                num_blocks: 0,
                n_layers: 32,
                n_kv_heads: 8,
                head_dim: 128,
                dtype: turbine_kernels::backend::KvDType::BF16,
            },
        }
    }
}

/// How a request ended.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum Outcome {
    Completed,
    Failed(String),
}

/// One request's client-side record.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RequestRecord {
    pub arrival: SimTime,
    pub input_len: u32,
    /// The workload's output length.
    pub output_len: u32,
    /// The `max_tokens` its client sent: `output_len` capped by the room the prompt leaves
    /// in the context, as the HTTP frontend caps it (`StopConditions::max_tokens_within`).
    /// A completed request streams exactly this many tokens.
    pub max_tokens: u32,
    /// When each streamed token reached the client (router), in order.
    pub token_times: Vec<SimTime>,
    pub finished: Option<SimTime>,
    pub outcome: Option<Outcome>,
    pub attempts: u32,
    /// How many times the request was resolved (must be exactly 1).
    pub resolutions: u32,
    /// The dispatcher's id of the stream that completed (the simulated sampler's key).
    pub request_id: Option<u64>,
    /// The token ids the client received, in order.
    pub tokens: Vec<u32>,
    /// Times its stream moved to another worker.
    pub migrations: u32,
    /// Prompt tokens the prefix cache served, as its first output said.
    pub cached_tokens: Option<u32>,
}

impl RequestRecord {
    /// A request that has not arrived yet.
    pub fn new(spec: &RequestSpec) -> Self {
        RequestRecord {
            arrival: spec.arrival,
            input_len: spec.input_len,
            output_len: spec.output_len,
            max_tokens: spec.output_len,
            token_times: Vec::new(),
            finished: None,
            outcome: None,
            attempts: 0,
            resolutions: 0,
            request_id: None,
            tokens: Vec::new(),
            migrations: 0,
            cached_tokens: None,
        }
    }
}

/// Invariant 1: every request resolved exactly once, and a completed one with exactly the
/// `max_tokens` it asked for (the simulated sampler never samples a stop token).
pub fn request_violations(records: &[RequestRecord]) -> Vec<String> {
    let mut violations = Vec::new();
    for (i, r) in records.iter().enumerate() {
        if r.resolutions != 1 {
            violations.push(format!("request {i} resolved {} times", r.resolutions));
        }
        if r.outcome == Some(Outcome::Completed) && r.token_times.len() != r.max_tokens as usize {
            violations.push(format!(
                "request {i} completed with {} of {} tokens",
                r.token_times.len(),
                r.max_tokens
            ));
        }
        // The simulated sampler is a pure function of (request, position), so a fault-free
        // run of this request streams exactly these tokens: a migrated stream must too (no
        // token twice, none missing, the sample index continued).
        if let (Some(Outcome::Completed), Some(id)) = (&r.outcome, r.request_id) {
            let expected = (0..r.tokens.len() as u32)
                .map(|k| crate::worker::sample_token(turbine_actors::ids::RequestId(id), k));
            if let Some(k) = expected.zip(&r.tokens).position(|(e, got)| e != *got) {
                violations.push(format!(
                    "request {i} (migrated {} times) differs from its fault-free tokens at position {k}",
                    r.migrations
                ));
            }
        }
    }
    violations
}

/// Per-worker-slot figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkerRecord {
    pub slot: u32,
    pub final_id: WorkerId,
    pub busy_s: f64,
    pub steps: u64,
    pub crashes: u32,
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
}

/// The raw result of a run (see `report` for the derived figures).
#[derive(Clone, Debug, serde::Serialize)]
pub struct SimOutcome {
    pub end: SimTime,
    pub event_log_hash: u64,
    pub events: u64,
    pub requests: Vec<RequestRecord>,
    pub workers: Vec<WorkerRecord>,
    pub net: NetStats,
    pub resyncs: u64,
    pub leases_expired: u64,
    /// Router-side prefix overlap: blocks predicted cached / blocks routed.
    pub routed_overlap_blocks: u64,
    pub routed_blocks: u64,
    pub invariant_violations: Vec<String>,
    #[serde(skip)]
    pub event_log_lines: Option<Vec<String>>,
    #[serde(skip)]
    pub planner: Option<PlannerOutcome>,
    /// Disaggregated runs: where prefills ran and what KV crossed (the frontend's counts).
    pub disagg: Option<turbine_actors::disagg::metrics::DisaggSummary>,
}

impl SimOutcome {
    /// Worker-seconds provisioned from workload time 0 to the last request's end: the
    /// planner's timeline, or `workers` all along.
    pub fn worker_seconds(&self, workers: u32) -> f64 {
        let end = self
            .requests
            .iter()
            .filter_map(|r| r.finished)
            .max()
            .unwrap_or(self.end)
            .as_secs_f64();
        let Some(p) = &self.planner else {
            return f64::from(workers) * end;
        };
        let mut total = 0.0;
        let (mut at, mut n) = (0.0, workers as usize);
        for &(t, pools) in &p.timeline {
            let t = t.as_secs_f64().min(end);
            total += (t - at).max(0.0) * n as f64;
            (at, n) = (t.max(at), pools.total());
        }
        total + (end - at).max(0.0) * n as f64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("invalid engine profile: {0}")]
    Config(#[from] turbine_actors::worker::ConfigError),
    #[error("invalid router config: {0}")]
    Router(#[from] turbine_actors::router::RouterConfigError),
    #[error("the simulation needs at least one worker")]
    NoWorkers,
    #[error("starting the actor shells: {0}")]
    Shells(String),
}

/// The router configuration a simulated run uses: `policy`, an events-fed index, and
/// `seed` for the policy's generator (random policy, softmax sampling).
pub fn router_config(policy: PolicyKind, block_size: BlockSize, seed: u64) -> RouterConfig {
    RouterConfig {
        policy,
        seed,
        block_size,
        index: RouterIndexMode::Events,
        ..RouterConfig::default()
    }
}

/// Runs one simulation (see [`crate::shells`]).
pub fn simulate(cfg: &SimConfig, workload: &[RequestSpec]) -> Result<SimOutcome, SimError> {
    crate::shells::simulate_actors(cfg, workload)
}
