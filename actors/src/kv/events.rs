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

/// Why a turbine KV event batch could not be decoded from the wire.
#[derive(Debug, thiserror::Error)]
pub enum KvEventCodecError {
    #[error("encoding a KV event batch failed: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("decoding a KV event batch failed: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

impl KvEventBatch {
    /// Number of block-level events in the batch (a `BlockStored` of n hashes counts n; a
    /// clear counts 1). The unit of the indexer's ingestion-rate goal.
    pub fn block_event_count(&self) -> usize {
        self.events
            .iter()
            .map(|e| match e {
                KvEvent::BlockStored { block_hashes, .. } => block_hashes.len(),
                KvEvent::BlockRemoved { block_hashes } => block_hashes.len(),
                KvEvent::AllBlocksCleared => 1,
            })
            .sum()
    }

    /// turbine's own wire form of a batch on the event plane (`kv.<worker>` topic):
    /// MessagePack with named fields, so fields can be added later without breaking readers.
    pub fn to_msgpack(&self) -> Result<Vec<u8>, KvEventCodecError> {
        Ok(rmp_serde::to_vec_named(self)?)
    }

    /// Inverse of [`KvEventBatch::to_msgpack`]. Never panics on garbage: any malformed input
    /// is a [`KvEventCodecError::Decode`].
    pub fn from_msgpack(bytes: &[u8]) -> Result<KvEventBatch, KvEventCodecError> {
        Ok(rmp_serde::from_slice(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> KvEventBatch {
        KvEventBatch {
            worker: WorkerId(3),
            seq: 9,
            ts: 12.5,
            events: vec![
                KvEvent::BlockStored {
                    block_hashes: vec![BlockHash(1), BlockHash(2)],
                    parent_block_hash: None,
                    token_ids: (0..32).collect(),
                    block_size: BlockSize::DEFAULT,
                    lora_id: Some(4),
                },
                KvEvent::BlockRemoved {
                    block_hashes: vec![BlockHash(2)],
                },
                KvEvent::AllBlocksCleared,
            ],
        }
    }

    #[test]
    fn msgpack_round_trip() {
        let batch = sample();
        let bytes = batch.to_msgpack().unwrap();
        assert_eq!(KvEventBatch::from_msgpack(&bytes).unwrap(), batch);
        assert_eq!(batch.block_event_count(), 4);
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        let bytes = sample().to_msgpack().unwrap();
        for cut in 0..bytes.len() {
            assert!(KvEventBatch::from_msgpack(&bytes[..cut]).is_err());
        }
        assert!(KvEventBatch::from_msgpack(&[0xc1, 0xff, 0x00]).is_err());
    }
}
