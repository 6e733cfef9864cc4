//! One shard of the KV index: an open-addressing hash table from a block's sequence hash to
//! the compact set of workers holding it.
//!
//! # Layout, and why
//! The router's query walks up to thousands of blocks of a prompt through an index of
//! millions; each step is a random access into a table far larger than the caches. So one
//! block costs one cache line: an [`Entry`] is 64 bytes, aligned, holding the key, its
//! eviction bookkeeping and up to [`INLINE`] holders (4-byte [`HolderId`]s, sorted) inline.
//! Blocks with more holders (a shared system prompt) keep their holder list in a side map of
//! the shard. Linear probing keeps probes on adjacent lines, and since every hash of a query
//! is known up front the caller can prefetch the home line of blocks further down the chain
//! ([`entry_addr`]) while it works on the current one. Deletion shifts later entries back
//! (no tombstones), so lookups stay short however many blocks come and go.
//!
//! All methods here are plain single-threaded code; the indexer puts each shard behind a
//! reader-writer lock.

use super::hash::PreHashed;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, Ordering};

/// Holders kept inside the entry; more spill to the shard's side map.
pub const INLINE: usize = 9;

/// Dense per-indexer number of a worker, so a holder costs 4 bytes.
pub type HolderId = u32;

/// Mixes a sequence hash once; shard and home slot are taken from different bits of it.
/// (Sequence hashes are xxh3 outputs already, but tests and other engines may send small
/// integers; one multiply makes the layout independent of that.)
#[inline]
pub fn mix(key: u64) -> u64 {
    let x = (key ^ (key >> 31)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29)
}

#[repr(C, align(64))]
pub struct Entry {
    key: u64,
    /// Identifies this incarnation of the entry in the eviction queue.
    born: u64,
    /// Last store or query tick; queries refresh it under a read lock.
    touched: AtomicU64,
    /// Holders; 0 marks an empty slot. Above `INLINE` the list lives in `spill`.
    len: u32,
    inline: [HolderId; INLINE],
}

impl Entry {
    fn empty() -> Entry {
        Entry {
            key: 0,
            born: 0,
            touched: AtomicU64::new(0),
            len: 0,
            inline: [0; INLINE],
        }
    }

    pub fn born(&self) -> u64 {
        self.born
    }

    pub fn touched(&self) -> u64 {
        self.touched.load(Ordering::Relaxed)
    }

    /// Raise the touch stamp to `tick` (a relaxed store, only when stale).
    pub fn touch(&self, tick: u64) {
        if self.touched.load(Ordering::Relaxed) < tick {
            self.touched.store(tick, Ordering::Relaxed);
        }
    }
}

/// What adding a holder did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Added {
    /// The block was not indexed before (its entry was created with the given `born`).
    pub created: bool,
    /// The holder's claim is new.
    pub claimed: bool,
}

/// What removing a holder did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Removed {
    pub unclaimed: bool,
    /// That was the last holder: the block left the index.
    pub emptied: bool,
}

/// One shard's table.
pub struct Table {
    entries: EntryArray,
    mask: usize,
    len: usize,
    spill: HashMap<u64, Vec<HolderId>, BuildHasherDefault<PreHashed>>,
}

const INITIAL_CAPACITY: usize = 64;

fn empty_entries(n: usize) -> EntryArray {
    EntryArray::new(n)
}

/// Tables of at least this many bytes are aligned to, and advised onto, 2 MB pages.
const HUGE_PAGE: usize = 2 << 20;

/// A fixed-size array of entries that large tables place on 2 MB pages.
///
/// WHY: a query touches one random entry per block of a table far larger than the TLB's
/// reach with 4 KB pages, so each block costs a page walk (two-dimensional under a VM) on
/// top of its cache miss. Transparent huge pages are often in `madvise` mode, so big tables
/// are allocated 2 MB-aligned and advised with `MADV_HUGEPAGE` before they are first written.
struct EntryArray {
    ptr: std::ptr::NonNull<Entry>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: EntryArray owns its entries exclusively, like a Box<[Entry]>, and Entry is Send +
// Sync (plain integers and an atomic).
unsafe impl Send for EntryArray {}
// SAFETY: as above; shared access only hands out `&[Entry]`.
unsafe impl Sync for EntryArray {}

impl EntryArray {
    fn new(len: usize) -> EntryArray {
        let len = len.max(1);
        let bytes = len * std::mem::size_of::<Entry>();
        let align = if bytes >= HUGE_PAGE {
            HUGE_PAGE
        } else {
            std::mem::align_of::<Entry>()
        };
        let Ok(layout) = std::alloc::Layout::from_size_align(bytes, align) else {
            std::alloc::handle_alloc_error(std::alloc::Layout::new::<Entry>());
        };
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) }.cast::<Entry>();
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout);
        };
        #[cfg(target_os = "linux")]
        if align == HUGE_PAGE {
            // SAFETY: the range is exactly our fresh allocation, 2 MB aligned; the advice
            // only changes how the kernel backs it. Failure is harmless (4 KB pages).
            unsafe {
                libc::madvise(raw.cast(), bytes, libc::MADV_HUGEPAGE);
            }
        }
        for i in 0..len {
            // SAFETY: i < len, inside the allocation; writing initialises the slot.
            unsafe { raw.add(i).write(Entry::empty()) };
        }
        EntryArray { ptr, len, layout }
    }
}

