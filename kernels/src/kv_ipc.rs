//! KV blocks between two **processes** on one host without a host round trip: the owner's
//! KV pool is one device allocation it shares by a CUDA IPC handle, and a consumer on the
//! same host maps it once (cached per peer) and copies the blocks it is told about device
//! to device on its own copy stream.
//!
//! This module is the plain-data and pure side (no CUDA): what an owner offers
//! ([`KvIpcPool`]: the handle, where the pool lives, its shape) and which path a consumer
//! takes for it ([`choose_kv_path`]: device copy, or the host path with a [`HostReason`]).
//! The CUDA shell (`cuda::CudaBackend::kv_ipc_pool` / `pull_blocks_ipc`) only carries the
//! decision out and adds the one reason it alone can know: opening the handle failed.

use serde::{Deserialize, Serialize};

use crate::backend::KvLayout;

/// Bytes of a CUDA IPC memory handle (`CU_IPC_HANDLE_SIZE`).
pub const IPC_HANDLE_BYTES: usize = 64;

/// Where a process runs, as far as sharing device memory goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessPlace {
    /// The host: its name and the kernel's boot id (two containers of one machine have
    /// different names, and their processes may not share memory handles).
    pub host: String,
    pub pid: u32,
    /// Random per process start: pids repeat across PID namespaces (containers sharing a
    /// hostname and boot id, `hostNetwork` pods), and only this process's own offers may be
    /// read at their raw device addresses ([`KvPath::DeviceLocal`]).
    pub instance: u64,
}

impl ProcessPlace {
    /// Whether `other` is this very process (same host, pid and start).
    pub fn same_process(&self, other: &ProcessPlace) -> bool {
        self == other
    }

    /// This process (read once).
    pub fn here() -> ProcessPlace {
        static HERE: std::sync::OnceLock<ProcessPlace> = std::sync::OnceLock::new();
        HERE.get_or_init(|| {
            let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string());
            let name = read("/proc/sys/kernel/hostname")
                .or_else(|_| read("/etc/hostname"))
                .unwrap_or_default();
            let boot = read("/proc/sys/kernel/random/boot_id").unwrap_or_default();
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            h.write_u32(std::process::id());
            ProcessPlace {
                host: format!("{name}/{boot}"),
                pid: std::process::id(),
                instance: h.finish(),
            }
        })
        .clone()
    }
}

/// The shape of a shared pool (a [`KvLayout`] as plain data).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcPoolShape {
    pub block_size: u32,
    pub num_blocks: u32,
    pub n_layers: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub dtype_bytes: u32,
}

impl IpcPoolShape {
    pub fn of(layout: &KvLayout) -> IpcPoolShape {
        IpcPoolShape {
            block_size: layout.block_size as u32,
            num_blocks: layout.num_blocks as u32,
            n_layers: layout.n_layers as u32,
            n_kv_heads: layout.n_kv_heads as u32,
            head_dim: layout.head_dim as u32,
            dtype_bytes: layout.dtype.size_bytes() as u32,
        }
    }

    /// Same shape apart from the number of blocks (pools may differ in size).
    pub fn fits(&self, layout: &KvLayout) -> bool {
        IpcPoolShape {
            num_blocks: self.num_blocks,
            ..IpcPoolShape::of(layout)
        } == *self
    }

    /// Bytes of one (layer, block) K or V segment.
    pub fn segment_bytes(&self) -> u64 {
        u64::from(self.block_size)
            * u64::from(self.n_kv_heads)
            * u64::from(self.head_dim)
            * u64::from(self.dtype_bytes)
    }
}

