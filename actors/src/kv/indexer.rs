//! FlashIndexer: which workers hold which KV blocks, for the router's prefix-overlap query.
//!
//! # Concurrency: why reads do not wait on batches
//! The index is a [`DashMap`] from [`BlockHash`] to the sorted set of workers holding it,
//! split into many shards, each behind its own reader-writer lock. A writer takes one shard's
//! write lock per *block* (insert or remove one worker id in one entry: tens of nanoseconds),
//! never for a whole batch, and never holds two block shards at once. A reader
//! ([`FlashIndexer::find_matches`]) takes one shard's read lock per block of the prompt.
//! So a query never waits for a batch to be applied: at worst it waits for one
//! single-entry update on the one shard it is reading, and readers never block each other.
//! We chose this over an RCU / arc-swap snapshot of the whole map because copying a
//! million-entry map per batch (or a persistent map's path-copying and pointer chasing) costs
//! far more than these short critical sections at the ingestion rates we need.
//! A query that runs while a batch is being applied may see part of it; every block it
//! reports was held at some instant during the query, which is all routing needs.
//!
//! # Per-worker state
//! Each worker has a reverse set (the blocks it holds, so removal and `AllBlocksCleared` cost
//! O(its blocks)), and the sequence number it should send next. A gap marks the worker as
//! needing a resync; the resync path is [`FlashIndexer::clear_worker`] followed by a full
//! re-store of its blocks. Lock order is always worker state, then one block shard.
//!
//! # Bounded memory
//! At most [`IndexerConfig::max_blocks`] distinct blocks are indexed. Beyond it the
//! least-recently-touched blocks are evicted whole (every worker's claim on them). "Touched"
//! means stored by a worker or matched by a query: queries refresh a block's touch stamp with
//! one relaxed atomic store (only when the stamp is stale), so popular shared prefixes stay
//! while cold leaves go. Eviction uses a FIFO of (block, stamp) with a second chance: a block
//! touched since it was queued is re-queued with its new stamp instead of evicted (the CLOCK
//! approximation of LRU). Evicted blocks are counted in [`IndexerMetrics::evictions`]; the
//! index then under-reports overlap for them, which only costs routing quality.

use super::events::{KvEvent, KvEventBatch};
use super::hash::BlockHash;
use crate::ids::WorkerId;
use dashmap::DashMap;
use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::sync::Mutex;

/// Hasher for keys that are already hashes (sequence hashes, worker ids): one multiply-mix
/// instead of SipHash, which would cost more than the map probe itself.
#[derive(Default, Clone, Copy)]
pub struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        let x = (self.0 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29);
    }
}

type FastBuild = BuildHasherDefault<PreHashed>;

/// Settings of the index.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct IndexerConfig {
    /// Most distinct blocks kept; beyond it the least-recently-touched are evicted.
    pub max_blocks: usize,
}

impl Default for IndexerConfig {
    fn default() -> Self {
        IndexerConfig {
            max_blocks: 4_000_000,
        }
    }
}

/// Per-worker prefix overlap for one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlapScores {
    /// (worker, number of consecutive leading request blocks it holds), sorted by worker,
    /// only workers with at least one block.
    pub scores: Vec<(WorkerId, u32)>,
    /// Longest leading run held by any single worker (the best achievable reuse).
    pub matched_blocks: u32,
}

impl OverlapScores {
    /// Leading blocks `worker` holds (0 when absent).
    pub fn get(&self, worker: WorkerId) -> u32 {
        self.scores
            .binary_search_by_key(&worker, |(w, _)| *w)
            .map_or(0, |i| self.scores.get(i).map_or(0, |(_, s)| *s))
    }

    /// Build from unsorted (worker, score) pairs, dropping zero scores.
    pub fn from_pairs(mut scores: Vec<(WorkerId, u32)>) -> OverlapScores {
        scores.retain(|(_, s)| *s > 0);
        scores.sort_unstable();
        let matched_blocks = scores.iter().map(|(_, s)| *s).max().unwrap_or(0);
        OverlapScores {
            scores,
            matched_blocks,
        }
    }
}

/// What applying a batch did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// In sequence; applied.
    Applied,
    /// Applied, but batches were lost before it (`expected` < `got`): the worker is now
    /// marked as needing a resync.
    AppliedAfterGap { expected: u64, got: u64 },
    /// Already seen (a replay or duplicate, `got` < `expected`); ignored.
    Duplicate { expected: u64, got: u64 },
}

