//! Router replicas that share one view: the shell that carries [`RouterEvent`]s between
//! routers over the event plane (`router.replica_sync`).
//!
//! Each frontend (or router process) runs its own router. Every one of them already
//! follows the workers' KV events and load reports, so their KV overlaps agree; what only
//! the router that decided knows is which requests it just sent where (the in-flight load a
//! worker's next load report will include). With replica sync each router
//!
//! - publishes the event of every decision and every finished request on a PUB socket of
//!   its own (topic `router.<replica>`, the event plane's per-publisher sequence numbers);
//! - registers as a `router-replica` instance (metadata `events`: that socket, `replica`:
//!   its id) with discovery, under a lease like a worker;
//! - subscribes to every other registered replica and applies its events to its own
//!   [`KvRouter`](super::KvRouter) ([`RouterCore::apply_peer_event`]).
//!
//! A gap in a peer's sequence (lost events, or a subscription that started late) and a
//! peer that leaves (deregistered, or its lease expired) both drop that peer's in-flight
//! requests from this view ([`RouterCore::forget_peer`]); the workers' load reports carry
//! their load from then on, so the views converge again within a report period.
//!
//! The pure rules (keys, duplicates, acknowledgement by load reports) are in
//! `kv_router.rs`; this file only moves bytes and follows discovery.

use super::events::{RouterEvent, RouterReplicaId};
use super::service::RouterCore;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use turbine_runtime::discovery::{Discovery, DiscoveryEvent, Instance, Lease};
use turbine_runtime::events::{Delivery, EventPublisher, EventSubscriber};
use turbine_runtime::RuntimeMetrics;

/// The discovery component router replicas register under.
pub const ROUTER_REPLICA_COMPONENT: &str = "router-replica";
/// Discovery metadata: the replica's event-plane (PUB) endpoint.
pub const META_REPLICA_EVENTS: &str = "events";
/// Discovery metadata: the replica's id.
pub const META_REPLICA_ID: &str = "replica";

/// Largest router event frame accepted (a Routed event in approximate mode carries the
/// prompt's block hashes: 8 bytes per block).
const MAX_EVENT_FRAME: usize = 4 << 20;

/// The topic replica `r` publishes its events on.
pub fn replica_topic(r: RouterReplicaId) -> String {
    format!("router.{}", r.0)
}

/// A running replica sync; dropping it stops publishing and following (the registration
/// then expires).
pub struct ReplicaSync {
    /// Where this replica's events can be subscribed to.
    pub endpoint: String,
    lease: Option<Lease>,
    tasks: Vec<JoinHandle<()>>,
}

impl ReplicaSync {
    /// Deregisters at once (peers forget this replica's requests now, not at lease expiry).
    pub async fn stop(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(lease) = self.lease.take() {
            lease.revoke().await;
        }
    }
}

impl Drop for ReplicaSync {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Why replica sync could not start.
#[derive(Debug, thiserror::Error)]
#[error("router replica sync: {0}")]
pub struct ReplicaSyncError(String);

/// Starts replica sync for `core`: binds a PUB socket at `events_bind` (`tcp://IP:PORT`,
/// port 0 for any), registers with `discovery` under `lease`, and follows the other
/// replicas registered there.
pub async fn start_replica_sync(
    core: Arc<RouterCore>,
    events_bind: &str,
    discovery: Arc<dyn Discovery>,
    lease: Duration,
    metrics: RuntimeMetrics,
) -> Result<ReplicaSync, ReplicaSyncError> {
    let me = core.replica();
    let publisher = EventPublisher::bind(events_bind, &format!("router-{}", me.0))
        .await
        .map_err(|e| ReplicaSyncError(e.to_string()))?;
    let endpoint = publisher.endpoint().to_string();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<RouterEvent>();
    core.publish_events_to(tx);
    let topic = replica_topic(me);
    // One task publishes in decision order (a Finished never overtakes its Routed).
    let publish = tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            if let Err(e) = publisher.publish(&topic, &event).await {
                tracing::warn!("publishing a router event: {e}");
            }
        }
    });
    let instance = Instance {
        component: ROUTER_REPLICA_COMPONENT.to_string(),
        id: format!("router-replica-{}", me.0),
        endpoint: endpoint.clone(),
        metadata: BTreeMap::from([
            (META_REPLICA_EVENTS.to_string(), endpoint.clone()),
            (META_REPLICA_ID.to_string(), me.0.to_string()),
        ]),
    };
    let registration = discovery
        .register(instance, lease)
        .await
        .map_err(|e| ReplicaSyncError(format!("registering: {e}")))?;
    let follow = tokio::spawn(follow_peers(core, discovery, metrics));
    tracing::info!(replica = me.0, %endpoint, "router replica sync started");
    Ok(ReplicaSync {
        endpoint,
        lease: Some(registration),
        tasks: vec![publish, follow],
    })
}