impl std::ops::Deref for EntryArray {
    type Target = [Entry];
    fn deref(&self) -> &[Entry] {
        // SAFETY: `len` initialised entries live at `ptr` for as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for EntryArray {
    fn deref_mut(&mut self) -> &mut [Entry] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for EntryArray {
    fn drop(&mut self) {
        // Entry has no drop glue; only the memory goes back.
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) };
    }
}

impl Default for Table {
    fn default() -> Self {
        Table {
            entries: empty_entries(INITIAL_CAPACITY),
            mask: INITIAL_CAPACITY - 1,
            len: 0,
            spill: HashMap::default(),
        }
    }
}

impl Table {
    /// Distinct blocks in this table.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base address and mask, for [`entry_addr`] (prefetch only).
    pub fn layout(&self) -> (*const Entry, usize) {
        (self.entries.as_ptr(), self.mask)
    }

    fn index_of(&self, key: u64, mixed: u64) -> Result<usize, usize> {
        let mut i = mixed as usize & self.mask;
        loop {
            let e = &self.entries[i];
            if e.len == 0 {
                return Err(i);
            }
            if e.key == key {
                return Ok(i);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// The entry of `key` (`mixed` = [`mix`]`(key)`).
    #[inline]
    pub fn get(&self, key: u64, mixed: u64) -> Option<&Entry> {
        self.index_of(key, mixed).ok().map(|i| &self.entries[i])
    }

    /// `e`'s holders, sorted.
    #[inline]
    pub fn holders<'a>(&'a self, e: &'a Entry) -> &'a [HolderId] {
        let n = e.len as usize;
        if n <= INLINE {
            &e.inline[..n]
        } else {
            self.spill.get(&e.key).map_or(&[], Vec::as_slice)
        }
    }

    /// Claim `key` for `holder`; a missing entry is created with `born` and touch `tick`.
    pub fn add_holder(
        &mut self,
        key: u64,
        mixed: u64,
        holder: HolderId,
        tick: u64,
        born: u64,
    ) -> Added {
        if (self.len + 1) * 8 > self.entries.len() * 5 {
            self.grow();
        }
        let (i, created) = match self.index_of(key, mixed) {
            Ok(i) => (i, false),
            Err(i) => {
                let e = &mut self.entries[i];
                e.key = key;
                e.born = born;
                e.len = 0;
                self.len += 1;
                (i, true)
            }
        };
        let e = &mut self.entries[i];
        *e.touched.get_mut() = tick.max(*e.touched.get_mut());
        let n = e.len as usize;
        let claimed = if n < INLINE {
            match e.inline[..n].binary_search(&holder) {
                Ok(_) => false,
                Err(pos) => {
                    e.inline.copy_within(pos..n, pos + 1);
                    e.inline[pos] = holder;
                    true
                }
            }
        } else if n == INLINE {
            match e.inline.binary_search(&holder) {
                Ok(_) => false,
                Err(pos) => {
                    let mut list = Vec::with_capacity(INLINE * 2);
                    list.extend_from_slice(&e.inline[..pos]);
                    list.push(holder);
                    list.extend_from_slice(&e.inline[pos..]);
                    self.spill.insert(key, list);
                    true
                }
            }
        } else {
            let list = self.spill.entry(key).or_default();
            match list.binary_search(&holder) {
                Ok(_) => false,
                Err(pos) => {
                    list.insert(pos, holder);
                    true
                }
            }
        };
        if claimed {
            self.entries[i].len += 1;
        }
        Added { created, claimed }
    }

    /// Drop `holder`'s claim on `key`, and the entry with its last holder.
    pub fn remove_holder(&mut self, key: u64, mixed: u64, holder: HolderId) -> Removed {
        let Ok(i) = self.index_of(key, mixed) else {
            return Removed::default();
        };
        let unclaimed = self.unclaim_at(i, holder);
        let emptied = unclaimed && self.entries[i].len == 0;
        if emptied {
            self.delete_at(i);
        }
        Removed { unclaimed, emptied }
    }

    /// Remove `key`'s entry if it is still incarnation `born`; returns its holders.
    pub fn remove_if_born(&mut self, key: u64, mixed: u64, born: u64) -> Option<Vec<HolderId>> {
        let i = self.index_of(key, mixed).ok()?;
        if self.entries[i].born != born {
            return None;
        }
        let holders = self.holders(&self.entries[i]).to_vec();
        self.spill.remove(&key);
        self.delete_at(i);
        Some(holders)
    }

    /// Drop `holder` from every entry: (claims dropped, entries emptied). O(capacity): used
    /// for `AllBlocksCleared` and worker removal, which are rare.
    pub fn remove_holder_everywhere(&mut self, holder: HolderId) -> (u64, usize) {
        let mut unclaimed = 0u64;
        let mut emptied = 0usize;
        for i in 0..self.entries.len() {
            if self.entries[i].len > 0 && self.unclaim_at(i, holder) {
                unclaimed += 1;
                emptied += usize::from(self.entries[i].len == 0);
            }
        }
        if emptied > 0 {
            // Emptied entries now read as free slots and would cut probe chains: re-place
            // the survivors.
            self.rehash(self.entries.len());
        }
        (unclaimed, emptied)
    }

    /// Remove `holder` from entry `i`'s list (entry kept even if emptied).
    fn unclaim_at(&mut self, i: usize, holder: HolderId) -> bool {
        let e = &mut self.entries[i];
        let n = e.len as usize;
        if n <= INLINE {
            let Ok(pos) = e.inline[..n].binary_search(&holder) else {
                return false;
            };
            e.inline.copy_within(pos + 1..n, pos);
            e.len -= 1;
            return true;
        }
        let Some(list) = self.spill.get_mut(&e.key) else {
            return false;
        };
        let Ok(pos) = list.binary_search(&holder) else {
            return false;
        };
        list.remove(pos);
        e.len -= 1;
        if e.len as usize == INLINE {
            if let Some(list) = self.spill.remove(&e.key) {
                e.inline.copy_from_slice(&list[..INLINE]);
            }
        }
        true
    }

    /// Empty slot `i` and shift back the entries after it that probed past it.
    fn delete_at(&mut self, i: usize) {
        let mask = self.mask;
        let mut hole = i;
        let mut j = (i + 1) & mask;
        while self.entries[j].len != 0 {
            let home = mix(self.entries[j].key) as usize & mask;
            // The entry at j may fill the hole if the hole lies on its probe path home..=j.
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.entries.swap(hole, j);
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.entries[hole].len = 0;
        self.len -= 1;
    }

    fn grow(&mut self) {
        self.rehash(self.entries.len() * 2);
    }

    /// Re-place every non-empty entry into a fresh array of `cap` entries.
    fn rehash(&mut self, cap: usize) {
        let old = std::mem::replace(&mut self.entries, empty_entries(cap));
        self.mask = cap - 1;
        self.len = 0;
        let mut old = old;
        for slot in old.iter_mut() {
            if slot.len == 0 {
                continue;
            }
            let e = std::mem::replace(slot, Entry::empty());
            let mut i = mix(e.key) as usize & self.mask;
            while self.entries[i].len != 0 {
                i = (i + 1) & self.mask;
            }
            self.entries[i] = e;
            self.len += 1;
        }
    }
}

/// Where `mixed`'s home entry would be in a table with this layout. Only for prefetching: the
/// layout may be stale (the table grew since), and a prefetch of a stale address is harmless.
#[inline]
pub fn entry_addr(base: *const Entry, mask: usize, mixed: u64) -> *const Entry {
    base.wrapping_add(mixed as usize & mask)
}

/// Hint the CPU to bring `addr`'s cache line in. Never dereferences `addr`.
#[inline(always)]
pub fn prefetch(addr: *const Entry) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn entry_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Entry>(), 64);
    }

    /// Random adds and removes (many holders per key to exercise spilling, and colliding
    /// homes to exercise backward-shift deletion) agree with a BTreeMap reference.
    #[test]
    fn matches_reference_under_churn() {
        let mut t = Table::default();
        let mut reference: BTreeMap<u64, BTreeSet<HolderId>> = BTreeMap::new();
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for step in 0..200_000u64 {
            let r = next();
            let key = r % 3_000;
            let holder = ((r >> 20) % 24) as HolderId;
            if (r >> 40) % 3 != 0 {
                let a = t.add_holder(key, mix(key), holder, step, step);
                let set = reference.entry(key).or_default();
                assert_eq!(a.created, set.is_empty());
                assert_eq!(a.claimed, set.insert(holder));
            } else {
                let rm = t.remove_holder(key, mix(key), holder);
                let was = reference.get_mut(&key).is_some_and(|s| s.remove(&holder));
                assert_eq!(rm.unclaimed, was);
                let now_empty = reference.get(&key).is_some_and(BTreeSet::is_empty);
                assert_eq!(rm.emptied, now_empty);
                if now_empty {
                    reference.remove(&key);
                }
            }
            if step % 20_000 == 0 {
                let (u, e) = t.remove_holder_everywhere(3);
                let mut unclaimed = 0;
                for set in reference.values_mut() {
                    unclaimed += u64::from(set.remove(&3));
                }
                let before = reference.len();
                reference.retain(|_, s| !s.is_empty());
                assert_eq!((u, e), (unclaimed, before - reference.len()));
            }
        }
        assert_eq!(t.len(), reference.len());
        for (key, set) in &reference {
            let e = t.get(*key, mix(*key)).expect("indexed");
            let want: Vec<HolderId> = set.iter().copied().collect();
            assert_eq!(t.holders(e), want.as_slice());
        }
        for key in 3_000..3_100u64 {
            assert!(t.get(key, mix(key)).is_none());
        }
    }
}