/// Counters the actor shell exports (monotonic unless noted). Rates (events/s) are the
/// shell's to compute from two readings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexerMetrics {
    pub batches_applied: u64,
    /// Events (one `BlockStored` of n blocks is one event).
    pub events_applied: u64,
    /// Block-level events: each stored or removed block, each clear.
    pub block_events_applied: u64,
    /// (worker, block) claims added.
    pub blocks_indexed: u64,
    pub gaps: u64,
    pub duplicates: u64,
    /// Blocks evicted whole to stay under `max_blocks`.
    pub evictions: u64,
    /// Gauge: distinct blocks currently indexed.
    pub index_size: u64,
    /// Gauge: workers currently known.
    pub workers: u64,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    events: AtomicU64,
    block_events: AtomicU64,
    indexed: AtomicU64,
    gaps: AtomicU64,
    duplicates: AtomicU64,
    evictions: AtomicU64,
}

struct BlockEntry {
    /// Sorted, no duplicates.
    holders: Vec<WorkerId>,
    /// Identifies this incarnation of the entry in the eviction queue.
    born: u64,
    /// Last store or query tick.
    touched: AtomicU64,
}

/// Which sequence number a worker must send next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SeqExpect {
    /// Accept whatever comes (after `clear_worker`: the resync stream's numbering).
    Any,
    Next(u64),
}

struct WorkerState {
    expect: SeqExpect,
    needs_resync: bool,
    blocks: HashSet<BlockHash, FastBuild>,
}

impl WorkerState {
    fn new() -> Self {
        WorkerState {
            // A worker's first batch is seq 0; anything else means we missed its start.
            expect: SeqExpect::Next(0),
            needs_resync: false,
            blocks: HashSet::default(),
        }
    }
}

struct EvictionQueue {
    /// (block, born, stamp when queued), oldest first.
    fifo: VecDeque<(BlockHash, u64, u64)>,
}

/// The concurrent KV block index. Share it behind an `Arc`; all methods take `&self`.
pub struct FlashIndexer {
    config: IndexerConfig,
    blocks: DashMap<BlockHash, BlockEntry, FastBuild>,
    workers: DashMap<WorkerId, WorkerState, FastBuild>,
    queue: Mutex<EvictionQueue>,
    /// Logical clock for touch stamps: +1 per applied batch.
    tick: AtomicU64,
    /// Distinct blocks. Signed and updated once per batch, so it can dip below zero for a
    /// moment when an eviction races a batch that created the block; read through
    /// `block_count`, which clamps.
    distinct: AtomicIsize,
    counters: Counters,
}

impl FlashIndexer {
    pub fn new(config: IndexerConfig) -> Self {
        FlashIndexer {
            config,
            blocks: DashMap::with_capacity_and_hasher_and_shard_amount(
                0,
                FastBuild::default(),
                128,
            ),
            workers: DashMap::with_hasher_and_shard_amount(FastBuild::default(), 64),
            queue: Mutex::new(EvictionQueue {
                fifo: VecDeque::new(),
            }),
            tick: AtomicU64::new(1),
            distinct: AtomicIsize::new(0),
            counters: Counters::default(),
        }
    }

    pub fn config(&self) -> &IndexerConfig {
        &self.config
    }

