//! The scheduler's side of disaggregated serving.
//!
//! **Prefill worker**: [`Scheduler::add_prefill_only`] queues a request that runs like any
//! other until its first token is sampled (the output carries that token, so it can reach
//! the client at once); then, instead of decoding, it is *held*: out of the running set,
//! still owning its blocks, listed by [`Scheduler::take_prefilled`] with its block table.
//! The driver exports those blocks and calls [`Scheduler::release_held`].
//!
//! **Decode worker**: [`Scheduler::add_with_remote_kv`] admits a request whose prompt KV
//! comes from elsewhere. It allocates the blocks at once (reusing cached prefix blocks, so
//! only the rest needs importing) and parks the request as *importing*. The driver imports
//! into the blocks it was given, then calls [`Scheduler::kv_imported`]: the prompt's full
//! blocks are registered (BlockStored events announce them to the router) and the request
//! decodes from its first token on. On a failed import, [`Scheduler::kv_import_failed`]
//! sends it back to the queue to recompute prompt + first token locally, as after a
//! preemption: the next token it samples is the second one, so nothing is emitted twice.
//! [`Scheduler::add_with_first_token`] queues such a recompute directly (an admission refused
//! for lack of blocks or slots).

use super::{AdmitError, Scheduler};
use crate::ids::{RequestId, TokenId};
use crate::protocol::PreprocessedRequest;
use crate::worker::block_manager::{BlockId, InvariantViolation, StartKind};
use crate::worker::sequence::Phase;
use std::time::Duration;

/// A prefill-only request whose prompt KV is complete and held for export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefilled {
    pub request: RequestId,
    /// The token sampled after the prompt (also in the step's output).
    pub first_token: TokenId,
    pub prompt_len: usize,
    /// The blocks holding positions `0..prompt_len`, in order.
    pub blocks: Vec<BlockId>,
}

/// Where a decode-side admission's KV must go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteKvAdmission {
    /// The request's whole block table for its prompt.
    pub blocks: Vec<BlockId>,
    /// Leading blocks already cached here (shared, not to be imported): import the
    /// transferred blocks `cached_blocks..` into `blocks[cached_blocks..]`.
    pub cached_blocks: usize,
}

impl RemoteKvAdmission {
    /// The blocks to import into.
    pub fn import_into(&self) -> &[BlockId] {
        &self.blocks[self.cached_blocks..]
    }
}

