//! Continuous batching with chunked prefill, prefix caching and recompute preemption.
//!
//! Each [`Scheduler::schedule`] call plans one forward pass under two limits: a token budget
//! (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`). In order:
//! 1. running sequences that are decoding get their one token each (oldest admitted first);
//! 2. running sequences still prefilling (a long prompt, or a recompute after preemption) get
//!    the next chunk, as much as the budget left allows;
//! 3. waiting requests are admitted in FIFO order while blocks, budget and slots allow,
//!    first reusing the longest cached prefix of their prompt. Admission stops at the first
//!    request that does not fit (no overtaking), and is skipped for a step that preempted.
//!
//! Fairness: while other requests want the budget (some wait for admission, or several
//! prompts are mid-prefill), one prefilling sequence takes at most `contended_prefill_chunk`
//! tokens a step, so a long prompt cannot hold the whole budget for many steps while a short
//! request waits behind it; alone, it takes the whole budget.
//!
//! When a running sequence needs a block and none is free, the most recently admitted
//! running sequence is preempted: its blocks are released (the full ones stay cached) and it
//! goes back to the front of the waiting queue. Its generated tokens stay part of its token
//! list, so on readmission it recomputes prompt + generated (mostly from the prefix cache)
//! and samples the *next* token: nothing is emitted twice. The oldest running sequence can
//! always progress because admission refuses requests that could not fit the pool alone.

use super::block_manager::{
    AllocError, BlockManager, BlockStats, InvariantViolation, PrefixHit, StartKind,
};
use super::config::{ConfigError, SchedulerConfig};
use super::plan::{
    PromptLogprobsAsk, PromptLogprobsChunk, SampledToken, ScheduledSeq, StepId, StepPlan,
};
use super::sequence::{Phase, Sequence};
use crate::ids::{RequestId, TokenId};
use crate::kv::events::KvEvent;
use crate::protocol::{FinishReason, PreprocessedRequest, SamplingParams, TokenOutput};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

mod embeds;
mod remote_kv;
pub use embeds::EmbedsWanted;
pub use remote_kv::{Prefilled, RemoteKvAdmission};

/// Why a request was refused at [`Scheduler::add_request`]. Refused requests hold nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    #[error("request {0} is already queued or running")]
    Duplicate(RequestId),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("max_tokens is 0")]
    ZeroMaxTokens,
    #[error(
        "prompt of {prompt_len} tokens leaves no room to generate within the context length \
         of {max_model_len}"
    )]
    PromptTooLong {
        prompt_len: usize,
        max_model_len: usize,
    },
    #[error("the request needs up to {needed} KV blocks but the whole pool has {pool}")]
    ExceedsKvCapacity { needed: usize, pool: usize },
    /// `add_with_remote_kv`: not enough free blocks right now (prefill locally instead).
    #[error("not enough free KV blocks to receive the request's KV now")]
    OutOfBlocks,
    /// `add_with_remote_kv`: `max_num_seqs` sequences are running or importing.
    #[error("the worker is running its maximum number of sequences")]
    Busy,
    /// The request's grammar (`response_format`, a forced tool call) cannot be enforced here.
    #[error("constrained decoding: {0}")]
    Grammar(String),
    /// `add_with_remote_kv`: the first token already ends the request.
    #[error("the request finished with its first token; there is nothing to decode")]
    NothingToDecode,
}

/// A step-protocol misuse by the driver (one step at a time, completed with its own id).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    #[error("step {0:?} is still in flight; complete it before scheduling another")]
    StepInFlight(StepId),
    #[error("step {got:?} is not the step in flight ({expected:?})")]
    UnknownStep {
        expected: Option<StepId>,
        got: StepId,
    },
}

