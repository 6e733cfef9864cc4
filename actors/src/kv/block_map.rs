//! The KV index's hash map: a block's sequence hash -> where the block lives (a run and an
//! offset in it, see `runs`).
//!
//! # Layout, and why
//! 16 bytes a block (key and packed location), open addressing with linear probing in
//! [`SHARDS`] shards chosen by the top bits of the mixed hash, each behind its own
//! reader-writer lock. The map is touched once per *run* of a chain, not once per block
//! (a query compares the rest of the run in place), so it is small and rarely on the hot
//! path; what it must be is compact (it holds every indexed block) and cheap to insert into
//! (every new block). Deletion shifts later entries back (no tombstones), so probe chains stay
//! short however many blocks come and go.
//!
//! # Huge pages
//! Ingestion probes the tables at random, once per block inserted or removed, so with 4 KB
//! pages nearly every probe of a table beyond the TLB's reach is also a TLB miss (a
//! two-level page walk under a hypervisor); perf showed the writer stalled on its slot
//! prefetches. A table of 2 MB or more is therefore its own anonymous mapping, 2 MB-aligned
//! and advised onto transparent huge pages (`madvise` mode is enough), and there are only
//! [`SHARDS`] = 16 shards so that tables reach that size at about 100 K blocks per shard
//! (with 64 shards the tables of a 1.5 M-block index stayed at 512 KB). Paired A/B on the
//! KV-indexer benchmark's workload (BENCHMARKS, indexer v6): ingest +4% per CPU-second beyond
//! what the prefetch of each event's first probes gave, queries' p50 -14%. Such mappings are
//! outside the global allocator: [`BlockMap::mapped_bytes`] counts them.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Shards (a power of two; chosen by the top bits of the mixed hash). Few enough that the
/// tables of a large index reach huge-page size (see the module docs); two writers still
/// rarely want the same shard at once (each holds a shard for one slot's insert or removal).
pub const SHARDS: usize = 16;
const SHARD_SHIFT: u32 = 64 - SHARDS.trailing_zeros();

/// Where a block lives: run id and offset in the run, packed (run in the high 32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc(u64);

/// Marks an empty slot (run id u32::MAX is never handed out).
const EMPTY: u64 = u64::MAX;

impl Loc {
    pub fn new(run: u32, off: u32) -> Loc {
        Loc((u64::from(run) << 32) | u64::from(off))
    }
    pub fn run(self) -> u32 {
        (self.0 >> 32) as u32
    }
    pub fn off(self) -> u32 {
        self.0 as u32
    }
}

/// Mixes a sequence hash once; shard and home slot come from different bits of it.
/// (Sequence hashes are xxh3 outputs already, but tests and other engines may send small
/// integers; one multiply makes the layout independent of that.)
#[inline]
pub fn mix(key: u64) -> u64 {
    let x = (key ^ (key >> 31)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29)
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Slot {
    key: u64,
    /// The location's bits inverted, so that an all-zero slot is empty (`!EMPTY`): fresh
    /// zeroed pages are an empty table without a fill pass.
    val: u64,
}

const FREE: Slot = Slot { key: 0, val: 0 };

/// Tables of at least this many bytes get their own mapping, 2 MB-aligned and advised onto
/// transparent huge pages.
const HUGE: usize = 2 << 20;

/// A table's slots, zeroed. Small tables come from the global allocator; from [`HUGE`] bytes
/// on, a table is its own anonymous mapping on 2 MB pages (see the module docs).
struct Slots {
    ptr: std::ptr::NonNull<Slot>,
    len: usize,
    mapped: bool,
}

// SAFETY: `Slots` owns its memory exclusively, like a `Vec<Slot>`.
unsafe impl Send for Slots {}
// SAFETY: shared access is read-only through `Deref`.
unsafe impl Sync for Slots {}

impl Slots {
    fn layout(len: usize) -> std::alloc::Layout {
        match std::alloc::Layout::array::<Slot>(len) {
            Ok(l) => l,
            Err(_) => std::alloc::handle_alloc_error(std::alloc::Layout::new::<Slot>()),
        }
    }

    fn zeroed(len: usize) -> Slots {
        let layout = Self::layout(len);
        if layout.size() >= HUGE {
            if let Some(ptr) = map_huge(layout.size()) {
                return Slots {
                    ptr,
                    len,
                    mapped: true,
                };
            }
        }
        // SAFETY: the layout has a non-zero size (len >= 16).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(ptr.cast::<Slot>()) else {
            std::alloc::handle_alloc_error(layout)
        };
        Slots {
            ptr,
            len,
            mapped: false,
        }
    }
}