    /// Apply one worker's batch. Batches of one worker must be applied in arrival order
    /// (one subscriber task per worker topic does that); different workers may be applied
    /// concurrently from different threads.
    pub fn apply(&self, batch: &KvEventBatch) -> ApplyOutcome {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut fresh: Vec<(BlockHash, u64, u64)> = Vec::new();
        let outcome = {
            let mut state = self
                .workers
                .entry(batch.worker)
                .or_insert_with(WorkerState::new);
            let outcome = match state.expect {
                SeqExpect::Any => ApplyOutcome::Applied,
                SeqExpect::Next(n) if batch.seq == n => ApplyOutcome::Applied,
                SeqExpect::Next(n) if batch.seq < n => ApplyOutcome::Duplicate {
                    expected: n,
                    got: batch.seq,
                },
                SeqExpect::Next(n) => ApplyOutcome::AppliedAfterGap {
                    expected: n,
                    got: batch.seq,
                },
            };
            match outcome {
                ApplyOutcome::Duplicate { .. } => {
                    self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    return outcome;
                }
                ApplyOutcome::AppliedAfterGap { .. } => {
                    state.needs_resync = true;
                    self.counters.gaps.fetch_add(1, Ordering::Relaxed);
                }
                ApplyOutcome::Applied => {}
            }
            state.expect = SeqExpect::Next(batch.seq.saturating_add(1));
            let mut block_events = 0u64;
            let mut indexed = 0u64;
            let mut dropped = 0isize;
            for event in &batch.events {
                match event {
                    KvEvent::BlockStored { block_hashes, .. } => {
                        block_events += block_hashes.len() as u64;
                        for h in block_hashes {
                            state.blocks.insert(*h);
                            // Always (re)claim in the map: an eviction may have just removed
                            // the entry while the reverse set still lists it.
                            if self.add_holder(*h, batch.worker, tick, &mut fresh) {
                                indexed += 1;
                            }
                        }
                    }
                    KvEvent::BlockRemoved { block_hashes } => {
                        block_events += block_hashes.len() as u64;
                        for h in block_hashes {
                            if state.blocks.remove(h) && self.remove_holder(*h, batch.worker) {
                                dropped += 1;
                            }
                        }
                    }
                    KvEvent::AllBlocksCleared => {
                        block_events += 1;
                        for h in std::mem::take(&mut state.blocks) {
                            if self.remove_holder(h, batch.worker) {
                                dropped += 1;
                            }
                        }
                    }
                }
            }
            let c = &self.counters;
            c.batches.fetch_add(1, Ordering::Relaxed);
            c.events
                .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
            c.block_events.fetch_add(block_events, Ordering::Relaxed);
            c.indexed.fetch_add(indexed, Ordering::Relaxed);
            let created = isize::try_from(fresh.len()).unwrap_or(isize::MAX);
            self.distinct
                .fetch_add(created - dropped, Ordering::Relaxed);
            outcome
        };
        self.enqueue_and_evict(fresh);
        outcome
    }

    /// Claim `h` for `w`; true when the claim is new.
    fn add_holder(
        &self,
        h: BlockHash,
        w: WorkerId,
        tick: u64,
        fresh: &mut Vec<(BlockHash, u64, u64)>,
    ) -> bool {
        let mut entry = self.blocks.entry(h).or_insert_with(|| {
            // Unique per (batch, new block) without a shared atomic: the batch's tick in the
            // high bits, its count of new blocks in the low 24. (A batch of over 16M new
            // blocks could alias two incarnations of one hash; the cost is an early evict.)
            let born = (tick << 24) | (fresh.len() as u64 & 0xFF_FFFF);
            fresh.push((h, born, tick));
            BlockEntry {
                holders: Vec::with_capacity(1),
                born,
                touched: AtomicU64::new(tick),
            }
        });
        entry.touched.store(tick, Ordering::Relaxed);
        match entry.holders.binary_search(&w) {
            Ok(_) => false,
            Err(pos) => {
                entry.holders.insert(pos, w);
                true
            }
        }
    }

    /// Drop `w`'s claim on `h`; true when that removed the block's entry (its last holder).
    fn remove_holder(&self, h: BlockHash, w: WorkerId) -> bool {
        let emptied = match self.blocks.get_mut(&h) {
            Some(mut entry) => {
                if let Ok(pos) = entry.holders.binary_search(&w) {
                    entry.holders.remove(pos);
                }
                entry.holders.is_empty()
            }
            None => false,
        };
        emptied
            && self
                .blocks
                .remove_if(&h, |_, e| e.holders.is_empty())
                .is_some()
    }

    fn enqueue_and_evict(&self, fresh: Vec<(BlockHash, u64, u64)>) {
        let over = self.block_count() > self.config.max_blocks;
        if fresh.is_empty() && !over {
            return;
        }
        let mut victims = Vec::new();
        {
            let Ok(mut q) = self.queue.lock() else {
                return; // a panicking thread poisoned it: stop evicting rather than panic
            };
            q.fifo.extend(fresh);
            let live = self.block_count();
            if q.fifo.len() > 2 * live + 4096 {
                // Drop queue items of blocks that were removed since they were queued.
                q.fifo
                    .retain(|(h, born, _)| self.blocks.get(h).is_some_and(|e| e.born == *born));
            }
            let mut excess = live.saturating_sub(self.config.max_blocks);
            while excess > 0 {
                let Some((h, born, stamp)) = q.fifo.pop_front() else {
                    break;
                };
                let Some(now) = self
                    .blocks
                    .get(&h)
                    .filter(|e| e.born == born)
                    .map(|e| e.touched.load(Ordering::Relaxed))
                else {
                    continue; // stale item
                };
                if now > stamp {
                    q.fifo.push_back((h, born, now)); // second chance
                    continue;
                }
                if let Some((_, entry)) = self.blocks.remove_if(&h, |_, e| e.born == born) {
                    self.distinct.fetch_sub(1, Ordering::Relaxed);
                    self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                    victims.push((h, entry.holders));
                    excess -= 1;
                }
            }
        }
        // Drop the evicted blocks from their holders' reverse sets (worker lock, then the
        // block shard: the same order as `apply`). A holder that stored the block again in
        // the meantime keeps it.
        for (h, holders) in victims {
            for w in holders {
                if let Some(mut state) = self.workers.get_mut(&w) {
                    let re_stored = self
                        .blocks
                        .get(&h)
                        .is_some_and(|e| e.holders.binary_search(&w).is_ok());
                    if !re_stored {
                        state.blocks.remove(&h);
                    }
                }
            }
        }
    }