/// Queue depths and counters for metrics and the planner.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SchedulerStats {
    pub num_waiting: usize,
    pub num_running: usize,
    pub num_preemptions: u64,
    pub num_steps: u64,
    pub kv: BlockStats,
    /// KV blocks the waiting requests will need once admitted (their known tokens).
    #[serde(default)]
    pub waiting_blocks: u64,
    /// KV event batches the worker loop has published so far (the scheduler leaves it 0;
    /// the loop fills it in). A subscriber that has seen fewer can tell a trailing batch
    /// was lost even when no later batch comes to reveal the gap.
    #[serde(default)]
    pub kv_batches: u64,
    /// The worker is draining (the loop fills it in): it takes no new requests, so the
    /// router leaves it out of selection.
    #[serde(default)]
    pub draining: bool,
    /// Images the worker ran through its own vision tower (the loop fills it in): none
    /// where encoders made them, and none on a decode worker whose KV was imported.
    #[serde(default)]
    pub images_encoded: u64,
}

impl SchedulerStats {
    /// The worker's load in KV blocks as the router weighs it: what its running requests hold
    /// plus what its queue will need. (Blocks held alone hide a queue: a worker with a full
    /// pool and a hundred waiting requests would look as loaded as one with none.)
    pub fn load_blocks(&self) -> u64 {
        self.kv.used as u64 + self.waiting_blocks
    }
}

/// What the executor's sampler needs for one request (see [`Scheduler::sampling_context`]).
#[derive(Clone, Copy, Debug)]
pub struct SamplingContext<'a> {
    pub params: &'a SamplingParams,
    /// Top alternatives to return with each token's logprob, if logprobs were asked for.
    pub logprobs: Option<u32>,
    /// Prompt followed by generated tokens (for repetition penalties).
    pub tokens: &'a [TokenId],
    pub prompt_len: usize,
    /// Of the prompt's last tokens, how many other workers generated (a migrated
    /// continuation): penalties and `min_tokens` count them as generated.
    pub generated_before: usize,
    /// The ids that end the sequence (banned before `min_tokens`).
    pub stop_token_ids: &'a [TokenId],
}

impl SamplingContext<'_> {
    /// The tokens generated for this request so far, across workers.
    pub fn generated(&self) -> &[TokenId] {
        let start = self.prompt_len.saturating_sub(self.generated_before);
        self.tokens.get(start..).unwrap_or(&[])
    }
}

#[derive(Clone, Copy, Debug)]
struct InFlightEntry {
    request: RequestId,
    serial: u64,
    num_tokens: usize,
    want_logits: bool,
}

#[derive(Clone, Debug)]
struct InFlight {
    step: StepId,
    /// In plan order.
    entries: Vec<InFlightEntry>,
}

