//! [`Node`]: one process's presence on the request plane.
//!
//! A node binds ONE ROUTER socket that serves every registered service, and connects one
//! DEALER per peer node it calls (created on first use, then shared by every [`Addr`] to
//! that peer). Replies go back through the ROUTER to the caller's DEALER identity.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::{CancellationToken, DropGuard};
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::addr::Addr;
use crate::clock::{SharedClock, TokioClock};
use crate::local::{LocalService, ServiceFactory};
use crate::peer::PeerLink;
use crate::service::{CallError, Handler, RequestCtx, Service};
use crate::supervisor::{self, RestartPolicy, SupervisorHandle};
use crate::telemetry::{DropReason, MetricsRegistry, RuntimeMetrics};
use crate::wire::{self, Envelope, Kind, WireError};
use futures::{FutureExt, StreamExt};
use tracing::Instrument;

/// Request-plane settings of a node (all have defaults; YAML field names as below).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Name of this node (appears in envelopes and logs).
    pub name: String,
    /// ZeroMQ endpoint to bind the ROUTER on; port 0 picks a free port.
    pub bind: String,
    /// How long a call waits for its reply (ms); also how long a stream served to a remote
    /// caller waits for credit before it is ended (the caller is gone or stopped reading).
    pub call_timeout_ms: u64,
    /// Inbound frames larger than this are dropped and counted.
    pub max_frame_bytes: usize,
    /// Stream items in flight per stream (local channel size and wire credit window).
    pub stream_window: usize,
    /// Frames queued per outbound socket before senders wait.
    pub send_queue: usize,
    /// Restart policy for served handlers.
    pub restart: RestartPolicy,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: "node".to_string(),
            bind: "tcp://127.0.0.1:0".to_string(),
            call_timeout_ms: 5_000,
            max_frame_bytes: 16 << 20,
            stream_window: 256,
            send_queue: 4096,
            restart: RestartPolicy::default(),
        }
    }
}

impl NodeConfig {
    /// The call timeout as a `Duration`.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }
}

/// Why a node operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Binding the ROUTER failed.
    #[error("bind {endpoint}: {message}")]
    Bind {
        /// Endpoint asked for.
        endpoint: String,
        /// Cause.
        message: String,
    },
    /// A service of that name is already registered.
    #[error("service `{0}` already registered")]
    Duplicate(String),
    /// The supervisor or the service actor could not start.
    #[error("spawn `{name}`: {message}")]
    Spawn {
        /// Service name.
        name: String,
        /// Cause.
        message: String,
    },
}

/// Type-erased access to a registered service for the wire.
trait InboundService: Send + Sync {
    fn serve(self: Arc<Self>, env: Envelope, reply: Responder, shared: Arc<Shared>);
}

struct Registered {
    inbound: Arc<dyn InboundService>,
    typed: Arc<dyn Any + Send + Sync>,
    supervisor: SupervisorHandle,
}

type StreamKey = (Bytes, u64);

/// Flow-control state of one stream served to a remote caller.
struct ServedStream {
    cancel: CancellationToken,
    credit: Arc<Semaphore>,
    /// Which stream holds the key: a task that ends removes its own entry only, never the
    /// entry of a later stream that reused the corr_id after a cancel.
    serial: u64,
}

/// State shared by the node handle and its socket tasks.
struct Shared {
    name: Arc<str>,
    config: NodeConfig,
    services: Mutex<HashMap<String, Registered>>,
    served_streams: Mutex<HashMap<StreamKey, ServedStream>>,
    next_stream_serial: std::sync::atomic::AtomicU64,
    metrics: RuntimeMetrics,
    router_out: mpsc::Sender<ZmqMessage>,
    clock: SharedClock,
}

