//! FlashIndexer: which workers hold which KV blocks, for the router's prefix-overlap query.
//!
//! # Layout
//! Blocks live in [`SHARDS`] shards chosen by hash bits; each shard is an open-addressing
//! [`Table`] (see `block_table`) behind its own reader-writer lock, one 64-byte entry per
//! block with its holders inline as 4-byte holder ids (a dense number per worker; blocks with
//! many holders spill their list to a side map). A query costs about one cache line per
//! block, and because all of a prompt's hashes are known up front, [`FlashIndexer::find_matches`]
//! prefetches the entries [`PREFETCH_DISTANCE`] blocks ahead of the one it is comparing, so
//! the cache misses of a long walk overlap instead of queueing one after another.
//!
//! # Concurrency: why reads do not wait on batches
//! A writer holds one shard's write lock at a time, for the few blocks of one batch that fall
//! in that shard (a 64-block batch over 64 shards is about one block per lock), never for a
//! whole batch and never two shards at once. A reader takes the read locks of the shards its
//! query touches, in ascending shard order (so readers and writers can never wait on each
//! other in a cycle, even with writer-preferring locks), walks, and releases them: first for
//! the first [`FIRST_CHUNK`] blocks (most queries of new prompts miss early), then once for
//! the rest. So a query waits at most for a few single-block updates, readers never block
//! each other, and a 1,024-block query takes at most about 2 × 64 lock acquisitions instead
//! of 1,024. A query that runs while a batch is being applied may see part of it; every block
//! it reports was held at some instant during the query, which is all routing needs.
//!
//! # Per-worker state
//! Each worker has its holder id, a count of the blocks it holds, and the sequence number it
//! should send next. A gap marks the worker as needing a resync; the resync path is
//! [`FlashIndexer::clear_worker`] followed by a full re-store of its blocks. There is no
//! per-worker reverse set (it cost a second hash-table insert per stored block): dropping all
//! of a worker's blocks (`AllBlocksCleared`, resync, removal) scans the shards instead, which
//! is O(index) but rare. Lock order is always worker state, then one block shard.
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

use super::block_table::{self, mix, Entry, HolderId, Table};
use super::events::{KvEvent, KvEventBatch};
use super::hash::{BlockHash, PreHashed};
use crate::ids::WorkerId;
use dashmap::DashMap;
use std::collections::VecDeque;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicIsize, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Block shards (a power of two; chosen by the top bits of the mixed hash).
pub const SHARDS: usize = 64;
const SHARD_SHIFT: u32 = 64 - SHARDS.trailing_zeros();
/// How many blocks ahead of the current one a query prefetches.
pub const PREFETCH_DISTANCE: usize = 12;
/// Blocks of a query walked under the first round of shard locks.
pub const FIRST_CHUNK: usize = 16;

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
    holder: HolderId,
    /// Blocks this worker holds in the index.
    blocks: u64,
}

struct EvictionQueue {
    /// (block, born, stamp when queued), oldest first.
    fifo: VecDeque<(BlockHash, u64, u64)>,
}

/// A shard: its table, plus the table's layout mirrored in atomics so queries can compute
/// prefetch addresses without taking the lock.
struct Shard {
    table: RwLock<Table>,
    base: AtomicPtr<Entry>,
    mask: AtomicUsize,
}

