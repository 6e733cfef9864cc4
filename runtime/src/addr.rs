//! [`Addr`]: the one handle callers use, whether the service is local or remote.

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use crate::clock::{self, SharedClock};
use crate::link::{Direction, Link};
use crate::local::LocalService;
use crate::peer::{PeerLink, Pending};
use crate::service::{CallError, RequestCtx, Service};
use crate::telemetry::{RuntimeMetrics, TraceContext};
use crate::wire::{self, Envelope, Kind};

enum Target<S: Service> {
    Local(Arc<LocalService<S>>),
    Remote {
        link: Arc<PeerLink>,
        name: Arc<str>,
    },
    /// Another address reached across a modelled [`Link`] (see [`Addr::via`]).
    Via {
        link: Arc<dyn Link>,
        inner: Box<Addr<S>>,
    },
}

impl<S: Service> Clone for Target<S> {
    fn clone(&self) -> Self {
        match self {
            Target::Local(l) => Target::Local(l.clone()),
            Target::Remote { link, name } => Target::Remote {
                link: link.clone(),
                name: name.clone(),
            },
            Target::Via { link, inner } => Target::Via {
                link: link.clone(),
                inner: inner.clone(),
            },
        }
    }
}

/// A location-transparent reference to a service `S`: local actors are reached directly
/// (requests are moved, never serialised), remote ones through the node's ZeroMQ link.
pub struct Addr<S: Service> {
    target: Target<S>,
    timeout: Duration,
    window: usize,
    clock: SharedClock,
    metrics: RuntimeMetrics,
}

impl<S: Service> Clone for Addr<S> {
    fn clone(&self) -> Self {
        Self {
            target: self.target.clone(),
            timeout: self.timeout,
            window: self.window,
            clock: self.clock.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<S: Service> std::fmt::Debug for Addr<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.target {
            Target::Local(l) => write!(f, "Addr(local {})", l.name),
            Target::Remote { link, name } => write!(f, "Addr({name} @ {})", link.endpoint),
            Target::Via { link, inner } => write!(f, "{inner:?} via {link:?}"),
        }
    }
}

/// The context of a request to a service in this process, served in a child of the
/// caller's span.
fn local_ctx(service: &str) -> RequestCtx {
    RequestCtx {
        from: "local".to_string(),
        corr_id: 0,
        span: crate::telemetry::context::local_serve_span(service),
    }
}

/// The context of a cast: fire and forget, so no span of its own (a cast opens no trace).
fn cast_ctx() -> RequestCtx {
    RequestCtx {
        from: "local".to_string(),
        corr_id: 0,
        span: tracing::Span::none(),
    }
}

impl<S: Service> Addr<S> {
    pub(crate) fn local(
        service: Arc<LocalService<S>>,
        timeout: Duration,
        clock: SharedClock,
        metrics: RuntimeMetrics,
    ) -> Self {
        let window = service.window;
        Self {
            target: Target::Local(service),
            timeout,
            window,
            clock,
            metrics,
        }
    }

    pub(crate) fn remote(
        link: Arc<PeerLink>,
        name: &str,
        timeout: Duration,
        window: usize,
        clock: SharedClock,
        metrics: RuntimeMetrics,
    ) -> Self {
        Self {
            target: Target::Remote {
                link,
                name: Arc::from(name),
            },
            timeout,
            window,
            clock,
            metrics,
        }
    }

    /// This address as seen from the far side of `link`: every request, reply, stream item
    /// and cancellation crosses the link first, and a link that fails a passage fails the
    /// exchange as the real transport would (`PeerGone`; `Timeout` past the call timeout).
    /// The simulator builds its network out of this.
    pub fn via(mut self, link: Arc<dyn Link>) -> Self {
        // The exchange is counted once, by the outer address: the inner one counts into a
        // registry nobody reads.
        let metrics = std::mem::replace(
            &mut self.metrics,
            RuntimeMetrics::new(&crate::telemetry::MetricsRegistry::new()),
        );
        Self {
            timeout: self.timeout,
            window: self.window,
            clock: self.clock.clone(),
            metrics,
            target: Target::Via {
                link,
                inner: Box::new(self),
            },
        }
    }

    /// True when calls go straight to an actor in this process.
    pub fn is_local(&self) -> bool {
        matches!(self.target, Target::Local(_))
    }

    /// A copy of this handle with a different call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn service_name(&self) -> &str {
        match &self.target {
            Target::Local(l) => &l.name,
            Target::Remote { name, .. } => name,
            Target::Via { inner, .. } => inner.service_name(),
        }
    }

