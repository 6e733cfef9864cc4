//! The transfer plane: bulk bytes outside the request plane's envelopes.
//!
//! The owner of some data [`TransferPlane::register`]s it (a list of chunks) and hands the
//! returned [`Descriptor`] to a consumer through any ordinary call; the consumer
//! [`TransferPlane::pull`]s it and gets a [`PullStream`] of pieces in buffer order, chunk by
//! chunk, so it can start using chunk 0 while chunk 1 is still on the way.
//!
//! Paths by locality (the consumer picks, by the descriptor's owner endpoint):
//! * **same process**: the owner's plane is in the consumer's [`TransferHub`]; pieces are
//!   slices of the pinned buffer (no socket, no serialisation). The simulator runs every
//!   node's plane [`TransferPlane::in_memory`] in one hub and puts a modelled [`Link`] in
//!   between with [`TransferPlane::set_link`] (pieces cross it with their size, so a link can
//!   charge bytes / bandwidth), like [`Addr::via`](crate::Addr::via) on the request plane;
//! * **another process**: the owner binds one ROUTER (its own port, next to the request
//!   plane's); each pull connects a DEALER and receives `[header, raw bytes]` multipart
//!   messages, at most `window` pieces ahead of what it has taken (credit flow control).
//!
//! Pinning: a buffer stays until a pull has delivered all of it, the owner
//! [`TransferPlane::release`]s it, or its expiry passes on the plane's [`Clock`]. A consumer
//! that dies mid-pull costs the owner nothing beyond the expiry; an owner that dies gives
//! the consumer [`TransferError::OwnerGone`] or [`TransferError::Timeout`], never a hang.
//!
//! # Example
//! ```
//! use bytes::Bytes;
//! use turbine_runtime::transfer::{TransferConfig, TransferHub, TransferPlane};
//! use turbine_runtime::{MetricsRegistry, TokioClock};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let hub = TransferHub::new();
//! let cfg = TransferConfig::default();
//! let (clock, reg) = (TokioClock::shared(), MetricsRegistry::new());
//! let owner = TransferPlane::in_memory("owner", cfg.clone(), clock.clone(), &reg, &hub);
//! let consumer = TransferPlane::in_memory("consumer", cfg, clock, &reg, &hub);
//!
//! let desc = owner.register(vec![Bytes::from_static(b"layer0"), Bytes::from_static(b"layer1")]);
//! let mut pull = consumer.pull(&desc);
//! let (index, bytes) = pull.next_chunk().await.expect("a chunk")?;
//! assert_eq!((index, &bytes[..]), (0, &b"layer0"[..]));
//! # Ok(())
//! # }
//! ```
//!
//! [`Clock`]: crate::Clock

mod descriptor;
mod frames;
mod pull;
mod serve;
mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use tokio_util::sync::{CancellationToken, DropGuard};

pub use descriptor::{BufferId, ByteRange, Descriptor, Layout, TransferError};
pub use frames::TRANSFER_VERSION;
pub use pull::PullStream;
pub use store::Piece;

use crate::clock::SharedClock;
use crate::link::Link;
use crate::node::NodeError;
use crate::telemetry::MetricsRegistry;

/// Transfer-plane settings (YAML field names as below; all have defaults).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferConfig {
    /// ZeroMQ endpoint the owner's ROUTER binds; port 0 picks a free port.
    pub bind: String,
    /// How long a registered buffer stays pinned when nobody pulls it (ms).
    pub expiry_ms: u64,
    /// Longest wait for any one step of a pull: connecting, the next piece, the next credit
    /// (ms). Bounds how long a dead peer can hold anything up.
    pub pull_timeout_ms: u64,
    /// The owner sends no piece larger than this (bytes); larger chunks go in several.
    pub max_piece_bytes: usize,
    /// The consumer refuses a data frame larger than this (bytes).
    pub max_frame_bytes: usize,
    /// Pieces a pull may have in flight ahead of the consumer.
    pub window: usize,
    /// The most bytes per second the owner's socket sends, over all pulls (0: no cap), so
    /// bulk KV leaves room on a shared link for the request plane. Pulls within one
    /// process (the in-memory path) are never capped.
    pub max_bytes_per_s: u64,
}

