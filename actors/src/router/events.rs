//! What router replicas tell each other so they weigh the same load.
//!
//! Each replica publishes a [`RouterEvent`] for every request it routes and every request
//! that finishes, and for every worker it newly finds unreachable or stalled; the others
//! apply them to their load view (and, in approximate mode, to their index of what was sent
//! where) and to their quarantine and stall marks, so no replica keeps routing to a worker
//! another one already found dead. Published on the event plane (topic
//! `router.<replica>`), MessagePack-encoded.

use crate::ids::{RequestId, WorkerId};
use crate::kv::hash::BlockHash;
use serde::{Deserialize, Serialize};

/// A router replica's identity (unique among the cluster's routers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RouterReplicaId(pub u64);

/// One routing fact from one replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterEvent {
    /// Who decided; a replica ignores its own events echoed back.
    pub replica: RouterReplicaId,
    /// Per-replica counter, +1 per event, so receivers can notice lost events.
    pub seq: u64,
    pub kind: RouterEventKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouterEventKind {
    /// `request` went to `worker` and will occupy `blocks` KV blocks there.
    Routed {
        request: RequestId,
        worker: WorkerId,
        blocks: u32,
        /// The request's block hashes, only in approximate mode (empty otherwise): peers
        /// record them in their own approximate index.
        hashes: Vec<BlockHash>,
    },
    /// `request` finished (or was cancelled); its blocks are free for reuse accounting.
    Finished { request: RequestId },
    /// The deciding replica could not reach `worker`: peers quarantine it too, for
    /// [`UNREACHABLE_QUARANTINE`](super::kv_router::UNREACHABLE_QUARANTINE) from when they
    /// apply the event.
    Unreachable { worker: WorkerId },
    /// A stream on `worker` stalled at the deciding replica: peers leave it out of selection
    /// too, until a load report shows it made progress (each against its own view of the
    /// worker's steps, as for a stall it found itself).
    Stalled { worker: WorkerId },
}

/// Why a router event could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum RouterEventCodecError {
    #[error("encoding a router event failed: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("decoding a router event failed: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

impl RouterEvent {
    pub fn to_msgpack(&self) -> Result<Vec<u8>, RouterEventCodecError> {
        Ok(rmp_serde::to_vec_named(self)?)
    }

    pub fn from_msgpack(bytes: &[u8]) -> Result<RouterEvent, RouterEventCodecError> {
        Ok(rmp_serde::from_slice(bytes)?)
    }
}
