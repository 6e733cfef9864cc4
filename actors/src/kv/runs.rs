//! Runs: the KV index's compressed chains.
//!
//! # Why runs
//! A prompt's blocks form a chain, and workers that share a prefix store the same chain.
//! So instead of one hash-table entry per block (one cache miss per block on every query),
//! the index keeps each chain as a *run*: the blocks' sequence hashes in order in one array,
//! cut into *segments* of consecutive blocks with the same holders. A query finds where its
//! first block lives (one lookup in `block_map`), then checks the rest of its hashes against
//! the run's array in place and meets the holder sets only at segment boundaries. Because a
//! sequence hash names its block's whole prefix, one compare at a segment's last position
//! tells whether the query holds the whole segment ([`chain_prefix`]); a scan is needed only
//! near where the query leaves the run. A 1,024-block prompt over a shared prefix costs a few
//! lookups and a few compares instead of 1,024 dependent lookups. Workers re-storing a chain
//! that is already indexed cost one lookup and a compare too, not one insert per block.
//!
//! Each indexed block lives at exactly one live position of one run (the map points at it).
//! A position whose segment has no holder is dead: its hash is out of the map, and a query
//! that meets it looks its hash up again (a block that came back lives somewhere else).
//! Dead tails are cut off the array, so a chain that is removed and stored again is appended
//! in place.
//!
//! Everything here is plain single-threaded code on `&mut Run`; the indexer puts each run
//! behind its own reader-writer lock, in an [`Arena`] that hands out run ids.

use super::hash::BlockHash;
use smallvec::{smallvec, SmallVec};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};

/// Dense per-indexer number of a worker, so a holder costs 4 bytes.
pub type HolderId = u32;

/// Positions `start..end` of a run.
pub type Range = (u32, u32);

/// Runs, one chunk of the arena; each run (its lock and header) alone on its cache lines.
type Chunk = Box<[Padded<RwLock<Run>>]>;

/// A value alone on its cache lines (128 bytes: x86 fetches lines in adjacent pairs). For
/// state that different writer threads update often: unpadded, neighbours share lines, and a
/// writer's every update invalidates the line the other writer is working on (two workers'
/// runs created one after the other are neighbours in the arena, and a run's header changes
/// with every block appended to it).
#[derive(Default)]
#[repr(align(128))]
pub struct Padded<T>(pub T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A segment's holders, sorted. Up to 4 live inline in the segment (8 bytes more than a
/// `Vec`), so a query crossing a segment reads them from the segment itself instead of
/// following a pointer; most segments have 1-4 holders.
pub type Holders = SmallVec<[HolderId; 4]>;

/// Consecutive positions `start..` (up to the next segment) held by the same `holders`
/// (sorted; empty = dead).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seg {
    pub start: u32,
    pub holders: Holders,
}

/// One chain of blocks.
#[derive(Debug, Default)]
pub struct Run {
    /// Sequence hashes, in chain order.
    pub hashes: Vec<BlockHash>,
    /// Segments, by `start`, the first at 0; empty when `hashes` is.
    pub segs: Vec<Seg>,
    /// Incarnation of this run id (0 while free); eviction queue items carry it.
    pub born: u64,
    /// Live positions.
    pub live: u32,
    /// Last store or query tick; queries refresh it with a relaxed store when stale.
    pub touched: AtomicU64,
    /// Highest end offset matched by a query since the eviction clock last passed.
    pub hot: AtomicU32,
}

/// Common leading length of `a` and `b`.
#[inline]
pub fn common_prefix(a: &[BlockHash], b: &[BlockHash]) -> usize {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut i = 0;
    // Eight at a time without short-circuit, which the compiler turns into vector compares.
    while i + 8 <= n {
        let (x, y) = (&a[i..i + 8], &b[i..i + 8]);
        let eq = x.iter().zip(y).fold(true, |acc, (p, q)| acc & (p.0 == q.0));
        if !eq {
            break;
        }
        i += 8;
    }
    while i < n && a[i].0 == b[i].0 {
        i += 1;
    }
    i
}

