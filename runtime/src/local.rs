//! The local side of a service: its supervised actor and the slot that always points at the
//! currently running incarnation (so callers ride through restarts).

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, MessagingErr};
use tokio::sync::{oneshot, watch};
use tracing::Instrument;

use crate::clock::{self, SharedClock};
use crate::service::{CallError, Handler, RequestCtx, Service, StreamSink};
use crate::supervisor::ChildFactory;
use crate::ReplyStream;

/// A request delivered to a service actor.
pub(crate) enum ServiceMsg<S: Service> {
    Call {
        req: S::Req,
        ctx: RequestCtx,
        reply: oneshot::Sender<Result<S::Resp, CallError>>,
    },
    Cast {
        req: S::Req,
        ctx: RequestCtx,
    },
    Stream {
        req: S::Req,
        ctx: RequestCtx,
        sink: StreamSink<S::Resp>,
    },
}

/// Which incarnation of the service actor is live.
pub(crate) enum Slot<S: Service> {
    Running(ActorRef<ServiceMsg<S>>),
    Restarting,
    Dead(String),
}

impl<S: Service> Clone for Slot<S> {
    fn clone(&self) -> Self {
        match self {
            Slot::Running(r) => Slot::Running(r.clone()),
            Slot::Restarting => Slot::Restarting,
            Slot::Dead(m) => Slot::Dead(m.clone()),
        }
    }
}

/// A service registered on this node.
pub(crate) struct LocalService<S: Service> {
    pub(crate) name: String,
    slot: watch::Sender<Slot<S>>,
    pub(crate) timeout: Duration,
    pub(crate) window: usize,
    pub(crate) clock: SharedClock,
}

impl<S: Service> LocalService<S> {
    pub(crate) fn new(name: String, timeout: Duration, window: usize, clock: SharedClock) -> Self {
        let (slot, _) = watch::channel(Slot::Restarting);
        Self {
            name,
            slot,
            timeout,
            window,
            clock,
        }
    }

    /// Hands `msg` to the live actor, waiting through a restart if one is under way.
    async fn deliver(&self, mut msg: ServiceMsg<S>) -> Result<(), CallError> {
        let mut watcher = self.slot.subscribe();
        loop {
            let current = watcher.borrow_and_update().clone();
            match current {
                Slot::Running(actor) => match actor.send_message(msg) {
                    Ok(()) => return Ok(()),
                    Err(MessagingErr::SendErr(back)) => msg = back,
                    Err(other) => return Err(CallError::ActorFailed(other.to_string())),
                },
                Slot::Dead(reason) => return Err(CallError::ActorFailed(reason)),
                Slot::Restarting => {}
            }
            // The actor is down: wait for the supervisor to publish the next incarnation.
            if watcher.changed().await.is_err() {
                return Err(CallError::ActorFailed(format!("{} stopped", self.name)));
            }
        }
    }

    /// Hands `msg` to the live actor right now if there is one, preserving arrival order;
    /// gives the message back when the actor is between incarnations.
    fn deliver_now(&self, msg: ServiceMsg<S>) -> Result<(), ServiceMsg<S>> {
        let current = self.slot.borrow().clone();
        match current {
            Slot::Running(actor) => match actor.send_message(msg) {
                Ok(()) => Ok(()),
                Err(MessagingErr::SendErr(back)) => Err(back),
                Err(_) => Ok(()),
            },
            _ => Err(msg),
        }
    }

    /// Delivers in order when possible, else in the background once the actor is back.
    pub(crate) fn submit(self: &Arc<Self>, msg: ServiceMsg<S>) {
        if let Err(msg) = self.deliver_now(msg) {
            let this = self.clone();
            tokio::spawn(async move {
                let _ = clock::timeout(this.clock.as_ref(), this.timeout, this.deliver(msg)).await;
            });
        }
    }

    /// Submits a call now (in order) and returns a future for its reply.
    pub(crate) fn call_submitted(
        self: &Arc<Self>,
        req: S::Req,
        ctx: RequestCtx,
    ) -> impl std::future::Future<Output = Result<S::Resp, CallError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        self.submit(ServiceMsg::Call { req, ctx, reply });
        let this = self.clone();
        async move {
            let timeout = this.timeout;
            let name = this.name.clone();
            let wait = async move {
                rx.await.unwrap_or_else(|_| {
                    Err(CallError::ActorFailed(format!(
                        "{name} stopped before replying"
                    )))
                })
            };
            clock::timeout(this.clock.as_ref(), timeout, wait)
                .await
                .unwrap_or(Err(CallError::Timeout(timeout)))
        }
    }

    pub(crate) async fn call(&self, req: S::Req, ctx: RequestCtx) -> Result<S::Resp, CallError> {
        let timeout = self.timeout;
        let work = async {
            let (reply, rx) = oneshot::channel();
            self.deliver(ServiceMsg::Call { req, ctx, reply }).await?;
            rx.await.unwrap_or_else(|_| {
                Err(CallError::ActorFailed(format!(
                    "{} stopped before replying",
                    self.name
                )))
            })
        };
        clock::timeout(self.clock.as_ref(), timeout, work)
            .await
            .unwrap_or(Err(CallError::Timeout(timeout)))
    }

    pub(crate) async fn cast(&self, req: S::Req, ctx: RequestCtx) -> Result<(), CallError> {
        clock::timeout(
            self.clock.as_ref(),
            self.timeout,
            self.deliver(ServiceMsg::Cast { req, ctx }),
        )
        .await
        .unwrap_or(Err(CallError::Timeout(self.timeout)))
    }

    pub(crate) async fn open_stream(
        &self,
        req: S::Req,
        ctx: RequestCtx,
    ) -> Result<ReplyStream<S::Resp>, CallError> {
        let (sink, rx) = StreamSink::channel(self.window);
        let cancel = sink.cancel.clone();
        clock::timeout(
            self.clock.as_ref(),
            self.timeout,
            self.deliver(ServiceMsg::Stream { req, ctx, sink }),
        )
        .await
        .unwrap_or(Err(CallError::Timeout(self.timeout)))?;
        Ok(ReplyStream::local(rx, cancel))
    }

    fn publish(&self, slot: Slot<S>) {
        self.slot.send_replace(slot);
    }
}

