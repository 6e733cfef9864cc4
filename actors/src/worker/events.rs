//! Numbering the worker's KV events into batches for the event plane.

use crate::ids::WorkerId;
use crate::kv::events::{KvEvent, KvEventBatch};

/// Wraps drained [`KvEvent`]s into [`KvEventBatch`]es with consecutive sequence numbers
/// (0, 1, 2, ...), so subscribers can detect a lost batch. Empty drains make no batch and
/// use no number.
#[derive(Clone, Debug)]
pub struct KvEventSequencer {
    worker: WorkerId,
    next_seq: u64,
}

impl KvEventSequencer {
    pub fn new(worker: WorkerId) -> Self {
        KvEventSequencer {
            worker,
            next_seq: 0,
        }
    }

    /// The batch to publish for `events`, stamped `ts` (seconds since the Unix epoch, or
    /// virtual seconds in the simulator); `None` when there is nothing to publish.
    pub fn batch(&mut self, events: Vec<KvEvent>, ts: f64) -> Option<KvEventBatch> {
        if events.is_empty() {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        Some(KvEventBatch {
            worker: self.worker,
            seq,
            ts,
            events,
        })
    }

    /// The sequence number the next batch will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}
