//! The encoder's embedding cache: an image's content hash to its embeddings, least recently
//! used first out, bounded in bytes. The same picture sent again (however it was encoded:
//! the hash is over its pixels) skips the vision tower.

use crate::protocol::ImageHash;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// What the cache did, for `/metrics` and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheCounts {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Entries and bytes held now.
    pub entries: usize,
    pub bytes: usize,
}

/// A bounded LRU of embeddings. Pure: no clock, no locks (its owner holds it behind one).
#[derive(Debug)]
pub struct EmbeddingCache {
    capacity_bytes: usize,
    /// hash -> (embeddings, last use tick)
    entries: HashMap<ImageHash, (Arc<Vec<f32>>, u64)>,
    /// last use tick -> hash (the oldest first)
    by_use: BTreeMap<u64, ImageHash>,
    tick: u64,
    counts: CacheCounts,
}

impl EmbeddingCache {
    /// A cache holding at most `capacity_bytes` of embeddings (0 disables it).
    pub fn new(capacity_bytes: usize) -> EmbeddingCache {
        EmbeddingCache {
            capacity_bytes,
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
            tick: 0,
            counts: CacheCounts::default(),
        }
    }

    fn bytes_of(rows: &[f32]) -> usize {
        std::mem::size_of_val(rows)
    }

    /// The embeddings of `hash`, if held (a hit makes it the most recently used).
    pub fn get(&mut self, hash: ImageHash) -> Option<Arc<Vec<f32>>> {
        self.tick += 1;
        let tick = self.tick;
        match self.entries.get_mut(&hash) {
            Some((rows, used)) => {
                self.by_use.remove(used);
                *used = tick;
                self.by_use.insert(tick, hash);
                self.counts.hits += 1;
                Some(rows.clone())
            }
            None => {
                self.counts.misses += 1;
                None
            }
        }
    }

    /// Keeps `rows` for `hash`, evicting the least recently used until it fits. Embeddings
    /// larger than the whole cache are not kept.
    pub fn insert(&mut self, hash: ImageHash, rows: Arc<Vec<f32>>) {
        let size = Self::bytes_of(&rows);
        if size > self.capacity_bytes {
            return;
        }
        if let Some((old, used)) = self.entries.remove(&hash) {
            self.by_use.remove(&used);
            self.counts.bytes -= Self::bytes_of(&old);
        }
        while self.counts.bytes + size > self.capacity_bytes {
            let Some((&used, &victim)) = self.by_use.iter().next() else {
                break;
            };
            self.by_use.remove(&used);
            if let Some((old, _)) = self.entries.remove(&victim) {
                self.counts.bytes -= Self::bytes_of(&old);
                self.counts.evictions += 1;
            }
        }
        self.tick += 1;
        self.by_use.insert(self.tick, hash);
        self.entries.insert(hash, (rows, self.tick));
        self.counts.bytes += size;
    }

    pub fn counts(&self) -> CacheCounts {
        CacheCounts {
            entries: self.entries.len(),
            ..self.counts
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> Arc<Vec<f32>> {
        Arc::new(vec![0.5; n])
    }

    #[test]
    fn least_recently_used_goes_first_and_bytes_stay_bounded() {
        // Room for three entries of 4 floats (16 bytes each).
        let mut c = EmbeddingCache::new(48);
        for h in 1..=3 {
            c.insert(ImageHash(h), rows(4));
        }
        assert!(c.get(ImageHash(1)).is_some()); // 1 is now the newest
        c.insert(ImageHash(4), rows(4)); // evicts 2, the oldest
        assert!(c.get(ImageHash(2)).is_none());
        assert!(c.get(ImageHash(1)).is_some());
        assert!(c.get(ImageHash(3)).is_some());
        let n = c.counts();
        assert_eq!((n.entries, n.bytes, n.evictions), (3, 48, 1));
        assert_eq!((n.hits, n.misses), (3, 1));
        // Too large for the whole cache: not kept, nothing evicted.
        c.insert(ImageHash(9), rows(100));
        assert!(c.get(ImageHash(9)).is_none());
        assert_eq!(c.counts().entries, 3);
        // Replacing an entry does not count its old bytes twice.
        c.insert(ImageHash(3), rows(4));
        assert_eq!(c.counts().bytes, 48);
    }
}
