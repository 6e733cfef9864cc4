//! What prefill and decode workers tell the frontend about a remote prefill, beyond tokens.

use serde::{Deserialize, Serialize};

use super::kv_transfer::KvTransferError;
use turbine_runtime::transfer::TransferError;

/// What the decode worker did with a remote prefill's KV (sent on its stream before any
/// token, so the frontend can count transfers and fallbacks).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ImportOutcome {
    /// The KV crossed: `blocks` blocks (those not cached on the decode worker), `bytes`
    /// bytes, in `seconds`, by `path`.
    Imported {
        blocks: u32,
        bytes: u64,
        seconds: f64,
        /// How the bytes crossed, when a device path was offered (`None`: the host path,
        /// with nothing offered). Last and left out when `None`, so a decode worker of this
        /// version still reports to a frontend that predates the device path (MessagePack
        /// structs are arrays; older readers refuse extra elements).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<TransferPath>,
    },
    /// The decode worker prefills locally instead; `reason` is a [`FallbackReason`] label.
    Fallback { reason: String },
}

/// How an import's bytes crossed when a device path had been offered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransferPath {
    /// Device to device.
    pub device_copy: bool,
    /// Why not, when not (a `kv_ipc::HostReason` label).
    pub host_reason: Option<String>,
}

impl TransferPath {
    /// `None` for a host transfer that was never offered a device path.
    pub fn of(device_copy: bool, host_reason: Option<String>) -> Option<TransferPath> {
        (device_copy || host_reason.is_some()).then_some(TransferPath {
            device_copy,
            host_reason,
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `ImportOutcome` as it was before the device path (three fields).
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum OldImportOutcome {
        Imported {
            blocks: u32,
            bytes: u64,
            seconds: f64,
        },
        Fallback {
            reason: String,
        },
    }

    #[test]
    fn reports_without_a_device_path_read_on_both_versions() {
        let new = ImportOutcome::Imported {
            blocks: 3,
            bytes: 1024,
            seconds: 0.5,
            path: TransferPath::of(false, None),
        };
        let bytes = rmp_serde::to_vec(&new).expect("encode");
        let old: OldImportOutcome = rmp_serde::from_slice(&bytes).expect("an old reader");
        assert_eq!(
            old,
            OldImportOutcome::Imported {
                blocks: 3,
                bytes: 1024,
                seconds: 0.5
            }
        );
        let back: ImportOutcome =
            rmp_serde::from_slice(&rmp_serde::to_vec(&old).expect("encode")).expect("new reader");
        assert_eq!(back, new);
        // With a device path, the report carries it (for readers of this version).
        let device = ImportOutcome::Imported {
            blocks: 3,
            bytes: 1024,
            seconds: 0.5,
            path: TransferPath::of(false, Some("not_device".into())),
        };
        let bytes = rmp_serde::to_vec(&device).expect("encode");
        assert_eq!(
            rmp_serde::from_slice::<ImportOutcome>(&bytes).expect("decode"),
            device
        );
    }
}