impl Shard {
    fn new() -> Shard {
        let table = Table::default();
        let (base, mask) = table.layout();
        Shard {
            table: RwLock::new(table),
            base: AtomicPtr::new(base.cast_mut()),
            mask: AtomicUsize::new(mask),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Table> {
        // A panic while writing leaves the table structurally valid (every mutation of one
        // entry completes before anything can panic), so a poisoned lock is used as is.
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// After a write: the table may have grown.
    fn publish(&self, table: &Table) {
        let (base, mask) = table.layout();
        self.base.store(base.cast_mut(), Ordering::Relaxed);
        self.mask.store(mask, Ordering::Relaxed);
    }
}

#[inline]
fn shard_of(mixed: u64) -> usize {
    (mixed >> SHARD_SHIFT) as usize
}

/// The concurrent KV block index. Share it behind an `Arc`; all methods take `&self`.
pub struct FlashIndexer {
    config: IndexerConfig,
    shards: Box<[Shard]>,
    workers: DashMap<WorkerId, WorkerState, FastBuild>,
    /// Holder id -> worker (ids are never reused: a removed worker that comes back gets a new one).
    names: RwLock<Vec<WorkerId>>,
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
            shards: (0..SHARDS).map(|_| Shard::new()).collect(),
            workers: DashMap::with_hasher_and_shard_amount(FastBuild::default(), 64),
            names: RwLock::new(Vec::new()),
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

    fn shard(&self, mixed: u64) -> &Shard {
        // SHARDS is a power of two and shard_of keeps the top bits: always in range.
        &self.shards[shard_of(mixed) & (SHARDS - 1)]
    }

    #[inline]
    fn prefetch(&self, mixed: u64) {
        let shard = self.shard(mixed);
        let base = shard.base.load(Ordering::Relaxed);
        let mask = shard.mask.load(Ordering::Relaxed);
        let home = block_table::entry_addr(base, mask, mixed);
        block_table::prefetch(home);
        // Linear probing: about a third of lookups at our load factor continue to the next
        // entry, which would otherwise be a second, unhidden miss.
        block_table::prefetch(home.wrapping_add(1));
    }

    fn new_worker_state(&self, worker: WorkerId) -> WorkerState {
        let mut names = self.names.write().unwrap_or_else(|e| e.into_inner());
        // Beyond 4 billion worker incarnations ids would alias; saturate rather than panic.
        let holder = HolderId::try_from(names.len()).unwrap_or(HolderId::MAX);
        names.push(worker);
        WorkerState {
            // A worker's first batch is seq 0; anything else means we missed its start.
            expect: SeqExpect::Next(0),
            needs_resync: false,
            holder,
            blocks: 0,
        }
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
                .or_insert_with(|| self.new_worker_state(batch.worker));
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
            let holder = state.holder;
            let mut block_events = 0u64;
            let mut indexed = 0u64;
            let mut dropped = 0usize;
            for event in &batch.events {
                match event {
                    KvEvent::BlockStored { block_hashes, .. } => {
                        block_events += block_hashes.len() as u64;
                        let claims = self.store(block_hashes, holder, tick, &mut fresh);
                        state.blocks += claims;
                        indexed += claims;
                    }
                    KvEvent::BlockRemoved { block_hashes } => {
                        block_events += block_hashes.len() as u64;
                        let (claims, emptied) = self.unstore(block_hashes, holder);
                        state.blocks = state.blocks.saturating_sub(claims);
                        dropped += emptied;
                    }
                    KvEvent::AllBlocksCleared => {
                        block_events += 1;
                        dropped += self.drop_holder(holder);
                        state.blocks = 0;
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
            let dropped = isize::try_from(dropped).unwrap_or(isize::MAX);
            self.distinct
                .fetch_add(created - dropped, Ordering::Relaxed);
            outcome
        };
        self.enqueue_and_evict(fresh);
        outcome
    }

    /// Mixed hashes of `hashes` with their position, grouped by shard (stable within a
    /// shard), their home entries prefetched.
    fn by_shard(&self, hashes: &[BlockHash]) -> Vec<(u64, u32)> {
        let mut order: Vec<(u64, u32)> = hashes
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let m = mix(h.0);
                self.prefetch(m);
                (m, i as u32)
            })
            .collect();
        order.sort_unstable_by_key(|(m, i)| (shard_of(*m), *i));
        order
    }

    /// Runs `f(table, hash, mixed hash, index in hashes)` for every block of `hashes` under its
    /// shard's write lock, taking each shard's lock once (in shard order, blocks in batch
    /// order within a shard) and publishing the table's layout after.
    fn for_each_by_shard(
        &self,
        hashes: &[BlockHash],
        mut f: impl FnMut(&mut Table, BlockHash, u64, u32),
    ) {
        let order = self.by_shard(hashes);
        for group in order.chunk_by(|a, b| shard_of(a.0) == shard_of(b.0)) {
            let Some(&(m0, _)) = group.first() else {
                continue;
            };
            let shard = self.shard(m0);
            let mut table = shard.write();
            for &(m, i) in group {
                let h = hashes.get(i as usize).copied().unwrap_or(BlockHash(0));
                f(&mut table, h, m, i);
            }
            shard.publish(&table);
        }
    }

    /// Claim `hashes` for `holder`, one write lock per shard touched. Returns new claims;
    /// blocks new to the index are appended to `fresh` in batch order.
    fn store(
        &self,
        hashes: &[BlockHash],
        holder: HolderId,
        tick: u64,
        fresh: &mut Vec<(BlockHash, u64, u64)>,
    ) -> u64 {
        let first_fresh = fresh.len();
        let mut claims = 0u64;
        let mut created: Vec<(u32, BlockHash, u64)> = Vec::new();
        self.for_each_by_shard(hashes, |table, h, m, i| {
            // Unique per (batch, new block) without a shared atomic: the batch's tick in the
            // high bits, its count of new blocks in the low 24. (A batch of over 16M new
            // blocks could alias two incarnations of one hash; the cost is an early evict.)
            let born = (tick << 24) | ((first_fresh + created.len()) as u64 & 0xFF_FFFF);
            let added = table.add_holder(h.0, m, holder, tick, born);
            if added.created {
                created.push((i, h, born));
            }
            claims += u64::from(added.claimed);
        });
        created.sort_unstable_by_key(|(i, _, _)| *i);
        fresh.extend(created.into_iter().map(|(_, h, born)| (h, born, tick)));
        claims
    }

    /// Drop `holder`'s claims on `hashes`: (claims dropped, blocks that left the index).
    fn unstore(&self, hashes: &[BlockHash], holder: HolderId) -> (u64, usize) {
        let (mut claims, mut emptied) = (0u64, 0usize);
        self.for_each_by_shard(hashes, |table, h, m, _| {
            let r = table.remove_holder(h.0, m, holder);
            claims += u64::from(r.unclaimed);
            emptied += usize::from(r.emptied);
        });
        (claims, emptied)
    }

    /// Drop every claim of `holder`, shard by shard; returns blocks that left the index.
    fn drop_holder(&self, holder: HolderId) -> usize {
        let mut emptied = 0;
        for shard in self.shards.iter() {
            let mut table = shard.write();
            emptied += table.remove_holder_everywhere(holder).1;
            shard.publish(&table);
        }
        emptied
    }

    fn born_of(&self, h: BlockHash) -> Option<(u64, u64)> {
        let m = mix(h.0);
        let table = self.shard(m).read();
        table.get(h.0, m).map(|e| (e.born(), e.touched()))
    }

    fn enqueue_and_evict(&self, fresh: Vec<(BlockHash, u64, u64)>) {
        let over = self.block_count() > self.config.max_blocks;
        if fresh.is_empty() && !over {
            return;
        }
        let mut victims: Vec<HolderId> = Vec::new();
        {
            let Ok(mut q) = self.queue.lock() else {
                return; // a panicking thread poisoned it: stop evicting rather than panic
            };
            q.fifo.extend(fresh);
            let live = self.block_count();
            if q.fifo.len() > 2 * live + 4096 {
                // Drop queue items of blocks that were removed since they were queued.
                q.fifo
                    .retain(|(h, born, _)| self.born_of(*h).is_some_and(|(b, _)| b == *born));
            }
            let mut excess = live.saturating_sub(self.config.max_blocks);
            while excess > 0 {
                let Some((h, born, stamp)) = q.fifo.pop_front() else {
                    break;
                };
                let Some(now) = self
                    .born_of(h)
                    .filter(|(b, _)| *b == born)
                    .map(|(_, touched)| touched)
                else {
                    continue; // stale item
                };
                if now > stamp {
                    q.fifo.push_back((h, born, now)); // second chance
                    continue;
                }
                let m = mix(h.0);
                let shard = self.shard(m);
                let removed = shard.write().remove_if_born(h.0, m, born);
                if let Some(holders) = removed {
                    self.distinct.fetch_sub(1, Ordering::Relaxed);
                    self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                    victims.extend(holders);
                    excess -= 1;
                }
            }
        }
        if victims.is_empty() {
            return;
        }
        // The evicted claims leave their holders' counts (worker lock only; names first and
        // released, so no lock is held across the two).
        let owners: Vec<(WorkerId, HolderId)> = {
            let names = self.names.read().unwrap_or_else(|e| e.into_inner());
            victims
                .into_iter()
                .filter_map(|id| names.get(id as usize).map(|w| (*w, id)))
                .collect()
        };
        for (w, id) in owners {
            if let Some(mut state) = self.workers.get_mut(&w) {
                if state.holder == id {
                    state.blocks = state.blocks.saturating_sub(1);
                }
            }
        }
    }

    /// Per-worker count of consecutive leading blocks of `hashes` held. Walks the chain and
    /// stops at the first block that no still-matching worker holds.
    pub fn find_matches(&self, hashes: &[BlockHash]) -> OverlapScores {
        let tick = self.tick.load(Ordering::Relaxed);
        let mixed: Vec<u64> = hashes.iter().map(|h| mix(h.0)).collect();
        for &m in mixed.iter().take(PREFETCH_DISTANCE) {
            self.prefetch(m);
        }
        let mut walk = Walk {
            active: Vec::new(),
            scores: Vec::new(),
            depth: 0,
        };
        let split = FIRST_CHUNK.min(hashes.len());
        if !self.walk_chunk(&mut walk, hashes, &mixed, 0, split, tick) {
            self.walk_chunk(&mut walk, hashes, &mixed, split, hashes.len(), tick);
        }
        let Walk {
            active,
            mut scores,
            depth,
        } = walk;
        scores.extend(active.into_iter().map(|w| (w, depth)));
        let names = self.names.read().unwrap_or_else(|e| e.into_inner());
        OverlapScores::from_pairs(
            scores
                .into_iter()
                .filter_map(|(id, n)| names.get(id as usize).map(|w| (*w, n)))
                .collect(),
        )
    }

    /// Walk blocks `from..to` under the read locks of the shards they fall in, taken in
    /// ascending shard order. True when the walk ended (a miss, or no worker left).
    fn walk_chunk(
        &self,
        walk: &mut Walk,
        hashes: &[BlockHash],
        mixed: &[u64],
        from: usize,
        to: usize,
        tick: u64,
    ) -> bool {
        let (Some(keys), Some(chunk)) = (hashes.get(from..to), mixed.get(from..to)) else {
            return true;
        };
        if chunk.is_empty() {
            return true;
        }
        let mut wanted = 0u64;
        for &m in chunk {
            wanted |= 1 << shard_of(m);
        }
        let mut guards: [Option<RwLockReadGuard<'_, Table>>; SHARDS] =
            std::array::from_fn(|_| None);
        for (s, guard) in guards.iter_mut().enumerate() {
            if wanted & (1 << s) != 0 {
                *guard = self.shards.get(s).map(Shard::read);
            }
        }
        for (k, (h, &m)) in keys.iter().zip(chunk).enumerate() {
            if let Some(&ahead) = mixed.get(from + k + PREFETCH_DISTANCE) {
                self.prefetch(ahead);
            }
            let Some(table) = guards.get(shard_of(m)).and_then(Option::as_ref) else {
                return true;
            };
            let Some(entry) = table.get(h.0, m) else {
                return true;
            };
            entry.touch(tick);
            let holders = table.holders(entry);
            if walk.depth == 0 {
                walk.active.extend_from_slice(holders);
            } else if holders != walk.active.as_slice() {
                // Both sorted: keep workers still holding this block; the rest stop at depth.
                let depth = walk.depth;
                let scores = &mut walk.scores;
                walk.active.retain(|w| {
                    let keep = holders.binary_search(w).is_ok();
                    if !keep {
                        scores.push((*w, depth));
                    }
                    keep
                });
            }
            if walk.active.is_empty() {
                return true;
            }
            walk.depth += 1;
        }
        false
    }

    /// Workers currently holding `h`, sorted.
    pub fn holders(&self, h: BlockHash) -> Vec<WorkerId> {
        let m = mix(h.0);
        let ids: Vec<HolderId> = {
            let table = self.shard(m).read();
            table
                .get(h.0, m)
                .map(|e| table.holders(e).to_vec())
                .unwrap_or_default()
        };
        let names = self.names.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<WorkerId> = ids
            .into_iter()
            .filter_map(|id| names.get(id as usize).copied())
            .collect();
        out.sort_unstable();
        out
    }

    /// Drop every block of `worker` and forget it (its sequence numbering included).
    pub fn remove_worker(&self, worker: WorkerId) {
        if let Some((_, state)) = self.workers.remove(&worker) {
            let emptied = self.drop_holder(state.holder);
            self.distinct.fetch_sub(
                isize::try_from(emptied).unwrap_or(isize::MAX),
                Ordering::Relaxed,
            );
        }
    }

    /// Resync step 1: drop every block of `worker`, clear its resync flag and accept the
    /// next batch whatever its sequence number (the full re-store that follows).
    pub fn clear_worker(&self, worker: WorkerId) {
        let mut state = self
            .workers
            .entry(worker)
            .or_insert_with(|| self.new_worker_state(worker));
        let emptied = self.drop_holder(state.holder);
        self.distinct.fetch_sub(
            isize::try_from(emptied).unwrap_or(isize::MAX),
            Ordering::Relaxed,
        );
        state.blocks = 0;
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
        self.workers
            .get(&worker)
            .map_or(0, |s| usize::try_from(s.blocks).unwrap_or(usize::MAX))
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

/// A query's progress along the chain: holder ids still matching, and those that stopped.
struct Walk {
    active: Vec<HolderId>,
    scores: Vec<(HolderId, u32)>,
    depth: u32,
}

impl Default for FlashIndexer {
    fn default() -> Self {
        FlashIndexer::new(IndexerConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::hash::BlockSize;

    fn stored(worker: u64, seq: u64, hashes: &[u64]) -> KvEventBatch {
        KvEventBatch {
            worker: WorkerId(worker),
            seq,
            ts: 0.0,
            events: vec![KvEvent::BlockStored {
                block_hashes: hashes.iter().map(|h| BlockHash(*h)).collect(),
                parent_block_hash: None,
                token_ids: Vec::new(),
                block_size: BlockSize::DEFAULT,
                lora_id: None,
            }],
        }
    }

    /// Many holders per block (past the inline capacity) and a long chain over every shard:
    /// each worker's overlap is exactly the prefix it stored.
    #[test]
    fn many_holders_and_long_chains() {
        let ix = FlashIndexer::default();
        let chain: Vec<u64> = (0..300u64).map(|i| i.wrapping_mul(0x9E37_79B9)).collect();
        for w in 0..30u64 {
            let len = 10 * (w as usize + 1);
            ix.apply(&stored(w, 0, &chain[..len]));
        }
        let q: Vec<BlockHash> = chain.iter().map(|h| BlockHash(*h)).collect();
        let m = ix.find_matches(&q);
        let want: Vec<(WorkerId, u32)> = (0..30u64)
            .map(|w| (WorkerId(w), 10 * (w as u32 + 1)))
            .collect();
        assert_eq!(m.scores, want);
        assert_eq!(m.matched_blocks, 300);
        assert_eq!(ix.holders(q[0]).len(), 30);
        // Removing most holders brings the list back inline; the survivors still match.
        for w in 0..25u64 {
            ix.remove_worker(WorkerId(w));
        }
        let m = ix.find_matches(&q);
        let want: Vec<(WorkerId, u32)> = (25..30u64)
            .map(|w| (WorkerId(w), 10 * (w as u32 + 1)))
            .collect();
        assert_eq!(m.scores, want);
        assert_eq!(ix.block_count(), 300);
        assert_eq!(ix.worker_block_count(WorkerId(29)), 300);
    }
}
