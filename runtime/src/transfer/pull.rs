//! The consumer's side: a [`PullStream`] of pieces, fed by one task per pull.
//!
//! Two paths, chosen by [`TransferPlane::pull`](super::TransferPlane::pull): the owner lives
//! in this process (its store is in the same [`TransferHub`](super::TransferHub)): pieces are
//! slices of the pinned buffer, no socket (optionally across a modelled [`Link`] for the
//! simulator); or it is another process: a DEALER per pull, raw data frames, one credit
//! granted back per piece taken. Every wait is bounded by the pull timeout.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};
use zeromq::{DealerSocket, Socket, SocketEvent, SocketRecv, SocketSend, ZmqMessage};

use super::descriptor::{ByteRange, Descriptor, TransferError};
use super::frames::{self, Header, Request};
use super::store::{Piece, Store};
use super::TransferMetrics;
use crate::clock::{self, SharedClock};
use crate::link::{Direction, Link};

/// What one pull task needs.
pub(crate) struct PullCtx {
    pub clock: SharedClock,
    pub timeout: Duration,
    pub window: usize,
    pub max_frame: usize,
    pub metrics: TransferMetrics,
}

/// The pieces of one pull, in buffer order, then the end of the stream; or an error item,
/// after which the stream ends. Dropping it abandons the pull (the owner keeps the buffer
/// pinned until it expires or is pulled again).
pub struct PullStream {
    rx: mpsc::Receiver<Result<Piece, TransferError>>,
    peeked: Option<Piece>,
    _cancel: DropGuard,
}

impl PullStream {
    pub(crate) fn spawn<F>(window: usize, run: impl FnOnce(Feed) -> F) -> Self
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(window.max(1));
        let cancel = CancellationToken::new();
        let task = run(Feed {
            tx,
            cancel: cancel.clone(),
        });
        tokio::spawn(task);
        Self {
            rx,
            peeked: None,
            _cancel: cancel.drop_guard(),
        }
    }

    /// A pull that failed before it started: `e` is its only item.
    pub(crate) fn failed(e: TransferError, metrics: TransferMetrics) -> Self {
        Self::spawn(1, |feed| async move { feed.fail(e, &metrics).await })
    }

    /// The next whole chunk: its index and the pulled bytes of it (all of it, for a pull of
    /// the whole buffer). Lets a consumer import chunk by chunk while later ones arrive.
    pub async fn next_chunk(&mut self) -> Option<Result<(u32, Bytes), TransferError>> {
        let first = match self.peeked.take() {
            Some(p) => p,
            None => match self.next().await? {
                Ok(p) => p,
                Err(e) => return Some(Err(e)),
            },
        };
        let chunk = first.chunk;
        let mut parts = vec![first.bytes];
        loop {
            match self.next().await {
                Some(Ok(p)) if p.chunk == chunk => parts.push(p.bytes),
                Some(Ok(p)) => {
                    self.peeked = Some(p);
                    break;
                }
                Some(Err(e)) => return Some(Err(e)),
                None => break,
            }
        }
        Some(Ok((chunk, concat(parts))))
    }

    /// Every pulled byte, in order (the descriptor's ranges, concatenated).
    pub async fn into_bytes(mut self) -> Result<Bytes, TransferError> {
        let mut parts = Vec::new();
        if let Some(p) = self.peeked.take() {
            parts.push(p.bytes);
        }
        while let Some(item) = self.next().await {
            parts.push(item?.bytes);
        }
        Ok(concat(parts))
    }
}

fn concat(mut parts: Vec<Bytes>) -> Bytes {
    if parts.len() == 1 {
        return parts.remove(0);
    }
    let mut out = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
    for p in parts {
        out.extend_from_slice(&p);
    }
    out.freeze()
}

impl Stream for PullStream {
    type Item = Result<Piece, TransferError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(p) = this.peeked.take() {
            return Poll::Ready(Some(Ok(p)));
        }
        this.rx.poll_recv(cx)
    }
}

/// The producing end of a [`PullStream`].
pub(crate) struct Feed {
    tx: mpsc::Sender<Result<Piece, TransferError>>,
    cancel: CancellationToken,
}

impl Feed {
    /// Hands a piece on; false once the consumer is gone.
    async fn piece(&self, piece: Piece) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            r = self.tx.send(Ok(piece)) => r.is_ok(),
        }
    }

    pub(crate) async fn fail(&self, e: TransferError, metrics: &TransferMetrics) {
        metrics.pull_errors.inc();
        let _ = self.tx.send(Err(e)).await;
    }
}

/// Checks that pieces arrive in order, inside the requested ranges, and add up.
struct Expect<'a> {
    ranges: &'a [ByteRange],
    next: usize,
    at: u64,
    got: u64,
}

impl<'a> Expect<'a> {
    fn new(ranges: &'a [ByteRange]) -> Self {
        Self {
            ranges,
            next: 0,
            at: ranges.first().map_or(0, |r| r.start),
            got: 0,
        }
    }

    fn piece(&mut self, offset: u64, len: u64) -> Result<(), TransferError> {
        while let Some(r) = self.ranges.get(self.next) {
            if self.at < r.end() {
                break;
            }
            self.next += 1;
            self.at = self.ranges.get(self.next).map_or(u64::MAX, |r| r.start);
        }
        let inside = self
            .ranges
            .get(self.next)
            .is_some_and(|r| offset == self.at && offset.saturating_add(len) <= r.end());
        if !inside || len == 0 {
            return Err(TransferError::Protocol(format!(
                "piece {offset}+{len} out of order"
            )));
        }
        self.at += len;
        self.got += len;
        Ok(())
    }

