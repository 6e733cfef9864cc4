//! Discovery plane: who serves a component, and where.
//!
//! [`Discovery`] is the seam every backend implements:
//! * [`StaticDiscovery`]: a fixed list from the config file (no leases, nothing changes).
//! * [`EmbeddedDiscovery`]: a registry service ([`embedded::Registry`]) served on some
//!   node (e.g. the frontend's); instances register with a lease that their [`Lease`]
//!   renews by heartbeat, and expiry removes them and is announced to watchers.
//! * [`KubernetesDiscovery`]: pods selected by a label in a namespace, each instance's
//!   liveness a `coordination.k8s.io` Lease it renews; list + watch, relist after
//!   `410 Gone` (see [`kubernetes`]).

pub mod embedded;
pub mod kubernetes;
pub mod static_list;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use tokio_util::sync::{CancellationToken, DropGuard};

pub use embedded::{EmbeddedDiscovery, EmbeddedRegistry};
pub use kubernetes::KubernetesDiscovery;
pub use static_list::StaticDiscovery;

/// One running instance of a component.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Instance {
    /// Component name (e.g. the service kind it offers).
    pub component: String,
    /// Unique id of the instance within its component.
    pub id: String,
    /// Request-plane endpoint of its node, e.g. `tcp://10.0.0.5:7000`.
    pub endpoint: String,
    /// Free-form labels.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// A change in a component's membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiscoveryEvent {
    /// The instance appeared (also sent for every existing instance when a watch starts).
    Added(Instance),
    /// The instance deregistered or its lease expired.
    Removed(Instance),
}

/// A stream of membership changes.
pub type WatchStream = BoxStream<'static, DiscoveryEvent>;

/// Discovery failures.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The registry could not be reached or answered with an error.
    #[error("discovery backend: {0}")]
    Backend(#[from] crate::CallError),
    /// The registry answered something unexpected.
    #[error("discovery protocol: {0}")]
    Protocol(String),
}

/// A backend that registers instances and watches components.
#[async_trait]
pub trait Discovery: Send + Sync + 'static {
    /// Registers `instance` with a lease of `lease`; the returned [`Lease`] keeps it alive
    /// until dropped (then it expires) or revoked (then it is removed at once).
    async fn register(&self, instance: Instance, lease: Duration) -> Result<Lease, DiscoveryError>;

    /// The instances of `component` now, sorted by id.
    async fn list(&self, component: &str) -> Result<Vec<Instance>, DiscoveryError>;

    /// `Added` for every current instance of `component`, then every change. The stream
    /// ends if the backend loses track of the watcher (e.g. the registry restarted): watch
    /// again and treat the new snapshot as the truth.
    async fn watch(&self, component: &str) -> Result<WatchStream, DiscoveryError>;
}

/// How long a follower waits before watching again after [`Discovery::watch`] failed.
pub const WATCH_RETRY: Duration = Duration::from_millis(500);

/// [`Discovery::watch`] until it succeeds, every failure logged and followed by
/// [`WATCH_RETRY`]: for the followers (workers, routers, encoders, stages) that must keep
/// watching whatever the backend does.
pub async fn watch_until_ok(discovery: &dyn Discovery, component: &str) -> WatchStream {
    loop {
        match discovery.watch(component).await {
            Ok(w) => return w,
            Err(e) => {
                tracing::warn!("watching {component}: {e}; retrying");
                tokio::time::sleep(WATCH_RETRY).await;
            }
        }
    }
}

/// Keeps a registration alive. Dropping it stops the heartbeats (the instance then expires
/// after its lease, as if the process had died); [`Lease::revoke`] deregisters at once.
pub struct Lease {
    _heartbeat: Option<DropGuard>,
    revoke: Option<BoxFuture<'static, ()>>,
}

impl Lease {
    /// A lease that needs no upkeep (static or externally managed backends).
    pub fn noop() -> Self {
        Self {
            _heartbeat: None,
            revoke: None,
        }
    }

    pub(crate) fn new(heartbeat: CancellationToken, revoke: BoxFuture<'static, ()>) -> Self {
        Self {
            _heartbeat: Some(heartbeat.drop_guard()),
            revoke: Some(revoke),
        }
    }

    /// Stops heartbeats and deregisters now.
    pub async fn revoke(mut self) {
        let revoke = self.revoke.take();
        drop(self);
        if let Some(revoke) = revoke {
            revoke.await;
        }
    }
}