/// The actor that owns one handler instance.
pub(crate) struct ServiceActor<S, H> {
    _p: std::marker::PhantomData<fn() -> (S, H)>,
}

/// State of a service actor: its handler and the slot it marks before it fails.
pub(crate) struct ServiceState<S: Service, H> {
    handler: H,
    service: Arc<LocalService<S>>,
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".to_string()
    }
}

impl<S: Service, H: Handler<S>> ServiceState<S, H> {
    /// Marks the service as restarting before anyone learns of the failure, so a caller
    /// that retries at once waits for the next incarnation instead of the dying one.
    fn failing(&self, reason: String) -> ActorProcessingErr {
        self.service.publish(Slot::Restarting);
        reason.into()
    }
}

impl<S: Service, H: Handler<S>> Actor for ServiceActor<S, H> {
    type Msg = ServiceMsg<S>;
    type State = ServiceState<S, H>;
    type Arguments = ServiceState<S, H>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: Self::State,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        use futures::FutureExt;
        use std::panic::AssertUnwindSafe;
        match msg {
            ServiceMsg::Call { req, ctx, reply } => {
                let span = ctx.span.clone();
                let outcome = AssertUnwindSafe(state.handler.call(req, &ctx).instrument(span))
                    .catch_unwind()
                    .await;
                match outcome {
                    Ok(Ok(resp)) => {
                        let _ = reply.send(Ok(resp));
                    }
                    Ok(Err(err)) if err.fatal => {
                        let failure = state.failing(err.message.clone());
                        let _ = reply.send(Err(CallError::Handler(err.message)));
                        return Err(failure);
                    }
                    Ok(Err(err)) => {
                        let _ = reply.send(Err(CallError::Handler(err.message)));
                    }
                    Err(panic) => {
                        let why = panic_message(panic.as_ref());
                        let failure = state.failing(why.clone());
                        let _ = reply.send(Err(CallError::ActorFailed(why)));
                        return Err(failure);
                    }
                }
            }
            ServiceMsg::Cast { req, ctx } => {
                let outcome = AssertUnwindSafe(state.handler.cast(req, &ctx))
                    .catch_unwind()
                    .await;
                match outcome {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) if err.fatal => return Err(state.failing(err.message)),
                    Ok(Err(err)) => tracing::debug!(error = %err, "cast failed"),
                    Err(panic) => return Err(state.failing(panic_message(panic.as_ref()))),
                }
            }
            ServiceMsg::Stream { req, ctx, sink } => {
                let keep = sink.clone();
                let span = ctx.span.clone();
                let outcome =
                    AssertUnwindSafe(state.handler.stream(req, sink, &ctx).instrument(span))
                        .catch_unwind()
                        .await;
                // Never block the actor on a slow consumer just to report an error.
                match outcome {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => {
                        let failure = err.fatal.then(|| state.failing(err.message.clone()));
                        let _ = keep.tx.try_send(Err(CallError::Handler(err.message)));
                        if let Some(failure) = failure {
                            return Err(failure);
                        }
                    }
                    Err(panic) => {
                        let why = panic_message(panic.as_ref());
                        let failure = state.failing(why.clone());
                        let _ = keep.tx.try_send(Err(CallError::ActorFailed(why)));
                        return Err(failure);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Builds handler incarnations and keeps the service slot current.
pub(crate) struct ServiceFactory<S: Service, H> {
    pub(crate) make: Arc<dyn Fn() -> H + Send + Sync>,
    pub(crate) service: Arc<LocalService<S>>,
}

impl<S: Service, H: Handler<S>> ChildFactory for ServiceFactory<S, H> {
    type Child = ServiceActor<S, H>;

    fn make(&self) -> (Self::Child, ServiceState<S, H>) {
        (
            ServiceActor {
                _p: std::marker::PhantomData,
            },
            ServiceState {
                handler: (self.make)(),
                service: self.service.clone(),
            },
        )
    }

    fn started(&self, child: &ActorRef<ServiceMsg<S>>) {
        self.service.publish(Slot::Running(child.clone()));
    }

    fn stopped(&self, _reason: &str) {
        self.service.publish(Slot::Restarting);
    }

    fn gave_up(&self, reason: &str) {
        self.service.publish(Slot::Dead(reason.to_string()));
    }
}