impl Default for TransferConfig {
    fn default() -> Self {
        Self {
            bind: "tcp://127.0.0.1:0".to_string(),
            expiry_ms: 30_000,
            pull_timeout_ms: 5_000,
            max_piece_bytes: 4 << 20,
            max_frame_bytes: 64 << 20,
            window: 8,
            max_bytes_per_s: 0,
        }
    }
}

impl TransferConfig {
    /// The pin expiry as a `Duration`.
    pub fn expiry(&self) -> Duration {
        Duration::from_millis(self.expiry_ms)
    }

    /// The pull timeout as a `Duration`.
    pub fn pull_timeout(&self) -> Duration {
        Duration::from_millis(self.pull_timeout_ms)
    }
}

/// Counters of one plane (in the registry given at start, prefix `turbine_transfer`).
#[derive(Clone, Debug, Default)]
pub(crate) struct TransferMetrics {
    pub bytes_out: Counter,
    pub bytes_in: Counter,
    pub pulls: Counter,
    pub pull_errors: Counter,
}

impl TransferMetrics {
    fn new(registry: &MetricsRegistry) -> Self {
        let m = Self::default();
        registry.with(|r| {
            let r = r.sub_registry_with_prefix("turbine_transfer");
            r.register(
                "bytes_out",
                "Bytes sent to consumers over sockets",
                m.bytes_out.clone(),
            );
            r.register("bytes_in", "Bytes pulled (every path)", m.bytes_in.clone());
            r.register("pulls", "Pulls completed by this consumer", m.pulls.clone());
            r.register(
                "pull_errors",
                "Pulls by this consumer that ended in an error",
                m.pull_errors.clone(),
            );
        });
        m
    }
}

/// The planes of one process that reach each other by direct copy. `turbine up` makes one
/// per process; the simulator one per simulation. Planes in different hubs always go
/// through sockets (two hubs in one test process behave like two processes).
#[derive(Clone, Default, Debug)]
pub struct TransferHub {
    planes: Arc<Mutex<HashMap<String, Weak<store::Store>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TransferHub {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    fn find(&self, endpoint: &str) -> Option<Option<Arc<store::Store>>> {
        lock(&self.planes).get(endpoint).map(Weak::upgrade)
    }
}

/// One process's presence on the transfer plane: owner (register, serve) and consumer
/// (pull) at once. Cheap to clone; stops serving when the last clone is dropped or on
/// [`TransferPlane::shutdown`].
#[derive(Clone)]
pub struct TransferPlane {
    inner: Arc<PlaneInner>,
}

struct PlaneInner {
    endpoint: String,
    networked: bool,
    config: TransferConfig,
    clock: SharedClock,
    store: Arc<store::Store>,
    hub: TransferHub,
    links: Mutex<HashMap<String, Arc<dyn Link>>>,
    metrics: TransferMetrics,
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl Drop for PlaneInner {
    fn drop(&mut self) {
        lock(&self.hub.planes).remove(&self.endpoint);
    }
}

impl std::fmt::Debug for TransferPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TransferPlane({})", self.inner.endpoint)
    }
}

impl TransferPlane {
    /// Binds the owner's ROUTER on `config.bind` and joins `hub`.
    pub async fn start(
        config: TransferConfig,
        clock: SharedClock,
        registry: &MetricsRegistry,
        hub: &TransferHub,
    ) -> Result<Self, NodeError> {
        let (router, endpoint) = crate::node::bind_router(&config.bind).await?;
        let plane = Self::assemble(endpoint, true, config, clock, registry, hub);
        let inner = &plane.inner;
        let ctx = serve::ServeCtx {
            store: inner.store.clone(),
            clock: inner.clock.clone(),
            timeout: inner.config.pull_timeout(),
            max_piece: inner.config.max_piece_bytes.max(1),
            pacer: Arc::new(serve::Pacer::new(inner.config.max_bytes_per_s)),
            metrics: inner.metrics.clone(),
            stop: inner.stop.clone(),
        };
        tokio::spawn(serve::serve(router, ctx));
        tracing::info!(endpoint = %inner.endpoint, "transfer plane listening");
        Ok(plane)
    }

    /// A plane without sockets, reachable only from planes of the same hub (the simulator's
    /// nodes). Its endpoint is `mem://<name>`.
    pub fn in_memory(
        name: &str,
        config: TransferConfig,
        clock: SharedClock,
        registry: &MetricsRegistry,
        hub: &TransferHub,
    ) -> Self {
        Self::assemble(format!("mem://{name}"), false, config, clock, registry, hub)
    }

