//! KV blocks as the transfer plane carries them: **one chunk per layer**.
//!
//! [`Backend::export_blocks`](crate::backend::Backend::export_blocks) writes blocks whole,
//! one after another (per block: every layer's K then V). A disaggregated prefill worker
//! instead ships one chunk per layer (that layer's K then V of every block, in block order),
//! so the decode worker receives layer 0 complete first and can place it while later layers
//! are still on the wire, and a GPU backend can copy a layer's blocks with one DMA. This
//! module converts between the two orders for backends that have only the block-major path
//! (the defaults of [`Backend::export_layer_chunks`](crate::backend::Backend::export_layer_chunks)
//! and [`Backend::import_layer_chunks`](crate::backend::Backend::import_layer_chunks)); the
//! CUDA backend writes and reads the chunks directly.

use bytes::Bytes;

use crate::backend::{BackendError, KvLayout};

/// Bytes of one layer of one block: its K then its V.
pub fn layer_block_bytes(layout: &KvLayout) -> usize {
    2 * layout.elems_per_layer_block() * layout.dtype.size_bytes()
}

/// Bytes of one layer chunk of `blocks` blocks.
pub fn chunk_bytes(layout: &KvLayout, blocks: usize) -> usize {
    layer_block_bytes(layout) * blocks
}

/// Cuts block-major data of `blocks` blocks (as `export_blocks` writes it) into one chunk
/// per layer.
pub fn to_layer_chunks(
    layout: &KvLayout,
    blocks: usize,
    block_major: &[u8],
) -> Result<Vec<Bytes>, BackendError> {
    let expected = layout.bytes_per_block() * blocks;
    if block_major.len() != expected {
        return Err(BackendError::KvDataSize {
            got: block_major.len(),
            expected,
        });
    }
    let (per, block) = (layer_block_bytes(layout), layout.bytes_per_block());
    Ok((0..layout.n_layers)
        .map(|layer| {
            let mut chunk = Vec::with_capacity(per * blocks);
            for b in 0..blocks {
                let at = b * block + layer * per;
                chunk.extend_from_slice(&block_major[at..at + per]);
            }
            Bytes::from(chunk)
        })
        .collect())
}

/// Joins one chunk per layer (each of `blocks` blocks) back into block-major data, as
/// `import_blocks` reads it.
pub fn to_block_major(
    layout: &KvLayout,
    blocks: usize,
    chunks: &[Bytes],
) -> Result<Vec<u8>, BackendError> {
    check_chunks(layout, blocks, chunks)?;
    let (per, block) = (layer_block_bytes(layout), layout.bytes_per_block());
    let mut out = vec![0u8; block * blocks];
    for (layer, chunk) in chunks.iter().enumerate() {
        for b in 0..blocks {
            let at = b * block + layer * per;
            out[at..at + per].copy_from_slice(&chunk[b * per..(b + 1) * per]);
        }
    }
    Ok(out)
}

/// One chunk per layer, each exactly [`chunk_bytes`] long.
pub fn check_chunks(
    layout: &KvLayout,
    blocks: usize,
    chunks: &[Bytes],
) -> Result<(), BackendError> {
    let want = chunk_bytes(layout, blocks);
    let got: usize = chunks.iter().map(Bytes::len).sum();
    if chunks.len() != layout.n_layers || chunks.iter().any(|c| c.len() != want) {
        return Err(BackendError::KvDataSize {
            got,
            expected: want * layout.n_layers,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::KvDType;

    fn layout() -> KvLayout {
        KvLayout {
            block_size: 2,
            num_blocks: 8,
            n_layers: 3,
            n_kv_heads: 1,
            head_dim: 2,
            dtype: KvDType::F16,
        }
    }

    #[test]
    fn layer_chunks_round_trip_to_block_major() {
        let l = layout();
        let data: Vec<u8> = (0..l.bytes_per_block() * 4).map(|i| i as u8).collect();
        let chunks = to_layer_chunks(&l, 4, &data).unwrap();
        assert_eq!(chunks.len(), 3);
        // Layer 1 of block 0 starts right after layer 0 of block 0.
        assert_eq!(chunks[1][0] as usize, layer_block_bytes(&l));
        assert_eq!(to_block_major(&l, 4, &chunks).unwrap(), data);
    }

    #[test]
    fn wrong_sizes_are_refused() {
        let l = layout();
        assert!(to_layer_chunks(&l, 2, &[0; 3]).is_err());
        let short = vec![Bytes::from(vec![0u8; 3]); 3];
        assert!(to_block_major(&l, 2, &short).is_err());
        let two = vec![Bytes::from(vec![0u8; chunk_bytes(&l, 2)]); 2];
        assert!(to_block_major(&l, 2, &two).is_err());
    }
}
