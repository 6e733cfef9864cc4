//! Synthetic, seeded KV workload shared by the indexer/router benches and the
//! `indexer_bench` example: `chains` prompt families of `chain_len` blocks; every chain is
//! held whole by one worker, and each worker also holds `prefixes_per_worker` random
//! prefixes of random chains (so roots are shared by several workers, deep blocks by few).

#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use turbine_actors::ids::WorkerId;
use turbine_actors::kv::hash::{BlockHash, BlockSize};
use turbine_actors::kv::indexer::{FlashIndexer, IndexerConfig};
use turbine_actors::kv::{KvEvent, KvEventBatch};

pub struct Workload {
    pub workers: usize,
    pub chains: Vec<Vec<BlockHash>>,
    /// Per worker, its batches in sequence order.
    pub batches: Vec<Vec<KvEventBatch>>,
    pub block_events: usize,
}

pub const BATCH_BLOCKS: usize = 64;

pub fn build(
    workers: usize,
    chains: usize,
    chain_len: usize,
    prefixes_per_worker: usize,
    seed: u64,
) -> Workload {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let chain_hashes: Vec<Vec<BlockHash>> = (0..chains)
        .map(|_| (0..chain_len).map(|_| BlockHash(rng.gen())).collect())
        .collect();
    let mut batches = Vec::with_capacity(workers);
    let mut block_events = 0;
    for w in 0..workers {
        let mut held: Vec<&[BlockHash]> = Vec::new();
        for c in (w..chains).step_by(workers.max(1)) {
            held.push(&chain_hashes[c]);
        }
        for _ in 0..prefixes_per_worker {
            let c = rng.gen_range(0..chains);
            let len = rng.gen_range(chain_len / 32..=chain_len);
            held.push(&chain_hashes[c][..len]);
        }
        let mut seq = 0;
        let mut mine = Vec::new();
        for prefix in held {
            let mut parent = None;
            for chunk in prefix.chunks(BATCH_BLOCKS) {
                block_events += chunk.len();
                mine.push(KvEventBatch {
                    worker: WorkerId(w as u64),
                    seq,
                    ts: 0.0,
                    events: vec![KvEvent::BlockStored {
                        block_hashes: chunk.to_vec(),
                        parent_block_hash: parent,
                        token_ids: Vec::new(),
                        block_size: BlockSize::DEFAULT,
                        lora_id: None,
                    }],
                });
                parent = chunk.last().copied();
                seq += 1;
            }
        }
        batches.push(mine);
    }
    Workload {
        workers,
        chains: chain_hashes,
        batches,
        block_events,
    }
}

/// The default scale of the goals: 1,000 workers, ~1M distinct blocks in 2,048-block chains.
pub fn goal_scale(seed: u64) -> Workload {
    build(1_000, 489, 2_048, 4, seed)
}

/// Apply every batch with `threads` threads (workers split by id). Returns the index.
pub fn ingest(w: &Workload, threads: usize) -> Arc<FlashIndexer> {
    let ix = Arc::new(FlashIndexer::new(IndexerConfig {
        max_blocks: 8_000_000,
    }));
    std::thread::scope(|s| {
        for t in 0..threads {
            let ix = ix.clone();
            s.spawn(move || {
                for per_worker in w.batches.iter().skip(t).step_by(threads) {
                    for b in per_worker {
                        ix.apply(b);
                    }
                }
            });
        }
    });
    ix
}
