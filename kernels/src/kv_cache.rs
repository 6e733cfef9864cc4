//! The CPU backend's paged KV pool, stored as f16.
//!
//! WHY f16: llama.cpp keeps an f16 cache, and matching its rounding keeps greedy decoding
//! token-for-token equal to it. Storing f16 (not f32 holding f16 values, as this pool once
//! did) halves what a decode step streams from memory at long contexts, where the cache
//! outgrows the CPU caches; the attention kernels widen rows with F16C. The export format
//! stays f32 ([`KvDType::F32`]): exports widen exactly, imports round to f16 (exact for
//! values that came from an f16 pool).
//!
//! Layout: for each layer, K and V are each `[block][slot][kv_head][head_dim]`, so one
//! block's K for one layer is contiguous, which is also the export layout
//! ([`KvLayout::bytes_per_block`]).
//!
//! WHY committed up front: a zeroed `Vec` is only reserved address space; its pages become
//! resident the first time a block is written. With the prefix cache keeping released blocks
//! for reuse, serving slowly writes every block of the pool, so a lazily committed pool made
//! the process's memory creep up under load (hundreds of MB per round of distinct prompts)
//! and never come back, although nothing leaked. Touching every page at start makes the pool
//! what it is: a fixed, bounded allocation, visible in the RSS from the first second.

use crate::backend::{BackendError, KvDType, KvLayout};
use half::f16;

pub struct PagedKvPool {
    layout: KvLayout,
    /// Per layer: `num_blocks * block_size * n_kv_heads * head_dim` f16 values (bits).
    k: Vec<Vec<u16>>,
    v: Vec<Vec<u16>>,
}

