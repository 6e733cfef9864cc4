//! A simulated worker: the real `turbine_actors::worker::Scheduler` (continuous batching,
//! chunked prefill, prefix caching, preemption, KV events) driven exactly as the worker actor
//! drives it, with the forward pass replaced by a cost-model delay and a deterministic
//! "sampler". This is the seam where the worker actor's shell can later be dropped in.

use crate::profile::{Profile, StepPricing};
use crate::rng::mix64;
use crate::time::{SimDuration, SimTime};
use std::collections::BTreeSet;
use turbine_actors::ids::{RequestId, TokenId, WorkerId};
use turbine_actors::kv::{BlockHash, KvEvent};
use turbine_actors::protocol::{FinishReason, PreprocessedRequest, TokenOutput};
use turbine_actors::worker::{
    BlockManager, BlockStats, ConfigError, InvariantViolation, SampledToken, ScheduledSeq,
    Scheduler, StepPlan,
};

/// One streamed token (or error) with its index within the attempt, so the router can put
/// reordered messages back in order.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexedOutput {
    pub request: RequestId,
    /// Tokens this attempt generated before this one.
    pub index: u32,
    pub output: TokenOutput,
}

/// What a finished step produced.
pub struct StepResult {
    pub outputs: Vec<IndexedOutput>,
    pub kv_events: Vec<KvEvent>,
}

pub struct SimWorker {
    pub id: WorkerId,
    pub alive: bool,
    sched: Scheduler,
    in_flight: Option<StepPlan>,
    /// Next KV event batch sequence number.
    pub kv_seq: u64,
    /// Blocks this incarnation announced as stored and not removed: what a resync sends.
    held: BTreeSet<BlockHash>,
    /// Cancels that arrived before their request (reordering): the request is refused.
    early_cancels: BTreeSet<RequestId>,
    pending_events: Vec<KvEvent>,
    /// Virtual time spent in forward passes (all incarnations).
    pub busy: SimDuration,
    pub steps: u64,
    /// Cache statistics of crashed incarnations, so hit rates cover the whole run.
    retired: BlockStats,
    pub crashes: u32,
}

