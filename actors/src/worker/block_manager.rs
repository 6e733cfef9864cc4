//! Paged KV block allocation with prefix caching.
//!
//! The pool holds `num_blocks` physical blocks of `block_size` tokens. Every sequence owns a
//! *block table*: the physical blocks covering its positions `0..n`, in order.
//!
//! A block is in exactly one of three places:
//! - **in use**: referenced by one or more sequences' tables (`ref_count > 0`). Only *full,
//!   computed, hashed* blocks are ever shared, so a shared block is never written again;
//! - **free**: unreferenced and holding nothing reusable;
//! - **evictable**: unreferenced but still registered under its sequence hash, so a later
//!   request with the same prefix can pick it up. Fresh blocks are taken from the free list
//!   first; only when it is empty is the least recently released evictable block evicted.
//!
//! Registering a block publishes [`KvEvent::BlockStored`]; evicting one publishes
//! [`KvEvent::BlockRemoved`]. The owner drains them with [`BlockManager::drain_events`] and
//! wraps them in a `KvEventBatch`.
//!
//! "Least recently used" is measured with a logical counter bumped on every release, never
//! the wall clock, so the same calls always give the same evictions. A sequence releases its
//! blocks tail first: the tail of a chain is evicted before its head, which keeps the cached
//! chains walkable from the root (the indexer stops at the first miss).

use crate::ids::{RequestId, TokenId};
use crate::kv::events::KvEvent;
use crate::kv::hash::{BlockHash, BlockSize};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;

/// A physical KV block in this worker's pool: an index into the executor's KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockId(pub u32);

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b{}", self.0)
    }
}

/// Size of the pool and whether full blocks are kept for reuse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockManagerConfig {
    /// Physical blocks in the pool (set from the executor's free memory).
    pub num_blocks: u32,
    /// Tokens per block.
    pub block_size: BlockSize,
    /// Keep full blocks under their sequence hash for reuse by later requests.
    pub enable_prefix_caching: bool,
}

impl Default for BlockManagerConfig {
    fn default() -> Self {
        BlockManagerConfig {
            num_blocks: 1024,
            block_size: BlockSize::DEFAULT,
            enable_prefix_caching: true,
        }
    }
}

/// Why an allocation was refused. On error nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("out of KV blocks: {needed} needed, {available} available")]
    OutOfBlocks { needed: usize, available: usize },
    #[error("sequence {0} already has a block table")]
    SequenceExists(RequestId),
    #[error("sequence {0} has no block table")]
    UnknownSequence(RequestId),
    #[error("the prefix hit is stale: its blocks changed since the lookup")]
    StalePrefix,
    #[error("{num_tokens} tokens requested but the prefix hit already covers {hit_tokens}")]
    ShorterThanPrefix {
        num_tokens: usize,
        hit_tokens: usize,
    },
}

/// A broken internal invariant, described for a test or simulator log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invariant violated: {0}")]
pub struct InvariantViolation(pub String);

/// Whether a sequence starts for the first time or restarts after preemption (only matters
/// for the hit-rate counters: a restart re-reads blocks it wrote itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartKind {
    Fresh,
    Resume,
}

/// The cached blocks matching a sequence's leading full blocks, from
/// [`BlockManager::find_cached_prefix`]. Pass it straight to [`BlockManager::allocate_new`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefixHit {
    blocks: Vec<BlockId>,
    hashes: Vec<BlockHash>,
    block_size: usize,
    query_tokens: usize,
}

impl PrefixHit {
    /// Tokens whose KV is already cached (a multiple of the block size).
    pub fn num_tokens(&self) -> usize {
        self.blocks.len() * self.block_size
    }

    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Tokens of the sequence that was looked up.
    pub fn query_tokens(&self) -> usize {
        self.query_tokens
    }
}

/// Occupancy and cache-effectiveness counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockStats {
    pub num_blocks: usize,
    /// Referenced by at least one sequence.
    pub used: usize,
    /// Unreferenced: `free_uncached + evictable`; all of them can be handed out.
    pub free: usize,
    /// Unreferenced and holding nothing reusable.
    pub free_uncached: usize,
    /// Unreferenced but still reusable by hash.
    pub evictable: usize,
    /// Registered under a hash (in use or evictable).
    pub cached: usize,
    /// Prompt tokens of fresh sequences looked up in the cache, and how many of them hit.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
    /// The same for sequences restarted after preemption.
    pub resume_query_tokens: u64,
    pub resume_hit_tokens: u64,
    /// Cached blocks evicted to make room.
    pub evictions: u64,
}

