//! KV cache events: what a worker tells the cluster about the blocks it holds.
//!
//! The field layout follows vLLM's KV events (`BlockStored`, `BlockRemoved`,
//! `AllBlocksCleared`, batched with a timestamp) so events from a vLLM worker can be ingested
//! by the same indexer. Batches carry a per-publisher sequence number so a subscriber can
//! detect a gap and ask for a resync.

use super::hash::{BlockHash, BlockSize};
use crate::ids::{TokenId, WorkerId};
use serde::{Deserialize, Serialize};

/// One change to a worker's KV cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvEvent {
    /// Full blocks became available for reuse. `block_hashes` form a chain: the first one's
    /// parent is `parent_block_hash` (`None` for a sequence's first block), each later one's
    /// parent is the one before it.
    BlockStored {
        block_hashes: Vec<BlockHash>,
        parent_block_hash: Option<BlockHash>,
        token_ids: Vec<TokenId>,
        block_size: BlockSize,
        lora_id: Option<u64>,
    },
    /// Blocks were evicted and can no longer be reused.
    BlockRemoved { block_hashes: Vec<BlockHash> },
    /// The worker dropped its whole cache (restart, reset).
    AllBlocksCleared,
}

/// A batch of events from one worker, in the order they happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvEventBatch {
    pub worker: WorkerId,
    /// Per-worker sequence number, +1 per batch, starting at 0. A gap means lost events.
    pub seq: u64,
    /// When the batch was published, in seconds since the Unix epoch (or virtual time in the
    /// simulator). Informational: ordering comes from `seq`.
    pub ts: f64,
    pub events: Vec<KvEvent>,
}
