//! The grammar state of a worker's constrained requests (`response_format`, forced tool
//! calls), and the token masks it hands the executor.
//!
//! WHY masks are filled off the critical path: a mask depends only on the tokens so far, so
//! it is computed on a blocking thread while the executor runs the step's forward pass; the
//! executor waits for it only when it samples (see `executor::MaskSlot`). A step costs the
//! longer of the two, not their sum.

use crate::executor::MaskSlot;
use crate::ids::RequestId;
use crate::protocol::PreprocessedRequest;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use turbine_kernels::grammar::{Constraint, Grammars};

/// Constrained requests of one worker.
#[derive(Default)]
pub struct Constrained {
    grammars: Option<Arc<Grammars>>,
    active: BTreeMap<RequestId, Arc<Mutex<Constraint>>>,
}

impl Constrained {
    pub fn new(grammars: Option<Arc<Grammars>>) -> Self {
        Constrained {
            grammars,
            active: BTreeMap::new(),
        }
    }

    /// Compiles `req`'s grammar, if it has one, and replays the tokens other workers
    /// generated for it already (a migrated continuation).
    pub fn admit(&mut self, req: &PreprocessedRequest) -> Result<(), String> {
        let Some(grammar) = &req.sampling.grammar else {
            return Ok(());
        };
        let Some(grammars) = &self.grammars else {
            return Err("this worker has no grammar engine for constrained decoding".into());
        };
        let mut constraint = grammars
            .constrain(&grammar.source()?)
            .map_err(|e| e.to_string())?;
        let before = req.generated_before as usize;
        let start = req.token_ids.len().saturating_sub(before);
        for &t in &req.token_ids[start..] {
            constraint.advance(t).map_err(|e| e.to_string())?;
        }
        self.active.insert(req.id, Arc::new(Mutex::new(constraint)));
        Ok(())
    }

    /// A slot the next mask of `id` will be written to, computed on a blocking thread;
    /// `None` for an unconstrained request. `hold` are the stop tokens `min_tokens` still
    /// keeps back: they leave the mask while the grammar allows anything else (see
    /// [`hold_back`]).
    pub fn next_mask(&self, id: RequestId, hold: Vec<u32>) -> Option<MaskSlot> {
        let constraint = self.active.get(&id)?.clone();
        let slot = MaskSlot::default();
        let filled = slot.clone();
        tokio::task::spawn_blocking(move || {
            let mask = constraint
                .lock()
                .map_err(|_| "the grammar state was poisoned".to_string())
                .and_then(|mut c| c.mask().map_err(|e| e.to_string()))
                .map(|mut bits| {
                    hold_back(&mut bits, &hold);
                    bits
                });
            filled.fill(mask);
        });
        Some(slot)
    }

    /// Advances `id` by its sampled `token`; `Err` if the grammar rejects it.
    pub fn advance(&self, id: RequestId, token: u32) -> Result<(), String> {
        let Some(constraint) = self.active.get(&id) else {
            return Ok(());
        };
        let mut c = constraint
            .lock()
            .map_err(|_| "the grammar state was poisoned".to_string())?;
        c.advance(token).map_err(|e| e.to_string())
    }

    /// Forgets `id` (finished, aborted or released).
    pub fn remove(&mut self, id: RequestId) {
        self.active.remove(&id);
    }

    pub fn is_constrained(&self, id: RequestId) -> bool {
        self.active.contains_key(&id)
    }
}

/// `min_tokens` under a grammar: clears the `hold` tokens (the stop tokens) from the
/// allowed-token bitmask `bits`, unless nothing else is allowed. Returns whether it did.
///
/// WHY the grammar wins: while the grammar allows going on (an unfinished value, or a
/// complete one that may still grow, like the digits of a number) the output is kept
/// going, as `min_tokens` asks; once only a stop token fits (a closed JSON object), the
/// output is complete and ends there, short of `min_tokens`, rather than fail the request
/// with no token left to draw.
pub fn hold_back(bits: &mut [u32], hold: &[u32]) -> bool {
    if hold.is_empty() {
        return false;
    }
    let mut rest = bits.to_vec();
    for &t in hold {
        if let Some(w) = rest.get_mut(t as usize / 32) {
            *w &= !(1u32 << (t % 32));
        }
    }
    if rest.iter().all(|&w| w == 0) {
        return false;
    }
    bits.copy_from_slice(&rest);
    true
}

#[cfg(test)]
mod tests {
    use super::hold_back;
    use turbine_kernels::grammar::allowed;

    fn bits(on: &[u32]) -> Vec<u32> {
        let mut b = vec![0u32; 3];
        for &t in on {
            b[t as usize / 32] |= 1 << (t % 32);
        }
        b
    }

    #[test]
    fn stop_tokens_are_held_back_only_while_something_else_fits() {
        // A value that may end or go on (EOS 2 and stop id 70 allowed, digits 40 and 41).
        let mut b = bits(&[2, 40, 41, 70]);
        assert!(hold_back(&mut b, &[2, 70]));
        assert_eq!(b, bits(&[40, 41]));
        // Complete: only the stop tokens fit, so the output ends there.
        let mut done = bits(&[2, 70]);
        assert!(!hold_back(&mut done, &[2, 70]));
        assert!(allowed(&done, 2) && allowed(&done, 70));
        // Nothing to hold (min_tokens reached): the mask as the grammar gave it.
        let mut free = bits(&[2, 40]);
        assert!(!hold_back(&mut free, &[]));
        assert_eq!(free, bits(&[2, 40]));
        // A stop token outside the vocabulary's bitmask is ignored.
        let mut b = bits(&[2, 40]);
        assert!(hold_back(&mut b, &[2, 5000]));
        assert_eq!(b, bits(&[40]));
    }
}
