//! FlashIndexer: which workers hold which KV blocks, for the router's prefix-overlap query.
//!
//! # Layout
//! Blocks are kept as *runs* (see `runs`): chains of sequence hashes in one array, cut into
//! segments of consecutive blocks with the same holders (4-byte holder ids, a dense number
//! per worker). A sharded hash map (`block_map`) says where each block lives (run, offset).
//! [`FlashIndexer::find_matches`] looks up the first block of the query, follows the run
//! from there segment by segment (a sequence hash names its whole prefix, so comparing the
//! query's hash with the run's at a segment's last position decides the whole segment; only
//! where they differ is the first difference searched, see `runs::chain_prefix`), intersects
//! the still-matching workers with each segment's holders (inline in the segment for up to 4),
//! and looks the next hash up again only where the run ends or the query leaves it. A
//! 1,024-block query over a shared prefix costs a handful of lookups and a few compares per
//! run instead of one dependent cache miss per block. Ingestion is cheap for the same reason: a worker
//! storing blocks already indexed (another worker's shared prefix) costs one lookup and a
//! compare per run; only blocks new to the index cost a map insert each. Removal finds the
//! first removed block and walks the run for the rest (tail removals are contiguous).
//!
//! # Concurrency: why reads do not wait on batches
//! Each run has its own reader-writer lock, each map shard its own. A writer holds at most one
//! run lock and, inside it, one map shard lock at a time (order: run, then shard); a reader
//! holds one map shard lock (for a lookup) or one run lock (for a compare), never both. So a
//! query waits at most for one run's update by one event (microseconds), readers never block
//! each other, and there is no lock cycle. A query that runs while a batch is applied may see
//! part of it; every block it reports was held at some instant during the query, which is all
//! routing needs. The read path writes nothing but a run's touch stamp (a relaxed store,
//! only when stale) and its matched high-water mark (only when it rises): a few stores per
//! query, never one per block.
//!
//! # Per-worker state
//! Each worker has its holder id, a count of the blocks it holds, and the sequence number it
//! should send next. A gap marks the worker as needing a resync; the resync path is
//! [`FlashIndexer::clear_worker`] followed by a full re-store of its blocks. Dropping all of a
//! worker's blocks (`AllBlocksCleared`, resync, removal) scans the runs, which is O(index) but
//! rare.
//!
//! # Bounded memory
//! At most [`IndexerConfig::max_blocks`] distinct blocks are indexed. Beyond it blocks are
//! evicted whole (every worker's claim on them), tail first within a run, so what stays is
//! still a matchable prefix. Which run: a CLOCK over runs (a FIFO of (run, stamp) with a second
//! chance): a run stored into or matched since it was queued is re-queued, but even then the
//! part beyond the deepest query match since the last pass (its cold tail) goes first.
//! Evicted blocks are counted in [`IndexerMetrics::evictions`]; the index then under-reports
//! overlap for them, which only costs routing quality.

use super::block_map::{BlockMap, Loc};
use super::events::{KvEvent, KvEventBatch};
use super::hash::{BlockHash, PreHashed};
use super::runs::{chain_prefix, Arena, HolderId, Padded, Run};
use crate::ids::WorkerId;
use dashmap::DashMap;
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

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

/// A run to consider for eviction: (run id, its incarnation, touch stamp when queued).
type Queued = (u32, u64, u64);

/// The runs one batch created, to be queued for eviction.
type Fresh = SmallVec<[Queued; 4]>;

/// How many blocks ahead a writer prefetches the map slots it will insert or delete.
const PREFETCH_DISTANCE: usize = 8;

/// How many times a store retries a lookup that raced with a removal before it treats the
/// block as new (the insert then settles it).
const STALE_RETRIES: usize = 4;

fn read(run: &RwLock<Run>) -> RwLockReadGuard<'_, Run> {
    // Every mutation of a run completes before anything can panic, so a poisoned lock still
    // guards a valid run.
    run.read().unwrap_or_else(|e| e.into_inner())
}

fn write(run: &RwLock<Run>) -> RwLockWriteGuard<'_, Run> {
    run.write().unwrap_or_else(|e| e.into_inner())
}