impl Shared {
    fn lookup(&self, name: &str) -> Option<Arc<dyn InboundService>> {
        lock(&self.services).get(name).map(|r| r.inbound.clone())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends answers for one inbound request back through the ROUTER.
#[derive(Clone)]
struct Responder {
    peer: Bytes,
    corr_id: u64,
    out: mpsc::Sender<ZmqMessage>,
    metrics: RuntimeMetrics,
}

impl Responder {
    async fn send(&self, kind: Kind, payload: Bytes) -> bool {
        let env = Envelope {
            to: String::new(),
            from: String::new(),
            corr_id: self.corr_id,
            kind,
            payload,
            trace: None,
        };
        let mut msg = ZmqMessage::from(wire::encode_frame(&env));
        msg.push_front(self.peer.clone());
        let ok = self.out.send(msg).await.is_ok();
        if ok {
            self.metrics.frame_out();
        }
        ok
    }

    async fn send_error(&self, err: WireError) -> bool {
        self.send(Kind::Error, wire::to_payload(&err).unwrap_or_default())
            .await
    }
}

impl<S: Service> InboundService for LocalService<S> {
    fn serve(self: Arc<Self>, env: Envelope, reply: Responder, shared: Arc<Shared>) {
        let req: S::Req = match wire::from_payload(&env.payload) {
            Ok(r) => r,
            Err(e) => {
                if env.kind != Kind::Cast {
                    tokio::spawn(async move { reply.send_error(WireError::BadRequest(e)).await });
                }
                return;
            }
        };
        // Calls and streams made inside a request are served in a span of it; casts and
        // background requests in none.
        let span = match (&env.trace, env.kind) {
            (Some(trace), Kind::Call | Kind::Stream) => {
                crate::telemetry::context::serve_span(&self.name, &env.from, trace)
            }
            _ => tracing::Span::none(),
        };
        let ctx = RequestCtx {
            from: env.from,
            corr_id: env.corr_id,
            span,
        };
        match env.kind {
            Kind::Cast => self.submit(crate::local::ServiceMsg::Cast { req, ctx }),
            Kind::Call => {
                // Submitted before spawning so requests from one peer keep their order.
                let reply_future = self.call_submitted(req, ctx);
                tokio::spawn(async move {
                    match reply_future.await {
                        Ok(resp) => match wire::to_payload(&resp) {
                            Ok(bytes) => reply.send(Kind::Reply, bytes).await,
                            Err(e) => reply.send_error(WireError::Handler(e)).await,
                        },
                        Err(e) => reply.send_error(e.to_wire()).await,
                    };
                });
            }
            Kind::Stream => {
                let key = (reply.peer.clone(), reply.corr_id);
                let cancel = CancellationToken::new();
                let credit = Arc::new(Semaphore::new(shared.config.stream_window.max(1)));
                let serial = shared
                    .next_stream_serial
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                {
                    let mut streams = lock(&shared.served_streams);
                    if streams.contains_key(&key) {
                        // A second stream on a live corr_id would make the first one
                        // uncancellable: refuse it, the first goes on.
                        drop(streams);
                        let corr_id = reply.corr_id;
                        tokio::spawn(async move {
                            reply
                                .send_error(WireError::BadRequest(format!(
                                    "corr_id {corr_id} already has an open stream"
                                )))
                                .await
                        });
                        return;
                    }
                    streams.insert(
                        key.clone(),
                        ServedStream {
                            cancel: cancel.clone(),
                            credit: credit.clone(),
                            serial,
                        },
                    );
                }
                let span = ctx.span.clone();
                let forward = async move {
                    let last =
                        forward_stream(self, req, ctx, &reply, cancel, credit, &shared).await;
                    {
                        let mut streams = lock(&shared.served_streams);
                        if streams.get(&key).is_some_and(|s| s.serial == serial) {
                            streams.remove(&key);
                        }
                    }
                    // Only now: a caller that reuses the corr_id once it has the stream's
                    // end finds it free.
                    if let Some((kind, payload)) = last {
                        reply.send(kind, payload).await;
                    }
                };
                // The span lasts as long as the stream: what it carries is the request's.
                tokio::spawn(forward.instrument(span));
            }
            _ => shared.metrics.drop_frame(DropReason::Unexpected),
        }
    }
}

/// Pumps a locally produced stream onto the wire, one item per credit. A consumer that
/// grants no credit for `call_timeout_ms` (it crashed, or stopped reading) gets an error and
/// the stream is dropped, which cancels it at the producer: a vanished caller cannot pin a
/// producer's resources (a worker's KV blocks) forever.
///
/// Returns the stream's last frame (its end, or an error) for the caller to send once the
/// stream is forgotten; `None` when the consumer cancelled or is gone.
async fn forward_stream<S: Service>(
    service: Arc<LocalService<S>>,
    req: S::Req,
    ctx: RequestCtx,
    reply: &Responder,
    cancel: CancellationToken,
    credit: Arc<Semaphore>,
    shared: &Shared,
) -> Option<(Kind, Bytes)> {
    let error = |err: WireError| Some((Kind::Error, wire::to_payload(&err).unwrap_or_default()));
    let idle = shared.config.call_timeout();
    let mut stream = match service.open_stream(req, ctx).await {
        Ok(s) => s,
        Err(e) => return error(e.to_wire()),
    };
    loop {
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => return None,
            p = crate::clock::timeout(shared.clock.as_ref(), idle, credit.acquire()) => p,
        };
        let Ok(permit) = permit else {
            tracing::debug!(
                corr_id = reply.corr_id,
                "stream got no credit in {idle:?}; ending it"
            );
            return error(WireError::Handler(format!(
                "the caller granted no stream credit for {} ms",
                idle.as_millis()
            )));
        };
        let Ok(permit) = permit else { return None };
        permit.forget();
        let item = tokio::select! {
            biased;
            _ = cancel.cancelled() => return None,
            item = stream.next() => item,
        };
        let mut batch = Vec::new();
        let mut last = match item {
            Some(Ok(resp)) => {
                match wire::to_payload(&resp) {
                    Ok(bytes) => batch.push(bytes),
                    Err(e) => return error(WireError::Handler(e)),
                }
                None
            }
            terminal => Some(terminal),
        };
        // Take items that are already waiting, within the credit window, into one frame.
        while last.is_none() && batch.len() < MAX_STREAM_BATCH {
            let Ok(permit) = credit.try_acquire() else {
                break;
            };
            match stream.next().now_or_never() {
                Some(Some(Ok(resp))) => match wire::to_payload(&resp) {
                    Ok(bytes) => {
                        permit.forget();
                        batch.push(bytes);
                    }
                    Err(e) => last = Some(Some(Err(CallError::Codec(e)))),
                },
                Some(terminal) => last = Some(terminal),
                None => break,
            }
        }
        let sent = match batch.len() {
            0 => true,
            1 => reply.send(Kind::StreamItem, batch.remove(0)).await,
            _ => match wire::to_payload(&batch) {
                Ok(bytes) => reply.send(Kind::StreamBatch, bytes).await,
                Err(e) => return error(WireError::Handler(e)),
            },
        };
        if !sent {
            return None;
        }
        match last {
            None => {}
            Some(Some(Ok(_))) => {}
            Some(Some(Err(e))) => return error(e.to_wire()),
            Some(None) => return Some((Kind::StreamEnd, Bytes::new())),
        }
    }
}

/// Most stream items packed into one frame.
const MAX_STREAM_BATCH: usize = 64;

/// A process's endpoint on the request plane. Cheap to clone; shuts down when the last
/// clone is dropped or [`Node::shutdown`] is called.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    shared: Arc<Shared>,
    endpoint: String,
    clock: SharedClock,
    registry: MetricsRegistry,
    peers: tokio::sync::Mutex<HashMap<String, Arc<PeerLink>>>,
    /// False for an in-memory node ([`Node::in_memory`]): it has no sockets to reach peers.
    networked: bool,
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl Drop for NodeInner {
    /// The last handle is gone: stop the services' actors along with the sockets.
    fn drop(&mut self) {
        for registered in lock(&self.shared.services).values() {
            registered.supervisor.stop();
        }
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Node({} @ {})",
            self.inner.shared.name, self.inner.endpoint
        )
    }
}