/// Common leading length of `a` and `b`, two stretches of sequence-hash chains that start at
/// the same block. A sequence hash names its block's whole prefix, so `a[i] == b[i]` implies
/// `a[..i] == b[..i]`: matching is monotone, and the last position decides whether all match
/// (one compare instead of a scan of both arrays). Otherwise the first difference is narrowed
/// with rounds of 7 independent probes (their cache misses overlap) down to a short stretch,
/// which is compared in order. This is the jump search of Dynamo's PositionalIndexer, and it
/// rests on the same assumption: sequence hashes do not collide (the map keys blocks by them
/// anyway).
#[inline]
pub fn chain_prefix(a: &[BlockHash], b: &[BlockHash]) -> usize {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let Some(last) = n.checked_sub(1) else {
        return 0;
    };
    if a[last] == b[last] {
        return n;
    }
    // Invariant: every position below `lo` matches (by monotonicity), `hi` does not.
    let (mut lo, mut hi) = (0usize, last);
    while hi - lo > 16 {
        let step = (hi - lo) / 8;
        let matched = (1..8)
            .map(|k| usize::from(a[lo + k * step] == b[lo + k * step]))
            .sum::<usize>();
        // Probes 1..=matched match, probe matched + 1 (if any) does not.
        let base = lo;
        if matched < 7 {
            hi = base + (matched + 1) * step;
        }
        if matched > 0 {
            lo = base + matched * step + 1;
        }
    }
    lo + common_prefix(&a[lo..hi], &b[lo..hi])
}

