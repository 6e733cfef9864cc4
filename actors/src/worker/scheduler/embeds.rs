//! Requests whose image embeddings are not there yet.
//!
//! A prompt's image placeholders can only be computed with their embeddings spliced in. A
//! prefill or aggregated worker gets them before admission (pulled from an encoder, or
//! encoded by the worker). A decode worker does not: the prompt's KV comes from the prefill
//! worker, and the images matter to it only through their hashes (the block hashes). It needs
//! the embeddings only when it computes the prompt itself: the KV could not be imported
//! (no descriptor, a failed pull, no room at once), or the request was preempted. Such a
//! request is *parked* here instead of waiting: [`Scheduler::take_embeds_wanted`] lists it
//! for the driver, which makes the embeddings off the loop and hands them back with
//! [`Scheduler::embeds_ready`] (the request joins the queue where it would have been) or
//! reports [`Scheduler::embeds_failed`] (the request ends with an error).

use super::Scheduler;
use crate::ids::{RequestId, TokenId};
use crate::protocol::{PromptImage, TokenOutput};
use crate::worker::block_manager::InvariantViolation;
use crate::worker::sequence::Phase;
use std::sync::Arc;

/// A parked request's images, for the driver to make their embeddings.
#[derive(Clone, Debug)]
pub struct EmbedsWanted {
    pub request: RequestId,
    /// Tells this incarnation of `request` apart from a later one with the same id.
    pub serial: u64,
    /// The prompt's token ids (where the placeholders are).
    pub prompt: Vec<TokenId>,
    pub images: Vec<PromptImage>,
}

impl Scheduler {
    /// Queues `id` (at the front: a preempted request keeps its turn), or parks it when it
    /// needs embeddings it does not have.
    pub(super) fn enqueue(&mut self, id: RequestId, front: bool) {
        if self.seqs.get(&id).is_some_and(|s| s.needs_embeds()) {
            self.parked_for_embeds.insert(id, front);
            self.embeds_wanted.push(id);
        } else if front {
            self.waiting.push_front(id);
        } else {
            self.waiting.push_back(id);
        }
    }

    /// Takes `id` out of the queue or the parked set (it is being admitted another way, or
    /// it ended).
    pub(super) fn unqueue(&mut self, id: RequestId) {
        self.waiting.retain(|r| *r != id);
        self.parked_for_embeds.remove(&id);
        self.embeds_wanted.retain(|r| *r != id);
    }

    /// Requests parked since the last call, waiting for their image embeddings.
    pub fn take_embeds_wanted(&mut self) -> Vec<EmbedsWanted> {
        std::mem::take(&mut self.embeds_wanted)
            .into_iter()
            .filter_map(|id| {
                let seq = self.seqs.get(&id)?;
                Some(EmbedsWanted {
                    request: id,
                    serial: seq.serial,
                    prompt: seq.tokens[..seq.prompt_len].to_vec(),
                    images: seq.images.clone(),
                })
            })
            .collect()
    }

    /// Requests parked for their embeddings now.
    pub fn num_parked_for_embeds(&self) -> usize {
        self.parked_for_embeds.len()
    }

    /// The embeddings of parked request `id` (incarnation `serial`) are here: it joins the
    /// queue. Returns false when it is no longer parked (aborted meanwhile).
    pub fn embeds_ready(
        &mut self,
        id: RequestId,
        serial: u64,
        embeds: Arc<crate::encoder::PromptEmbeds>,
    ) -> bool {
        let Some(seq) = self.seqs.get_mut(&id).filter(|s| s.serial == serial) else {
            return false;
        };
        let Some(front) = self.parked_for_embeds.remove(&id) else {
            return false;
        };
        seq.embeds = Some(embeds);
        self.enqueue(id, front);
        true
    }

    /// The embeddings of parked request `id` could not be made: it ends with an error (the
    /// output to deliver). `None` when it is no longer parked.
    pub fn embeds_failed(
        &mut self,
        id: RequestId,
        serial: u64,
        reason: &str,
    ) -> Option<TokenOutput> {
        self.seqs.get(&id).filter(|s| s.serial == serial)?;
        self.parked_for_embeds.contains_key(&id).then(|| {
            self.finish_with_error(
                id,
                &format!("the image embeddings could not be made: {reason}"),
            )
        })
    }

    /// Invariants of parked requests (part of `check_invariants`).
    pub(super) fn check_parked_for_embeds(&self) -> Result<(), InvariantViolation> {
        let fail = |msg: String| Err(InvariantViolation(msg));
        for id in self.parked_for_embeds.keys() {
            let Some(seq) = self.seqs.get(id) else {
                return fail(format!("parked {id} has no state"));
            };
            if seq.phase != Phase::Waiting || seq.num_computed != 0 {
                return fail(format!("parked {id} is {:?} with KV", seq.phase));
            }
            if !seq.needs_embeds() {
                return fail(format!("parked {id} needs no embeddings"));
            }
            if self.waiting.contains(id) || self.blocks.block_table(*id).is_some() {
                return fail(format!("parked {id} is also queued or holds blocks"));
            }
        }
        Ok(())
    }
}
