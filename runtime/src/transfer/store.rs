//! The owner's side: buffers pinned until pulled or expired, on the runtime [`Clock`].
//!
//! A pull *checks out* the pieces it will send (cheap `Bytes` clones of the pinned chunks)
//! and releases the buffer when it has delivered the last one. A pull that fails midway
//! leaves the buffer pinned for a retry; expiry frees it in every case, so nothing leaks when
//! a consumer dies. The reaper sleeps until the earliest deadline only (never on a fixed
//! tick), so a paused-time simulator is not kept busy by an idle plane.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::descriptor::{check_ranges, BufferId, ByteRange, Layout, TransferError};
use crate::clock::SharedClock;

/// One piece of a pull: bytes `offset..offset + bytes.len()` of the buffer, all inside
/// chunk `chunk`. Pieces arrive in buffer order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Index of the chunk (in [`Layout::chunks`]) the bytes belong to.
    pub chunk: u32,
    /// Offset of the first byte within the whole buffer.
    pub offset: u64,
    /// The bytes.
    pub bytes: Bytes,
}

struct Pinned {
    chunks: Vec<Bytes>,
    layout: Layout,
    deadline: Instant,
}

/// Ids of buffers that expired, kept a while so a late pull says `Expired`, not `Unknown`.
const TOMBSTONES: usize = 4096;

#[derive(Default)]
struct Table {
    pinned: HashMap<u64, Pinned>,
    expired: VecDeque<u64>,
    pinned_bytes: u64,
}

pub(crate) struct Store {
    incarnation: u64,
    next_seq: Mutex<u64>,
    table: Mutex<Table>,
    clock: SharedClock,
    changed: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    pub(crate) fn new(clock: SharedClock) -> Arc<Self> {
        Arc::new(Self {
            incarnation: rand::random(),
            next_seq: Mutex::new(1),
            table: Mutex::new(Table::default()),
            clock,
            changed: Notify::new(),
        })
    }

    /// Pins `chunks` for `ttl`; the layout is their sizes.
    pub(crate) fn register(&self, chunks: Vec<Bytes>, ttl: Duration) -> (BufferId, Layout) {
        let layout = Layout {
            chunks: chunks.iter().map(|c| c.len() as u64).collect(),
        };
        let seq = {
            let mut next = lock(&self.next_seq);
            let seq = *next;
            *next += 1;
            seq
        };
        let now = self.clock.now();
        // A configured expiry too large for the clock pins "forever" rather than panicking.
        let deadline = now
            .checked_add(ttl)
            .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
            .unwrap_or(now);
        {
            let mut t = lock(&self.table);
            t.pinned_bytes += layout.total_bytes();
            t.pinned.insert(
                seq,
                Pinned {
                    chunks,
                    layout: layout.clone(),
                    deadline,
                },
            );
        }
        self.changed.notify_one();
        let id = BufferId {
            incarnation: self.incarnation,
            seq,
        };
        (id, layout)
    }

    /// The pieces a pull of `ranges` of `id` sends, each at most `max_piece` bytes.
    pub(crate) fn checkout(
        &self,
        id: BufferId,
        ranges: &[ByteRange],
        max_piece: usize,
    ) -> Result<Vec<Piece>, TransferError> {
        if id.incarnation != self.incarnation {
            return Err(TransferError::UnknownBuffer(id));
        }
        let now = self.clock.now();
        let mut t = lock(&self.table);
        let Some(p) = t.pinned.get(&id.seq) else {
            return Err(if t.expired.contains(&id.seq) {
                TransferError::Expired(id)
            } else {
                TransferError::UnknownBuffer(id)
            });
        };
        if p.deadline <= now {
            Self::expire(&mut t, id.seq);
            return Err(TransferError::Expired(id));
        }
        check_ranges(ranges, p.layout.total_bytes())?;
        Ok(cut(&p.chunks, &p.layout, ranges, max_piece.max(1)))
    }