/// The per-worker scheduler. Pure logic: see the module doc and `worker`'s doc for the loop.
#[derive(Clone, Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    /// Lookup only (ordering lives in `waiting` and `running`), so a HashMap is
    /// deterministic here and keeps per-step lookups cheap.
    seqs: HashMap<RequestId, Sequence>,
    waiting: VecDeque<RequestId>,
    /// Admission order, oldest first; preemption takes from the back.
    running: Vec<RequestId>,
    in_flight: Option<InFlight>,
    next_step: u64,
    next_serial: u64,
    num_preemptions: u64,
    /// Prefill-only requests done with their prompt, holding blocks for export.
    held: BTreeSet<RequestId>,
    /// Requests holding blocks that another worker's KV is being imported into.
    importing: BTreeSet<RequestId>,
    /// Prefill-only requests that finished their prompt since the last drain.
    prefilled: Vec<Prefilled>,
    /// Requests that would wait but lack their image embeddings (see `scheduler/embeds.rs`),
    /// with whether they go to the front of the queue once they have them.
    parked_for_embeds: BTreeMap<RequestId, bool>,
    /// Parked requests not yet listed by `take_embeds_wanted`.
    embeds_wanted: Vec<RequestId>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, blocks: BlockManager) -> Result<Self, ConfigError> {
        cfg.validate()?;
        if blocks.num_blocks() == 0 {
            return Err(ConfigError::EmptyPool);
        }
        Ok(Scheduler {
            cfg,
            blocks,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            in_flight: None,
            next_step: 0,
            next_serial: 0,
            num_preemptions: 0,
            held: BTreeSet::new(),
            importing: BTreeSet::new(),
            prefilled: Vec::new(),
            parked_for_embeds: BTreeMap::new(),
            embeds_wanted: Vec::new(),
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn block_manager(&self) -> &BlockManager {
        &self.blocks
    }

    /// Queues a request. Refuses, with nothing held, one that could never complete: empty,
    /// no room in the context, or more KV than the whole pool.
    pub fn add_request(
        &mut self,
        req: PreprocessedRequest,
        now: Duration,
    ) -> Result<(), AdmitError> {
        if self.seqs.contains_key(&req.id) {
            return Err(AdmitError::Duplicate(req.id));
        }
        let prompt_len = req.token_ids.len();
        if prompt_len == 0 {
            return Err(AdmitError::EmptyPrompt);
        }
        if req.stop.max_tokens == 0 {
            return Err(AdmitError::ZeroMaxTokens);
        }
        let max_model_len = self.cfg.max_model_len;
        if prompt_len >= max_model_len {
            return Err(AdmitError::PromptTooLong {
                prompt_len,
                max_model_len,
            });
        }
        // The final sampled token is never fed back, so the KV holds at most total - 1.
        let max_total = prompt_len
            .saturating_add(req.stop.max_tokens as usize)
            .min(max_model_len);
        let needed = self.blocks.block_size().blocks_for(max_total - 1);
        if needed > self.blocks.num_blocks() {
            return Err(AdmitError::ExceedsKvCapacity {
                needed,
                pool: self.blocks.num_blocks(),
            });
        }
        let id = req.id;
        let serial = self.next_serial;
        self.next_serial += 1;
        self.seqs.insert(
            id,
            Sequence::new(req, serial, self.blocks.block_size(), now),
        );
        self.enqueue(id, false);
        Ok(())
    }

    /// Cancels a request: drops it from the queues and frees its blocks at once. If it is in
    /// the step in flight, its result is ignored. Returns whether the request was known.
    pub fn abort(&mut self, id: RequestId) -> bool {
        if self.seqs.remove(&id).is_none() {
            return false;
        }
        self.unqueue(id);
        self.running.retain(|r| *r != id);
        self.held.remove(&id);
        self.importing.remove(&id);
        self.blocks.free(id);
        true
    }

    /// Plans the next step. An empty plan means there is nothing to run (nothing needs to be
    /// completed for it). Only one non-empty step may be in flight at a time.
    pub fn schedule(&mut self, _now: Duration) -> Result<StepPlan, StepError> {
        if let Some(f) = &self.in_flight {
            return Err(StepError::StepInFlight(f.step));
        }
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut batch: Vec<(RequestId, usize)> = Vec::new();
        let mut preempted: Vec<RequestId> = Vec::new();

        let (decodes, prefills): (Vec<RequestId>, Vec<RequestId>) = self
            .running
            .iter()
            .partition(|id| self.seqs.get(id).is_some_and(|s| s.remaining() == 1));
        // Others want budget besides a prefill: waiting requests, or another prefill.
        let contended = !self.waiting.is_empty() || prefills.len() > 1;
        let prefill_cap = self.prefill_cap(contended);
        let prefilling = prefills
            .iter()
            .any(|id| self.seqs.get(id).is_some_and(|s| s.remaining() > 1));
        for id in decodes.into_iter().chain(prefills) {
            if budget == 0 {
                break;
            }
            self.schedule_running(id, prefill_cap, &mut budget, &mut batch, &mut preempted);
        }
        if preempted.is_empty() {
            self.admit_waiting(prefilling, &mut budget, &mut batch);
        }

        let step = StepId(self.next_step);
        let mut seqs = Vec::with_capacity(batch.len());
        let mut entries = Vec::with_capacity(batch.len());
        for (id, n) in batch {
            let (Some(seq), Some(table)) = (self.seqs.get(&id), self.blocks.block_table(id)) else {
                continue;
            };
            let start = seq.num_computed;
            let want_logits = start + n == seq.tokens.len();
            seqs.push(ScheduledSeq {
                request: id,
                tokens: seq.tokens[start..start + n].to_vec(),
                start_pos: start,
                block_table: table.iter().map(|b| b.0).collect(),
                want_logits,
                sample_index: seq.sample_index(),
                prompt_logprobs: prompt_logprobs_ask(seq, start, n),
            });
            entries.push(InFlightEntry {
                request: id,
                serial: seq.serial,
                num_tokens: n,
                want_logits,
            });
        }
        if !seqs.is_empty() {
            self.next_step += 1;
            self.in_flight = Some(InFlight { step, entries });
        }
        Ok(StepPlan {
            step,
            seqs,
            preempted,
        })
    }

    /// Applies a finished step: advances computed tokens, registers newly full blocks for
    /// prefix caching, appends the sampled tokens, checks stop conditions and frees finished
    /// sequences. Returns one output per sampled token, in plan order. A `want_logits`
    /// request with no entry in `sampled` ends with `FinishReason::Error`. `sampled` may come
    /// in any order (plan order is the fast path). A stop token is included in the output's
    /// `token_ids` (the detokenizer hides special tokens); `ignore_eos` disables every id in
    /// `stop_token_ids`, as they arrive merged.
    pub fn on_step_done(
        &mut self,
        plan: &StepPlan,
        sampled: &[SampledToken],
        now: Duration,
    ) -> Result<Vec<(RequestId, TokenOutput)>, StepError> {
        self.on_step_done_with(plan, sampled, &[], now)
    }

    /// [`Scheduler::on_step_done`] with the prompt logprobs the executor computed for the
    /// step's entries that asked (`ScheduledSeq::prompt_logprobs`): they gather chunk by
    /// chunk and go out with the request's first output.
    pub fn on_step_done_with(
        &mut self,
        plan: &StepPlan,
        sampled: &[SampledToken],
        prompt_logprobs: &[PromptLogprobsChunk],
        _now: Duration,
    ) -> Result<Vec<(RequestId, TokenOutput)>, StepError> {
        let Some(flight) = self.take_in_flight(plan)? else {
            return Ok(Vec::new());
        };
        let mut samples = SampleLookup::new(sampled);
        let block_size = self.blocks.block_size();
        let mut outputs = Vec::new();
        for entry in flight.entries {
            let id = entry.request;
            // Aborted while the step ran (and possibly re-added since: a new incarnation).
            let Some(seq) = self.seqs.get_mut(&id).filter(|s| s.serial == entry.serial) else {
                continue;
            };
            seq.num_computed += entry.num_tokens;
            if let Some(chunk) = prompt_logprobs.iter().find(|c| c.request == id) {
                seq.prompt_lps.extend_from_slice(&chunk.logprobs);
            }
            // Cannot fail: a running sequence always has a table.
            let _ = self
                .blocks
                .commit_computed(id, &seq.tokens[..seq.num_computed], &seq.hashes);
            if !entry.want_logits {
                continue;
            }
            let Some(sample) = samples.get(id) else {
                outputs.push((id, self.finish_with_error(id, "no token was sampled")));
                continue;
            };
            seq.push_token(sample.token, block_size);
            let finish = finish_reason(seq, sample.token, self.cfg.max_model_len);
            let output = TokenOutput {
                token_ids: vec![sample.token],
                logprobs: match (seq.logprobs, &sample.logprob) {
                    (Some(_), Some(lp)) => Some(vec![lp.clone()]),
                    _ => None,
                },
                cached_tokens: (!seq.first_output_sent).then_some(seq.cached_tokens.unwrap_or(0)),
                prompt_logprobs: match seq.first_output_sent {
                    false if seq.sampling.prompt_logprobs.is_some() => {
                        Some(std::mem::take(&mut seq.prompt_lps))
                    }
                    _ => None,
                },
                finish,
            };
            seq.first_output_sent = true;
            if output.finish.is_some() {
                self.remove(id);
            } else if seq.prefill_only {
                self.hold(id);
            }
            outputs.push((id, output));
        }
        Ok(outputs)
    }

    /// The step failed in the backend: every request in it ends with
    /// `FinishReason::Error(reason)` and is freed.
    pub fn on_step_failed(
        &mut self,
        plan: &StepPlan,
        reason: &str,
    ) -> Result<Vec<(RequestId, TokenOutput)>, StepError> {
        let Some(flight) = self.take_in_flight(plan)? else {
            return Ok(Vec::new());
        };
        let mut outputs = Vec::new();
        for entry in flight.entries {
            let id = entry.request;
            if self.seqs.get(&id).is_some_and(|s| s.serial == entry.serial) {
                outputs.push((id, self.finish_with_error(id, reason)));
            }
        }
        Ok(outputs)
    }

    /// KV events since the last drain, for the worker to publish as a `KvEventBatch`.
    pub fn drain_kv_events(&mut self) -> Vec<KvEvent> {
        self.blocks.drain_events()
    }

    pub fn sampling_params(&self, id: RequestId) -> Option<&SamplingParams> {
        self.seqs.get(&id).map(|s| &s.sampling)
    }

    /// Prompt followed by the tokens generated so far.
    pub fn token_history(&self, id: RequestId) -> Option<&[TokenId]> {
        self.seqs.get(&id).map(|s| s.tokens.as_slice())
    }

    /// Everything the sampler needs for `id` in one borrow.
    pub fn sampling_context(&self, id: RequestId) -> Option<SamplingContext<'_>> {
        self.seqs.get(&id).map(|s| SamplingContext {
            params: &s.sampling,
            logprobs: s.logprobs,
            tokens: &s.tokens,
            prompt_len: s.prompt_len,
            generated_before: s.sample_offset as usize,
            stop_token_ids: &s.stop.stop_token_ids,
        })
    }

    /// The embeddings of `id`'s image placeholders, if its prompt has images.
    pub fn prompt_embeds(
        &self,
        id: RequestId,
    ) -> Option<&std::sync::Arc<crate::encoder::PromptEmbeds>> {
        self.seqs.get(&id).and_then(|s| s.embeds.as_ref())
    }

    /// When `id` arrived (the `now` given to `add_request`).
    pub fn arrival(&self, id: RequestId) -> Option<Duration> {
        self.seqs.get(&id).map(|s| s.arrival)
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// Waiting request ids, front first.
    pub fn waiting(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.waiting.iter().copied()
    }

    /// Running request ids, oldest admitted first.
    pub fn running(&self) -> &[RequestId] {
        &self.running
    }

    pub fn has_step_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Nothing queued, running or in flight.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty() && self.in_flight.is_none()
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            num_waiting: self.waiting.len() + self.parked_for_embeds.len(),
            num_running: self.running.len(),
            num_preemptions: self.num_preemptions,
            num_steps: self.next_step,
            kv: self.blocks.stats(),
            waiting_blocks: self
                .waiting
                .iter()
                .chain(self.parked_for_embeds.keys())
                .filter_map(|id| self.seqs.get(id))
                .map(|seq| self.blocks.block_size().blocks_for(seq.tokens.len()) as u64)
                .sum(),
            kv_batches: 0,
            draining: false,
            images_encoded: 0,
        }
    }

    /// Checks the scheduler's and the block manager's invariants (tests, simulator).
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        self.blocks.check_invariants()?;
        let fail = |msg: String| Err(InvariantViolation(msg));
        if self.running.len() > self.cfg.max_num_seqs {
            return fail(format!("{} running > max_num_seqs", self.running.len()));
        }
        let parked = self.held.len() + self.importing.len() + self.parked_for_embeds.len();
        if self.waiting.len() + self.running.len() + parked != self.seqs.len() {
            return fail(format!(
                "{} waiting + {} running + {parked} held, importing or parked != {} sequences",
                self.waiting.len(),
                self.running.len(),
                self.seqs.len()
            ));
        }
        self.check_parked()?;
        self.check_parked_for_embeds()?;
        let bs = self.blocks.block_size();
        for id in &self.waiting {
            let Some(seq) = self.seqs.get(id) else {
                return fail(format!("waiting {id} has no state"));
            };
            if seq.phase != Phase::Waiting || seq.num_computed != 0 {
                return fail(format!("waiting {id} is {:?} with KV", seq.phase));
            }
            if self.blocks.block_table(*id).is_some() {
                return fail(format!("waiting {id} holds blocks"));
            }
        }
        for id in &self.running {
            let Some(seq) = self.seqs.get(id) else {
                return fail(format!("running {id} has no state"));
            };
            if seq.phase != Phase::Running {
                return fail(format!("running {id} is {:?}", seq.phase));
            }
            let Some(table) = self.blocks.block_table(*id) else {
                return fail(format!("running {id} holds no blocks"));
            };
            if table.len() < bs.blocks_for(seq.num_computed) {
                return fail(format!(
                    "{id}: {} blocks for {} tokens",
                    table.len(),
                    seq.num_computed
                ));
            }
        }
        // Same set as `seqs` (checked above), in a deterministic order.
        for id in self.waiting.iter().chain(&self.running) {
            let Some(seq) = self.seqs.get(id) else {
                continue;
            };
            if seq.num_computed >= seq.tokens.len() {
                return fail(format!("{id} has no token left to feed"));
            }
            if seq.hashes.len() != bs.full_blocks(seq.tokens.len()) {
                return fail(format!("{id} hashes are stale"));
            }
            if seq.num_generated() >= seq.stop.max_tokens as usize
                || seq.tokens.len() >= self.cfg.max_model_len
            {
                return fail(format!("{id} should have finished"));
            }
        }
        for id in self.blocks.sequences() {
            if !self.running.contains(&id)
                && !self.held.contains(&id)
                && !self.importing.contains(&id)
            {
                return fail(format!("{id} holds blocks but is not running"));
            }
        }
        Ok(())
    }

    /// Most tokens one prefill chunk may take this step (see the module doc, "Fairness").
    fn prefill_cap(&self, contended: bool) -> usize {
        match contended {
            true => self.cfg.contended_prefill_chunk.max(1),
            false => usize::MAX,
        }
    }

    fn schedule_running(
        &mut self,
        id: RequestId,
        prefill_cap: usize,
        budget: &mut usize,
        batch: &mut Vec<(RequestId, usize)>,
        preempted: &mut Vec<RequestId>,
    ) {
        loop {
            // A victim earlier in this step is no longer running.
            let Some(seq) = self.seqs.get(&id).filter(|s| s.phase == Phase::Running) else {
                return;
            };
            let n = seq.remaining().min(*budget).min(prefill_cap);
            match self.blocks.grow(id, seq.num_computed + n) {
                Ok(()) => {
                    batch.push((id, n));
                    *budget -= n;
                    return;
                }
                Err(AllocError::OutOfBlocks { .. }) => {
                    let Some(victim) = self.running.last().copied() else {
                        return;
                    };
                    self.preempt(victim);
                    preempted.push(victim);
                    if let Some(pos) = batch.iter().position(|(r, _)| *r == victim) {
                        *budget += batch.remove(pos).1;
                    }
                    if victim == id {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }

    /// `prefilling`: a running sequence is mid-prompt (admitting more keeps it so).
    fn admit_waiting(
        &mut self,
        mut prefilling: bool,
        budget: &mut usize,
        batch: &mut Vec<(RequestId, usize)>,
    ) {
        while let Some(&id) = self.waiting.front() {
            // Importing requests join `running` once their KV is in: they count already.
            if *budget == 0 || self.running.len() + self.importing.len() >= self.cfg.max_num_seqs {
                return;
            }
            let Some(seq) = self.seqs.get(&id) else {
                self.waiting.pop_front();
                continue;
            };
            // Prompt logprobs: every prompt position computed (a cached one has no
            // logits), chunked like any prompt.
            let every_position = seq.sampling.prompt_logprobs.is_some() && !seq.first_output_sent;
            let hit = if every_position {
                PrefixHit::default()
            } else {
                self.blocks
                    .find_cached_prefix(&seq.hashes, seq.tokens.len())
            };
            let hit_tokens = hit.num_tokens();
            let remaining = seq.tokens.len() - hit_tokens;
            // Contended when requests wait behind this one or prompts are mid-prefill.
            let cap = self.prefill_cap(self.waiting.len() > 1 || prefilling);
            let n = if self.cfg.enable_chunked_prefill {
                remaining.min(*budget).min(cap)
            } else if remaining <= *budget {
                remaining
            } else {
                return;
            };
            let kind = if seq.cached_tokens.is_none() {
                StartKind::Fresh
            } else {
                StartKind::Resume
            };
            if self
                .blocks
                .allocate_new(id, &hit, hit_tokens + n, kind)
                .is_err()
            {
                return;
            }
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.num_computed = hit_tokens;
                seq.phase = Phase::Running;
                seq.cached_tokens.get_or_insert(hit_tokens as u32);
            }
            self.waiting.pop_front();
            self.running.push(id);
            batch.push((id, n));
            *budget -= n;
            prefilling |= remaining > 1;
        }
    }

    fn preempt(&mut self, id: RequestId) {
        self.blocks.free(id);
        self.running.retain(|r| *r != id);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.num_computed = 0;
            seq.phase = Phase::Waiting;
            seq.prompt_lps.clear();
        }
        self.enqueue(id, true);
        self.num_preemptions += 1;
    }

    fn take_in_flight(&mut self, plan: &StepPlan) -> Result<Option<InFlight>, StepError> {
        match &self.in_flight {
            Some(f) if f.step == plan.step => Ok(self.in_flight.take()),
            None if plan.seqs.is_empty() => Ok(None),
            other => Err(StepError::UnknownStep {
                expected: other.as_ref().map(|f| f.step),
                got: plan.step,
            }),
        }
    }

    fn finish_with_error(&mut self, id: RequestId, reason: &str) -> TokenOutput {
        let cached_tokens = self
            .seqs
            .get(&id)
            .filter(|s| !s.first_output_sent)
            .map(|s| s.cached_tokens.unwrap_or(0));
        self.remove(id);
        TokenOutput {
            token_ids: Vec::new(),
            logprobs: None,
            finish: Some(FinishReason::Error(reason.to_string())),
            cached_tokens,
            prompt_logprobs: None,
        }
    }

    fn remove(&mut self, id: RequestId) {
        self.abort(id);
    }
}

/// The executor's prompt-logprobs ask for `seq`'s entry of `n` tokens from `start`: set
/// while the request wants its prompt's logprobs and the entry computes prompt positions.
fn prompt_logprobs_ask(seq: &Sequence, start: usize, n: usize) -> Option<PromptLogprobsAsk> {
    let top = seq.sampling.prompt_logprobs?;
    if seq.first_output_sent || start >= seq.prompt_len {
        return None;
    }
    let end = start + n;
    Some(PromptLogprobsAsk {
        top,
        next: seq
            .tokens
            .get(end)
            .copied()
            .filter(|_| end < seq.prompt_len),
    })
}

/// Finds each request's sample. The executor normally returns samples in plan order, so a
/// cursor finds each in O(1); anything else falls back to a map built on first need.
struct SampleLookup<'a> {
    sampled: &'a [SampledToken],
    cursor: usize,
    map: Option<BTreeMap<RequestId, &'a SampledToken>>,
}