/// Keeps one subscription per peer replica that discovery lists, until aborted.
async fn follow_peers(
    core: Arc<RouterCore>,
    discovery: Arc<dyn Discovery>,
    metrics: RuntimeMetrics,
) {
    let me = core.replica();
    // By instance id: the peer and the task applying its events.
    let mut peers: BTreeMap<String, (RouterReplicaId, AbortOnDrop)> = BTreeMap::new();
    loop {
        let mut watch = turbine_runtime::discovery::watch_until_ok(
            discovery.as_ref(),
            ROUTER_REPLICA_COMPONENT,
        )
        .await;
        while let Some(event) = watch.next().await {
            match event {
                DiscoveryEvent::Added(inst) => {
                    if peers.contains_key(&inst.id) {
                        continue;
                    }
                    let Some(peer) = inst
                        .metadata
                        .get(META_REPLICA_ID)
                        .and_then(|v| v.parse().ok())
                        .map(RouterReplicaId)
                    else {
                        tracing::warn!(instance = %inst.id, "router replica without an id; ignored");
                        continue;
                    };
                    if peer == me {
                        continue;
                    }
                    let Some(events) = inst.metadata.get(META_REPLICA_EVENTS) else {
                        tracing::warn!(
                            peer = peer.0,
                            "router replica without an events endpoint; ignored"
                        );
                        continue;
                    };
                    match subscribe(events, peer, &metrics).await {
                        Ok(sub) => {
                            tracing::info!(peer = peer.0, %events, "router replica joined");
                            let task = tokio::spawn(apply_events(core.clone(), peer, sub));
                            peers.insert(inst.id.clone(), (peer, AbortOnDrop(task)));
                        }
                        Err(e) => tracing::warn!(peer = peer.0, "router replica unreachable: {e}"),
                    }
                }
                DiscoveryEvent::Removed(inst) => {
                    if let Some((peer, task)) = peers.remove(&inst.id) {
                        drop(task);
                        tracing::info!(peer = peer.0, "router replica left");
                        core.forget_peer(peer);
                    }
                }
            }
            core.set_peer_count(peers.len());
        }
    }
}

async fn subscribe(
    endpoint: &str,
    peer: RouterReplicaId,
    metrics: &RuntimeMetrics,
) -> Result<EventSubscriber, String> {
    let mut sub = EventSubscriber::new(MAX_EVENT_FRAME, metrics.clone());
    sub.connect(endpoint).await.map_err(|e| e.to_string())?;
    sub.subscribe(&replica_topic(peer))
        .await
        .map_err(|e| e.to_string())?;
    Ok(sub)
}

/// Applies `peer`'s events until its subscription fails; a gap (or the failure) drops its
/// in-flight requests from this view.
async fn apply_events(core: Arc<RouterCore>, peer: RouterReplicaId, mut sub: EventSubscriber) {
    loop {
        match sub.recv().await {
            Ok(Delivery::Event(ev)) => match ev.decode::<RouterEvent>() {
                Ok(event) if event.replica == peer => core.apply_peer_event(&event),
                Ok(event) => tracing::warn!(
                    peer = peer.0,
                    from = event.replica.0,
                    "router event from another replica on this topic; ignored"
                ),
                Err(e) => tracing::warn!(peer = peer.0, "bad router event: {e}"),
            },
            Ok(Delivery::Gap(gap)) => {
                tracing::warn!(peer = peer.0, ?gap, "router events lost; resyncing");
                core.forget_peer(peer);
            }
            Err(e) => {
                tracing::warn!(peer = peer.0, "router replica subscription failed: {e}");
                core.forget_peer(peer);
                return;
            }
        }
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