/// The concurrent KV block index. Share it behind an `Arc`; all methods take `&self`.
pub struct FlashIndexer {
    config: IndexerConfig,
    map: BlockMap,
    runs: Arena,
    workers: DashMap<WorkerId, WorkerState, FastBuild>,
    /// Holder id -> worker (ids are never reused: a removed worker that comes back gets a new one).
    names: RwLock<Vec<WorkerId>>,
    // The fields every batch writes (and the queue, locked by a batch that creates runs) each
    // sit on their own cache lines, apart from the read-only ones read on every block (`map`,
    // `runs`): two writers would otherwise invalidate those for each other once per batch.
    queue: Padded<Mutex<VecDeque<Queued>>>,
    /// Logical clock for touch stamps: +1 per applied batch.
    tick: Padded<AtomicU64>,
    /// Distinct blocks. Signed and updated once per event, so it can dip below zero for a
    /// moment when an eviction races a batch that created the block; read through
    /// `block_count`, which clamps.
    distinct: Padded<AtomicIsize>,
    counters: Padded<Counters>,
}

/// What one event did to the index.
#[derive(Default)]
struct Delta {
    /// (worker, block) claims added or dropped.
    claims: u64,
    /// Blocks that entered or left the index.
    blocks: usize,
}

impl FlashIndexer {
    pub fn new(config: IndexerConfig) -> Self {
        FlashIndexer {
            config,
            map: BlockMap::default(),
            runs: Arena::default(),
            workers: DashMap::with_hasher_and_shard_amount(FastBuild::default(), 64),
            names: RwLock::new(Vec::new()),
            queue: Padded(Mutex::new(VecDeque::new())),
            tick: Padded(AtomicU64::new(1)),
            distinct: Padded(AtomicIsize::new(0)),
            counters: Padded::default(),
        }
    }

