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
    /// `None` for an unconstrained request.
    pub fn next_mask(&self, id: RequestId) -> Option<MaskSlot> {
        let constraint = self.active.get(&id)?.clone();
        let slot = MaskSlot::default();
        let filled = slot.clone();
        tokio::task::spawn_blocking(move || {
            let mask = constraint
                .lock()
                .map_err(|_| "the grammar state was poisoned".to_string())
                .and_then(|mut c| c.mask().map_err(|e| e.to_string()));
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