impl Scheduler {
    /// Queues a request for a prefill worker: scheduled like [`Scheduler::add_request`], but
    /// held after its first token (see the module doc). Same refusals.
    pub fn add_prefill_only(
        &mut self,
        req: PreprocessedRequest,
        now: Duration,
    ) -> Result<(), AdmitError> {
        let id = req.id;
        self.add_request(req, now)?;
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.prefill_only = true;
        }
        Ok(())
    }

    /// Moves a prefill-only request that just sampled its first token out of the batch.
    pub(super) fn hold(&mut self, id: RequestId) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        seq.phase = Phase::Held;
        self.running.retain(|r| *r != id);
        self.held.insert(id);
        let blocks = self.blocks.block_table(id).unwrap_or_default().to_vec();
        self.prefilled.push(Prefilled {
            request: id,
            first_token: seq.tokens[seq.prompt_len],
            prompt_len: seq.prompt_len,
            blocks,
        });
    }

    /// Prefill-only requests held since the last call, in the order they finished.
    pub fn take_prefilled(&mut self) -> Vec<Prefilled> {
        std::mem::take(&mut self.prefilled)
    }

    /// Frees a held request's blocks (exported, or given up). Full blocks stay in the prefix
    /// cache. Returns whether `id` was held.
    pub fn release_held(&mut self, id: RequestId) -> bool {
        self.held.contains(&id) && self.abort(id)
    }

    pub fn num_held(&self) -> usize {
        self.held.len()
    }

    pub fn num_importing(&self) -> usize {
        self.importing.len()
    }

    /// Whether `id` is waiting for its KV import (its blocks are being written).
    pub fn is_importing(&self, id: RequestId) -> bool {
        self.importing.contains(&id)
    }

    /// Admits a request whose prompt KV is computed elsewhere and whose first token,
    /// `first_token`, was sampled there. Allocates its blocks now, all or nothing. Refuses
    /// what [`Scheduler::add_request`] refuses, plus `OutOfBlocks` / `Busy` when it cannot
    /// be admitted at once (the caller then queues it with `add_request` to prefill locally)
    /// and `NothingToDecode` when the first token already ends it.
    pub fn add_with_remote_kv(
        &mut self,
        req: PreprocessedRequest,
        first_token: TokenId,
        now: Duration,
    ) -> Result<RemoteKvAdmission, AdmitError> {
        let id = req.id;
        let prompt_len = req.token_ids.len();
        // Reuse add_request's validation; take the sequence back out of the queue.
        self.add_request(req, now)?;
        self.unqueue(id);
        let Some(mut seq) = self.seqs.remove(&id) else {
            return Err(AdmitError::EmptyPrompt);
        };
        if self.running.len() + self.importing.len() >= self.cfg.max_num_seqs {
            return Err(AdmitError::Busy);
        }
        let block_size = self.blocks.block_size();
        seq.push_token(first_token, block_size);
        if super::finish_reason(&seq, first_token, self.cfg.max_model_len).is_some() {
            return Err(AdmitError::NothingToDecode);
        }
        let hit = self
            .blocks
            .find_cached_prefix(&seq.hashes, seq.tokens.len());
        let cached_blocks = hit.blocks().len();
        self.blocks
            .allocate_new(id, &hit, prompt_len, StartKind::Fresh)
            .map_err(|_| AdmitError::OutOfBlocks)?;
        seq.num_computed = prompt_len;
        seq.phase = Phase::Importing;
        seq.cached_tokens = Some(hit.num_tokens() as u32);
        // The prefill worker streamed the first token (with cached_tokens).
        seq.first_output_sent = true;
        let blocks = self.blocks.block_table(id).unwrap_or_default().to_vec();
        self.seqs.insert(id, seq);
        self.importing.insert(id);
        Ok(RemoteKvAdmission {
            blocks,
            cached_blocks,
        })
    }

    /// Queues a request whose first token, `first_token`, was sampled elsewhere (and already
    /// streamed) but whose KV will not be imported here (the admission was refused for
    /// `OutOfBlocks` / `Busy`, or the remote prefill's KV is unusable): it recomputes prompt
    /// and first token locally and samples the second token next. Same refusals as
    /// [`Scheduler::add_request`], plus `NothingToDecode`.
    pub fn add_with_first_token(
        &mut self,
        req: PreprocessedRequest,
        first_token: TokenId,
        now: Duration,
    ) -> Result<(), AdmitError> {
        let id = req.id;
        self.add_request(req, now)?;
        let Some(seq) = self.seqs.get_mut(&id) else {
            return Ok(());
        };
        seq.push_token(first_token, self.blocks.block_size());
        seq.first_output_sent = true;
        if super::finish_reason(seq, first_token, self.cfg.max_model_len).is_some() {
            self.abort(id);
            return Err(AdmitError::NothingToDecode);
        }
        Ok(())
    }

    /// The KV of an importing request is in its blocks: register them and start decoding.
    /// Returns whether `id` was importing.
    pub fn kv_imported(&mut self, id: RequestId) -> bool {
        if !self.importing.remove(&id) {
            return false;
        }
        let Some(seq) = self.seqs.get_mut(&id) else {
            return false;
        };
        seq.phase = Phase::Running;
        // Cannot fail: the request holds a table.
        let _ = self
            .blocks
            .commit_computed(id, &seq.tokens[..seq.num_computed], &seq.hashes);
        self.running.push(id);
        true
    }

    /// The import failed: free the blocks (nothing was registered from them) and queue the
    /// request to recompute its prompt and first token here. Returns whether `id` was
    /// importing.
    pub fn kv_import_failed(&mut self, id: RequestId) -> bool {
        if !self.importing.remove(&id) {
            return false;
        }
        self.blocks.free(id);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.num_computed = 0;
            seq.phase = Phase::Waiting;
        }
        self.enqueue(id, false);
        true
    }

    /// Invariants of held and importing requests (part of `check_invariants`).
    pub(super) fn check_parked(&self) -> Result<(), InvariantViolation> {
        let fail = |msg: String| Err(InvariantViolation(msg));
        let bs = self.blocks.block_size();
        for (set, phase) in [
            (&self.held, Phase::Held),
            (&self.importing, Phase::Importing),
        ] {
            for id in set {
                let Some(seq) = self.seqs.get(id) else {
                    return fail(format!("{phase:?} {id} has no state"));
                };
                if seq.phase != phase {
                    return fail(format!("{id} listed {phase:?} but is {:?}", seq.phase));
                }
                let held = self.blocks.block_table(*id).map_or(0, <[BlockId]>::len);
                if seq.num_computed != seq.prompt_len || held != bs.blocks_for(seq.prompt_len) {
                    return fail(format!("{phase:?} {id}: {held} blocks for its prompt"));
                }
            }
        }
        Ok(())
    }
}