impl Run {
    pub fn len(&self) -> u32 {
        self.hashes.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Index of the segment containing `off` (`off` < len).
    #[inline]
    pub fn seg_index(&self, off: u32) -> usize {
        self.segs
            .partition_point(|s| s.start <= off)
            .saturating_sub(1)
    }

    /// End (exclusive) of segment `i`.
    #[inline]
    pub fn seg_end(&self, i: usize) -> u32 {
        self.segs.get(i + 1).map_or(self.len(), |s| s.start)
    }

    pub fn is_live(&self, off: u32) -> bool {
        off < self.len() && !self.segs[self.seg_index(off)].holders.is_empty()
    }

    /// End of the stretch of live positions starting at `off`.
    pub fn live_end(&self, off: u32) -> u32 {
        let mut i = self.seg_index(off);
        while i < self.segs.len() && !self.segs[i].holders.is_empty() {
            i += 1;
        }
        self.segs.get(i).map_or(self.len(), |s| s.start).max(off)
    }

    /// Make a segment start at `off` (no-op at the end or on a boundary).
    fn split_at(&mut self, off: u32) {
        if off >= self.len() {
            return;
        }
        let i = self.seg_index(off);
        if self.segs[i].start != off {
            let holders = self.segs[i].holders.clone();
            self.segs.insert(
                i + 1,
                Seg {
                    start: off,
                    holders,
                },
            );
        }
    }

    /// Merge neighbouring segments with equal holders.
    fn coalesce(&mut self) {
        self.segs
            .dedup_by(|later, earlier| later.holders == earlier.holders);
    }

    /// Append `hash` held by `holder` alone.
    pub fn push(&mut self, hash: BlockHash, holder: HolderId) {
        let start = self.len();
        self.hashes.push(hash);
        self.live += 1;
        match self.segs.last() {
            Some(s) if s.holders.len() == 1 && s.holders[0] == holder => {}
            _ => self.segs.push(Seg {
                start,
                holders: smallvec![holder],
            }),
        }
    }

    /// Add `holder` to positions `a..b` (all live); returns the positions newly claimed.
    pub fn add_holder(&mut self, a: u32, b: u32, holder: HolderId) -> u64 {
        let b = b.min(self.len());
        if a >= b {
            return 0;
        }
        self.split_at(a);
        self.split_at(b);
        let (from, to) = (self.seg_index(a), self.seg_index(b - 1));
        let mut claimed = 0u64;
        for i in from..=to {
            let end = self.seg_end(i);
            let seg = &mut self.segs[i];
            if let Err(pos) = seg.holders.binary_search(&holder) {
                seg.holders.insert(pos, holder);
                claimed += u64::from(end - seg.start);
            }
        }
        self.coalesce();
        claimed
    }

    /// Drop `holder` from positions `a..b`: (positions unclaimed, ranges that died).
    pub fn remove_holder(&mut self, a: u32, b: u32, holder: HolderId) -> (u64, Vec<Range>) {
        let b = b.min(self.len());
        if a >= b {
            return (0, Vec::new());
        }
        self.split_at(a);
        self.split_at(b);
        let (from, to) = (self.seg_index(a), self.seg_index(b - 1));
        let mut unclaimed = 0u64;
        let mut died = Vec::new();
        for i in from..=to {
            let end = self.seg_end(i);
            let seg = &mut self.segs[i];
            if let Ok(pos) = seg.holders.binary_search(&holder) {
                seg.holders.remove(pos);
                unclaimed += u64::from(end - seg.start);
                if seg.holders.is_empty() {
                    died.push((seg.start, end));
                }
            }
        }
        self.live -= died.iter().map(|(s, e)| e - s).sum::<u32>();
        self.coalesce();
        (unclaimed, died)
    }

    /// Kill positions `a..b` (every holder's claim): per holder, the claims dropped, and the
    /// live positions that died.
    pub fn kill(&mut self, a: u32, b: u32) -> (Vec<(HolderId, u64)>, Vec<Range>) {
        let b = b.min(self.len());
        if a >= b {
            return (Vec::new(), Vec::new());
        }
        self.split_at(a);
        self.split_at(b);
        let (from, to) = (self.seg_index(a), self.seg_index(b - 1));
        let mut claims = Vec::new();
        let mut died = Vec::new();
        for i in from..=to {
            let end = self.seg_end(i);
            let seg = &mut self.segs[i];
            if seg.holders.is_empty() {
                continue;
            }
            let n = u64::from(end - seg.start);
            claims.extend(seg.holders.drain(..).map(|h| (h, n)));
            died.push((seg.start, end));
        }
        self.live -= died.iter().map(|(s, e)| e - s).sum::<u32>();
        self.coalesce();
        (claims, died)
    }

    /// End of the last live position (0 when none).
    pub fn live_tail(&self) -> u32 {
        self.segs
            .iter()
            .enumerate()
            .rev()
            .find(|(_, s)| !s.holders.is_empty())
            .map_or(0, |(i, _)| self.seg_end(i))
    }

    /// Cut dead positions off the end, so the chain can grow in place again.
    pub fn trim(&mut self) {
        let end = self.live_tail();
        self.hashes.truncate(end as usize);
        while self.segs.last().is_some_and(|s| s.start >= end) {
            self.segs.pop();
        }
        if self.hashes.len() * 4 < self.hashes.capacity() {
            self.hashes.shrink_to_fit();
        }
    }

    /// Return to the free state (memory released).
    pub fn reset(&mut self) {
        self.hashes = Vec::new();
        self.segs = Vec::new();
        self.born = 0;
        self.live = 0;
        *self.touched.get_mut() = 0;
        *self.hot.get_mut() = 0;
    }

    /// Refresh the touch stamp (a relaxed store, only when stale) and the matched high-water
    /// mark (only when higher).
    #[inline]
    pub fn touch(&self, tick: u64, matched_end: u32) {
        if self.touched.load(Ordering::Relaxed) < tick {
            self.touched.store(tick, Ordering::Relaxed);
        }
        if self.hot.load(Ordering::Relaxed) < matched_end {
            self.hot.fetch_max(matched_end, Ordering::Relaxed);
        }
    }

    /// Heap bytes (for metrics and benchmarks).
    pub fn heap_bytes(&self) -> usize {
        self.hashes.capacity() * 8
            + self.segs.capacity() * std::mem::size_of::<Seg>()
            + self
                .segs
                .iter()
                .filter(|s| s.holders.spilled())
                .map(|s| s.holders.capacity() * 4)
                .sum::<usize>()
    }
}

/// Runs per chunk of the arena.
const CHUNK: usize = 1024;
/// Chunks at most (16 M runs).
const MAX_CHUNKS: usize = 16 * 1024;

struct Ids {
    next: u32,
    free: Vec<u32>,
    born: u64,
}

/// Run ids to runs. Lookups are lock-free (a chunk, once allocated, never moves); only
/// creating and freeing a run takes the id mutex.
pub struct Arena {
    chunks: Box<[OnceLock<Chunk>]>,
    /// Apart from `chunks` (read on every lookup): taken on every run created or freed.
    ids: Padded<Mutex<Ids>>,
}

impl Default for Arena {
    fn default() -> Self {
        Arena {
            chunks: (0..MAX_CHUNKS).map(|_| OnceLock::new()).collect(),
            ids: Padded(Mutex::new(Ids {
                next: 0,
                free: Vec::new(),
                born: 0,
            })),
        }
    }
}

impl Arena {
    pub fn get(&self, id: u32) -> Option<&RwLock<Run>> {
        let id = id as usize;
        self.chunks
            .get(id / CHUNK)?
            .get()?
            .get(id % CHUNK)
            .map(|r| &r.0)
    }