    /// Per-worker count of consecutive leading blocks of `hashes` held. Walks the chain and
    /// stops at the first block that no still-matching worker holds.
    pub fn find_matches(&self, hashes: &[BlockHash]) -> OverlapScores {
        let tick = self.tick.load(Ordering::Relaxed);
        let mut active: Vec<WorkerId> = Vec::new();
        let mut scores: Vec<(WorkerId, u32)> = Vec::new();
        let mut depth = 0u32;
        for h in hashes {
            let Some(entry) = self.blocks.get(h) else {
                break;
            };
            if entry.touched.load(Ordering::Relaxed) < tick {
                entry.touched.store(tick, Ordering::Relaxed);
            }
            if depth == 0 {
                active.extend_from_slice(&entry.holders);
            } else if entry.holders != active {
                // Both sorted: keep workers still holding this block; the rest stop at depth.
                let holders = &entry.holders;
                active.retain(|w| {
                    let keep = holders.binary_search(w).is_ok();
                    if !keep {
                        scores.push((*w, depth));
                    }
                    keep
                });
            }
            drop(entry);
            if active.is_empty() {
                break;
            }
            depth += 1;
        }
        scores.extend(active.into_iter().map(|w| (w, depth)));
        OverlapScores::from_pairs(scores)
    }

    /// Workers currently holding `h`, sorted.
    pub fn holders(&self, h: BlockHash) -> Vec<WorkerId> {
        self.blocks
            .get(&h)
            .map(|e| e.holders.clone())
            .unwrap_or_default()
    }

    /// Drop every block of `worker` and forget it (its sequence numbering included).
    pub fn remove_worker(&self, worker: WorkerId) {
        if let Some((_, state)) = self.workers.remove(&worker) {
            for h in state.blocks {
                if self.remove_holder(h, worker) {
                    self.distinct.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Resync step 1: drop every block of `worker`, clear its resync flag and accept the
    /// next batch whatever its sequence number (the full re-store that follows).
    pub fn clear_worker(&self, worker: WorkerId) {
        let mut state = self.workers.entry(worker).or_insert_with(WorkerState::new);
        for h in std::mem::take(&mut state.blocks) {
            if self.remove_holder(h, worker) {
                self.distinct.fetch_sub(1, Ordering::Relaxed);
            }
        }
        state.needs_resync = false;
        state.expect = SeqExpect::Any;
    }

    /// Workers whose event stream had a gap since their last `clear_worker`, sorted.
    pub fn workers_needing_resync(&self) -> Vec<WorkerId> {
        let mut out: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|s| s.needs_resync)
            .map(|s| *s.key())
            .collect();
        out.sort_unstable();
        out
    }

    /// Known workers, sorted.
    pub fn workers(&self) -> Vec<WorkerId> {
        let mut out: Vec<WorkerId> = self.workers.iter().map(|s| *s.key()).collect();
        out.sort_unstable();
        out
    }

    /// Blocks `worker` holds according to the index.
    pub fn worker_block_count(&self, worker: WorkerId) -> usize {
        self.workers.get(&worker).map_or(0, |s| s.blocks.len())
    }

    /// Distinct blocks indexed.
    pub fn block_count(&self) -> usize {
        usize::try_from(self.distinct.load(Ordering::Relaxed)).unwrap_or(0)
    }

    pub fn metrics(&self) -> IndexerMetrics {
        let c = &self.counters;
        IndexerMetrics {
            batches_applied: c.batches.load(Ordering::Relaxed),
            events_applied: c.events.load(Ordering::Relaxed),
            block_events_applied: c.block_events.load(Ordering::Relaxed),
            blocks_indexed: c.indexed.load(Ordering::Relaxed),
            gaps: c.gaps.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            index_size: self.block_count() as u64,
            workers: self.workers.len() as u64,
        }
    }
}

impl Default for FlashIndexer {
    fn default() -> Self {
        FlashIndexer::new(IndexerConfig::default())
    }
}