/// What an owner offers for its KV pool: enough for a process on the same host to map the
/// pool and address any block in it. Offered once per pool (the handle never changes while
/// the pool lives); a transfer then names only block ids.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvIpcPool {
    pub place: ProcessPlace,
    /// The device's UUID (ordinals differ between processes with other visible devices).
    pub device_uuid: [u8; 16],
    /// The `CUipcMemHandle` of the one allocation that holds every layer's K and V.
    pub handle: Vec<u8>,
    /// Bytes of that allocation.
    pub bytes: u64,
    /// The allocation's device address in the owner's process (meaningful there only: a
    /// second backend of that process on the same device copies from it directly).
    #[serde(default)]
    pub base: u64,
    pub shape: IpcPoolShape,
    /// Byte offset of each layer's K and V pool inside the allocation.
    pub k: Vec<u64>,
    pub v: Vec<u64>,
}

impl KvIpcPool {
    /// Whether the offer is internally consistent: a handle of the right size, one K and
    /// one V offset per layer, every layer's pool inside the allocation. A consumer checks
    /// this before mapping anything (the offer came over the network).
    pub fn well_formed(&self) -> bool {
        let layers = self.shape.n_layers as usize;
        let span = self
            .shape
            .segment_bytes()
            .saturating_mul(u64::from(self.shape.num_blocks));
        self.handle.len() == IPC_HANDLE_BYTES
            && self.k.len() == layers
            && self.v.len() == layers
            && span > 0
            && self
                .k
                .iter()
                .chain(&self.v)
                .all(|&off| off.checked_add(span).is_some_and(|end| end <= self.bytes))
    }
}

/// What the consumer knows about itself and the offering peer's device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerPlace {
    pub place: ProcessPlace,
    pub device_uuid: [u8; 16],
    /// Whether this process's device can map memory of the peer's device: `None` when the
    /// peer's device is not visible here (the consumer's shell asks the driver).
    pub peer_access: Option<bool>,
}

/// How a consumer moves a peer's KV blocks into its pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvPath {
    /// Map the peer's pool by its IPC handle and copy device to device.
    DeviceIpc,
    /// The owner is a backend of this process on this device: copy device to device from
    /// its addresses (no mapping).
    DeviceLocal,
    /// Through host memory (the transfer plane's layer chunks), for this reason.
    Host(HostReason),
}

/// What [`Backend::pull_blocks_ipc`](crate::backend::Backend::pull_blocks_ipc) did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpcPull {
    /// The blocks were copied device to device, in this device time.
    Copied(std::time::Duration),
    /// No device copy was possible, for this reason (nothing was copied): take the host
    /// path.
    Host(HostReason),
}

/// Why the host path was taken instead of a device copy. Each is logged and counted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostReason {
    #[error("the owner offered no IPC handle")]
    NoOffer,
    #[error("this backend cannot map another process's device memory")]
    NotDevice,
    #[error("the owner's IPC offer is malformed")]
    BadOffer,
    #[error("the owner runs on another host")]
    OtherHost,
    #[error("the owner is this process, on another device")]
    SameProcess,
    #[error("the owner's GPU cannot be reached from this one (no peer access)")]
    NoPeerAccess,
    #[error("the pools differ in shape")]
    ShapeMismatch,
    #[error("opening the IPC handle failed: {0}")]
    OpenFailed(String),
}

impl HostReason {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            HostReason::NoOffer => "no_offer",
            HostReason::NotDevice => "not_device",
            HostReason::BadOffer => "bad_offer",
            HostReason::OtherHost => "other_host",
            HostReason::SameProcess => "same_process",
            HostReason::NoPeerAccess => "no_peer_access",
            HostReason::ShapeMismatch => "shape_mismatch",
            HostReason::OpenFailed(_) => "open_failed",
        }
    }
}