impl BlockStats {
    /// Fraction of fresh prompt tokens served from the prefix cache (0 when nothing queried).
    pub fn prefix_hit_rate(&self) -> f64 {
        if self.prefix_query_tokens == 0 {
            0.0
        } else {
            self.prefix_hit_tokens as f64 / self.prefix_query_tokens as f64
        }
    }

    /// Fraction of the pool referenced by sequences.
    pub fn usage(&self) -> f64 {
        if self.num_blocks == 0 {
            0.0
        } else {
            self.used as f64 / self.num_blocks as f64
        }
    }
}

#[derive(Clone, Debug, Default)]
struct BlockState {
    ref_count: u32,
    /// The sequence hash this block is registered under, if any.
    hash: Option<BlockHash>,
    /// Key in `evictable` while the block sits there.
    evict_tick: Option<u64>,
}

#[derive(Clone, Debug, Default)]
struct SeqBlocks {
    blocks: Vec<BlockId>,
    /// Leading blocks already considered for registration (registered, shared from the
    /// cache, or skipped because an equal block was cached first).
    num_committed: usize,
}

/// The pool, the per-sequence block tables and the prefix cache. See the module doc.
#[derive(Clone, Debug)]
pub struct BlockManager {
    cfg: BlockManagerConfig,
    blocks: Vec<BlockState>,
    free: VecDeque<BlockId>,
    evictable: BTreeMap<u64, BlockId>,
    next_tick: u64,
    /// Lookup only (never iterated for output), so a HashMap keeps runs deterministic.
    cached: HashMap<BlockHash, BlockId>,
    /// Lookup only; `sequences()` sorts before handing ids out.
    seqs: HashMap<RequestId, SeqBlocks>,
    num_used: usize,
    events: Vec<KvEvent>,
    stats: BlockStats,
}

impl BlockManager {
    pub fn new(cfg: BlockManagerConfig) -> Self {
        let n = cfg.num_blocks as usize;
        BlockManager {
            blocks: vec![BlockState::default(); n],
            free: (0..cfg.num_blocks).map(BlockId).collect(),
            evictable: BTreeMap::new(),
            next_tick: 0,
            cached: HashMap::new(),
            seqs: HashMap::new(),
            num_used: 0,
            events: Vec::new(),
            stats: BlockStats {
                num_blocks: n,
                ..BlockStats::default()
            },
            cfg,
        }
    }

    pub fn config(&self) -> &BlockManagerConfig {
        &self.cfg
    }

