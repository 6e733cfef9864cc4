//! A request's KV blocks from one executor to another over the transfer plane.
//!
//! The transfer plane carries **one chunk per layer** (that layer's K and V of every block,
//! in block order; `turbine_kernels::kv_chunks`), as the executor exports and imports them
//! (`Backend::export_layer_chunks` / `import_layer_chunks`: on a GPU, slices of page-locked
//! memory filled on the copy stream, which a pull in the same process hands to the importer
//! with no host copy). [`KvChunkLayout`] is what both sides agree on: the prefill side sends
//! it with the descriptor, the decode side checks it against its own pool's shape before
//! importing.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use turbine_kernels::backend::KvLayout;
use turbine_kernels::kv_ipc::{HostReason, IpcPull, KvIpcPool};
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
}

/// What a prefill worker hands the decode worker for one request's KV.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvExport {
    pub descriptor: Descriptor,
    pub layout: KvChunkLayout,
    /// The device path, when the prefill worker's pool can be mapped by another process on
    /// its host (CUDA IPC): its pool and the blocks' ids in it. The blocks stay held there
    /// until `descriptor` is pulled or expires, so a decode worker that copied them device
    /// to device pulls no bytes of it (a pull of nothing, which also unpins); one that
    /// cannot pulls the layer chunks as usual.
    /// Last and left out when `None`, so workers of earlier versions still read replies
    /// without a device path (MessagePack structs are arrays; extra elements are refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipc: Option<Box<KvIpcSource>>,
}

/// A prefill worker's blocks, where a process on its host can copy them device to device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvIpcSource {
    pub pool: KvIpcPool,
    /// The transferred blocks' ids in `pool`, in order.
    pub blocks: Vec<u32>,
}

/// How a decode worker's import went: bytes written into its pool, and whether they came
/// device to device (and if not, why not, when a device path was offered).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Imported {
    pub bytes: u64,
    pub device_copy: bool,
    /// Why an offered device path was not taken (`HostReason::label`).
    pub host_reason: Option<&'static str>,
}

/// The owner of an exported chunk that also keeps `guard` alive: the transfer plane drops
/// it when it unpins the buffer (pulled, discarded or expired) and the pull's slices are
/// gone.
struct Holding {
    bytes: Bytes,
    _guard: HoldGuard,
}

/// What an export keeps alive for as long as the plane pins it (see [`export_blocks`]).
pub type HoldGuard = Box<dyn std::any::Any + Send>;

impl AsRef<[u8]> for Holding {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Copies `blocks` out of `exec`'s pool and pins them on `plane`, one chunk per layer.
/// Without `hold` the caller may free the blocks once this returns: the plane holds a
/// copy. With `hold` (the executor's pool offer and a guard) the export also offers the
/// blocks for a device copy, and the caller keeps them until `hold`'s guard is dropped,
/// which happens when the plane unpins the buffer.
pub async fn export_blocks(
    exec: &Executor,
    plane: &TransferPlane,
    blocks: &[BlockId],
    hold: Option<(KvIpcPool, HoldGuard)>,
) -> Result<KvExport, KvTransferError> {
    let layout = KvChunkLayout::new(&exec.kv_layout().await?, blocks.len());
    let ids: Vec<u32> = blocks.iter().map(|b| b.0).collect();
    let mut chunks = exec.export_layer_chunks(ids.clone()).await?;
    let ipc = match hold {
        Some((pool, guard)) if !chunks.is_empty() => {
            chunks[0] = Bytes::from_owner(Holding {
                bytes: chunks[0].clone(),
                _guard: guard,
            });
            Some(Box::new(KvIpcSource { pool, blocks: ids }))
        }
        _ => None,
    };
    Ok(KvExport {
        descriptor: plane.register(chunks),
        layout,
        ipc,
    })
}

/// The device path of [`import_blocks`]: `Some` when the blocks were copied device to
/// device and the owner confirmed it held them throughout (the pull of nothing that also
/// unpins them); `None`, with the reason, when the host path must run instead.
async fn import_by_device(
    exec: &Executor,
    plane: &TransferPlane,
    export: &KvExport,
    skip: usize,
    blocks: &[BlockId],
) -> Result<Result<(), &'static str>, KvTransferError> {
    let Some(src) = &export.ipc else {
        return Ok(Err(HostReason::NoOffer.label()));
    };
    let Some(src_ids) = src.blocks.get(skip..skip + blocks.len()) else {
        return Err(KvTransferError::BlockCount {
            expected: src.blocks.len() as u32,
            got: (skip + blocks.len()) as u32,
        });
    };
    let dst: Vec<u32> = blocks.iter().map(|b| b.0).collect();
    match exec
        .pull_blocks_ipc(src.pool.clone(), src_ids.to_vec(), dst)
        .await
    {
        Ok(IpcPull::Copied(_)) => {}
        Err(e) => {
            // The owner still pins the blocks: the host path rewrites all of them.
            tracing::warn!(owner = %export.descriptor.owner, "device copy failed ({e}); KV by host memory");
            return Ok(Err("copy_failed"));
        }
        Ok(IpcPull::Host(reason)) => {
            if !matches!(reason, HostReason::NotDevice) {
                tracing::info!(owner = %export.descriptor.owner, "KV by host memory: {reason}");
            }
            return Ok(Err(reason.label()));
        }
    }
    // The owner unpins the buffer, and frees the blocks, only now: a success says they
    // were there for the whole copy.
    plane.discard(&export.descriptor).await?;
    Ok(Ok(()))
}