    /// Sends a request and waits for its reply (at most the configured timeout).
    pub async fn call(&self, req: S::Req) -> Result<S::Resp, CallError> {
        self.metrics.call_started();
        let span =
            tracing::debug_span!("call", service = %self.service_name(), local = self.is_local());
        let result = async {
            match &self.target {
                Target::Local(service) => service.call(req, local_ctx(&service.name)).await,
                Target::Remote { link, name } => self.remote_call(link, name, req).await,
                Target::Via { link, inner } => {
                    let exchange = async {
                        link.transit(Direction::Request).await?;
                        let reply = Box::pin(inner.call(req)).await;
                        link.transit(Direction::Reply).await?;
                        reply
                    };
                    clock::timeout(self.clock.as_ref(), self.timeout, exchange)
                        .await
                        .unwrap_or(Err(CallError::Timeout(self.timeout)))
                }
            }
        }
        .instrument(span)
        .await;
        if result.is_err() {
            self.metrics.call_failed();
        }
        result
    }

    async fn remote_call(
        &self,
        link: &Arc<PeerLink>,
        name: &str,
        req: S::Req,
    ) -> Result<S::Resp, CallError> {
        let payload = wire::to_payload(&req).map_err(CallError::Codec)?;
        let corr_id = link.next_corr();
        let (tx, rx) = oneshot::channel();
        link.add_pending(corr_id, Pending::Call(tx))?;
        let env = Envelope {
            to: name.to_string(),
            from: link.node_name.to_string(),
            corr_id,
            kind: Kind::Call,
            payload,
            trace: TraceContext::current(),
        };
        let exchange = async {
            link.send(&env).await?;
            rx.await
                .unwrap_or_else(|_| Err(CallError::PeerGone(link.endpoint.clone())))
        };
        let outcome = clock::timeout(self.clock.as_ref(), self.timeout, exchange).await;
        let bytes = match outcome {
            Ok(result) => result?,
            Err(_) => {
                link.remove_pending(corr_id);
                return Err(CallError::Timeout(self.timeout));
            }
        };
        wire::from_payload(&bytes).map_err(CallError::Codec)
    }

    /// Sends a request without waiting for any answer. Best effort: errors are only
    /// logged. Casts and calls from one node to one service keep their order (except while
    /// the service restarts or the send queue is full).
    pub fn cast(&self, req: S::Req) {
        self.metrics.call_started();
        match &self.target {
            Target::Local(service) => service.submit(crate::local::ServiceMsg::Cast {
                req,
                ctx: cast_ctx(),
            }),
            Target::Via { link, inner } => {
                let (passage, inner) = (link.transit(Direction::Request), inner.clone());
                tokio::spawn(async move {
                    if passage.await.is_ok() {
                        inner.cast(req);
                    }
                });
            }
            Target::Remote { link, name } => {
                let payload = match wire::to_payload(&req) {
                    Ok(p) => p,
                    Err(e) => {
                        self.metrics.call_failed();
                        tracing::debug!(error = %e, "cast not encodable");
                        return;
                    }
                };
                let env = Envelope {
                    to: name.to_string(),
                    from: link.node_name.to_string(),
                    corr_id: link.next_corr(),
                    kind: Kind::Cast,
                    payload,
                    // A cast opens no span on the callee (see `cast_ctx`).
                    trace: None,
                };
                match link.try_send(&env) {
                    Ok(()) => {}
                    Err(Some(frame)) => {
                        let link = link.clone();
                        tokio::spawn(async move { link.send_frame(frame).await });
                    }
                    Err(None) => {
                        self.metrics.call_failed();
                        tracing::debug!("cast to a closed link dropped");
                    }
                }
            }
        }
    }

    /// Like [`Addr::cast`], but waits until the request is handed to the actor (local)
    /// or queued on the wire (remote), reporting failure to do so.
    pub async fn cast_now(&self, req: S::Req) -> Result<(), CallError> {
        match &self.target {
            Target::Local(service) => service.cast(req, cast_ctx()).await,
            Target::Via { link, inner } => {
                link.transit(Direction::Request).await?;
                Box::pin(inner.cast_now(req)).await
            }
            Target::Remote { link, name } => {
                let env = Envelope {
                    to: name.to_string(),
                    from: link.node_name.to_string(),
                    corr_id: link.next_corr(),
                    kind: Kind::Cast,
                    payload: wire::to_payload(&req).map_err(CallError::Codec)?,
                    trace: None,
                };
                clock::timeout(self.clock.as_ref(), self.timeout, link.send(&env))
                    .await
                    .unwrap_or(Err(CallError::Timeout(self.timeout)))
            }
        }
    }

