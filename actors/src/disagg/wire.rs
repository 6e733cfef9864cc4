//! What prefill and decode workers tell the frontend about a remote prefill, beyond tokens.

use serde::{Deserialize, Serialize};

use super::kv_transfer::KvTransferError;
use turbine_runtime::transfer::TransferError;

/// What the decode worker did with a remote prefill's KV (sent on its stream before any
/// token, so the frontend can count transfers and fallbacks).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ImportOutcome {
    /// The KV crossed: `blocks` blocks (those not cached on the decode worker), `bytes`
    /// bytes, in `seconds`; device to device (`device_copy`), or through host memory, when
    /// a device path was offered for `host_reason` (a `kv_ipc::HostReason` label).
    Imported {
        blocks: u32,
        bytes: u64,
        seconds: f64,
        #[serde(default)]
        device_copy: bool,
        #[serde(default)]
        host_reason: Option<String>,
    },
    /// The decode worker prefills locally instead; `reason` is a [`FallbackReason`] label.
    Fallback { reason: String },
}

/// Why a remote prefill was abandoned for a local one (a metrics label each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallbackReason {
    /// The prefill worker could not be reached, or failed the request.
    PrefillFailed,
    /// The prefill worker did not answer within `remote_prefill_timeout_ms`.
    PrefillTimeout,
    /// The prefill worker went away between the first token and its descriptor.
    NoDescriptor,
    /// The decode worker had no free slot or blocks to admit the import at once.
    DecodeBusy,
    /// The descriptor's buffer had expired on its owner.
    Expired,
    /// The descriptor named a buffer its owner does not know (bad, or already pulled).
    UnknownBuffer,
    /// The owner (prefill worker) was gone during the pull.
    OwnerGone,
    /// A pull step timed out.
    TransferTimeout,
    /// Sizes, ranges, shapes or the transfer protocol did not agree.
    BadDescriptor,
    /// The executor failed to import.
    ImportFailed,
}

impl FallbackReason {
    /// Every reason, in declaration order.
    pub const ALL: [FallbackReason; 10] = [
        FallbackReason::PrefillFailed,
        FallbackReason::PrefillTimeout,
        FallbackReason::NoDescriptor,
        FallbackReason::DecodeBusy,
        FallbackReason::Expired,
        FallbackReason::UnknownBuffer,
        FallbackReason::OwnerGone,
        FallbackReason::TransferTimeout,
        FallbackReason::BadDescriptor,
        FallbackReason::ImportFailed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FallbackReason::PrefillFailed => "prefill_failed",
            FallbackReason::PrefillTimeout => "prefill_timeout",
            FallbackReason::NoDescriptor => "no_descriptor",
            FallbackReason::DecodeBusy => "decode_busy",
            FallbackReason::Expired => "expired",
            FallbackReason::UnknownBuffer => "unknown_buffer",
            FallbackReason::OwnerGone => "owner_gone",
            FallbackReason::TransferTimeout => "transfer_timeout",
            FallbackReason::BadDescriptor => "bad_descriptor",
            FallbackReason::ImportFailed => "import_failed",
        }
    }

    /// The reason a failed import falls back for.
    pub fn of_import(e: &KvTransferError) -> FallbackReason {
        match e {
            KvTransferError::Transfer(t) => match t {
                TransferError::Expired(..) => FallbackReason::Expired,
                TransferError::UnknownBuffer(..) => FallbackReason::UnknownBuffer,
                TransferError::OwnerGone(..) => FallbackReason::OwnerGone,
                TransferError::Timeout(..) => FallbackReason::TransferTimeout,
                _ => FallbackReason::BadDescriptor,
            },
            KvTransferError::ShapeMismatch { .. } | KvTransferError::BlockCount { .. } => {
                FallbackReason::BadDescriptor
            }
            KvTransferError::Exec(_) => FallbackReason::ImportFailed,
        }
    }
}
