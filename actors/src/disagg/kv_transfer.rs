//! A request's KV blocks from one executor to another over the transfer plane.
//!
//! `Backend::export_blocks` writes blocks whole, one after another (per block: every layer's
//! K then V). The transfer plane instead carries **one chunk per layer** (that layer's K and
//! V of every block, in block order), so a decode worker receives layer 0 complete first
//! and can start placing it while later layers are still on the wire (and a backend with a
//! per-layer import can start the device copy then). [`KvChunkLayout`] converts between the
//! two orders and is what both sides agree on: the prefill side sends it with the
//! descriptor, the decode side checks it against its own pool's shape before importing.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use turbine_kernels::backend::KvLayout;
use turbine_runtime::transfer::{ByteRange, Descriptor, TransferError, TransferPlane};

use crate::executor::{ExecError, Executor};
use crate::worker::BlockId;

/// The shape of a request's exported KV, cut into layer chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvChunkLayout {
    /// Tokens per block.
    pub block_size: u32,
    pub n_layers: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    /// Bytes per K or V element.
    pub dtype_bytes: u32,
    /// Blocks carried.
    pub blocks: u32,
}

/// Why a KV export or import failed. The decode side answers any of them by prefilling
/// locally.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KvTransferError {
    #[error("executor: {0}")]
    Exec(String),
    #[error("transfer: {0}")]
    Transfer(#[from] TransferError),
    #[error("the KV pools differ in shape: {ours:?} here, {theirs:?} from the prefill side")]
    ShapeMismatch {
        ours: KvChunkLayout,
        theirs: KvChunkLayout,
    },
    #[error("{got} blocks allocated for {expected} transferred blocks")]
    BlockCount { expected: u32, got: u32 },
}

impl From<ExecError> for KvTransferError {
    fn from(e: ExecError) -> Self {
        KvTransferError::Exec(e.to_string())
    }
}

impl KvChunkLayout {
    /// `blocks` blocks of a pool shaped like `layout`.
    pub fn new(layout: &KvLayout, blocks: usize) -> Self {
        KvChunkLayout {
            block_size: layout.block_size as u32,
            n_layers: layout.n_layers as u32,
            n_kv_heads: layout.n_kv_heads as u32,
            head_dim: layout.head_dim as u32,
            dtype_bytes: layout.dtype.size_bytes() as u32,
            blocks: blocks as u32,
        }
    }

    /// Bytes of one layer of one block: its K then its V.
    pub fn layer_block_bytes(&self) -> usize {
        2 * self.block_size as usize
            * self.n_kv_heads as usize
            * self.head_dim as usize
            * self.dtype_bytes as usize
    }

    /// Bytes of one whole block (every layer), as `export_blocks` writes it.
    pub fn block_bytes(&self) -> usize {
        self.layer_block_bytes() * self.n_layers as usize
    }

    /// Bytes of one layer chunk.
    pub fn chunk_bytes(&self) -> usize {
        self.layer_block_bytes() * self.blocks as usize
    }

    /// Bytes transferred in all.
    pub fn total_bytes(&self) -> usize {
        self.block_bytes() * self.blocks as usize
    }

    /// Same shape apart from the block count.
    fn same_shape(&self, other: &KvChunkLayout) -> bool {
        KvChunkLayout {
            blocks: other.blocks,
            ..*self
        } == *other
    }

    /// Cuts `export_blocks` output (block-major) into one chunk per layer.
    pub fn to_layer_chunks(&self, block_major: &[u8]) -> Result<Vec<Bytes>, TransferError> {
        if block_major.len() != self.total_bytes() {
            return Err(TransferError::SizeMismatch {
                expected: self.total_bytes() as u64,
                got: block_major.len() as u64,
            });
        }
        let (per, block) = (self.layer_block_bytes(), self.block_bytes());
        Ok((0..self.n_layers as usize)
            .map(|layer| {
                let mut chunk = Vec::with_capacity(self.chunk_bytes());
                for b in 0..self.blocks as usize {
                    let at = b * block + layer * per;
                    chunk.extend_from_slice(&block_major[at..at + per]);
                }
                Bytes::from(chunk)
            })
            .collect())
    }

    /// Places layer `layer`'s chunk into a block-major buffer of [`Self::total_bytes`].
    pub fn place_layer(
        &self,
        layer: usize,
        chunk: &[u8],
        block_major: &mut [u8],
    ) -> Result<(), TransferError> {
        if chunk.len() != self.chunk_bytes()
            || layer >= self.n_layers as usize
            || block_major.len() != self.total_bytes()
        {
            return Err(TransferError::SizeMismatch {
                expected: self.chunk_bytes() as u64,
                got: chunk.len() as u64,
            });
        }
        let (per, block) = (self.layer_block_bytes(), self.block_bytes());
        for (b, part) in chunk.chunks_exact(per).enumerate() {
            let at = b * block + layer * per;
            block_major[at..at + per].copy_from_slice(part);
        }
        Ok(())
    }
}

/// What a prefill worker hands the decode worker for one request's KV.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvExport {
    pub descriptor: Descriptor,
    pub layout: KvChunkLayout,
}