impl PagedKvPool {
    /// Allocates a zeroed pool (`layout.dtype` is forced to F32).
    pub fn new(layout: KvLayout) -> PagedKvPool {
        let layout = KvLayout {
            dtype: KvDType::F32,
            ..layout
        };
        let per_layer = layout.num_blocks * layout.elems_per_layer_block();
        let committed = || {
            let mut values = vec![0u16; per_layer];
            commit_pages(&mut values);
            values
        };
        PagedKvPool {
            layout,
            k: (0..layout.n_layers).map(|_| committed()).collect(),
            v: (0..layout.n_layers).map(|_| committed()).collect(),
        }
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    fn row_width(&self) -> usize {
        self.layout.n_kv_heads * self.layout.head_dim
    }

    /// Checks a block id against the pool size.
    pub fn check_block(&self, block: u32) -> Result<(), BackendError> {
        if (block as usize) < self.layout.num_blocks {
            Ok(())
        } else {
            Err(BackendError::BadBlockId {
                block,
                num_blocks: self.layout.num_blocks,
            })
        }
    }

    fn offset(&self, block: u32, slot: usize) -> usize {
        (block as usize * self.layout.block_size + slot) * self.row_width()
    }

    /// K and V of every KV head at (`block`, `slot`) of `layer`, widened to f32; empty when
    /// out of range (callers validate block ids first).
    pub fn kv_at(&self, layer: usize, block: u32, slot: usize) -> (Vec<f32>, Vec<f32>) {
        let o = self.offset(block, slot);
        let w = self.row_width();
        let widen = |x: Option<&Vec<u16>>| -> Vec<f32> {
            x.and_then(|x| x.get(o..o + w))
                .unwrap_or(&[])
                .iter()
                .map(|&b| f16::from_bits(b).to_f32())
                .collect()
        };
        (widen(self.k.get(layer)), widen(self.v.get(layer)))
    }

    /// K and V of one whole block of `layer` (`[slot][kv_head][head_dim]` each, f16 bits);
    /// empty when out of range (callers validate block ids first).
    pub fn block(&self, layer: usize, block: u32) -> (&[u16], &[u16]) {
        let r = self.block_range(block);
        let k = self
            .k
            .get(layer)
            .and_then(|k| k.get(r.clone()))
            .unwrap_or(&[]);
        let v = self.v.get(layer).and_then(|v| v.get(r)).unwrap_or(&[]);
        (k, v)
    }

    /// Writes one token's K and V rows (`n_kv_heads * head_dim` each), rounded to f16.
    pub fn write(&mut self, layer: usize, block: u32, slot: usize, k: &[f32], v: &[f32]) {
        let o = self.offset(block, slot);
        let w = self.row_width();
        for (rows, src) in [(self.k.get_mut(layer), k), (self.v.get_mut(layer), v)] {
            if let Some(dst) = rows.and_then(|x| x.get_mut(o..o + w)) {
                for (d, &x) in dst.iter_mut().zip(src) {
                    *d = f16::from_f32(x).to_bits();
                }
            }
        }
    }

    fn block_range(&self, block: u32) -> std::ops::Range<usize> {
        let n = self.layout.elems_per_layer_block();
        block as usize * n..(block as usize + 1) * n
    }

    pub fn copy_blocks(&mut self, src_dst: &[(u32, u32)]) -> Result<(), BackendError> {
        for &(s, d) in src_dst {
            self.check_block(s)?;
            self.check_block(d)?;
        }
        for &(s, d) in src_dst {
            let (rs, rd) = (self.block_range(s), self.block_range(d));
            for layer in self.k.iter_mut().chain(self.v.iter_mut()) {
                layer.copy_within(rs.clone(), rd.start);
            }
        }
        Ok(())
    }

    pub fn export_blocks(&self, ids: &[u32]) -> Result<Vec<u8>, BackendError> {
        for &b in ids {
            self.check_block(b)?;
        }
        let mut out = Vec::with_capacity(ids.len() * self.layout.bytes_per_block());
        for &b in ids {
            let r = self.block_range(b);
            for (k, v) in self.k.iter().zip(&self.v) {
                for &x in k[r.clone()].iter().chain(&v[r.clone()]) {
                    out.extend_from_slice(&f16::from_bits(x).to_f32().to_le_bytes());
                }
            }
        }
        Ok(out)
    }

    pub fn import_blocks(&mut self, ids: &[u32], data: &[u8]) -> Result<(), BackendError> {
        for &b in ids {
            self.check_block(b)?;
        }
        let per_block = self.layout.bytes_per_block();
        let expected = ids.len() * per_block;
        if data.len() != expected {
            return Err(BackendError::KvDataSize {
                got: data.len(),
                expected,
            });
        }
        let per_part = self.layout.elems_per_layer_block() * 4;
        for (&b, bytes) in ids.iter().zip(data.chunks_exact(per_block)) {
            let r = self.block_range(b);
            let mut parts = bytes.chunks_exact(per_part);
            for (k, v) in self.k.iter_mut().zip(self.v.iter_mut()) {
                for dst in [&mut k[r.clone()], &mut v[r.clone()]] {
                    if let Some(src) = parts.next() {
                        for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                            *d = f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                                .to_bits();
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Writes one value per page so the kernel backs the whole buffer now (see the module doc).
/// Volatile, because a plain store of zero into freshly zeroed memory may be optimised away.
fn commit_pages(values: &mut [u16]) {
    const PER_PAGE: usize = 4096 / std::mem::size_of::<u16>();
    for page in values.chunks_mut(PER_PAGE) {
        // SAFETY: `page` is a non-empty, exclusively borrowed, initialised slice; writing a
        // valid u16 to its first element is always sound.
        unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> PagedKvPool {
        PagedKvPool::new(KvLayout {
            block_size: 2,
            num_blocks: 3,
            n_layers: 2,
            n_kv_heads: 1,
            head_dim: 2,
            dtype: KvDType::F32,
        })
    }

    /// Resident memory of this process, from /proc (Linux only).
    #[cfg(target_os = "linux")]
    fn rss_bytes() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_pool_is_resident_from_the_start() {
        let layout = KvLayout {
            block_size: 16,
            num_blocks: 512,
            n_layers: 4,
            n_kv_heads: 4,
            head_dim: 64,
            dtype: KvDType::F32,
        };
        // 2 (K, V) x 4 layers x 512 blocks x 16 slots x 256 values x 2 bytes = 32 MiB.
        let bytes = 2 * 4 * 512 * 16 * 256 * 2;
        let before = rss_bytes();
        let pool = PagedKvPool::new(layout);
        let grown = rss_bytes().saturating_sub(before);
        assert!(
            grown >= bytes * 9 / 10,
            "only {grown} of {bytes} bytes became resident"
        );
        drop(pool);
    }

    #[test]
    fn export_import_copy_round_trip() {
        let mut p = pool();
        p.write(1, 2, 1, &[1.0, 2.0], &[3.0, 4.0]);
        let bytes = p.export_blocks(&[2]).unwrap();
        assert_eq!(bytes.len(), p.layout().bytes_per_block());
        let mut q = pool();
        q.import_blocks(&[0], &bytes).unwrap();
        assert_eq!(q.kv_at(1, 0, 1), (vec![1.0, 2.0], vec![3.0, 4.0]));
        q.copy_blocks(&[(0, 1)]).unwrap();
        assert_eq!(q.kv_at(1, 1, 1), (vec![1.0, 2.0], vec![3.0, 4.0]));
        assert_eq!(q.kv_at(0, 1, 1), (vec![0.0, 0.0], vec![0.0, 0.0]));
    }

    #[test]
    fn bad_ids_and_sizes_are_errors() {
        let mut p = pool();
        assert!(matches!(
            p.export_blocks(&[3]),
            Err(BackendError::BadBlockId { .. })
        ));
        assert!(matches!(
            p.copy_blocks(&[(0, 9)]),
            Err(BackendError::BadBlockId { .. })
        ));
        assert!(matches!(
            p.import_blocks(&[0], &[0u8; 3]),
            Err(BackendError::KvDataSize { .. })
        ));
    }
}
