//! KV-cache bookkeeping shared by workers, the indexer, the router and the simulator.

pub mod approx;
pub mod block_map;
pub mod events;
pub mod hash;
pub mod indexer;
pub mod runs;
pub mod vllm;
pub mod vllm_feed;

pub use events::{KvEvent, KvEventBatch};
pub use hash::{hash_blocks, BlockHash, BlockSize, LocalBlockHash};