/// The pure decision: device copy by IPC when the offer is well formed, from another process
/// on this host, on this GPU or one this GPU has peer access to, with a pool of this
/// shape (from this process on this GPU: a device copy with no mapping); the host path
/// otherwise, with the first reason that rules the device copy out.
pub fn choose_kv_path(
    here: &ConsumerPlace,
    layout: &KvLayout,
    offer: Option<&KvIpcPool>,
) -> KvPath {
    let Some(offer) = offer else {
        return KvPath::Host(HostReason::NoOffer);
    };
    let reason = if !offer.well_formed() {
        Some(HostReason::BadOffer)
    } else if offer.place.host != here.place.host {
        Some(HostReason::OtherHost)
    } else if offer.place.same_process(&here.place) && offer.device_uuid != here.device_uuid {
        Some(HostReason::SameProcess)
    } else if offer.device_uuid != here.device_uuid && here.peer_access != Some(true) {
        Some(HostReason::NoPeerAccess)
    } else if !offer.shape.fits(layout) {
        Some(HostReason::ShapeMismatch)
    } else {
        None
    };
    match reason {
        Some(r) => KvPath::Host(r),
        None if offer.place.same_process(&here.place) => KvPath::DeviceLocal,
        None => KvPath::DeviceIpc,
    }
}