    fn end(&self, expected: u64) -> Result<(), TransferError> {
        if self.got == expected {
            Ok(())
        } else {
            Err(TransferError::SizeMismatch {
                expected,
                got: self.got,
            })
        }
    }
}

/// The same-process path: slices of the owner's pinned chunks, optionally across `link`.
pub(crate) async fn local(
    store: Arc<Store>,
    desc: Descriptor,
    link: Option<Arc<dyn Link>>,
    ctx: PullCtx,
    feed: Feed,
) {
    let bounded = |t: crate::link::Transit| {
        let (clock, timeout, owner) = (ctx.clock.clone(), ctx.timeout, desc.owner.clone());
        async move {
            match clock::timeout(clock.as_ref(), timeout, t).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(TransferError::OwnerGone(owner)),
                Err(_) => Err(TransferError::Timeout(timeout)),
            }
        }
    };
    if let Some(link) = &link {
        if let Err(e) = bounded(link.transit(Direction::Request)).await {
            return feed.fail(e, &ctx.metrics).await;
        }
    }
    let pieces = match store.checkout(desc.buffer, &desc.ranges, usize::MAX) {
        Ok(p) => p,
        Err(e) => return feed.fail(e, &ctx.metrics).await,
    };
    for piece in pieces {
        let len = piece.bytes.len() as u64;
        if let Some(link) = &link {
            if let Err(e) = bounded(link.transit_bytes(Direction::Reply, len)).await {
                return feed.fail(e, &ctx.metrics).await;
            }
        }
        if !feed.piece(piece).await {
            return;
        }
        ctx.metrics.bytes_in.inc_by(len);
    }
    store.release(desc.buffer);
    ctx.metrics.pulls.inc();
}

/// The cross-process path: a DEALER to the owner's ROUTER.
pub(crate) async fn remote(desc: Descriptor, ctx: PullCtx, feed: Feed) {
    if let Err(e) = remote_inner(&desc, &ctx, &feed).await {
        feed.fail(e, &ctx.metrics).await;
    }
}

async fn remote_inner(desc: &Descriptor, ctx: &PullCtx, feed: &Feed) -> Result<(), TransferError> {
    let gone = || TransferError::OwnerGone(desc.owner.clone());
    let mut socket = DealerSocket::new();
    let mut monitor = socket.monitor();
    clock::timeout(ctx.clock.as_ref(), ctx.timeout, socket.connect(&desc.owner))
        .await
        .map_err(|_| TransferError::Timeout(ctx.timeout))?
        .map_err(|_| gone())?;
    let pull = Request::Pull {
        buffer: desc.buffer,
        ranges: desc.ranges.clone(),
        credit: ctx.window.max(1) as u32,
    };
    send(&mut socket, ctx, frames::encode(&pull)).await?;
    let mut expect = Expect::new(&desc.ranges);
    loop {
        let msg = tokio::select! {
            _ = feed.cancel.cancelled() => return Ok(()),
            ev = monitor.next() => match ev {
                Some(SocketEvent::Disconnected(_)) | None => return Err(gone()),
                Some(_) => continue,
            },
            m = clock::timeout(ctx.clock.as_ref(), ctx.timeout, socket.recv()) => m,
        };
        let msg = msg
            .map_err(|_| TransferError::Timeout(ctx.timeout))?
            .map_err(|_| gone())?;
        let mut parts = msg.into_vecdeque();
        let header = parts
            .pop_front()
            .ok_or_else(|| TransferError::Protocol("empty message".into()))?;
        match frames::decode::<Header>(&header)? {
            Header::Piece { chunk, offset, len } => {
                let data = match (parts.pop_front(), parts.front()) {
                    (Some(d), None) => d,
                    _ => {
                        return Err(TransferError::Protocol(
                            "piece without one data frame".into(),
                        ))
                    }
                };
                if data.len() as u64 != len || data.len() > ctx.max_frame {
                    return Err(TransferError::SizeMismatch {
                        expected: len,
                        got: data.len() as u64,
                    });
                }
                expect.piece(offset, len)?;
                if !feed
                    .piece(Piece {
                        chunk,
                        offset,
                        bytes: data,
                    })
                    .await
                {
                    return Ok(());
                }
                ctx.metrics.bytes_in.inc_by(len);
                send(&mut socket, ctx, frames::encode(&Request::Credit(1))).await?;
            }
            Header::End { bytes } => {
                expect.end(desc.pull_bytes())?;
                expect.end(bytes)?;
                ctx.metrics.pulls.inc();
                return Ok(());
            }
            Header::Failed(e) => return Err(e),
        }
    }
}

async fn send(socket: &mut DealerSocket, ctx: &PullCtx, frame: Bytes) -> Result<(), TransferError> {
    clock::timeout(
        ctx.clock.as_ref(),
        ctx.timeout,
        socket.send(ZmqMessage::from(frame)),
    )
    .await
    .map_err(|_| TransferError::Timeout(ctx.timeout))?
    .map_err(|e| TransferError::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expect_accepts_in_order_pieces_and_counts() {
        let ranges = [
            ByteRange { start: 2, len: 4 },
            ByteRange { start: 10, len: 2 },
        ];
        let mut e = Expect::new(&ranges);
        assert!(e.piece(2, 3).is_ok());
        assert!(e.piece(5, 1).is_ok());
        assert!(e.piece(10, 2).is_ok());
        assert!(e.end(6).is_ok());
        let mut e = Expect::new(&ranges);
        assert!(e.piece(3, 1).is_err());
        let mut e = Expect::new(&ranges);
        assert!(e.piece(2, 5).is_err());
        let e = Expect::new(&ranges);
        assert_eq!(
            e.end(6),
            Err(TransferError::SizeMismatch {
                expected: 6,
                got: 0
            })
        );
    }
}
