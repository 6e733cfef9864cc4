//! What one step runs (scheduler → executor) and what it sampled (executor → scheduler).

use crate::ids::{RequestId, TokenId};
use crate::protocol::TokenLogprob;
use serde::{Deserialize, Serialize};

/// Identifies a step, so a late or duplicated completion is recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StepId(pub u64);

/// One sequence's share of a step. Maps 1:1 onto the backend's `SeqStep`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledSeq {
    pub request: RequestId,
    /// Tokens to feed, at positions `start_pos..start_pos + tokens.len()`: a prompt chunk, a
    /// recomputation after preemption, or the one last sampled token of a decode.
    pub tokens: Vec<TokenId>,
    /// Tokens whose KV is already in the cache (from earlier steps or the prefix cache).
    pub start_pos: usize,
    /// Physical blocks covering positions `0..start_pos + tokens.len()`, in order: exactly
    /// `ceil((start_pos + tokens.len()) / block_size)` of them. Blocks before
    /// `start_pos / block_size` may be shared with other sequences (read only); KV for the
    /// fed tokens is written only into blocks this sequence owns alone.
    pub block_table: Vec<u32>,
    /// Sample a token from the last position: true exactly when this chunk reaches the end
    /// of the known tokens (the prompt's end, or a decode).
    pub want_logits: bool,
    /// When `want_logits`: how many tokens the request generated before this one. A sampler
    /// that seeds its RNG from (request seed, sample_index) draws the same token after a
    /// preemption-and-recompute as it would have without.
    pub sample_index: u32,
    /// A prompt chunk of a request that asked for prompt logprobs (`echo` with
    /// `logprobs`), before its first output: the executor computes every position's
    /// logits and returns each fed position's logprob of the token after it.
    #[serde(default)]
    pub prompt_logprobs: Option<PromptLogprobsAsk>,
}

/// What the executor needs to give a prompt chunk's logprobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptLogprobsAsk {
    /// Alternatives per position.
    pub top: u32,
    /// The prompt token after this chunk, which its last position predicts; `None` when
    /// the chunk ends the prompt (that position's logits are sampled instead).
    pub next: Option<TokenId>,
}

impl ScheduledSeq {
    /// Has the shape of a decode: one token fed on top of cached KV, sampled. (A prompt's
    /// one-token last chunk has the same shape and costs the same.)
    pub fn is_decode(&self) -> bool {
        self.want_logits && self.tokens.len() == 1 && self.start_pos > 0
    }

    /// Positions attended to by the last fed token (what a cost model charges attention on).
    pub fn context_len(&self) -> usize {
        self.start_pos + self.tokens.len()
    }
}

/// Everything to run in one forward pass.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepPlan {
    pub step: StepId,
    /// Decodes first, then continuing prefills, then newly admitted requests.
    pub seqs: Vec<ScheduledSeq>,
    /// Requests preempted while planning this step (informational: they lost their KV and
    /// will be recomputed; their streams continue later without repeats).
    pub preempted: Vec<RequestId>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Tokens fed in this step (at most `max_num_batched_tokens`).
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }

    /// Sequences fed exactly one token (decodes); the rest are prefill chunks.
    pub fn num_decodes(&self) -> usize {
        self.seqs.iter().filter(|s| s.is_decode()).count()
    }

    /// Tokens fed as prefill chunks (prompt or recompute), i.e. not as decodes.
    pub fn num_prefill_tokens(&self) -> usize {
        self.seqs
            .iter()
            .filter(|s| !s.is_decode())
            .map(|s| s.tokens.len())
            .sum()
    }

    /// Sequences that need a token sampled after the forward pass.
    pub fn num_samples(&self) -> usize {
        self.seqs.iter().filter(|s| s.want_logits).count()
    }
}

/// The executor's sample for one `want_logits` entry of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampledToken {
    pub request: RequestId,
    pub token: TokenId,
    /// Filled when the request asked for logprobs.
    pub logprob: Option<TokenLogprob>,
}

impl SampledToken {
    pub fn new(request: RequestId, token: TokenId) -> Self {
        SampledToken {
            request,
            token,
            logprob: None,
        }
    }
}

/// The executor's answer to an entry with `prompt_logprobs`: the logprob of each prompt
/// token that entry's positions predict (the chunk's tokens after its first, then
/// `PromptLogprobsAsk::next`), in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptLogprobsChunk {
    pub request: RequestId,
    pub logprobs: Vec<TokenLogprob>,
}
