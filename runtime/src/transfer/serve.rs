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