impl std::ops::Deref for Slots {
    type Target = [Slot];
    fn deref(&self) -> &[Slot] {
        // SAFETY: `ptr` points at `len` initialised slots owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Slots {
    fn deref_mut(&mut self) -> &mut [Slot] {
        // SAFETY: as in `deref`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        let layout = Self::layout(self.len);
        if self.mapped {
            // SAFETY: the mapping was made by `map_huge` with this size and is unmapped once.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), layout.size()) };
        } else {
            // SAFETY: allocated by `alloc_zeroed` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), layout) };
        }
    }
}

/// An anonymous private mapping of `bytes` (a multiple of [`HUGE`]) at a 2 MB boundary,
/// advised onto huge pages; `None` when the system refuses (the caller then allocates).
fn map_huge(bytes: usize) -> Option<std::ptr::NonNull<Slot>> {
    let span = bytes.checked_add(HUGE)?;
    // SAFETY: a fresh anonymous mapping; no existing memory is touched.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let start = raw as usize;
    let aligned = (start + HUGE - 1) & !(HUGE - 1);
    // SAFETY: both trims lie inside the mapping just made, outside [aligned, aligned + bytes).
    unsafe {
        if aligned > start {
            libc::munmap(raw, aligned - start);
        }
        let tail = start + span - (aligned + bytes);
        if tail > 0 {
            libc::munmap((aligned + bytes) as *mut libc::c_void, tail);
        }
        libc::madvise(aligned as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE);
    }
    std::ptr::NonNull::new(aligned as *mut Slot)
}

/// One shard: a power-of-two open-addressing table.
struct Table {
    slots: Slots,
    len: usize,
}

impl Table {
    fn new() -> Table {
        Table {
            slots: Slots::zeroed(16),
            len: 0,
        }
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    fn find(&self, key: u64, mixed: u64) -> Result<usize, usize> {
        let mask = self.mask();
        let mut i = mixed as usize & mask;
        loop {
            let s = self.slots[i];
            if s.val == !EMPTY {
                return Err(i);
            }
            if s.key == key {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    fn grow(&mut self) {
        let cap = self.slots.len() * 2;
        let old = std::mem::replace(&mut self.slots, Slots::zeroed(cap));
        let mask = self.mask();
        for s in old.iter().copied().filter(|s| s.val != !EMPTY) {
            let mut i = mix(s.key) as usize & mask;
            while self.slots[i].val != !EMPTY {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }

    fn delete_at(&mut self, i: usize) {
        let mask = self.mask();
        let mut hole = i;
        let mut j = (i + 1) & mask;
        while self.slots[j].val != !EMPTY {
            let home = mix(self.slots[j].key) as usize & mask;
            // The entry at j may fill the hole if the hole lies on its probe path home..=j.
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.slots[hole] = FREE;
        self.len -= 1;
    }
}

/// A shard: its table behind its own lock, alone on its cache lines (128 bytes: x86 fetches
/// lines in adjacent pairs). Two writers take random shards' locks once per inserted or
/// removed block; unpadded, neighbouring shards shared lines, so every lock word a writer took
/// was also invalidated by the other writer's work on the next shard.
#[repr(align(128))]
struct Shard {
    table: RwLock<Table>,
}

/// A shard table's layout mirrored in atomics, so a writer can prefetch the home slots of the
/// keys it is about to insert or remove without taking the lock. Kept apart from the shards
/// (written only when a table grows): reading it does not pull a lock word's line away from
/// the writer holding it.
struct Layout {
    base: AtomicPtr<Slot>,
    mask: AtomicUsize,
}

/// The sharded map. All methods take `&self`.
pub struct BlockMap {
    shards: Box<[Shard]>,
    layouts: Box<[Layout]>,
}

impl Default for BlockMap {
    fn default() -> Self {
        let mut tables: Vec<Table> = (0..SHARDS).map(|_| Table::new()).collect();
        let layouts = tables
            .iter_mut()
            .map(|t| Layout {
                base: AtomicPtr::new(t.slots.as_mut_ptr()),
                mask: AtomicUsize::new(t.mask()),
            })
            .collect();
        BlockMap {
            shards: tables
                .into_iter()
                .map(|t| Shard {
                    table: RwLock::new(t),
                })
                .collect(),
            layouts,
        }
    }
}

impl BlockMap {
    fn index(mixed: u64) -> usize {
        (mixed >> SHARD_SHIFT) as usize & (SHARDS - 1)
    }

    fn shard(&self, mixed: u64) -> &Shard {
        // SHARDS is a power of two and the shift keeps the top bits: always in range.
        &self.shards[Self::index(mixed)]
    }

    fn read(&self, mixed: u64) -> RwLockReadGuard<'_, Table> {
        // Every mutation of a table completes before anything can panic, so a poisoned
        // lock still guards a valid table.
        self.shard(mixed)
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, mixed: u64) -> RwLockWriteGuard<'_, Table> {
        self.shard(mixed)
            .table
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Hint the CPU to fetch `key`'s home slot, and its shard's lock word for writing. The
    /// layout read may be stale (the table grew since); a prefetch of a stale address is
    /// harmless.
    #[inline]
    pub fn prefetch(&self, key: u64) {
        let m = mix(key);
        let i = Self::index(m);
        let layout = &self.layouts[i];
        let base = layout.base.load(Ordering::Relaxed);
        let mask = layout.mask.load(Ordering::Relaxed);
        prefetch(base.wrapping_add(m as usize & mask));
        prefetch_for_write(std::ptr::from_ref(&self.shards[i]).cast::<u8>());
    }

    pub fn get(&self, key: u64) -> Option<Loc> {
        let m = mix(key);
        let t = self.read(m);
        t.find(key, m).ok().map(|i| Loc(!t.slots[i].val))
    }

    /// Insert `key -> loc` unless `key` is present; then `Err(its location)`.
    pub fn insert_or_get(&self, key: u64, loc: Loc) -> Result<(), Loc> {
        let m = mix(key);
        let mut t = self.write(m);
        if (t.len + 1) * 4 > t.slots.len() * 3 {
            t.grow();
            let layout = &self.layouts[Self::index(m)];
            layout.base.store(t.slots.as_mut_ptr(), Ordering::Relaxed);
            layout.mask.store(t.mask(), Ordering::Relaxed);
        }
        match t.find(key, m) {
            Ok(i) => Err(Loc(!t.slots[i].val)),
            Err(i) => {
                t.slots[i] = Slot { key, val: !loc.0 };
                t.len += 1;
                Ok(())
            }
        }
    }

    /// Remove `key` if it still points at `loc`; true when removed.
    pub fn remove_if(&self, key: u64, loc: Loc) -> bool {
        let m = mix(key);
        let mut t = self.write(m);
        match t.find(key, m) {
            Ok(i) if t.slots[i].val == !loc.0 => {
                t.delete_at(i);
                true
            }
            _ => false,
        }
    }

    /// Entries, all shards (takes each read lock in turn).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.table.read().unwrap_or_else(|e| e.into_inner()).len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the tables that live in mappings of their own, outside the global allocator
    /// (a counting allocator does not see them; they are part of [`BlockMap::heap_bytes`]).
    pub fn mapped_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let t = s.table.read().unwrap_or_else(|e| e.into_inner());
                if t.slots.mapped {
                    t.slots.len() * std::mem::size_of::<Slot>()
                } else {
                    0
                }
            })
            .sum()
    }

    /// Bytes of the tables, wherever they live (for metrics and benchmarks).
    pub fn heap_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.table
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .slots
                    .len()
                    * std::mem::size_of::<Slot>()
            })
            .sum()
    }
}

/// Hint the CPU to bring `addr`'s cache line in. Never dereferences `addr`.
#[inline(always)]
fn prefetch(addr: *const Slot) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unused_unsafe)]
    // SAFETY: a prefetch is a hint: it does not access memory architecturally and never
    // faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(addr.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// Hint the CPU to bring `addr`'s cache line in, owned for writing (`prefetchw`: the lock
