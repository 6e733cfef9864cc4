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

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Shards (a power of two; chosen by the top bits of the mixed hash).
pub const SHARDS: usize = 64;
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
struct Slot {
    key: u64,
    val: u64,
}

const FREE: Slot = Slot { key: 0, val: EMPTY };

/// One shard: a power-of-two open-addressing table.
struct Table {
    slots: Vec<Slot>,
    len: usize,
}

impl Table {
    fn new() -> Table {
        Table {
            slots: vec![FREE; 16],
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
            if s.val == EMPTY {
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
        let old = std::mem::replace(&mut self.slots, vec![FREE; cap]);
        let mask = self.mask();
        for s in old.into_iter().filter(|s| s.val != EMPTY) {
            let mut i = mix(s.key) as usize & mask;
            while self.slots[i].val != EMPTY {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }

    fn delete_at(&mut self, i: usize) {
        let mask = self.mask();
        let mut hole = i;
        let mut j = (i + 1) & mask;
        while self.slots[j].val != EMPTY {
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
        t.find(key, m).ok().map(|i| Loc(t.slots[i].val))
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
            Ok(i) => Err(Loc(t.slots[i].val)),
            Err(i) => {
                t.slots[i] = Slot { key, val: loc.0 };
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
            Ok(i) if t.slots[i].val == loc.0 => {
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

    /// Heap bytes of the tables (for metrics and benchmarks).
    pub fn heap_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.table
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .slots
                    .len()
                    * 16
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
}