impl Node {
    /// Binds the ROUTER and starts serving, on the real (tokio) clock with a fresh
    /// metrics registry.
    pub async fn start(config: NodeConfig) -> Result<Self, NodeError> {
        Self::start_with(config, TokioClock::shared(), MetricsRegistry::new()).await
    }

    /// Binds the ROUTER and starts serving with the given clock and metrics registry.
    pub async fn start_with(
        config: NodeConfig,
        clock: SharedClock,
        registry: MetricsRegistry,
    ) -> Result<Self, NodeError> {
        let (router, endpoint) = bind_router(&config.bind).await?;
        let metrics = RuntimeMetrics::new(&registry);
        let (router_out, out_rx) = mpsc::channel(config.send_queue.max(1));
        let node = Self::assemble(config, endpoint, clock, registry, metrics, router_out, true);
        let (send_half, recv_half) = router.split();
        let (shared, stop) = (&node.inner.shared, &node.inner.stop);
        tokio::spawn(router_write_loop(send_half, out_rx, stop.clone()));
        tokio::spawn(router_read_loop(recv_half, shared.clone(), stop.clone()));
        tracing::info!(node = %shared.name, endpoint = %node.inner.endpoint, "node listening");
        Ok(node)
    }

    /// A node without sockets: services are served and reached in this process only
    /// ([`Node::connect`] to any other endpoint fails). The simulator runs the real actors on
    /// such nodes and puts its own network between them with [`Addr::via`]; nothing here
    /// touches the OS network, so a paused-time runtime stays deterministic.
    pub fn in_memory(config: NodeConfig, clock: SharedClock, registry: MetricsRegistry) -> Self {
        let metrics = RuntimeMetrics::new(&registry);
        // Replies to remote callers go out through `router_out`; an in-memory node has none.
        let (router_out, _) = mpsc::channel(1);
        let endpoint = format!("inproc://{}", config.name);
        Self::assemble(
            config, endpoint, clock, registry, metrics, router_out, false,
        )
    }