    pub fn block_size(&self) -> BlockSize {
        self.cfg.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that a fresh allocation can take (free plus evictable).
    pub fn num_free_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    pub fn num_used_blocks(&self) -> usize {
        self.num_used
    }

    pub fn stats(&self) -> BlockStats {
        BlockStats {
            used: self.num_used,
            free: self.num_free_blocks(),
            free_uncached: self.free.len(),
            evictable: self.evictable.len(),
            cached: self.cached.len(),
            ..self.stats.clone()
        }
    }

    /// The physical blocks of `seq`, covering its positions in order.
    pub fn block_table(&self, seq: RequestId) -> Option<&[BlockId]> {
        self.seqs.get(&seq).map(|s| s.blocks.as_slice())
    }

    /// Whether `hash` is registered (in use or evictable).
    pub fn is_cached(&self, hash: BlockHash) -> bool {
        self.cached.contains_key(&hash)
    }

    /// Sequences that hold a block table, in id order.
    pub fn sequences(&self) -> Vec<RequestId> {
        let mut ids: Vec<RequestId> = self.seqs.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The longest run of cached blocks matching `hashes` (the sequence's full-block hashes,
    /// from `kv::hash::hash_blocks`), never covering the last of its `num_tokens` tokens: at
    /// least one token must be computed so there are logits to sample from. Read only.
    pub fn find_cached_prefix(&self, hashes: &[BlockHash], num_tokens: usize) -> PrefixHit {
        let bs = self.cfg.block_size.as_usize();
        let mut hit = PrefixHit {
            block_size: bs,
            query_tokens: num_tokens,
            ..PrefixHit::default()
        };
        if !self.cfg.enable_prefix_caching {
            return hit;
        }
        let max_blocks = num_tokens.saturating_sub(1) / bs;
        for hash in hashes.iter().take(max_blocks) {
            match self.cached.get(hash) {
                Some(&block) => {
                    hit.blocks.push(block);
                    hit.hashes.push(*hash);
                }
                None => break,
            }
        }
        hit
    }

    /// Gives a new sequence a table covering `num_tokens` positions: the blocks of `hit`
    /// (shared) followed by fresh blocks. All or nothing.
    pub fn allocate_new(
        &mut self,
        seq: RequestId,
        hit: &PrefixHit,
        num_tokens: usize,
        kind: StartKind,
    ) -> Result<(), AllocError> {
        if self.seqs.contains_key(&seq) {
            return Err(AllocError::SequenceExists(seq));
        }
        let hit_tokens = hit.num_tokens();
        if num_tokens < hit_tokens {
            return Err(AllocError::ShorterThanPrefix {
                num_tokens,
                hit_tokens,
            });
        }
        let mut reclaimed_from_evictable = 0;
        for (block, hash) in hit.blocks.iter().zip(&hit.hashes) {
            let state = self.state(*block).ok_or(AllocError::StalePrefix)?;
            if state.hash != Some(*hash) || hit.block_size != self.cfg.block_size.as_usize() {
                return Err(AllocError::StalePrefix);
            }
            if state.ref_count == 0 {
                reclaimed_from_evictable += 1;
            }
        }
        let needed = self.cfg.block_size.blocks_for(num_tokens) - hit.blocks.len();
        let available = self.num_free_blocks() - reclaimed_from_evictable;
        if needed > available {
            return Err(AllocError::OutOfBlocks { needed, available });
        }
        let mut table = Vec::with_capacity(hit.blocks.len() + needed);
        for &block in &hit.blocks {
            self.acquire_cached(block);
            table.push(block);
        }
        for _ in 0..needed {
            table.push(self.take_fresh()?);
        }
        let query = hit.query_tokens as u64;
        let hits = hit_tokens as u64;
        match kind {
            StartKind::Fresh => {
                self.stats.prefix_query_tokens += query;
                self.stats.prefix_hit_tokens += hits;
            }
            StartKind::Resume => {
                self.stats.resume_query_tokens += query;
                self.stats.resume_hit_tokens += hits;
            }
        }
        self.seqs.insert(
            seq,
            SeqBlocks {
                blocks: table,
                num_committed: hit.blocks.len(),
            },
        );
        Ok(())
    }

    /// Extends `seq`'s table with fresh blocks so it covers `num_tokens` positions (no-op if
    /// it already does). All or nothing.
    pub fn grow(&mut self, seq: RequestId, num_tokens: usize) -> Result<(), AllocError> {
        let have = self
            .seqs
            .get(&seq)
            .ok_or(AllocError::UnknownSequence(seq))?
            .blocks
            .len();
        let needed = self
            .cfg
            .block_size
            .blocks_for(num_tokens)
            .saturating_sub(have);
        let available = self.num_free_blocks();
        if needed > available {
            return Err(AllocError::OutOfBlocks { needed, available });
        }
        let mut fresh = Vec::with_capacity(needed);
        for _ in 0..needed {
            fresh.push(self.take_fresh()?);
        }
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.blocks.extend(fresh);
        }
        Ok(())
    }

    /// Registers the full blocks among `seq`'s first `computed.len()` tokens (whose KV is now
    /// written) for prefix caching. `hashes` are the sequence's full-block hashes
    /// (`hash_blocks(tokens, block_size, salt)`; extra trailing hashes are ignored). A block
    /// whose hash is already cached elsewhere (two sequences computed the same prefix at
    /// once) stays private and is freed, not cached, on release.
    pub fn commit_computed(
        &mut self,
        seq: RequestId,
        computed: &[TokenId],
        hashes: &[BlockHash],
    ) -> Result<(), AllocError> {
        let bs = self.cfg.block_size.as_usize();
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(AllocError::UnknownSequence(seq))?;
        let full = (computed.len() / bs).min(s.blocks.len()).min(hashes.len());
        if full <= s.num_committed {
            return Ok(());
        }
        let start = s.num_committed;
        s.num_committed = full;
        if !self.cfg.enable_prefix_caching {
            return Ok(());
        }
        let table: Vec<BlockId> = s.blocks[start..full].to_vec();
        // Consecutive newly registered blocks go out as one chained BlockStored event.
        let mut run: Option<(usize, Vec<BlockHash>)> = None;
        for (offset, block) in table.into_iter().enumerate() {
            let i = start + offset;
            let hash = hashes[i];
            let fresh = !self.cached.contains_key(&hash);
            if fresh {
                self.cached.insert(hash, block);
                if let Some(state) = self.blocks.get_mut(block.0 as usize) {
                    state.hash = Some(hash);
                }
                match &mut run {
                    Some((_, run_hashes)) => run_hashes.push(hash),
                    None => run = Some((i, vec![hash])),
                }
            } else if let Some((first, run_hashes)) = run.take() {
                self.push_stored(first, run_hashes, computed, hashes);
            }
        }
        if let Some((first, run_hashes)) = run {
            self.push_stored(first, run_hashes, computed, hashes);
        }
        Ok(())
    }

    /// Releases `seq`'s whole table (tail first). Registered blocks that drop to zero
    /// references become evictable; the rest go back to the free list. Returns whether `seq`
    /// had a table.
    pub fn free(&mut self, seq: RequestId) -> bool {
        let Some(s) = self.seqs.remove(&seq) else {
            return false;
        };
        for &block in s.blocks.iter().rev() {
            self.release(block);
        }
        true
    }

    /// Evicts every evictable block (e.g. an admin "reset prefix cache"); blocks in use keep
    /// their registration. Returns how many were evicted.
    pub fn evict_all_cached(&mut self) -> usize {
        let mut n = 0;
        while let Some(block) = self.evict_lru() {
            self.free.push_back(block);
            n += 1;
        }
        n
    }

    /// Events since the last drain, in the order they happened.
    pub fn drain_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    /// Checks every structural invariant; for tests and the simulator (O(pool)).
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let fail = |msg: String| Err(InvariantViolation(msg));
        let n = self.blocks.len();
        let mut refs = vec![0u32; n];
        for seq in self.sequences() {
            let Some(s) = self.seqs.get(&seq) else {
                continue;
            };
            let mut seen = BTreeSet::new();
            for b in &s.blocks {
                let Some(r) = refs.get_mut(b.0 as usize) else {
                    return fail(format!("{seq} holds out-of-range block {b}"));
                };
                if !seen.insert(*b) {
                    return fail(format!("{seq} holds block {b} twice"));
                }
                *r += 1;
            }
            if s.num_committed > s.blocks.len() {
                return fail(format!("{seq} committed past its table"));
            }
        }
        let mut place = vec![0u8; n];
        for b in &self.free {
            let Some(p) = place.get_mut(b.0 as usize) else {
                return fail(format!("free list holds out-of-range block {b}"));
            };
            *p += 1;
        }
        for (tick, b) in &self.evictable {
            let Some(p) = place.get_mut(b.0 as usize) else {
                return fail(format!("evictable holds out-of-range block {b}"));
            };
            *p += 1;
            let state = &self.blocks[b.0 as usize];
            if state.evict_tick != Some(*tick) {
                return fail(format!(
                    "evictable block {b} has tick {:?}",
                    state.evict_tick
                ));
            }
            if state.hash.is_none() {
                return fail(format!("evictable block {b} has no hash"));
            }
        }
        let mut used = 0;
        let mut hashed = 0;
        for (i, state) in self.blocks.iter().enumerate() {
            let b = BlockId(i as u32);
            if state.ref_count != refs[i] {
                return fail(format!(
                    "block {b} has ref_count {} but {} tables hold it",
                    state.ref_count, refs[i]
                ));
            }
            let in_use = state.ref_count > 0;
            used += usize::from(in_use);
            if usize::from(in_use) + usize::from(place[i]) != 1 {
                return fail(format!(
                    "block {b} is in {} places (in use: {in_use})",
                    usize::from(in_use) + usize::from(place[i])
                ));
            }
            if in_use && state.evict_tick.is_some() {
                return fail(format!("block {b} in use but carries an evict tick"));
            }
            if let Some(h) = state.hash {
                hashed += 1;
                if self.cached.get(&h) != Some(&b) {
                    return fail(format!("block {b} has hash {h} not mapped to it"));
                }
            }
        }
        for b in &self.free {
            if self.blocks[b.0 as usize].hash.is_some() {
                return fail(format!("free block {b} still has a hash"));
            }
        }
        if hashed != self.cached.len() {
            return fail(format!(
                "{} hashes cached but {hashed} blocks carry one",
                self.cached.len()
            ));
        }
        if used != self.num_used {
            return fail(format!(
                "num_used {} but {used} blocks in use",
                self.num_used
            ));
        }
        if !self.cfg.enable_prefix_caching && !self.cached.is_empty() {
            return fail("prefix caching disabled but blocks are cached".into());
        }
        Ok(())
    }

    fn state(&self, block: BlockId) -> Option<&BlockState> {
        self.blocks.get(block.0 as usize)
    }

    /// Adds a reference to a cached block, pulling it out of the evictable set if needed.
    fn acquire_cached(&mut self, block: BlockId) {
        let Some(state) = self.blocks.get_mut(block.0 as usize) else {
            return;
        };
        if state.ref_count == 0 {
            if let Some(tick) = state.evict_tick.take() {
                self.evictable.remove(&tick);
            }
            self.num_used += 1;
        }
        state.ref_count += 1;
    }

    /// A block with no contents for a sequence to write: the free list first, else the
    /// least recently released cached block (evicted).
    fn take_fresh(&mut self) -> Result<BlockId, AllocError> {
        let block = match self.free.pop_front() {
            Some(b) => b,
            None => self.evict_lru().ok_or(AllocError::OutOfBlocks {
                needed: 1,
                available: 0,
            })?,
        };
        if let Some(state) = self.blocks.get_mut(block.0 as usize) {
            state.ref_count = 1;
        }
        self.num_used += 1;
        Ok(block)
    }

    /// Evicts the least recently released cached block; it is returned unreferenced and
    /// unregistered (not on any list).
    fn evict_lru(&mut self) -> Option<BlockId> {
        let (_, block) = self.evictable.pop_first()?;
        let state = self.blocks.get_mut(block.0 as usize)?;
        state.evict_tick = None;
        if let Some(hash) = state.hash.take() {
            self.cached.remove(&hash);
            self.stats.evictions += 1;
            match self.events.last_mut() {
                Some(KvEvent::BlockRemoved { block_hashes }) => block_hashes.push(hash),
                _ => self.events.push(KvEvent::BlockRemoved {
                    block_hashes: vec![hash],
                }),
            }
        }
        Some(block)
    }

    fn release(&mut self, block: BlockId) {
        let tick = self.next_tick;
        let Some(state) = self.blocks.get_mut(block.0 as usize) else {
            return;
        };
        state.ref_count = state.ref_count.saturating_sub(1);
        if state.ref_count > 0 {
            return;
        }
        self.num_used -= 1;
        if state.hash.is_some() {
            state.evict_tick = Some(tick);
            self.next_tick += 1;
            self.evictable.insert(tick, block);
        } else {
            self.free.push_back(block);
        }
    }

    fn push_stored(
        &mut self,
        first: usize,
        run_hashes: Vec<BlockHash>,
        computed: &[TokenId],
        hashes: &[BlockHash],
    ) {
        let bs = self.cfg.block_size.as_usize();
        let end = first + run_hashes.len();
        let parent_block_hash = first.checked_sub(1).map(|p| hashes[p]);
        self.events.push(KvEvent::BlockStored {
            block_hashes: run_hashes,
            parent_block_hash,
            token_ids: computed[first * bs..end * bs].to_vec(),
            block_size: self.cfg.block_size,
            lora_id: None,
        });
    }
}