impl SimWorker {
    pub fn new(id: WorkerId, profile: &Profile) -> Result<Self, ConfigError> {
        Ok(SimWorker {
            id,
            alive: true,
            sched: fresh_scheduler(profile)?,
            in_flight: None,
            kv_seq: 0,
            held: BTreeSet::new(),
            early_cancels: BTreeSet::new(),
            pending_events: Vec::new(),
            busy: SimDuration(0),
            steps: 0,
            retired: BlockStats::default(),
            crashes: 0,
        })
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    pub fn block_manager(&self) -> &BlockManager {
        self.sched.block_manager()
    }

    pub fn held_blocks(&self) -> Vec<BlockHash> {
        self.held.iter().copied().collect()
    }

    pub fn has_step_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Queues a request; a refusal is returned as the request's final (error) output.
    pub fn submit(&mut self, req: PreprocessedRequest, now: SimTime) -> Option<IndexedOutput> {
        let id = req.id;
        if self.early_cancels.remove(&id) {
            return None;
        }
        match self.sched.add_request(req, now.as_duration()) {
            Ok(()) => None,
            Err(e) => Some(IndexedOutput {
                request: id,
                index: 0,
                output: TokenOutput {
                    token_ids: vec![],
                    logprobs: None,
                    finish: Some(FinishReason::Error(e.to_string())),
                    cached_tokens: None,
                },
            }),
        }
    }

    pub fn cancel(&mut self, id: RequestId) {
        if !self.sched.abort(id) {
            self.early_cancels.insert(id);
        }
    }

    /// Plans the next step if none is running; returns its virtual duration.
    pub fn start_step(&mut self, now: SimTime, profile: &Profile) -> Option<SimDuration> {
        if !self.alive || self.in_flight.is_some() {
            return None;
        }
        let plan = self.sched.schedule(now.as_duration()).ok()?;
        self.pending_events.extend(self.sched.drain_kv_events());
        if plan.is_empty() {
            return None;
        }
        let d = profile.step_time.step_time(&plan);
        self.busy = SimDuration(self.busy.0 + d.0);
        self.steps += 1;
        self.in_flight = Some(plan);
        Some(d)
    }

    /// Completes the step in flight: samples a deterministic token per `want_logits` entry.
    pub fn finish_step(&mut self, now: SimTime) -> StepResult {
        let Some(plan) = self.in_flight.take() else {
            return StepResult {
                outputs: vec![],
                kv_events: vec![],
            };
        };
        let sampled = sample_step(&plan.seqs);
        let index_of = |r: RequestId| {
            plan.seqs
                .iter()
                .find(|s| s.request == r)
                .map_or(0, |s| s.sample_index)
        };
        let outputs = match self.sched.on_step_done(&plan, &sampled, now.as_duration()) {
            Ok(outs) => outs
                .into_iter()
                .map(|(request, output)| IndexedOutput {
                    request,
                    index: index_of(request),
                    output,
                })
                .collect(),
            Err(_) => Vec::new(), // cannot happen: the plan is the one in flight
        };
        let mut kv_events = std::mem::take(&mut self.pending_events);
        kv_events.extend(self.sched.drain_kv_events());
        track_held(&mut self.held, &kv_events);
        StepResult { outputs, kv_events }
    }

    /// The process dies: its requests, step and KV cache are gone.
    pub fn crash(&mut self) {
        self.alive = false;
        self.in_flight = None;
        self.crashes += 1;
    }

    /// A fresh process under a fresh id (stale KV state is never attributed to it).
    pub fn restart(&mut self, id: WorkerId, profile: &Profile) -> Result<(), ConfigError> {
        let old = self.sched.block_manager().stats();
        self.retired.prefix_query_tokens += old.prefix_query_tokens;
        self.retired.prefix_hit_tokens += old.prefix_hit_tokens;
        self.retired.evictions += old.evictions;
        self.sched = fresh_scheduler(profile)?;
        self.id = id;
        self.alive = true;
        self.kv_seq = 0;
        self.held.clear();
        self.early_cancels.clear();
        self.pending_events.clear();
        Ok(())
    }

    /// Prefix-cache (query, hit) tokens over all incarnations.
    pub fn prefix_tokens(&self) -> (u64, u64) {
        let s = self.sched.block_manager().stats();
        (
            self.retired.prefix_query_tokens + s.prefix_query_tokens,
            self.retired.prefix_hit_tokens + s.prefix_hit_tokens,
        )
    }

    /// Block manager invariants, plus: an idle worker holds no blocks for requests, and every
    /// block it announced is still cached.
    pub fn check_settled(&self) -> Result<(), InvariantViolation> {
        check_settled(self.id, &self.sched, &self.held)
    }
}

/// Applies a worker's KV events to the set of blocks it has announced and not removed.
pub(crate) fn track_held(held: &mut BTreeSet<BlockHash>, events: &[KvEvent]) {
    for e in events {
        match e {
            KvEvent::BlockStored { block_hashes, .. } => held.extend(block_hashes.iter().copied()),
            KvEvent::BlockRemoved { block_hashes } => {
                for h in block_hashes {
                    held.remove(h);
                }
            }
            KvEvent::AllBlocksCleared => held.clear(),
        }
    }
}

/// A settled worker's invariants: the scheduler's and block manager's own, no block held for
/// requests, and every block in `held` (announced, not removed) still cached.
pub(crate) fn check_settled(
    id: WorkerId,
    sched: &Scheduler,
    held: &BTreeSet<BlockHash>,
) -> Result<(), InvariantViolation> {
    sched.check_invariants()?;
    let bm = sched.block_manager();
    if bm.num_used_blocks() != 0 {
        return Err(InvariantViolation(format!(
            "{id}: {} blocks still referenced by requests after the run",
            bm.num_used_blocks()
        )));
    }
    if let Some(h) = held.iter().find(|h| !bm.is_cached(**h)) {
        return Err(InvariantViolation(format!(
            "{id}: announced block {h} is not cached"
        )));
    }
    Ok(())
}

/// The simulated sampler's tokens for every sequence of a step that wants logits.
pub(crate) fn sample_step<'a>(
    seqs: impl IntoIterator<Item = &'a ScheduledSeq>,
) -> Vec<SampledToken> {
    seqs.into_iter()
        .filter(|s| s.want_logits)
        .map(|s| SampledToken::new(s.request, sample_token(s.request, s.sample_index)))
        .collect()
}

fn fresh_scheduler(profile: &Profile) -> Result<Scheduler, ConfigError> {
    Scheduler::new(
        profile.scheduler.clone(),
        BlockManager::new(profile.block_manager_config()),
    )
}

/// The simulated sampler: a pure function of (request, index), never a stop token.
pub(crate) fn sample_token(request: RequestId, index: u32) -> TokenId {
    (100 + mix64(request.0.rotate_left(20) ^ u64::from(index)) % 30_000) as TokenId
}