    fn assemble(
        config: NodeConfig,
        endpoint: String,
        clock: SharedClock,
        registry: MetricsRegistry,
        metrics: RuntimeMetrics,
        router_out: mpsc::Sender<ZmqMessage>,
        networked: bool,
    ) -> Self {
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            name: Arc::from(config.name.as_str()),
            config,
            services: Mutex::new(HashMap::new()),
            served_streams: Mutex::new(HashMap::new()),
            next_stream_serial: std::sync::atomic::AtomicU64::new(0),
            metrics,
            router_out,
            clock: clock.clone(),
        });
        Self {
            inner: Arc::new(NodeInner {
                shared,
                endpoint,
                clock,
                registry,
                peers: tokio::sync::Mutex::new(HashMap::new()),
                networked,
                _stop_on_drop: stop.clone().drop_guard(),
                stop,
            }),
        }
    }

    /// The endpoint peers connect to (bound port resolved), e.g. `tcp://127.0.0.1:40123`.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.inner.shared.name
    }

    /// The runtime's counters for this node.
    pub fn metrics(&self) -> &RuntimeMetrics {
        &self.inner.shared.metrics
    }

    /// The Prometheus registry this node's counters live in (components may add theirs).
    pub fn registry(&self) -> &MetricsRegistry {
        &self.inner.registry
    }

    /// The clock every timer of this node uses.
    pub fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }

    /// The node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.shared.config
    }

    /// Registers service `name`, served by handlers built by `make` inside a supervised
    /// actor restarted per the node's restart policy.
    pub async fn serve<S, H, F>(&self, name: &str, make: F) -> Result<ServiceHandle<S>, NodeError>
    where
        S: Service,
        H: Handler<S>,
        F: Fn() -> H + Send + Sync + 'static,
    {
        let policy = self.inner.shared.config.restart;
        self.serve_with_policy(name, policy, make).await
    }

    /// Like [`Node::serve`] with an explicit restart policy.
    pub async fn serve_with_policy<S, H, F>(
        &self,
        name: &str,
        policy: RestartPolicy,
        make: F,
    ) -> Result<ServiceHandle<S>, NodeError>
    where
        S: Service,
        H: Handler<S>,
        F: Fn() -> H + Send + Sync + 'static,
    {
        let shared = &self.inner.shared;
        if lock(&shared.services).contains_key(name) {
            return Err(NodeError::Duplicate(name.to_string()));
        }
        let service = Arc::new(LocalService::<S>::new(
            name.to_string(),
            shared.config.call_timeout(),
            shared.config.stream_window,
            self.inner.clock.clone(),
        ));
        let factory = ServiceFactory {
            make: Arc::new(make),
            service: service.clone(),
        };
        let supervisor = supervisor::spawn_supervisor(
            format!("{}/{}", shared.name, name),
            factory,
            policy,
            self.inner.clock.clone(),
            None,
        )
        .await
        .map_err(|e| NodeError::Spawn {
            name: name.to_string(),
            message: e.to_string(),
        })?;
        let events = supervisor.subscribe();
        let mut services = lock(&shared.services);
        if services.contains_key(name) {
            supervisor.stop();
            return Err(NodeError::Duplicate(name.to_string()));
        }
        services.insert(
            name.to_string(),
            Registered {
                inbound: service.clone(),
                typed: service.clone(),
                supervisor,
            },
        );
        Ok(ServiceHandle {
            addr: self.addr_for(service),
            events,
        })
    }

    fn addr_for<S: Service>(&self, service: Arc<LocalService<S>>) -> Addr<S> {
        Addr::local(
            service,
            self.inner.shared.config.call_timeout(),
            self.inner.clock.clone(),
            self.inner.shared.metrics.clone(),
        )
    }

    /// An address of a service registered on this node.
    pub fn local<S: Service>(&self, name: &str) -> Result<Addr<S>, CallError> {
        let typed = lock(&self.inner.shared.services)
            .get(name)
            .map(|r| r.typed.clone())
            .ok_or_else(|| CallError::UnknownActor(name.to_string()))?;
        let service = typed
            .downcast::<LocalService<S>>()
            .map_err(|_| CallError::TypeMismatch(name.to_string()))?;
        Ok(self.addr_for(service))
    }

    /// An address of service `name` on the node at `endpoint` (this node's own endpoint
    /// yields a local address). Connects a DEALER to that node on first use.
    pub async fn connect<S: Service>(
        &self,
        endpoint: &str,
        name: &str,
    ) -> Result<Addr<S>, CallError> {
        if endpoint == self.inner.endpoint {
            return self.local(name);
        }
        if !self.inner.networked {
            return Err(CallError::Transport(format!(
                "node {} is in-memory and cannot reach {endpoint}",
                self.inner.shared.name
            )));
        }
        let link = self.link(endpoint).await?;
        let cfg = &self.inner.shared.config;
        Ok(Addr::remote(
            link,
            name,
            cfg.call_timeout(),
            cfg.stream_window,
            self.inner.clock.clone(),
            self.inner.shared.metrics.clone(),
        ))
    }

    async fn link(&self, endpoint: &str) -> Result<Arc<PeerLink>, CallError> {
        let mut peers = self.inner.peers.lock().await;
        if let Some(link) = peers.get(endpoint) {
            return Ok(link.clone());
        }
        let cfg = &self.inner.shared.config;
        let link = crate::clock::timeout(
            self.inner.clock.as_ref(),
            cfg.call_timeout(),
            PeerLink::connect(
                endpoint,
                self.inner.shared.name.clone(),
                cfg.max_frame_bytes,
                cfg.send_queue,
                self.inner.shared.metrics.clone(),
                self.inner.stop.clone(),
            ),
        )
        .await
        .map_err(|_| CallError::Timeout(cfg.call_timeout()))??;
        peers.insert(endpoint.to_string(), link.clone());
        Ok(link)
    }

    /// Stops serving: closes the sockets and stops every service's supervisor.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
        for registered in lock(&self.inner.shared.services).values() {
            registered.supervisor.stop();
        }
    }
}