impl<'a> SampleLookup<'a> {
    fn new(sampled: &'a [SampledToken]) -> Self {
        SampleLookup {
            sampled,
            cursor: 0,
            map: None,
        }
    }

    /// The first sample for `id`.
    fn get(&mut self, id: RequestId) -> Option<&'a SampledToken> {
        // Samples before the cursor each matched an earlier plan entry, and a plan names a
        // request once, so a match at the cursor is `id`'s first sample.
        if let Some(s) = self.sampled.get(self.cursor).filter(|s| s.request == id) {
            self.cursor += 1;
            return Some(s);
        }
        let sampled = self.sampled;
        self.map
            .get_or_insert_with(|| sampled.iter().rev().map(|s| (s.request, s)).collect())
            .get(&id)
            .copied()
    }
}

/// Stop checks after appending `token`: a stop token (unless `ignore_eos`), then
/// `max_tokens`, then the context length.
fn finish_reason(seq: &Sequence, token: TokenId, max_model_len: usize) -> Option<FinishReason> {
    if !seq.stop.ignore_eos && seq.stop.stop_token_ids.contains(&token) {
        Some(FinishReason::Stop)
    } else if seq.num_generated() >= seq.stop.max_tokens as usize
        || seq.tokens.len() >= max_model_len
    {
        Some(FinishReason::Length)
    } else {
        None
    }
}
