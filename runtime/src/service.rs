//! Services: what a component implements to be callable, and the errors callers see.

use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::wire::WireError;

/// A callable protocol: one request type and one response type.
///
/// Implement it on a marker type (`struct Echo; impl Service for Echo { .. }`); the same
/// types travel locally (moved, never serialised) and remotely (MessagePack).
pub trait Service: Send + Sync + 'static {
    /// Request type (for calls, casts and stream requests).
    type Req: Serialize + DeserializeOwned + Send + 'static;
    /// Response type (a call's reply, or each item of a stream).
    type Resp: Serialize + DeserializeOwned + Send + 'static;
}

/// Why a call, cast or stream failed, as seen by the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No service of that name on the target node.
    #[error("unknown actor `{0}`")]
    UnknownActor(String),
    /// The service exists but speaks a different `Service` type.
    #[error("service `{0}` has a different type")]
    TypeMismatch(String),
    /// No reply within the configured call timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The peer node disconnected with the call pending.
    #[error("peer {0} is gone")]
    PeerGone(String),
    /// The handler returned an error.
    #[error("handler error: {0}")]
    Handler(String),
    /// The serving actor died (panicked or was stopped) before answering.
    #[error("actor failed: {0}")]
    ActorFailed(String),
    /// The callee could not decode the request.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The service does not serve this kind of request (e.g. streams).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A payload could not be (de)serialised on this side.
    #[error("codec error: {0}")]
    Codec(String),
    /// The transport could not send.
    #[error("transport error: {0}")]
    Transport(String),
}

impl From<WireError> for CallError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::UnknownActor(n) => CallError::UnknownActor(n),
            WireError::Handler(m) => CallError::Handler(m),
            WireError::BadRequest(m) => CallError::BadRequest(m),
            WireError::Unsupported(m) => CallError::Unsupported(m),
        }
    }
}

impl CallError {
    /// The wire form of this error when a callee reports it to a remote caller.
    pub(crate) fn to_wire(&self) -> WireError {
        match self {
            CallError::UnknownActor(n) => WireError::UnknownActor(n.clone()),
            CallError::BadRequest(m) => WireError::BadRequest(m.clone()),
            CallError::Unsupported(m) => WireError::Unsupported(m.clone()),
            CallError::Handler(m) => WireError::Handler(m.clone()),
            other => WireError::Handler(other.to_string()),
        }
    }
}

/// An error returned by a handler. `fatal` errors also fail the serving actor so its
/// supervisor restarts it (use them for corrupted state); plain ones only fail the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    /// Human-readable reason, passed to the caller.
    pub message: String,
    /// Whether the actor should be failed (and restarted) after reporting it.
    pub fatal: bool,
}

impl HandlerError {
    /// A request-level error; the actor keeps serving.
    pub fn new(message: impl std::fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            fatal: false,
        }
    }

    /// An error that also fails the actor, handing it to its supervisor for restart.
    pub fn fatal(message: impl std::fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            fatal: true,
        }
    }
}

/// Facts about the request being served.
#[derive(Debug, Clone)]
pub struct RequestCtx {
    /// Who sent it: a node name, or `local`.
    pub from: String,
    /// Correlation id (0 for local requests).
    pub corr_id: u64,
    /// The span the handler runs in: a `serve` span, child of the caller's (in this process,
    /// or across the wire from the envelope's [`crate::TraceContext`]), carrying its request
    /// id; `Span::none()` for background requests. Work a handler moves onto a task of its
    /// own should run in it (`.instrument(ctx.span.clone())`), so its log lines and trace
    /// spans stay the request's.
    pub span: tracing::Span,
}

/// The producing end of a stream handed to [`Handler::stream`].
///
/// Bounded: `send` waits while the consumer is behind (back-pressure). Once the caller drops
/// its [`crate::ReplyStream`] (locally or across the wire), `send` fails with [`StreamClosed`]
/// and [`StreamSink::cancelled`] resolves. The stream ends when every clone is dropped.
pub struct StreamSink<T> {
    pub(crate) tx: mpsc::Sender<Result<T, CallError>>,
    pub(crate) cancel: CancellationToken,
}

impl<T> Clone for StreamSink<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            cancel: self.cancel.clone(),
        }
    }
}

/// The consumer of a stream went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stream closed by the consumer")]
pub struct StreamClosed;

impl<T: Send> StreamSink<T> {
    /// Sends one item, waiting for room. Fails once the consumer cancelled.
    pub async fn send(&self, item: T) -> Result<(), StreamClosed> {
        if self.cancel.is_cancelled() {
            return Err(StreamClosed);
        }
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(StreamClosed),
            sent = self.tx.send(Ok(item)) => sent.map_err(|_| StreamClosed),
        }
    }

    /// Ends the stream with an error the consumer will receive as `CallError::Handler`.
    pub async fn fail(&self, err: HandlerError) {
        let _ = self.tx.send(Err(CallError::Handler(err.message))).await;
    }

    /// True once the consumer has gone away.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled() || self.tx.is_closed()
    }

    /// Resolves when the consumer goes away.
    pub async fn cancelled(&self) {
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = self.tx.closed() => {}
        }
    }

    pub(crate) fn channel(capacity: usize) -> (Self, mpsc::Receiver<Result<T, CallError>>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Self {
                tx,
                cancel: CancellationToken::new(),
            },
            rx,
        )
    }
}

/// Server side of a [`Service`]: one instance lives inside a supervised actor and handles
/// requests one at a time (`&mut self`, actor semantics). A handler that panics, or returns
/// a [`HandlerError::fatal`], is restarted from its factory by the supervisor.
///
/// Long streams should move the sink into a spawned task so the actor stays responsive.
#[async_trait]
pub trait Handler<S: Service>: Send + 'static {
    /// Serves a call.
    async fn call(&mut self, req: S::Req, ctx: &RequestCtx) -> Result<S::Resp, HandlerError>;

    /// Serves a cast (no reply). Default: treat it as a call and discard the answer.
    async fn cast(&mut self, req: S::Req, ctx: &RequestCtx) -> Result<(), HandlerError> {
        self.call(req, ctx).await.map(|_| ())
    }

    /// Serves a stream request by sending items into `sink`; the stream ends when the last
    /// clone of `sink` is dropped. Default: unsupported.
    async fn stream(
        &mut self,
        req: S::Req,
        sink: StreamSink<S::Resp>,
        ctx: &RequestCtx,
    ) -> Result<(), HandlerError> {
        let _ = (req, sink, ctx);
        Err(HandlerError::new("this service does not stream"))
    }
}
