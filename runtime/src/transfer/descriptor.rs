//! What a consumer needs to pull bulk data: the [`Descriptor`], and the typed
//! [`TransferError`]s a pull can end with.
//!
//! A descriptor is plain data (MessagePack-friendly) so it can ride inside any request-plane
//! reply. The runtime never interprets the chunking: the owner decides what a chunk is (one
//! model layer, say) and the consumer reads [`Layout::chunks`] back the same way.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Names one registered buffer on its owner. `incarnation` is drawn at random when the
/// owner's plane starts, so a descriptor issued before an owner restart never names a buffer
/// of the new incarnation that happens to reuse the same `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BufferId {
    /// Random per owner plane instance.
    pub incarnation: u64,
    /// Counter within the incarnation.
    pub seq: u64,
}

impl std::fmt::Display for BufferId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}.{}", self.incarnation, self.seq)
    }
}

/// A half-open byte range `start..start + len` of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl ByteRange {
    /// One past the last byte (saturating, so a hostile range cannot overflow).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// How a buffer is cut into chunks: their sizes, in the order they stream. Chunk `i` covers
/// bytes `sum(chunks[..i])..sum(chunks[..=i])`. What a chunk *means* is the owner's business.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Size of each chunk in bytes.
    pub chunks: Vec<u64>,
}

impl Layout {
    /// Total bytes of the buffer.
    pub fn total_bytes(&self) -> u64 {
        self.chunks.iter().fold(0u64, |a, c| a.saturating_add(*c))
    }

    /// The byte range of every chunk, in order.
    pub fn chunk_ranges(&self) -> Vec<ByteRange> {
        let mut start = 0u64;
        self.chunks
            .iter()
            .map(|&len| {
                let r = ByteRange { start, len };
                start = start.saturating_add(len);
                r
            })
            .collect()
    }
}

/// A handle to bulk data pinned by its owner, handed to the consumer that will pull it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// The owner's transfer endpoint ([`TransferPlane::endpoint`](super::TransferPlane::endpoint)).
    pub owner: String,
    /// The buffer on that owner.
    pub buffer: BufferId,
    /// How the buffer is chunked.
    pub layout: Layout,
    /// The bytes a pull delivers: sorted, non-overlapping, within the buffer. The whole
    /// buffer when issued; a consumer that already holds part of it may narrow them with
    /// [`Descriptor::with_ranges`].
    pub ranges: Vec<ByteRange>,
    /// How long after issue the owner keeps the buffer pinned (informational for the
    /// consumer: the owner's own clock decides).
    pub expires_after_ms: u64,
}

impl Descriptor {
    /// Bytes a pull of this descriptor delivers.
    pub fn pull_bytes(&self) -> u64 {
        self.ranges
            .iter()
            .fold(0u64, |a, r| a.saturating_add(r.len))
    }

    /// The same buffer, pulling only `ranges`.
    pub fn with_ranges(mut self, ranges: Vec<ByteRange>) -> Self {
        self.ranges = ranges;
        self
    }

    /// Checks that `ranges` are sorted, non-overlapping, non-empty and inside the buffer.
    pub fn check_ranges(&self) -> Result<(), TransferError> {
        check_ranges(&self.ranges, self.layout.total_bytes())
    }
}

pub(crate) fn check_ranges(ranges: &[ByteRange], total: u64) -> Result<(), TransferError> {
    let mut end = 0u64;
    for r in ranges {
        if r.len == 0 || r.start < end || r.end() > total || r.start.checked_add(r.len).is_none() {
            return Err(TransferError::BadRange {
                start: r.start,
                len: r.len,
                total,
            });
        }
        end = r.end();
    }
    Ok(())
}

/// Why a pull failed. Every failure is one of these, and every wait is bounded by a timeout:
/// a pull never hangs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum TransferError {
    /// The owner has no such buffer: never registered, already pulled, released, or issued
    /// by an earlier incarnation of the owner.
    #[error("unknown transfer buffer {0}")]
    UnknownBuffer(BufferId),
    /// The buffer's pin expired before the pull.
    #[error("transfer buffer {0} expired")]
    Expired(BufferId),
    /// The owner cannot be reached or went away during the pull.
    #[error("transfer owner {0} is gone")]
    OwnerGone(String),
    /// The bytes that arrived do not add up to what the descriptor promised.
    #[error("transfer size mismatch: expected {expected} bytes, got {got}")]
    SizeMismatch {
        /// Bytes expected.
        expected: u64,
        /// Bytes received (or offered).
        got: u64,
    },
    /// A requested range is empty, unsorted, overlapping or outside the buffer.
    #[error("byte range {start}+{len} is not valid for a buffer of {total} bytes")]
    BadRange {
        /// Range start.
        start: u64,
        /// Range length.
        len: u64,
        /// Buffer size.
        total: u64,
    },
    /// No progress within the pull timeout.
    #[error("transfer timed out after {0:?}")]
    Timeout(Duration),
    /// The owner sent something that is not a transfer-plane frame.
    #[error("transfer protocol error: {0}")]
    Protocol(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_ranges_tile_the_buffer() {
        let l = Layout {
            chunks: vec![3, 0, 5],
        };
        assert_eq!(l.total_bytes(), 8);
        let r = l.chunk_ranges();
        assert_eq!(r[2], ByteRange { start: 3, len: 5 });
    }

    #[test]
    fn ranges_must_be_sorted_disjoint_and_inside() {
        let ok = [
            ByteRange { start: 0, len: 2 },
            ByteRange { start: 4, len: 4 },
        ];
        assert!(check_ranges(&ok, 8).is_ok());
        let outside = [ByteRange { start: 6, len: 4 }];
        assert!(check_ranges(&outside, 8).is_err());
        let overlap = [
            ByteRange { start: 0, len: 4 },
            ByteRange { start: 2, len: 1 },
        ];
        assert!(check_ranges(&overlap, 8).is_err());
        let huge = [ByteRange {
            start: u64::MAX,
            len: 2,
        }];
        assert!(check_ranges(&huge, 8).is_err());
        assert!(check_ranges(&[ByteRange { start: 1, len: 0 }], 8).is_err());
    }
}