/// Binds a ROUTER socket on `bind`; returns it with the endpoint it got (port resolved).
pub(crate) async fn bind_router(bind: &str) -> Result<(RouterSocket, String), NodeError> {
    let mut router = RouterSocket::new();
    let endpoint = router
        .bind(bind)
        .await
        .map_err(|e| NodeError::Bind {
            endpoint: bind.to_string(),
            message: e.to_string(),
        })?
        .to_string();
    Ok((router, endpoint))
}

/// What [`Node::serve`] returns: a local address and the supervisor's event feed.
pub struct ServiceHandle<S: Service> {
    /// Local address of the service.
    pub addr: Addr<S>,
    /// Failures (with reasons), restarts and escalations of the serving actor.
    pub events: tokio::sync::broadcast::Receiver<crate::supervisor::SupervisorEvent>,
}

async fn router_write_loop(
    mut socket: zeromq::RouterSendHalf,
    mut out: mpsc::Receiver<ZmqMessage>,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            m = out.recv() => m,
        };
        let Some(msg) = msg else { return };
        if let Err(e) = socket.send(msg).await {
            tracing::debug!(error = %e, "router send failed (peer gone?)");
        }
    }
}

async fn router_read_loop(
    mut socket: zeromq::RouterRecvHalf,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            m = socket.recv() => m,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "router recv failed");
                continue;
            }
        };
        shared.metrics.frame_in();
        let mut parts = msg.into_vecdeque();
        let (Some(peer), Some(frame), None) = (parts.pop_front(), parts.pop_front(), parts.front())
        else {
            shared.metrics.drop_frame(DropReason::Malformed);
            continue;
        };
        let env = match wire::decode_frame(&frame, shared.config.max_frame_bytes) {
            Ok(env) => env,
            Err(e) => {
                tracing::trace!(error = %e, "dropping frame");
                shared.metrics.drop_frame(e.reason());
                continue;
            }
        };
        dispatch(&shared, peer, env);
    }
}

