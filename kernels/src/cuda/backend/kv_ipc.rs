//! KV blocks from another process's pool on this host, device to device (the CUDA shell of
//! [`crate::kv_ipc`]): the pool is one `cuMemAlloc` allocation, so it has an IPC handle
//! ([`CudaBackend::kv_ipc_offer`] offers it); a consumer backend in another process decides
//! with [`crate::kv_ipc::choose_kv_path`] whether it can map it, maps it once per peer
//! (cached until [`CudaBackend::forget_ipc_peer`] or the backend goes), and copies the
//! named blocks with one `copy_segments` kernel on its copy stream
//! (`Backend::pull_blocks_ipc`). Whatever rules the device copy out (the pure
//! decision's reasons, or the driver refusing the handle) comes back as a
//! [`HostReason`]: the caller takes the host path.
//!
//! Ordering across the two processes: the owner's writes to the blocks are complete when
//! it offers them (every backend call ends synchronised), and the owner keeps them until
//! the consumer says it is done; a pull returns only once its copy is over.

use std::collections::BTreeMap;

use super::CudaBackend;
use crate::backend::BackendError;
use crate::cuda::device::{DBuf, IpcMapping};
use crate::kv_ipc::{
    choose_kv_path, ipc_copy_pairs, ConsumerPlace, HostReason, IpcPoolShape, IpcPull, KvIpcPool,
    KvPath, ProcessPlace,
};

/// Most peer pools kept mapped; the oldest mapping goes first beyond it.
const MAX_PEERS: usize = 64;

/// A peer pool's key: its process and its handle (a peer that re-made its pool offers a
/// new one).
type PeerKey = (String, u32, Vec<u8>);

/// Peer pools mapped into this backend's context, by process and handle.
#[derive(Default)]
pub(crate) struct IpcPeers {
    open: BTreeMap<PeerKey, (u64, IpcMapping)>,
    /// Mappings made, for eviction order.
    made: u64,
}

impl CudaBackend {
    /// What another process on this host needs to copy blocks out of this pool: its IPC
    /// handle, where it lives and its shape. Cheap; the handle is the same for the pool's
    /// life.
    pub fn kv_ipc_offer(&self) -> Result<KvIpcPool, BackendError> {
        let base = self.kv_alloc.ptr();
        let offset = |b: &DBuf| b.ptr() - base;
        Ok(KvIpcPool {
            place: ProcessPlace::here(),
            device_uuid: self.gpu.device_uuid()?,
            handle: self.kv_alloc.ipc_handle()?.to_vec(),
            bytes: self.kv_alloc.len() as u64,
            base,
            shape: IpcPoolShape::of(&self.layout),
            k: self.kcache.iter().map(offset).collect(),
            v: self.vcache.iter().map(offset).collect(),
        })
    }

    /// This process and device, as [`choose_kv_path`] needs them for `offer`.
    pub fn kv_consumer_place(
        &self,
        offer: Option<&KvIpcPool>,
    ) -> Result<ConsumerPlace, BackendError> {
        let peer_access = match offer {
            Some(o) => self.gpu.peer_access(&o.device_uuid)?,
            None => None,
        };
        Ok(ConsumerPlace {
            place: ProcessPlace::here(),
            device_uuid: self.gpu.device_uuid()?,
            peer_access,
        })
    }

    /// The path a pull of `offer`'s blocks takes into this backend.
    pub fn kv_path(&self, offer: Option<&KvIpcPool>) -> Result<KvPath, BackendError> {
        let here = self.kv_consumer_place(offer)?;
        Ok(choose_kv_path(&here, &self.layout, offer))
    }

    /// Copies blocks `src_ids` of the peer pool `offer` into this pool's `dst_ids`, device
    /// to device on this backend's copy stream, mapping the pool first if this backend has
    /// not yet (kept for later pulls; an offer of this process needs no mapping). The owner's blocks must be written and held until
    /// this returns. [`IpcPull::Host`] when the device copy is ruled out (nothing was
    /// copied); an error for bad block ids or a failed copy.
    pub(super) fn pull_ipc(
        &mut self,
        offer: &KvIpcPool,
        src_ids: &[u32],
        dst_ids: &[u32],
    ) -> Result<IpcPull, BackendError> {
        let base = match self.kv_path(Some(offer))? {
            KvPath::Host(reason) => return Ok(IpcPull::Host(reason)),
            // Two backends of this process on one device share its primary context: the
            // owner's addresses are valid here.
            KvPath::DeviceLocal => offer.base,
            KvPath::DeviceIpc => match self.ipc_mapping(offer) {
                Ok(base) => base,
                Err(reason) => return Ok(IpcPull::Host(reason)),
            },
        };
        let pairs = ipc_copy_pairs(
            offer,
            base,
            src_ids,
            &self.kcache.iter().map(DBuf::ptr).collect::<Vec<_>>(),
            &self.vcache.iter().map(DBuf::ptr).collect::<Vec<_>>(),
            self.layout.num_blocks,
            dst_ids,
        )
        .map_err(BackendError::BadConfig)?;
        let seg = offer.shape.segment_bytes() as usize;
        Ok(IpcPull::Copied(self.copy_pairs(&pairs, seg)?))
    }

    /// The base address of `offer`'s pool in this context, mapping it now if needed.
    fn ipc_mapping(&mut self, offer: &KvIpcPool) -> Result<u64, HostReason> {
        let key = (
            offer.place.host.clone(),
            offer.place.pid,
            offer.handle.clone(),
        );
        if let Some((_, m)) = self.ipc_peers.open.get(&key) {
            return Ok(m.ptr());
        }
        let mapping = IpcMapping::open(&self.gpu, &offer.handle)
            .map_err(|e| HostReason::OpenFailed(e.to_string()))?;
        let peers = &mut self.ipc_peers;
        if peers.open.len() >= MAX_PEERS {
            let oldest = peers
                .open
                .iter()
                .min_by_key(|(_, (made, _))| *made)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                // Every copy from it is over (each pull waits for its copy).
                peers.open.remove(&k);
            }
        }
        let base = mapping.ptr();
        peers.made += 1;
        peers.open.insert(key, (peers.made, mapping));
        Ok(base)
    }

    /// Unmaps every pool of the process at `place` (it went away, or will offer no more);
    /// returns how many. A later pull maps afresh.
    pub fn forget_ipc_peer(&mut self, place: &ProcessPlace) -> usize {
        let before = self.ipc_peers.open.len();
        self.ipc_peers
            .open
            .retain(|(host, pid, _), _| !(host == &place.host && *pid == place.pid));
        before - self.ipc_peers.open.len()
    }

    /// Peer pools mapped now.
    pub fn ipc_peers_open(&self) -> usize {
        self.ipc_peers.open.len()
    }
}