    /// Opens a stream of responses. Errors from the callee (including an unknown remote
    /// service) arrive as `Err` items; dropping the stream cancels the producer.
    pub async fn stream(&self, req: S::Req) -> Result<ReplyStream<S::Resp>, CallError> {
        self.metrics.call_started();
        match &self.target {
            Target::Local(service) => service.open_stream(req, local_ctx(&service.name)).await,
            Target::Via { link, inner } => {
                let open = async {
                    link.transit(Direction::Request).await?;
                    Box::pin(inner.stream(req)).await
                };
                let upstream = clock::timeout(self.clock.as_ref(), self.timeout, open)
                    .await
                    .unwrap_or(Err(CallError::Timeout(self.timeout)))?;
                let (tx, rx) = mpsc::channel(self.window.max(1));
                let cancel = CancellationToken::new();
                tokio::spawn(forward_across(link.clone(), upstream, tx, cancel.clone()));
                Ok(ReplyStream::local(rx, cancel))
            }
            Target::Remote { link, name } => {
                let payload = wire::to_payload(&req).map_err(CallError::Codec)?;
                let corr_id = link.next_corr();
                let (tx, rx) = mpsc::channel(self.window.max(1));
                link.add_pending(corr_id, Pending::Stream(tx))?;
                let env = Envelope {
                    to: name.to_string(),
                    from: link.node_name.to_string(),
                    corr_id,
                    kind: Kind::Stream,
                    payload,
                    trace: TraceContext::current(),
                };
                let sent = clock::timeout(self.clock.as_ref(), self.timeout, link.send(&env))
                    .await
                    .unwrap_or(Err(CallError::Timeout(self.timeout)));
                if let Err(e) = sent {
                    link.remove_pending(corr_id);
                    return Err(e);
                }
                Ok(ReplyStream {
                    inner: Inner::Remote(RemoteStream {
                        rx,
                        link: link.clone(),
                        corr_id,
                        unacked: 0,
                        credit_every: (self.window / 2).max(1) as u32,
                        finished: false,
                    }),
                    _t: PhantomData,
                })
            }
        }
    }
}

/// Carries a stream's items back across `link` in order; a cancellation from the consumer
/// crosses the link before it reaches the producer (dropping `upstream` cancels it).
async fn forward_across<T: serde::de::DeserializeOwned + Send + 'static>(
    link: Arc<dyn Link>,
    mut upstream: ReplyStream<T>,
    tx: mpsc::Sender<Result<T, CallError>>,
    cancel: CancellationToken,
) {
    use futures::StreamExt;
    loop {
        let item = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                let _ = link.transit(Direction::Request).await;
                return;
            }
            item = upstream.next() => item,
        };
        let Some(item) = item else { return };
        if let Err(e) = link.transit(Direction::Reply).await {
            let _ = tx.send(Err(e)).await;
            return;
        }
        if tx.send(item).await.is_err() {
            return;
        }
    }
}

struct RemoteStream {
    rx: mpsc::Receiver<Result<Bytes, CallError>>,
    link: Arc<PeerLink>,
    corr_id: u64,
    unacked: u32,
    credit_every: u32,
    finished: bool,
}

impl Drop for RemoteStream {
    fn drop(&mut self) {
        if !self.finished && self.link.remove_pending(self.corr_id).is_some() {
            self.link
                .send_control(Kind::Cancel, self.corr_id, Bytes::new());
        }
    }
}

enum Inner<T> {
    Local {
        rx: mpsc::Receiver<Result<T, CallError>>,
        _cancel_on_drop: DropGuard,
    },
    Remote(RemoteStream),
}

/// A stream of responses from [`Addr::stream`]. Bounded end to end (a slow consumer slows
/// the producer); dropping it sends Cancel to the producer.
pub struct ReplyStream<T> {
    inner: Inner<T>,
    _t: PhantomData<fn() -> T>,
}

impl<T> ReplyStream<T> {
    pub(crate) fn local(
        rx: mpsc::Receiver<Result<T, CallError>>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            inner: Inner::Local {
                rx,
                _cancel_on_drop: cancel.drop_guard(),
            },
            _t: PhantomData,
        }
    }
}

impl<T: serde::de::DeserializeOwned> Stream for ReplyStream<T> {
    type Item = Result<T, CallError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // ReplyStream is Unpin: every field is.
        let this = self.get_mut();
        match &mut this.inner {
            Inner::Local { rx, .. } => rx.poll_recv(cx),
            Inner::Remote(remote) => match remote.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    remote.unacked += 1;
                    if remote.unacked >= remote.credit_every {
                        let grant = wire::to_payload(&remote.unacked).unwrap_or_default();
                        remote
                            .link
                            .send_control(Kind::Credit, remote.corr_id, grant);
                        remote.unacked = 0;
                    }
                    Poll::Ready(Some(wire::from_payload(&bytes).map_err(CallError::Codec)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    remote.finished = true;
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}