/// word another core took last comes over while the writer works on earlier blocks, instead
/// of stalling the lock's compare-and-swap). Never dereferences `addr`; CPUs without the
/// instruction execute it as a no-op.
#[inline(always)]
fn prefetch_for_write(addr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it does not access memory architecturally and never
    // faults, whatever the address; it touches no register but its input and no flags.
    unsafe {
        std::arch::asm!("prefetchw [{0}]", in(reg) addr, options(nostack, preserves_flags, readonly));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Random inserts and conditional removes (small keys, so homes collide and deletion
    /// shifts entries back) agree with a HashMap reference.
    #[test]
    fn matches_reference_under_churn() {
        let map = BlockMap::default();
        let mut reference: HashMap<u64, Loc> = HashMap::new();
        let mut x = 0x1234_5678_9abc_def0u64;
        for step in 0..100_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = x % 2_000;
            let loc = Loc::new(step % 7, step);
            if (x >> 40) % 3 != 0 {
                let got = map.insert_or_get(key, loc);
                match reference.get(&key) {
                    Some(old) => assert_eq!(got, Err(*old)),
                    None => {
                        assert_eq!(got, Ok(()));
                        reference.insert(key, loc);
                    }
                }
            } else if let Some(old) = reference.get(&key).copied() {
                assert!(!map.remove_if(key, Loc::new(99, 0)));
                assert!(map.remove_if(key, old));
                reference.remove(&key);
            }
        }
        assert_eq!(map.len(), reference.len());
        for (k, v) in &reference {
            assert_eq!(map.get(*k), Some(*v));
        }
        assert_eq!(map.get(5_000), None);
    }

    /// A table of huge-page size is its own mapping (where the system allows one), zeroed,
    /// and usable like a small one.
    #[test]
    fn large_tables_are_zeroed_mappings() {
        let len = 2 * HUGE / std::mem::size_of::<Slot>();
        let mut slots = Slots::zeroed(len);
        assert_eq!(slots.len(), len);
        assert!(slots.iter().all(|s| s.key == 0 && s.val == !EMPTY));
        assert_eq!(slots.ptr.as_ptr() as usize % HUGE, 0, "2 MB-aligned");
        slots[len - 1] = Slot { key: 7, val: 9 };
        assert_eq!((slots[len - 1].key, slots[len - 1].val), (7, 9));
        let small = Slots::zeroed(16);
        assert!(!small.mapped);
        // And a map grown past it counts those tables as mapped.
        let map = BlockMap::default();
        // 60 K keys a shard: past 3/4 of 64 K slots, so each table grows to 128 K (2 MB).
        for k in 0..(SHARDS * 60_000) as u64 {
            assert_eq!(map.insert_or_get(k, Loc::new(1, k as u32)), Ok(()));
        }
        assert_eq!(map.get(12_345), Some(Loc::new(1, 12_345)));
        if slots.mapped {
            assert!(map.mapped_bytes() >= SHARDS * HUGE);
        }
        assert!(map.mapped_bytes() <= map.heap_bytes());
    }
}