/// The (source, destination) byte addresses of every (layer, K or V, block) segment of a
/// device copy of blocks `src_ids` of a pool mapped at `src_base` (offsets `offer.k` /
/// `offer.v`) into blocks `dst_ids` of the pools at `dst_k` / `dst_v`. Ids are checked
/// against both pools' sizes first.
pub fn ipc_copy_pairs(
    offer: &KvIpcPool,
    src_base: u64,
    src_ids: &[u32],
    dst_k: &[u64],
    dst_v: &[u64],
    dst_blocks: usize,
    dst_ids: &[u32],
) -> Result<Vec<(u64, u64)>, String> {
    if src_ids.len() != dst_ids.len() {
        return Err(format!(
            "{} source blocks for {} destination blocks",
            src_ids.len(),
            dst_ids.len()
        ));
    }
    if let Some(b) = src_ids.iter().find(|&&b| b >= offer.shape.num_blocks) {
        return Err(format!(
            "source block {b} of a pool of {}",
            offer.shape.num_blocks
        ));
    }
    if let Some(b) = dst_ids.iter().find(|&&b| b as usize >= dst_blocks) {
        return Err(format!("destination block {b} of a pool of {dst_blocks}"));
    }
    let layers = offer.shape.n_layers as usize;
    if dst_k.len() != layers || dst_v.len() != layers || !offer.well_formed() {
        return Err("the pools differ in their number of layers".into());
    }
    let seg = offer.shape.segment_bytes();
    let mut pairs = Vec::with_capacity(2 * layers * src_ids.len());
    for l in 0..layers {
        for (from, to) in [(offer.k[l], dst_k[l]), (offer.v[l], dst_v[l])] {
            for (&s, &d) in src_ids.iter().zip(dst_ids) {
                pairs.push((
                    src_base + from + u64::from(s) * seg,
                    to + u64::from(d) * seg,
                ));
            }
        }
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::KvDType;

    fn layout(blocks: usize) -> KvLayout {
        KvLayout {
            block_size: 2,
            num_blocks: blocks,
            n_layers: 2,
            n_kv_heads: 1,
            head_dim: 4,
            dtype: KvDType::BF16,
        }
    }

    fn offer(host: &str, pid: u32, uuid: u8) -> KvIpcPool {
        let shape = IpcPoolShape::of(&layout(8));
        let region = shape.segment_bytes() * 9; // one spare block, as the CUDA pool has
        KvIpcPool {
            place: ProcessPlace {
                host: host.into(),
                pid,
                instance: pid as u64,
            },
            device_uuid: [uuid; 16],
            handle: vec![7; IPC_HANDLE_BYTES],
            bytes: region * 4,
            base: 1 << 32,
            shape,
            k: vec![0, 2 * region],
            v: vec![region, 3 * region],
        }
    }

    fn consumer(peer_access: Option<bool>) -> ConsumerPlace {
        ConsumerPlace {
            place: ProcessPlace {
                host: "a/boot".into(),
                pid: 20,
                instance: 20,
            },
            device_uuid: [1; 16],
            peer_access,
        }
    }

    #[test]
    fn ipc_only_between_processes_of_one_host_that_share_a_gpu_or_peer_access() {
        let here = consumer(None);
        let l = layout(16);
        let pick = |o: &KvIpcPool| choose_kv_path(&here, &l, Some(o));
        assert_eq!(pick(&offer("a/boot", 10, 1)), KvPath::DeviceIpc);
        // The same pid in another PID namespace is another process: never its raw addresses.
        let mut twin = offer("a/boot", 20, 1);
        twin.place.instance = 99;
        assert_eq!(pick(&twin), KvPath::DeviceIpc);
        assert_eq!(
            choose_kv_path(&here, &l, None),
            KvPath::Host(HostReason::NoOffer)
        );
        assert_eq!(
            pick(&offer("b/boot", 10, 1)),
            KvPath::Host(HostReason::OtherHost)
        );
        assert_eq!(pick(&offer("a/boot", 20, 1)), KvPath::DeviceLocal);
        assert_eq!(
            pick(&offer("a/boot", 20, 2)),
            KvPath::Host(HostReason::SameProcess)
        );
        assert_eq!(
            pick(&offer("a/boot", 10, 2)),
            KvPath::Host(HostReason::NoPeerAccess)
        );
        let peer = consumer(Some(true));
        assert_eq!(
            choose_kv_path(&peer, &l, Some(&offer("a/boot", 10, 2))),
            KvPath::DeviceIpc
        );
        let other = KvLayout {
            head_dim: 8,
            ..layout(16)
        };
        assert_eq!(
            choose_kv_path(&here, &other, Some(&offer("a/boot", 10, 1))),
            KvPath::Host(HostReason::ShapeMismatch)
        );
    }

    #[test]
    fn a_malformed_offer_is_refused_before_anything_is_mapped() {
        let here = consumer(None);
        let l = layout(16);
        let mut short = offer("a/boot", 10, 1);
        short.handle.pop();
        let mut outside = offer("a/boot", 10, 1);
        outside.v[1] = outside.bytes - 1;
        let mut layers = offer("a/boot", 10, 1);
        layers.k.pop();
        let mut wrap = offer("a/boot", 10, 1);
        wrap.k[0] = u64::MAX - 1;
        for bad in [short, outside, layers, wrap] {
            assert_eq!(
                choose_kv_path(&here, &l, Some(&bad)),
                KvPath::Host(HostReason::BadOffer)
            );
        }
    }

    #[test]
    fn copy_pairs_address_every_segment_of_every_layer() {
        let o = offer("a/boot", 10, 1);
        let seg = o.shape.segment_bytes();
        let (dk, dv) = (vec![1000, 3000], vec![2000, 4000]);
        let pairs = ipc_copy_pairs(&o, 1 << 40, &[3, 0], &dk, &dv, 16, &[5, 9]).unwrap();
        assert_eq!(pairs.len(), 2 * 2 * 2);
        assert_eq!(pairs[0], ((1 << 40) + 3 * seg, 1000 + 5 * seg));
        assert_eq!(pairs[1], (1 << 40, 1000 + 9 * seg));
        assert_eq!(pairs[2], ((1 << 40) + o.v[0] + 3 * seg, 2000 + 5 * seg));
        assert_eq!(pairs[7], ((1 << 40) + o.v[1], 4000 + 9 * seg));
        assert!(ipc_copy_pairs(&o, 0, &[8], &dk, &dv, 16, &[0]).is_err());
        assert!(ipc_copy_pairs(&o, 0, &[0], &dk, &dv, 16, &[16]).is_err());
        assert!(ipc_copy_pairs(&o, 0, &[0, 1], &dk, &dv, 16, &[0]).is_err());
        assert!(ipc_copy_pairs(&o, 0, &[0], &dk[..1], &dv, 16, &[0]).is_err());
    }

    #[test]
    fn an_offer_survives_json() {
        let o = offer("a/boot", 10, 1);
        let text = serde_json::to_string(&o).unwrap();
        assert_eq!(serde_json::from_str::<KvIpcPool>(&text).unwrap(), o);
    }
}