    pub fn config(&self) -> &IndexerConfig {
        &self.config
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
        self.prefetch_first_lookups(batch);
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        // Runs this batch creates (on the stack: usually one or two).
        let mut fresh: Fresh = Fresh::new();
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
            let mut created = 0usize;
            let mut dropped = 0usize;
            for event in &batch.events {
                match event {
                    KvEvent::BlockStored {
                        block_hashes,
                        parent_block_hash,
                        ..
                    } => {
                        block_events += block_hashes.len() as u64;
                        let d =
                            self.store(block_hashes, *parent_block_hash, holder, tick, &mut fresh);
                        state.blocks += d.claims;
                        indexed += d.claims;
                        created += d.blocks;
                    }
                    KvEvent::BlockRemoved { block_hashes } => {
                        block_events += block_hashes.len() as u64;
                        let d = self.unstore(block_hashes, holder);
                        state.blocks = state.blocks.saturating_sub(d.claims);
                        dropped += d.blocks;
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
            let created = isize::try_from(created).unwrap_or(isize::MAX);
            let dropped = isize::try_from(dropped).unwrap_or(isize::MAX);
            self.distinct
                .fetch_add(created - dropped, Ordering::Relaxed);
            outcome
        };
        self.enqueue_and_evict(fresh);
        outcome
    }

    /// Start the map probes an event begins with: a store looks up its first block (and, when
    /// that is new, its parent, then inserts the blocks that follow), a removal its first
    /// block. They are independent cache misses (each in a random slot of the map); issued
    /// here they overlap each other and the batch's bookkeeping, instead of stalling one
    /// after the other once the event is applied. Only the first few events of a batch: the
    /// later ones' lines would not survive until they are used.
    fn prefetch_first_lookups(&self, batch: &KvEventBatch) {
        for event in batch.events.iter().take(4) {
            match event {
                KvEvent::BlockStored {
                    block_hashes,
                    parent_block_hash,
                    ..
                } => {
                    if let Some(p) = parent_block_hash {
                        self.map.prefetch(p.0);
                    }
                    for key in block_hashes.iter().take(PREFETCH_DISTANCE) {
                        self.map.prefetch(key.0);
                    }
                }
                KvEvent::BlockRemoved { block_hashes } => {
                    if let Some(key) = block_hashes.first() {
                        self.map.prefetch(key.0);
                    }
                }
                KvEvent::AllBlocksCleared => {}
            }
        }
    }

    /// Claim `hashes` (a chain whose first block's parent is `parent`) for `holder`.
    fn store(
        &self,
        hashes: &[BlockHash],
        parent: Option<BlockHash>,
        holder: HolderId,
        tick: u64,
        fresh: &mut Fresh,
    ) -> Delta {
        let keys = hashes;
        let mut d = Delta::default();
        let mut i = 0usize;
        // Where the previous block of the chain lives, once known.
        let mut prev: Option<Loc> = None;
        let mut stale = 0usize;
        while let Some(&key) = keys.get(i) {
            if stale < STALE_RETRIES {
                if let Some(loc) = self.map.get(key.0) {
                    match self.claim_existing(loc, &keys[i..], holder, tick) {
                        Some((matched, claims, last)) => {
                            d.claims += claims;
                            i += matched;
                            prev = Some(last);
                        }
                        None => stale += 1, // raced with a removal: look again
                    }
                    continue;
                }
            }
            if i == 0 {
                prev = parent.and_then(|p| self.map.get(p.0));
            }
            let (n, last) = self.append_new(prev, &keys[i..], holder, tick, fresh);
            d.claims += n as u64;
            d.blocks += n;
            i += n;
            prev = last.or(prev);
            stale = 0;
        }
        d
    }

    /// Add `holder` to the stretch of `keys` that the run at `loc` holds in order from
    /// `loc`: (blocks matched, new claims, location of the last). `None` when `loc` is stale.
    fn claim_existing(
        &self,
        loc: Loc,
        keys: &[BlockHash],
        holder: HolderId,
        tick: u64,
    ) -> Option<(usize, u64, Loc)> {
        let slot = self.runs.get(loc.run())?;
        let mut run = write(slot);
        let off = loc.off();
        if run.hashes.get(off as usize) != keys.first() || !run.is_live(off) {
            return None;
        }
        let end = run.live_end(off);
        let m = chain_prefix(keys, &run.hashes[off as usize..end as usize]).max(1);
        let claims = run.add_holder(off, off + m as u32, holder);
        *run.touched.get_mut() = tick.max(*run.touched.get_mut());
        Some((m, claims, Loc::new(loc.run(), off + m as u32 - 1)))
    }

    /// Index new blocks `keys` for `holder`, appended to `prev`'s run when `prev` ends it,
    /// else in a new run. Stops at the first key already indexed: (blocks indexed, location of
    /// the last).
    fn append_new(
        &self,
        prev: Option<Loc>,
        keys: &[BlockHash],
        holder: HolderId,
        tick: u64,
        fresh: &mut Fresh,
    ) -> (usize, Option<Loc>) {
        // Grow the previous block's run in place when the chain continues at its end.
        if let Some(p) = prev {
            if let Some(slot) = self.runs.get(p.run()) {
                let mut run = write(slot);
                if run.len() == p.off() + 1 && run.is_live(p.off()) {
                    let n = self.push_keys(p.run(), &mut run, keys, holder, tick);
                    return (n, (n > 0).then(|| Loc::new(p.run(), p.off() + n as u32)));
                }
            }
        }
        let Some((id, born)) = self.runs.create() else {
            return (keys.len(), None); // arena full: these blocks go unindexed
        };
        let Some(slot) = self.runs.get(id) else {
            return (keys.len(), None);
        };
        let mut run = write(slot);
        run.born = born;
        let n = self.push_keys(id, &mut run, keys, holder, tick);
        if n == 0 {
            // The first key was indexed meanwhile (another writer): no run after all.
            run.reset();
            drop(run);
            self.runs.release(id);
            return (0, None);
        }
        fresh.push((id, born, tick));
        (n, Some(Loc::new(id, n as u32 - 1)))
    }

    /// Append keys to `run` (id `id`, write-locked) while each is new to the index.
    fn push_keys(
        &self,
        id: u32,
        run: &mut Run,
        keys: &[BlockHash],
        holder: HolderId,
        tick: u64,
    ) -> usize {
        let mut n = 0;
        for key in keys.iter().take(PREFETCH_DISTANCE) {
            self.map.prefetch(key.0);
        }
        for (k, &key) in keys.iter().enumerate() {
            if let Some(ahead) = keys.get(k + PREFETCH_DISTANCE) {
                self.map.prefetch(ahead.0);
            }
            if self
                .map
                .insert_or_get(key.0, Loc::new(id, run.len()))
                .is_err()
            {
                break;
            }
            run.push(key, holder);
            n += 1;
        }
        *run.touched.get_mut() = tick.max(*run.touched.get_mut());
        n
    }

    /// Drop `holder`'s claims on `hashes`.
    fn unstore(&self, hashes: &[BlockHash], holder: HolderId) -> Delta {
        let mut d = Delta::default();
        let mut j = 0usize;
        while let Some(h) = hashes.get(j) {
            j += 1;
            let Some(loc) = self.map.get(h.0) else {
                continue;
            };
            let Some(slot) = self.runs.get(loc.run()) else {
                continue;
            };
            let mut run = write(slot);
            let off = loc.off();
            if run.hashes.get(off as usize) != Some(h) {
                continue;
            }
            // The rest of a tail removal is usually the run's neighbouring blocks, in either
            // order: take them under the same lock instead of looking each up.
            let (mut lo, mut hi) = (off, off);
            while let Some(next) = hashes.get(j) {
                // Only live neighbours: a dead position's block may live elsewhere now.
                if lo > 0 && run.hashes.get(lo as usize - 1) == Some(next) && run.is_live(lo - 1) {
                    lo -= 1;
                } else if run.hashes.get(hi as usize + 1) == Some(next) && run.is_live(hi + 1) {
                    hi += 1;
                } else {
                    break;
                }
                j += 1;
            }
            let (claims, died) = run.remove_holder(lo, hi + 1, holder);
            d.claims += claims;
            d.blocks += self.forget(loc.run(), &mut run, &died);
        }
        d
    }

    /// Take the dead ranges of a write-locked run out of the map, trim it, and free it when
    /// nothing in it is live. Returns the blocks that left the index.
    fn forget(&self, id: u32, run: &mut Run, died: &[(u32, u32)]) -> usize {
        let mut gone = 0;
        for &(a, b) in died {
            let dead = run.hashes.get(a as usize..b as usize).unwrap_or(&[]);
            for key in dead.iter().take(PREFETCH_DISTANCE) {
                self.map.prefetch(key.0);
            }
            for off in a..b {
                if let Some(ahead) = run.hashes.get(off as usize + PREFETCH_DISTANCE) {
                    if off as usize + PREFETCH_DISTANCE < b as usize {
                        self.map.prefetch(ahead.0);
                    }
                }
                if let Some(key) = run.hashes.get(off as usize) {
                    gone += usize::from(self.map.remove_if(key.0, Loc::new(id, off)));
                }
            }
        }
        if !died.is_empty() {
            run.trim();
            if run.live == 0 {
                run.reset();
                self.runs.release(id);
            }
        }
        gone
    }

    /// Drop every claim of `holder`, run by run; returns blocks that left the index.
    fn drop_holder(&self, holder: HolderId) -> usize {
        let mut gone = 0;
        for id in 0..self.runs.end() {
            let Some(slot) = self.runs.get(id) else {
                continue;
            };
            let mut run = write(slot);
            if run.live == 0 {
                continue;
            }
            let len = run.len();
            let (_, died) = run.remove_holder(0, len, holder);
            gone += self.forget(id, &mut run, &died);
        }
        gone
    }

    fn enqueue_and_evict(&self, fresh: Fresh) {
        let over = self.block_count() > self.config.max_blocks;
        if fresh.is_empty() && !over {
            return;
        }
        let mut victims: Vec<(HolderId, u64)> = Vec::new();
        {
            let Ok(mut q) = self.queue.lock() else {
                return; // a panicking thread poisoned it: stop evicting rather than panic
            };
            q.extend(fresh);
            if q.len() > 2 * self.runs.end() as usize + 4096 {
                // Drop items of runs freed since they were queued.
                q.retain(|(id, born, _)| self.runs.get(*id).is_some_and(|r| read(r).born == *born));
            }
            let mut excess = self.block_count().saturating_sub(self.config.max_blocks);
            // Each run is looked at most twice per call (once, then after its second chance).
            let mut budget = 2 * q.len() + 1;
            while excess > 0 && budget > 0 {
                budget -= 1;
                let Some((id, born, stamp)) = q.pop_front() else {
                    break;
                };
                let Some(slot) = self.runs.get(id) else {
                    continue;
                };
                let mut run = write(slot);
                if run.born != born || run.live == 0 {
                    continue; // freed (and maybe reused) since it was queued
                }
                let touched = *run.touched.get_mut();
                let hot = std::mem::take(run.hot.get_mut());
                // Matched or stored since queued: only the part beyond the deepest match is
                // evictable this pass.
                let floor = if touched > stamp { hot } else { 0 };
                let tail = run.live_tail();
                let from = tail
                    .saturating_sub(u32::try_from(excess).unwrap_or(u32::MAX))
                    .max(floor);
                if from < tail {
                    let (claims, died) = run.kill(from, tail);
                    victims.extend(claims);
                    let gone = self.forget(id, &mut run, &died);
                    self.distinct.fetch_sub(
                        isize::try_from(gone).unwrap_or(isize::MAX),
                        Ordering::Relaxed,
                    );
                    self.counters
                        .evictions
                        .fetch_add(gone as u64, Ordering::Relaxed);
                    excess = excess.saturating_sub(gone);
                }
                if run.born == born && run.live > 0 {
                    q.push_back((id, born, touched));
                }
            }
        }
        if victims.is_empty() {
            return;
        }
        // The evicted claims leave their holders' counts (worker lock only; names first and
        // released, so no lock is held across the two).
        let owners: Vec<(WorkerId, HolderId, u64)> = {
            let names = self.names.read().unwrap_or_else(|e| e.into_inner());
            victims
                .into_iter()
                .filter_map(|(id, n)| names.get(id as usize).map(|w| (*w, id, n)))
                .collect()
        };
        for (w, id, n) in owners {
            if let Some(mut state) = self.workers.get_mut(&w) {
                if state.holder == id {
                    state.blocks = state.blocks.saturating_sub(n);
                }
            }
        }
    }

    /// Per-worker count of consecutive leading blocks of `hashes` held. Walks the chain and
    /// stops at the first block that no still-matching worker holds.
    pub fn find_matches(&self, hashes: &[BlockHash]) -> OverlapScores {
        let tick = self.tick.load(Ordering::Relaxed);
        let keys = hashes;
        let mut walk = Walk::default();
        let mut i = 0usize;
        while let Some(key) = keys.get(i) {
            let Some(loc) = self.map.get(key.0) else {
                break;
            };
            let Some(slot) = self.runs.get(loc.run()) else {
                break;
            };
            let run = read(slot);
            // Most queries leave a run where it ends: fetch that key's map slot while the run
            // is compared, so the next lookup (or the final miss) does not wait for it.
            let rest = run.len().saturating_sub(loc.off()) as usize;
            if let Some(next) = keys.get(i + rest) {
                self.map.prefetch(next.0);
            }
            let advanced = walk.through_run(&run, loc.off(), &keys[i..]);
            if advanced == 0 {
                break;
            }
            run.touch(tick, loc.off() + advanced as u32);
            i += advanced;
            if walk.active.is_empty() {
                break;
            }
        }
        let Walk {
            active,
            scores,
            depth,
        } = walk;
        // One allocation: the answer itself.
        let mut out: Vec<(WorkerId, u32)> = Vec::with_capacity(scores.len() + active.len());
        {
            let names = self.names.read().unwrap_or_else(|e| e.into_inner());
            let stopped = scores.into_iter();
            let held = active.into_iter().map(|w| (w, depth));
            out.extend(
                stopped
                    .chain(held)
                    .filter(|(_, n)| *n > 0)
                    .filter_map(|(id, n)| names.get(id as usize).map(|w| (*w, n))),
            );
        }
        out.sort_unstable();
        let matched_blocks = out.iter().map(|(_, n)| *n).max().unwrap_or(0);
        OverlapScores {
            scores: out,
            matched_blocks,
        }
    }

    /// Workers currently holding `h`, sorted.
    pub fn holders(&self, h: BlockHash) -> Vec<WorkerId> {
        let ids: Vec<HolderId> = self
            .map
            .get(h.0)
            .and_then(|loc| {
                let run = read(self.runs.get(loc.run())?);
                let off = loc.off();
                (run.hashes.get(off as usize) == Some(&h))
                    .then(|| run.segs[run.seg_index(off)].holders.to_vec())
            })
            .unwrap_or_default();
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

    /// Heap bytes of the index's map and runs (walks every run: for benchmarks and
    /// diagnostics, not a hot path).
    pub fn heap_bytes(&self) -> usize {
        self.map.heap_bytes() + self.runs.heap_bytes()
    }

    /// Of [`FlashIndexer::heap_bytes`], the bytes in mappings of the index's own (large map
    /// tables on huge pages), which a counting global allocator does not see.
    pub fn mapped_bytes(&self) -> usize {
        self.map.mapped_bytes()
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

/// A query's progress along the chain: holder ids still matching, and those that stopped
/// (on the stack for the usual handful of workers).
#[derive(Default)]
struct Walk {
    active: SmallVec<[HolderId; 16]>,
    scores: SmallVec<[(HolderId, u32); 16]>,
    depth: u32,
}

impl Walk {
    /// Follow `keys` through `run` from offset `off` while they match its live positions,
    /// narrowing the active workers at each segment. Returns the keys consumed (0 when the
    /// run does not hold `keys[0]` at `off`, e.g. a stale location).
    fn through_run(&mut self, run: &Run, off: u32, keys: &[BlockHash]) -> usize {
        if run.hashes.get(off as usize) != keys.first() {
            return 0;
        }
        let mut pos = off;
        let mut used = 0usize;
        let mut s = run.seg_index(off);
        while let Some(seg) = run.segs.get(s) {
            if seg.holders.is_empty() {
                break; // dead: the caller looks the key up again
            }
            let end = run.seg_end(s);
            let m = chain_prefix(&keys[used..], &run.hashes[pos as usize..end as usize]);
            if m == 0 {
                break;
            }
            self.narrow(&seg.holders);
            if self.active.is_empty() {
                return used + 1; // consumed, but nobody holds it
            }
            used += m;
            pos += m as u32;
            self.depth += m as u32;
            if pos < end || used == keys.len() {
                break; // the query leaves the run here (or ends)
            }
            s += 1;
        }
        used
    }

    /// Keep the active workers that also hold the current segment; the rest stop at `depth`.
    fn narrow(&mut self, holders: &[HolderId]) {
        if self.depth == 0 && self.active.is_empty() {
            self.active.extend_from_slice(holders);
            return;
        }
        if holders == self.active.as_slice() {
            return;
        }
        let depth = self.depth;
        let scores = &mut self.scores;
        self.active.retain(|w| {
            let keep = holders.binary_search(w).is_ok();
            if !keep {
                scores.push((*w, depth));
            }
            keep
        });
    }
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

    /// Many holders per block and a long chain: each worker's overlap is exactly the prefix
    /// it stored.
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

    /// A chain removed tail first and stored again grows its run in place; a block that
    /// comes back after its run moved on is found where it now lives.
    #[test]
    fn removed_tails_regrow_and_moved_blocks_are_found() {
        let ix = FlashIndexer::default();
        let chain: Vec<u64> = (1..=20).collect();
        ix.apply(&stored(1, 0, &chain));
        ix.apply(&stored(2, 0, &chain[..10]));
        let rm = |w: u64, seq: u64, hs: &[u64]| KvEventBatch {
            worker: WorkerId(w),
            seq,
            ts: 0.0,
            events: vec![KvEvent::BlockRemoved {
                block_hashes: hs.iter().rev().map(|h| BlockHash(*h)).collect(),
            }],
        };
        ix.apply(&rm(1, 1, &chain[5..]));
        assert_eq!(ix.block_count(), 10);
        let q: Vec<BlockHash> = chain.iter().map(|h| BlockHash(*h)).collect();
        assert_eq!(
            ix.find_matches(&q).scores,
            vec![(WorkerId(1), 5), (WorkerId(2), 10)]
        );
        // Worker 2 drops 3..5 (a hole), then worker 3 stores block 4 alone.
        ix.apply(&rm(2, 1, &chain[2..5]));
        ix.apply(&stored(3, 0, &[4]));
        assert_eq!(ix.holders(BlockHash(4)), vec![WorkerId(1), WorkerId(3)]);
        assert_eq!(ix.holders(BlockHash(3)), vec![WorkerId(1)]);
        assert_eq!(
            ix.find_matches(&q).scores,
            vec![(WorkerId(1), 5), (WorkerId(2), 2)]
        );
        // Worker 1 stores the tail again, appended in place.
        ix.apply(&stored(1, 2, &chain[5..]));
        assert_eq!(ix.find_matches(&q).get(WorkerId(1)), 20);
        assert_eq!(ix.block_count(), 20);
        assert_eq!(ix.worker_block_count(WorkerId(1)), 20);
        assert_eq!(ix.worker_block_count(WorkerId(2)), 7);
    }
}
