//! The owner's socket: one ROUTER per plane. Every pull comes from its own DEALER (one
//! identity per pull), so a credit frame names its pull by the socket identity alone.
//!
//! A pull sends one piece per credit. A consumer that stops granting credit (it died, or
//! stopped reading) is given up after the pull timeout; its buffer stays pinned until it is
//! pulled again or expires, so nothing leaks either way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use zeromq::{RouterSocket, SocketRecv, SocketSend, ZmqMessage};

use super::frames::{self, Header, Request};
use super::store::Store;
use super::TransferMetrics;
use crate::clock::{self, SharedClock};

/// What a served pull needs besides its request.
#[derive(Clone)]
pub(crate) struct ServeCtx {
    pub store: Arc<Store>,
    pub clock: SharedClock,
    pub timeout: Duration,
    pub max_piece: usize,
    pub pacer: Arc<Pacer>,
    pub metrics: TransferMetrics,
    pub stop: CancellationToken,
}

type Credits = Arc<Mutex<HashMap<Bytes, Arc<Semaphore>>>>;
type SendHalf = Arc<tokio::sync::Mutex<zeromq::RouterSendHalf>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads pull and credit frames until `ctx.stop` fires.
pub(crate) async fn serve(router: RouterSocket, ctx: ServeCtx) {
    let (send, mut recv) = router.split();
    let send: SendHalf = Arc::new(tokio::sync::Mutex::new(send));
    let credits: Credits = Arc::default();
    loop {
        let msg = tokio::select! {
            _ = ctx.stop.cancelled() => return,
            m = recv.recv() => m,
        };
        let Ok(msg) = msg else { continue };
        let mut parts = msg.into_vecdeque();
        let (Some(peer), Some(frame), None) = (parts.pop_front(), parts.pop_front(), parts.front())
        else {
            continue;
        };
        match frames::decode::<Request>(&frame) {
            Ok(Request::Pull {
                buffer,
                ranges,
                credit,
            }) => {
                let permits = Arc::new(Semaphore::new((credit as usize).min(1 << 16)));
                lock(&credits).insert(peer.clone(), permits.clone());
                let (ctx, send, credits) = (ctx.clone(), send.clone(), credits.clone());
                tokio::spawn(async move {
                    let pieces = ctx.store.checkout(buffer, &ranges, ctx.max_piece);
                    let done = match pieces {
                        Ok(pieces) => send_pieces(&ctx, &send, &peer, pieces, &permits).await,
                        Err(e) => {
                            reply(&ctx, &send, &peer, frames::encode(&Header::Failed(e)), None)
                                .await;
                            false
                        }
                    };
                    if done {
                        ctx.store.release(buffer);
                    }
                    lock(&credits).remove(&peer);
                });
            }
            Ok(Request::Credit(n)) => {
                if let Some(s) = lock(&credits).get(&peer) {
                    s.add_permits((n as usize).min(1 << 16));
                }
            }
            Err(e) => tracing::trace!(error = %e, "dropping transfer frame"),
        }
    }
}

/// Paces what one owner sends to `bytes_per_s` across all its pulls: each piece is booked
/// a slot on one timeline and waits for it (0: no cap, never waits).
pub(crate) struct Pacer {
    bytes_per_s: u64,
    /// When the booked bytes will have gone out at the cap.
    next_free: Mutex<Option<tokio::time::Instant>>,
}

impl Pacer {
    pub fn new(bytes_per_s: u64) -> Self {
        Pacer {
            bytes_per_s,
            next_free: Mutex::new(None),
        }
    }

    /// How long a piece of `len` bytes, ready at `now`, waits before it may go.
    fn book(&self, now: tokio::time::Instant, len: u64) -> Duration {
        if self.bytes_per_s == 0 {
            return Duration::ZERO;
        }
        let mut next = lock(&self.next_free);
        let start = next.map_or(now, |t| t.max(now));
        *next = Some(start + Duration::from_secs_f64(len as f64 / self.bytes_per_s as f64));
        start - now
    }
}

/// Sends every piece (one per credit) and the end marker; true when all went out.
async fn send_pieces(
    ctx: &ServeCtx,
    send: &SendHalf,
    peer: &Bytes,
    pieces: Vec<super::store::Piece>,
    permits: &Semaphore,
) -> bool {
    let mut total = 0u64;
    for piece in pieces {
        let granted = tokio::select! {
            _ = ctx.stop.cancelled() => return false,
            p = clock::timeout(ctx.clock.as_ref(), ctx.timeout, permits.acquire()) => p,
        };
        match granted {
            Ok(Ok(p)) => p.forget(),
            _ => {
                tracing::debug!("transfer consumer stopped granting credit; pull abandoned");
                return false;
            }
        }
        let len = piece.bytes.len() as u64;
        let wait = ctx.pacer.book(ctx.clock.now(), len);
        if !wait.is_zero() {
            tokio::select! {
                _ = ctx.stop.cancelled() => return false,
                _ = ctx.clock.sleep(wait) => {}
            }
        }
        let header = frames::encode(&Header::Piece {
            chunk: piece.chunk,
            offset: piece.offset,
            len,
        });
        if !reply(ctx, send, peer, header, Some(piece.bytes)).await {
            return false;
        }
        ctx.metrics.bytes_out.inc_by(len);
        total += len;
    }
    reply(
        ctx,
        send,
        peer,
        frames::encode(&Header::End { bytes: total }),
        None,
    )
    .await
}

/// Sends `[peer, header, data?]`, bounded by the pull timeout and the plane's stop.
async fn reply(
    ctx: &ServeCtx,
    send: &SendHalf,
    peer: &Bytes,
    header: Bytes,
    data: Option<Bytes>,
) -> bool {
    let mut msg = ZmqMessage::from(header);
    msg.push_front(peer.clone());
    if let Some(data) = data {
        msg.push_back(data);
    }
    let sent = async {
        let mut socket = send.lock().await;
        socket.send(msg).await
    };
    tokio::select! {
        _ = ctx.stop.cancelled() => false,
        r = clock::timeout(ctx.clock.as_ref(), ctx.timeout, sent) => matches!(r, Ok(Ok(()))),
    }
}

#[cfg(test)]
mod tests {
    use super::Pacer;
    use std::time::Duration;
    use tokio::time::Instant;

    #[test]
    fn the_pacer_spaces_pieces_at_the_cap_and_an_uncapped_one_never_waits() {
        let t0 = Instant::now();
        let p = Pacer::new(1000);
        assert_eq!(p.book(t0, 500), Duration::ZERO);
        assert_eq!(p.book(t0, 500), Duration::from_millis(500));
        // Booked until t0 + 1 s: a piece ready later than that goes at once.
        assert_eq!(p.book(t0 + Duration::from_secs(2), 10), Duration::ZERO);
        let free = Pacer::new(0);
        assert_eq!(free.book(t0, u64::MAX), Duration::ZERO);
    }
}