    /// A fresh run id and its incarnation; `None` when the arena is full.
    pub fn create(&self) -> Option<(u32, u64)> {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        let id = match ids.free.pop() {
            Some(id) => id,
            None => {
                let id = ids.next;
                let chunk = self.chunks.get(id as usize / CHUNK)?;
                chunk.get_or_init(|| (0..CHUNK).map(|_| Padded::default()).collect());
                ids.next += 1;
                id
            }
        };
        ids.born += 1;
        Some((id, ids.born))
    }

    /// Give `id` back (its run already reset).
    pub fn release(&self, id: u32) {
        self.ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .free
            .push(id);
    }

    /// Ids handed out so far (free ones included): scans walk `0..end`.
    pub fn end(&self) -> u32 {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).next
    }

    /// Heap bytes of the arena and its runs (takes each run's read lock in turn).
    pub fn heap_bytes(&self) -> usize {
        let chunks = self.chunks.iter().filter(|c| c.get().is_some()).count();
        let mut bytes = self.chunks.len() * std::mem::size_of::<OnceLock<Chunk>>()
            + chunks * CHUNK * std::mem::size_of::<Padded<RwLock<Run>>>();
        for id in 0..self.end() {
            if let Some(run) = self.get(id) {
                bytes += run.read().unwrap_or_else(|e| e.into_inner()).heap_bytes();
            }
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(n: u64, holder: HolderId) -> Run {
        let mut r = Run::default();
        for h in 0..n {
            r.push(BlockHash(100 + h), holder);
        }
        r
    }

    fn holders_at(r: &Run, off: u32) -> Vec<HolderId> {
        r.segs[r.seg_index(off)].holders.to_vec()
    }

    #[test]
    fn segments_split_and_merge() {
        let mut r = run_of(10, 1);
        assert_eq!(r.segs.len(), 1);
        assert_eq!(r.add_holder(0, 6, 2), 6);
        assert_eq!(r.add_holder(0, 6, 2), 0);
        assert_eq!(r.segs.len(), 2);
        assert_eq!(holders_at(&r, 5), vec![1, 2]);
        assert_eq!(holders_at(&r, 6), vec![1]);
        assert_eq!(r.add_holder(6, 10, 2), 4);
        assert_eq!(r.segs.len(), 1, "equal neighbours merge");
        let (un, died) = r.remove_holder(3, 10, 1);
        assert_eq!((un, died), (7, vec![]));
        let (un, died) = r.remove_holder(8, 10, 2);
        assert_eq!((un, died), (2, vec![(8, 10)]));
        assert_eq!(r.live, 8);
        assert!(!r.is_live(9));
        assert_eq!(r.live_end(0), 8);
        r.trim();
        assert_eq!(r.len(), 8);
        let (claims, died) = r.kill(6, 8);
        assert_eq!(claims, vec![(2, 2)]);
        assert_eq!(died, vec![(6, 8)]);
        assert_eq!(r.live_tail(), 6);
    }

    #[test]
    fn common_prefix_finds_the_first_difference() {
        let a: Vec<BlockHash> = (0..100).map(BlockHash).collect();
        for cut in [0usize, 1, 7, 8, 9, 63, 64, 99] {
            let mut b = a.clone();
            b[cut] = BlockHash(1_000);
            assert_eq!(common_prefix(&a, &b), cut);
        }
        assert_eq!(common_prefix(&a, &a[..50]), 50);
    }

    /// On chains (a difference at i means every later position differs too) the jump search
    /// finds the same length as the scan, for every cut and length.
    #[test]
    fn chain_prefix_agrees_with_the_scan_on_chains() {
        for n in [0usize, 1, 2, 7, 16, 17, 18, 40, 100, 513, 1024] {
            let a: Vec<BlockHash> = (0..n as u64).map(BlockHash).collect();
            for cut in (0..=n).step_by(1 + n / 97) {
                let b: Vec<BlockHash> = (0..n as u64)
                    .map(|i| BlockHash(if (i as usize) < cut { i } else { 10_000 + i }))
                    .collect();
                assert_eq!(chain_prefix(&a, &b), cut, "n {n} cut {cut}");
                assert_eq!(chain_prefix(&a, &b[..cut]), cut);
                assert_eq!(chain_prefix(&a, &b), common_prefix(&a, &b));
            }
        }
    }
}
