//! A seeded Mooncake-style KV event workload, in neutral form (both indexers' events are
//! built from it).
//!
//! Shape: `workers` workers, `groups` shared-prefix groups (a system prompt / document of
//! 16-512 blocks each), requests of 64-1,024 blocks = the group's prefix (cut to the prompt
//! length) + a unique suffix. A request goes to one of its group's 8 "home" workers 80% of
//! the time (a KV-aware router's affinity), else to any worker. The worker stores the blocks it
//! does not hold yet, in batches of up to 64 with the parent hash, like vLLM. Each worker
//! holds at most `capacity` blocks; beyond that it removes the blocks of its oldest stored
//! segments tail first, never a block that still has a held child (so, like a prefix cache,
//! what a worker holds stays prefix-closed).
//!
//! Hashes: a block's local hash is its content (group and position for prefix blocks, random
//! for suffix blocks); its sequence hash chains the parent's sequence hash with the local
//! hash (Dynamo's chain function, see `chain`). turbine indexes sequence hashes; Dynamo's trees walk local hashes.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, HashSet, VecDeque};

/// One block: (sequence hash, local hash).
pub type Block = (u64, u64);

pub enum EvKind {
    Stored {
        parent: Option<u64>,
        /// Position of the first block in its sequence.
        start: u32,
        blocks: Vec<Block>,
    },
    Removed {
        hashes: Vec<u64>,
    },
}

pub struct Ev {
    pub worker: u64,
    /// Per-worker sequence number (0, 1, ...).
    pub seq: u64,
    pub kind: EvKind,
}

pub struct Query {
    pub seq: Vec<u64>,
    pub local: Vec<u64>,
}

pub struct Params {
    pub seed: u64,
    pub workers: usize,
    pub groups: usize,
    pub requests: usize,
    pub capacity: usize,
    pub queries: usize,
    pub query_blocks: usize,
}

pub struct Workload {
    pub workers: usize,
    pub events: Vec<Ev>,
    pub queries: Vec<Query>,
    pub block_events: usize,
    pub stored_blocks: usize,
    pub removed_blocks: usize,
    pub distinct_ever: usize,
    pub distinct_at_end: usize,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Sequence hashes chained the way Dynamo chains them (the first block's is its local hash),
/// because Dynamo's PositionalIndexer recomputes the chain from a query's local hashes.
/// turbine indexes whatever sequence hashes the events carry.
fn chain(locals: &[u64]) -> Vec<Block> {
    let mut parent: Option<u64> = None;
    locals
        .iter()
        .map(|&l| {
            let h = parent.map_or(l, |p| dynamo_tokens::compute_next_sequence_hash(p, l));
            parent = Some(h);
            (h, l)
        })
        .collect()
}

#[derive(Default)]
struct WorkerCache {
    /// Held sequence hash -> number of held children.
    held: HashMap<u64, u32>,
    /// Parent of each held block.
    parent: HashMap<u64, Option<u64>>,
    /// Stored segments, oldest first.
    lru: VecDeque<Vec<u64>>,
    seq: u64,
}

pub fn generate(p: &Params) -> Workload {
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
    let prefixes: Vec<Vec<u64>> = (0..p.groups)
        .map(|g| {
            let len = rng.gen_range(16..=512);
            (0..len)
                .map(|i| splitmix(((g as u64) << 32) | i as u64))
                .collect()
        })
        .collect();
    let homes: Vec<Vec<u64>> = (0..p.groups)
        .map(|_| (0..8).map(|_| rng.gen_range(0..p.workers as u64)).collect())
        .collect();
    let mut caches: Vec<WorkerCache> = (0..p.workers).map(|_| WorkerCache::default()).collect();
    let mut events = Vec::new();
    let mut prompts: Vec<Vec<Block>> = Vec::new();
    let (mut stored, mut removed) = (0usize, 0usize);
    let mut ever: HashSet<u64> = HashSet::new();
    for _ in 0..p.requests {
        let g = rng.gen_range(0..p.groups);
        let len = rng.gen_range(64..=1024usize);
        let mut locals: Vec<u64> = prefixes[g].iter().take(len).copied().collect();
        while locals.len() < len {
            locals.push(rng.gen());
        }
        let blocks = chain(&locals);
        let w = if rng.gen_bool(0.8) {
            homes[g][rng.gen_range(0..8)]
        } else {
            rng.gen_range(0..p.workers as u64)
        } as usize;
        let cache = &mut caches[w];
        let first_new = blocks
            .iter()
            .position(|(h, _)| !cache.held.contains_key(h))
            .unwrap_or(blocks.len());
        if first_new < blocks.len() {
            let mut parent = first_new.checked_sub(1).map(|i| blocks[i].0);
            let mut segment = Vec::new();
            for (k, piece) in blocks[first_new..].chunks(64).enumerate() {
                let piece_parent = parent;
                for &(h, _) in piece {
                    if let Some(c) = parent.and_then(|ph| cache.held.get_mut(&ph)) {
                        *c += 1;
                    }
                    cache.held.insert(h, 0);
                    cache.parent.insert(h, parent);
                    segment.push(h);
                    ever.insert(h);
                    parent = Some(h);
                }
                events.push(Ev {
                    worker: w as u64,
                    seq: cache.seq,
                    kind: EvKind::Stored {
                        parent: piece_parent,
                        start: (first_new + k * 64) as u32,
                        blocks: piece.to_vec(),
                    },
                });
                cache.seq += 1;
                stored += piece.len();
            }
            cache.lru.push_back(segment);
        }
        // Tail removals down to capacity.
        while cache.held.len() > p.capacity {
            let Some(segment) = cache.lru.pop_front() else {
                break;
            };
            let mut gone = Vec::new();
            for &h in segment.iter().rev() {
                if cache.held.get(&h).copied() != Some(0) {
                    break; // still has a held child (or already gone)
                }
                cache.held.remove(&h);
                if let Some(Some(par)) = cache.parent.remove(&h) {
                    if let Some(c) = cache.held.get_mut(&par) {
                        *c = c.saturating_sub(1);
                    }
                }
                gone.push(h);
            }
            if !gone.is_empty() {
                removed += gone.len();
                events.push(Ev {
                    worker: w as u64,
                    seq: cache.seq,
                    kind: EvKind::Removed { hashes: gone },
                });
                cache.seq += 1;
            }
        }
        prompts.push(blocks);
    }
    let distinct_at_end = caches
        .iter()
        .flat_map(|c| c.held.keys())
        .collect::<HashSet<_>>()
        .len();
    // Queries: a random earlier prompt, extended with fresh blocks to `query_blocks`.
    let queries = (0..p.queries)
        .map(|_| {
            let base = &prompts[rng.gen_range(0..prompts.len())];
            let mut locals: Vec<u64> = base.iter().take(p.query_blocks).map(|(_, l)| *l).collect();
            while locals.len() < p.query_blocks {
                locals.push(rng.gen());
            }
            let blocks = chain(&locals);
            Query {
                seq: blocks.iter().map(|b| b.0).collect(),
                local: locals,
            }
        })
        .collect();
    Workload {
        workers: p.workers,
        events,
        queries,
        block_events: stored + removed,
        stored_blocks: stored,
        removed_blocks: removed,
        distinct_ever: ever.len(),
        distinct_at_end,
    }
}