/// Pulls `export` over `plane` into `blocks` of `exec`'s pool: device to device when the
/// prefill worker offered it and [`turbine_kernels::kv_ipc::choose_kv_path`] allows it
/// here, else the layer chunks as they arrive, then one executor job imports them all.
/// The first `skip` transferred blocks are not pulled at all (the decode worker caches
/// them: `RemoteKvAdmission`'s `cached_blocks`); the rest go into `blocks`, in order. On
/// error the blocks hold garbage: the caller frees them (and prefills locally).
pub async fn import_blocks(
    exec: &Executor,
    plane: &TransferPlane,
    export: &KvExport,
    skip: usize,
    blocks: &[BlockId],
) -> Result<Imported, KvTransferError> {
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
    let tail_bytes = (theirs.block_bytes() * blocks.len()) as u64;
    let host_reason = if export.ipc.is_some() && !blocks.is_empty() {
        match import_by_device(exec, plane, export, skip, blocks).await? {
            Ok(()) => {
                return Ok(Imported {
                    bytes: tail_bytes,
                    device_copy: true,
                    host_reason: None,
                })
            }
            Err(reason) => Some(reason),
        }
    } else {
        None
    };
    let bytes = import_by_host(exec, plane, export, skip, blocks).await?;
    Ok(Imported {
        bytes,
        device_copy: false,
        host_reason,
    })
}

/// The host path of [`import_blocks`]: returns the bytes pulled.
async fn import_by_host(
    exec: &Executor,
    plane: &TransferPlane,
    export: &KvExport,
    skip: usize,
    blocks: &[BlockId],
) -> Result<u64, KvTransferError> {
    let theirs = export.layout;
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
    let mut chunks: Vec<Option<Bytes>> = vec![None; tail.n_layers as usize];
    let mut pull = plane.pull(&descriptor);
    while let Some(chunk) = pull.next_chunk().await {
        let (layer, bytes) = chunk?;
        let slot = chunks.get_mut(layer as usize).filter(|c| c.is_none());
        match slot {
            Some(slot) if bytes.len() == tail.chunk_bytes() => *slot = Some(bytes),
            _ => {
                return Err(TransferError::SizeMismatch {
                    expected: tail.chunk_bytes() as u64,
                    got: bytes.len() as u64,
                }
                .into())
            }
        }
    }
    if tail.blocks == 0 {
        return Ok(0);
    }
    let chunks: Vec<Bytes> = chunks.into_iter().flatten().collect();
    if chunks.len() != tail.n_layers as usize {
        return Err(TransferError::SizeMismatch {
            expected: tail.total_bytes() as u64,
            got: (chunks.len() * tail.chunk_bytes()) as u64,
        }
        .into());
    }
    let ids: Vec<u32> = blocks.iter().map(|b| b.0).collect();
    exec.import_layer_chunks(ids, chunks).await?;
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
    fn shapes_agree_apart_from_the_block_count() {
        assert_eq!(layout(4).chunk_bytes(), 4 * layout(1).layer_block_bytes());
        assert_eq!(layout(4).total_bytes(), 4 * layout(4).block_bytes());
        assert!(layout(1).same_shape(&layout(9)));
        let other = KvChunkLayout {
            head_dim: 4,
            ..layout(1)
        };
        assert!(!layout(1).same_shape(&other));
    }
}