    /// Unpins `id` (pulled, or given up by the owner). Returns whether it was pinned.
    pub(crate) fn release(&self, id: BufferId) -> bool {
        if id.incarnation != self.incarnation {
            return false;
        }
        let mut t = lock(&self.table);
        match t.pinned.remove(&id.seq) {
            Some(p) => {
                t.pinned_bytes -= p.layout.total_bytes();
                true
            }
            None => false,
        }
    }

    fn expire(t: &mut Table, seq: u64) {
        if let Some(p) = t.pinned.remove(&seq) {
            t.pinned_bytes -= p.layout.total_bytes();
            if t.expired.len() >= TOMBSTONES {
                t.expired.pop_front();
            }
            t.expired.push_back(seq);
        }
    }

    /// Frees every buffer past its deadline; returns the earliest remaining deadline.
    fn sweep(&self) -> Option<Instant> {
        let now = self.clock.now();
        let mut t = lock(&self.table);
        let due: Vec<u64> = t
            .pinned
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(s, _)| *s)
            .collect();
        for seq in due {
            Self::expire(&mut t, seq);
        }
        t.pinned.values().map(|p| p.deadline).min()
    }

    /// (buffers, bytes) pinned now.
    pub(crate) fn pinned(&self) -> (usize, u64) {
        let t = lock(&self.table);
        (t.pinned.len(), t.pinned_bytes)
    }

    /// Expires buffers on time until `stop` fires.
    pub(crate) async fn reap(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            let next = self.sweep();
            let changed = self.changed.notified();
            let wait = match next {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(self.clock.now());
                    self.clock.sleep(left)
                }
                None => Box::pin(std::future::pending()),
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = changed => {}
                _ = wait => {}
            }
        }
    }
}

/// Cuts the requested ranges into pieces that never straddle a chunk boundary and are at
/// most `max_piece` bytes: chunk `i` is fully delivered before chunk `i + 1` starts, so the
/// consumer can act on each chunk as soon as its last piece is in.
fn cut(chunks: &[Bytes], layout: &Layout, ranges: &[ByteRange], max_piece: usize) -> Vec<Piece> {
    let mut out = Vec::new();
    for (index, (chunk, span)) in chunks.iter().zip(layout.chunk_ranges()).enumerate() {
        for r in ranges {
            let start = r.start.max(span.start);
            let end = r.end().min(span.end());
            let mut at = start;
            while at < end {
                let n = (end - at).min(max_piece as u64);
                let local = (at - span.start) as usize;
                out.push(Piece {
                    chunk: index as u32,
                    offset: at,
                    bytes: chunk.slice(local..local + n as usize),
                });
                at += n;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn pieces_follow_chunks_and_ranges() {
        let chunks = vec![Bytes::from_static(b"abcd"), Bytes::from_static(b"efghij")];
        let layout = Layout { chunks: vec![4, 6] };
        let ranges = [ByteRange { start: 2, len: 5 }];
        let pieces = cut(&chunks, &layout, &ranges, 2);
        let got: Vec<(u32, u64, &[u8])> = pieces
            .iter()
            .map(|p| (p.chunk, p.offset, p.bytes.as_ref()))
            .collect();
        assert_eq!(
            got,
            vec![(0, 2, &b"cd"[..]), (1, 4, &b"ef"[..]), (1, 6, &b"g"[..])]
        );
    }

    #[tokio::test]
    async fn expiry_follows_the_clock_and_leaves_a_tombstone() {
        let clock = ManualClock::new();
        let store = Store::new(clock.shared());
        let (id, layout) = store.register(vec![Bytes::from_static(b"xyz")], Duration::from_secs(2));
        let all = [ByteRange {
            start: 0,
            len: layout.total_bytes(),
        }];
        assert!(store.checkout(id, &all, 64).is_ok());
        clock.advance(Duration::from_secs(2));
        assert_eq!(
            store.checkout(id, &all, 64),
            Err(TransferError::Expired(id))
        );
        assert_eq!(store.pinned(), (0, 0));
        let stranger = BufferId {
            incarnation: id.incarnation ^ 1,
            seq: id.seq,
        };
        assert_eq!(
            store.checkout(stranger, &all, 64),
            Err(TransferError::UnknownBuffer(stranger))
        );
    }
}