/// Copies `blocks` out of `exec`'s pool and pins them on `plane`, one chunk per layer. The
/// caller may free the blocks in its own pool once this returns: the plane holds a copy.
pub async fn export_blocks(
    exec: &Executor,
    plane: &TransferPlane,
    blocks: &[BlockId],
) -> Result<KvExport, KvTransferError> {
    let layout = KvChunkLayout::new(&exec.kv_layout().await?, blocks.len());
    let ids: Vec<u32> = blocks.iter().map(|b| b.0).collect();
    let data = exec.export_blocks(ids).await?;
    let chunks = layout.to_layer_chunks(&data)?;
    Ok(KvExport {
        descriptor: plane.register(chunks),
        layout,
    })
}

/// Pulls `export` over `plane` into `blocks` of `exec`'s pool, layer by layer as the
/// chunks arrive, then imports them in one executor job. The first `skip` transferred
/// blocks are not pulled at all (the decode worker caches them: `RemoteKvAdmission`'s
/// `cached_blocks`); the rest go into `blocks`, in order. Returns the bytes pulled. On error
/// the blocks hold garbage: the caller frees them (and prefills locally).
pub async fn import_blocks(
    exec: &Executor,
    plane: &TransferPlane,
    export: &KvExport,
    skip: usize,
    blocks: &[BlockId],
) -> Result<u64, KvTransferError> {
    let theirs = export.layout;
    let ours = KvChunkLayout::new(&exec.kv_layout().await?, blocks.len());
    if !ours.same_shape(&theirs) {
        return Err(KvTransferError::ShapeMismatch { ours, theirs });
    }
    if skip.checked_add(blocks.len()) != Some(theirs.blocks as usize) {
        return Err(KvTransferError::BlockCount {
            expected: theirs.blocks,
            got: (skip + blocks.len()) as u32,
        });
    }
    let expected_chunks = vec![theirs.chunk_bytes() as u64; theirs.n_layers as usize];
    if export.descriptor.layout.chunks != expected_chunks {
        return Err(TransferError::SizeMismatch {
            expected: theirs.total_bytes() as u64,
            got: export.descriptor.layout.total_bytes(),
        }
        .into());
    }
    // The tail of every layer chunk: blocks `skip..` of that layer. An empty pull still
    // tells the owner it may unpin.
    let tail = KvChunkLayout {
        blocks: blocks.len() as u32,
        ..theirs
    };
    let ranges = if tail.blocks == 0 {
        Vec::new()
    } else {
        (0..theirs.n_layers as u64)
            .map(|layer| ByteRange {
                start: layer * theirs.chunk_bytes() as u64
                    + (skip * theirs.layer_block_bytes()) as u64,
                len: tail.chunk_bytes() as u64,
            })
            .collect()
    };
    let descriptor = export.descriptor.clone().with_ranges(ranges);
    let mut block_major = vec![0u8; tail.total_bytes()];
    let mut pull = plane.pull(&descriptor);
    let mut layers = 0usize;
    while let Some(chunk) = pull.next_chunk().await {
        let (layer, bytes) = chunk?;
        tail.place_layer(layer as usize, &bytes, &mut block_major)?;
        layers += 1;
    }
    if tail.blocks == 0 {
        return Ok(0);
    }
    if layers != tail.n_layers as usize {
        return Err(TransferError::SizeMismatch {
            expected: tail.total_bytes() as u64,
            got: (layers * tail.chunk_bytes()) as u64,
        }
        .into());
    }
    let ids: Vec<u32> = blocks.iter().map(|b| b.0).collect();
    exec.import_blocks(ids, block_major).await?;
    Ok(tail.total_bytes() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(blocks: u32) -> KvChunkLayout {
        KvChunkLayout {
            block_size: 2,
            n_layers: 3,
            n_kv_heads: 1,
            head_dim: 2,
            dtype_bytes: 1,
            blocks,
        }
    }

    #[test]
    fn layer_chunks_round_trip_to_block_major() {
        let l = layout(4);
        let data: Vec<u8> = (0..l.total_bytes()).map(|i| i as u8).collect();
        let chunks = l.to_layer_chunks(&data).unwrap();
        assert_eq!(chunks.len(), 3);
        // Layer 1 of block 0 starts right after layer 0 of block 0.
        assert_eq!(chunks[1][0] as usize, l.layer_block_bytes());
        let mut back = vec![0u8; l.total_bytes()];
        for (i, c) in chunks.iter().enumerate().rev() {
            l.place_layer(i, c, &mut back).unwrap();
        }
        assert_eq!(back, data);
    }

    #[test]
    fn wrong_sizes_are_refused() {
        let l = layout(2);
        assert!(l.to_layer_chunks(&[0; 3]).is_err());
        let mut out = vec![0u8; l.total_bytes()];
        assert!(l.place_layer(0, &[0; 3], &mut out).is_err());
        assert!(l
            .place_layer(7, &vec![0; l.chunk_bytes()], &mut out)
            .is_err());
        assert!(layout(1).same_shape(&layout(9)));
        let other = KvChunkLayout {
            head_dim: 4,
            ..layout(1)
        };
        assert!(!layout(1).same_shape(&other));
    }
}