fn dispatch(shared: &Arc<Shared>, peer: Bytes, env: Envelope) {
    let reply = Responder {
        peer,
        corr_id: env.corr_id,
        out: shared.router_out.clone(),
        metrics: shared.metrics.clone(),
    };
    match env.kind {
        Kind::Call | Kind::Cast | Kind::Stream => match shared.lookup(&env.to) {
            Some(service) => service.serve(env, reply, shared.clone()),
            None => {
                if env.kind == Kind::Cast {
                    shared.metrics.drop_frame(DropReason::Unexpected);
                } else {
                    let name = env.to;
                    tokio::spawn(
                        async move { reply.send_error(WireError::UnknownActor(name)).await },
                    );
                }
            }
        },
        Kind::Cancel => {
            if let Some(s) = lock(&shared.served_streams).remove(&(reply.peer, env.corr_id)) {
                s.cancel.cancel();
            }
        }
        Kind::Credit => {
            let grant: u32 = wire::from_payload(&env.payload).unwrap_or(0);
            let streams = lock(&shared.served_streams);
            // Late credit for a stream that already ended is normal and ignored. Grants are
            // capped so a hostile peer cannot overflow the semaphore.
            if let Some(s) = streams.get(&(reply.peer, env.corr_id)) {
                s.credit.add_permits((grant as usize).min(1 << 20));
            }
        }
        _ => shared.metrics.drop_frame(DropReason::Unexpected),
    }
}
