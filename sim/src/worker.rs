//! What the simulator adds to a worker: the simulated sampler (a pure function of request
//! and position), the blocks a worker announced (from its own KV events, before the
//! network), and the settled-state check run at the end of every run.

use crate::rng::mix64;
use std::collections::BTreeSet;
use turbine_actors::ids::{RequestId, TokenId, WorkerId};
use turbine_actors::kv::{BlockHash, KvEvent};
use turbine_actors::worker::{InvariantViolation, SampledToken, ScheduledSeq, Scheduler};

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

/// The simulated sampler: a pure function of (request, index), never a stop token.
pub(crate) fn sample_token(request: RequestId, index: u32) -> TokenId {
    (100 + mix64(request.0.rotate_left(20) ^ u64::from(index)) % 30_000) as TokenId
}
