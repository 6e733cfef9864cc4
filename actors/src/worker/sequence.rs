//! One request's state inside the scheduler.

use crate::ids::TokenId;
use crate::kv::hash::{extend_block_hashes, BlockHash, BlockSize, ImageSalts};
use crate::protocol::{PreprocessedRequest, SamplingParams, StopConditions};
use std::time::Duration;

/// Where a sequence is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Queued, holding no blocks (new, or preempted and waiting to be recomputed).
    Waiting,
    /// Admitted, holding blocks.
    Running,
    /// A prefill-only request whose prompt is done: it holds its blocks for export and is
    /// never scheduled again (see `Scheduler::add_prefill_only`).
    Held,
    /// Holding blocks whose KV is being imported from another worker; scheduled once the
    /// import is reported done (see `Scheduler::add_with_remote_kv`).
    Importing,
}

#[derive(Clone, Debug)]
pub(crate) struct Sequence {
    /// Unique per `add_request` call: tells a re-added request id apart from an aborted
    /// incarnation whose step is still in flight.
    pub serial: u64,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    pub logprobs: Option<u32>,
    pub salt: u64,
    /// The salts the prompt's images put on its blocks (empty for text).
    pub image_salts: ImageSalts,
    /// The embeddings of the prompt's image placeholders, spliced whenever those positions
    /// are computed (first prefill, or a recompute after preemption).
    pub embeds: Option<std::sync::Arc<crate::encoder::PromptEmbeds>>,
    /// The prompt's images, kept so their embeddings can be made when they are missing: a
    /// decode worker admits a request whose KV came from a prefill worker without them, and
    /// needs them only if it recomputes the prompt (see `Scheduler::take_embeds_wanted`).
    pub images: Vec<crate::protocol::PromptImage>,
    /// Prompt then generated tokens. The last one's KV is not computed yet.
    pub tokens: Vec<TokenId>,
    /// Sequence hashes of every full block of `tokens`, kept up to date as tokens arrive.
    pub hashes: Vec<BlockHash>,
    pub prompt_len: usize,
    /// Leading tokens whose KV is in this sequence's blocks. Always `< tokens.len()`.
    pub num_computed: usize,
    /// Prefix-cache hit at the first admission; reported on the first output.
    pub cached_tokens: Option<u32>,
    pub first_output_sent: bool,
    pub phase: Phase,
    pub arrival: Duration,
    /// Stop after the first sampled token and hold the blocks (a prefill worker's request).
    pub prefill_only: bool,
    /// Tokens other workers generated before this one took the request over (migration):
    /// the sample index starts here.
    pub sample_offset: u32,
    /// The prompt logprobs the computed chunks gave so far (a request that asked for
    /// them), sent with the first output; cleared when a preemption recomputes the prompt.
    pub prompt_lps: Vec<crate::protocol::TokenLogprob>,
}

impl Sequence {
    pub fn new(
        req: PreprocessedRequest,
        serial: u64,
        block_size: BlockSize,
        now: Duration,
    ) -> Self {
        let image_salts = req.image_salts();
        let hashes = image_salts.hash_blocks(&req.token_ids, block_size, req.salt);
        Sequence {
            image_salts,
            embeds: req.embeds,
            images: req.images,
            serial,
            prompt_len: req.token_ids.len(),
            tokens: req.token_ids,
            hashes,
            sampling: req.sampling,
            stop: req.stop,
            logprobs: req.logprobs,
            salt: req.salt,
            num_computed: 0,
            cached_tokens: None,
            first_output_sent: false,
            phase: Phase::Waiting,
            arrival: now,
            prefill_only: false,
            sample_offset: req.generated_before,
            prompt_lps: Vec::new(),
        }
    }

    /// The prompt has images but not their embeddings: its placeholder positions cannot be
    /// computed until they come.
    pub fn needs_embeds(&self) -> bool {
        !self.images.is_empty() && self.embeds.is_none()
    }

    /// Known tokens whose KV is still to compute (prompt rest, recompute, or 1 for a decode).
    pub fn remaining(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Index of the next token to sample, counted over the whole request (across
    /// migrations), so a seeded sampler draws the same token wherever it runs.
    pub fn sample_index(&self) -> u32 {
        self.sample_offset + self.num_generated() as u32
    }

    /// Appends a sampled token, hashing the block it completes.
    pub fn push_token(&mut self, token: TokenId, block_size: BlockSize) {
        self.tokens.push(token);
        let bs = block_size.as_usize();
        if self.tokens.len() % bs == 0 {
            let parent = self.hashes.last().copied().unwrap_or(BlockHash::ROOT);
            let start = self.tokens.len() - bs;
            self.hashes.extend(extend_block_hashes(
                parent,
                &self.tokens[start..],
                block_size,
                self.image_salts.salt_of_block(self.salt, self.tokens.len()),
            ));
        }
    }
}