    fn assemble(
        endpoint: String,
        networked: bool,
        config: TransferConfig,
        clock: SharedClock,
        registry: &MetricsRegistry,
        hub: &TransferHub,
    ) -> Self {
        let store = store::Store::new(clock.clone());
        let stop = CancellationToken::new();
        tokio::spawn(store.clone().reap(stop.clone()));
        lock(&hub.planes).insert(endpoint.clone(), Arc::downgrade(&store));
        Self {
            inner: Arc::new(PlaneInner {
                endpoint,
                networked,
                config,
                clock,
                store,
                hub: hub.clone(),
                links: Mutex::new(HashMap::new()),
                metrics: TransferMetrics::new(registry),
                _stop_on_drop: stop.clone().drop_guard(),
                stop,
            }),
        }
    }

    /// Where consumers reach this plane's buffers (the `owner` of its descriptors).
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// The plane's settings.
    pub fn config(&self) -> &TransferConfig {
        &self.inner.config
    }

    /// Pins `chunks` for the configured expiry and describes them for a consumer.
    pub fn register(&self, chunks: Vec<Bytes>) -> Descriptor {
        self.register_for(chunks, self.inner.config.expiry())
    }

    /// Pins `chunks` for `ttl`.
    pub fn register_for(&self, chunks: Vec<Bytes>, ttl: Duration) -> Descriptor {
        let (buffer, layout) = self.inner.store.register(chunks, ttl);
        let ranges = match layout.total_bytes() {
            0 => Vec::new(),
            len => vec![ByteRange { start: 0, len }],
        };
        Descriptor {
            owner: self.inner.endpoint.clone(),
            buffer,
            layout,
            ranges,
            expires_after_ms: ttl.as_millis().min(u128::from(u64::MAX)) as u64,
        }
    }

    /// Unpins a buffer this plane issued (the consumer will not pull it). Returns whether it
    /// was still pinned.
    pub fn release(&self, desc: &Descriptor) -> bool {
        desc.owner == self.inner.endpoint && self.inner.store.release(desc.buffer)
    }

    /// (buffers, bytes) this plane has pinned now.
    pub fn pinned(&self) -> (usize, u64) {
        self.inner.store.pinned()
    }

    /// Pulls from `owner` (same hub) cross `link` from now on: the simulator's network.
    pub fn set_link(&self, owner: &str, link: Arc<dyn Link>) {
        lock(&self.inner.links).insert(owner.to_string(), link);
    }

    /// Starts pulling `desc`. Errors (bad ranges, unknown or expired buffer, owner gone,
    /// size mismatch, timeout) arrive as the stream's last item.
    pub fn pull(&self, desc: &Descriptor) -> PullStream {
        let inner = &self.inner;
        let ctx = pull::PullCtx {
            clock: inner.clock.clone(),
            timeout: inner.config.pull_timeout(),
            window: inner.config.window.max(1),
            max_frame: inner.config.max_frame_bytes,
            metrics: inner.metrics.clone(),
        };
        let desc = desc.clone();
        let window = ctx.window;
        if let Err(e) = desc.check_ranges() {
            return PullStream::failed(e, ctx.metrics);
        }
        match inner.hub.find(&desc.owner) {
            Some(Some(store)) => {
                let link = lock(&inner.links).get(&desc.owner).cloned();
                PullStream::spawn(window, |feed| pull::local(store, desc, link, ctx, feed))
            }
            found if found.is_some() || !inner.networked || !desc.owner.starts_with("tcp://") => {
                PullStream::failed(TransferError::OwnerGone(desc.owner), ctx.metrics)
            }
            _ => PullStream::spawn(window, |feed| pull::remote(desc, ctx, feed)),
        }
    }

    /// Tells the owner of `desc` that it will not be pulled (a pull of no bytes), so the
    /// owner unpins it now instead of at expiry.
    pub async fn discard(&self, desc: &Descriptor) -> Result<(), TransferError> {
        let empty = desc.clone().with_ranges(Vec::new());
        self.pull(&empty).into_bytes().await.map(|_| ())
    }

    /// Stops serving: the socket closes and pulls in progress from this plane end.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
    }
}
