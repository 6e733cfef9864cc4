//! Workers in other processes: `turbine worker` registers with the frontend's embedded
//! registry, serves [`WorkerService`] on its own node and publishes its KV events
//! (`kv.<worker>`) and load (`metrics.<worker>`) on its event-plane PUB socket. The
//! frontend watches the registry: a new worker is connected, subscribed to and routed to;
//! one whose lease expires is forgotten, with its KV blocks.
//!
//! How a registered worker is reached is a [`WorkerConnector`]: over ZeroMQ
//! ([`NodeConnector`]) in a deployment, over a simulated network in the simulator; the
//! watch loop and the event handling are the same code either way.

use super::dispatch::Dispatcher;
use super::service::{worker_service_name, WorkerService};
use crate::ids::WorkerId;
use crate::kv::indexer::FlashIndexer;
use crate::kv::KvEventBatch;
use crate::worker::SchedulerStats;
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::task::JoinHandle;
use turbine_runtime::discovery::{Discovery, DiscoveryEvent, Instance};
use turbine_runtime::events::{Delivery, EventSubscriber};
use turbine_runtime::{Addr, Node};

/// The discovery component every worker registers under.
pub const WORKER_COMPONENT: &str = "worker";
/// Name the frontend serves its embedded registry under.
pub const REGISTRY_SERVICE: &str = "registry";
/// Instance metadata keys.
pub const META_EVENTS: &str = "events";
pub const META_WORKER_ID: &str = "worker_id";

pub fn kv_topic(worker: WorkerId) -> String {
    format!("kv.{}", worker.0)
}

pub fn metrics_topic(worker: WorkerId) -> String {
    format!("metrics.{}", worker.0)
}

/// A worker's event-plane feed as the frontend receives it (events and gap notices); an
/// `Err` ends the feed.
pub type EventFeed = BoxStream<'static, Result<Delivery, String>>;

/// Reaches a worker that registered: its request-plane address and its event feed
/// (subscribed to its `kv.<id>` and `metrics.<id>` topics).
#[async_trait]
pub trait WorkerConnector: Send + Sync + 'static {
    async fn connect(
        &self,
        inst: &Instance,
        id: WorkerId,
    ) -> Result<(Addr<WorkerService>, EventFeed), String>;
}

/// Reaches workers over ZeroMQ from `node`: a DEALER to the worker's node and a SUB socket
/// on its events endpoint (instance metadata `events`).
pub struct NodeConnector {
    node: Node,
}

impl NodeConnector {
    pub fn new(node: Node) -> Self {
        NodeConnector { node }
    }
}

#[async_trait]
impl WorkerConnector for NodeConnector {
    async fn connect(
        &self,
        inst: &Instance,
        id: WorkerId,
    ) -> Result<(Addr<WorkerService>, EventFeed), String> {
        let events_endpoint = inst
            .metadata
            .get(META_EVENTS)
            .ok_or("no events endpoint in its registration")?
            .clone();
        let addr = self
            .node
            .connect::<WorkerService>(&inst.endpoint, &worker_service_name(id))
            .await
            .map_err(|e| e.to_string())?;
        let mut sub = EventSubscriber::new(16 << 20, self.node.metrics().clone());
        sub.connect(&events_endpoint)
            .await
            .map_err(|e| e.to_string())?;
        for topic in [kv_topic(id), metrics_topic(id)] {
            sub.subscribe(&topic).await.map_err(|e| e.to_string())?;
        }
        let feed = futures::stream::unfold(sub, |mut sub| async move {
            let item = sub.recv().await.map_err(|e| e.to_string());
            Some((item, sub))
        });
        Ok((addr, feed.boxed()))
    }
}

/// What the frontend keeps per remote worker: the task feeding its events in.
struct Joined {
    id: WorkerId,
    events: JoinHandle<()>,
}

/// Watches `discovery` for workers and keeps `pipeline` (and the KV `index`) in step with
/// them, until the returned task is aborted. A watch that ends (registry restart) is
/// re-opened and its snapshot taken as the truth.
pub fn watch_workers(
    connector: Arc<dyn WorkerConnector>,
    discovery: Arc<dyn Discovery>,
    dispatcher: Arc<Dispatcher>,
    index: Arc<FlashIndexer>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut joined: BTreeMap<String, Joined> = BTreeMap::new();
        loop {
            let mut watch = match discovery.watch(WORKER_COMPONENT).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!("watching workers: {e}; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    continue;
                }
            };
            while let Some(event) = watch.next().await {
                match event {
                    DiscoveryEvent::Added(inst) => {
                        if joined.contains_key(&inst.id) {
                            continue;
                        }
                        match join(connector.as_ref(), &inst, &dispatcher, &index).await {
                            Ok(j) => {
                                tracing::info!(worker = %j.id, endpoint = %inst.endpoint, "worker joined");
                                joined.insert(inst.id.clone(), j);
                            }
                            Err(e) => tracing::warn!("worker {} could not join: {e}", inst.id),
                        }
                    }
                    DiscoveryEvent::Removed(inst) => {
                        if let Some(j) = joined.remove(&inst.id) {
                            tracing::info!(worker = %j.id, "worker left");
                            j.events.abort();
                            dispatcher.remove_worker(j.id);
                        }
                    }
                }
            }
        }
    })
}

async fn join(
    connector: &dyn WorkerConnector,
    inst: &Instance,
    dispatcher: &Arc<Dispatcher>,
    index: &Arc<FlashIndexer>,
) -> Result<Joined, String> {
    let id = inst
        .metadata
        .get(META_WORKER_ID)
        .and_then(|v| v.parse().ok())
        .map(WorkerId)
        .ok_or("no worker_id in its registration")?;
    let (addr, feed) = connector.connect(inst, id).await?;
    dispatcher.add_worker(id, addr);
    let events = tokio::spawn(feed_events(id, feed, dispatcher.clone(), index.clone()));
    Ok(Joined { id, events })
}

/// Applies a worker's events until its feed ends: KV batches into the index, load into the
/// router; a gap in its KV events clears its index entries.
async fn feed_events(
    id: WorkerId,
    mut feed: EventFeed,
    dispatcher: Arc<Dispatcher>,
    index: Arc<FlashIndexer>,
) {
    while let Some(item) = feed.next().await {
        match item {
            Ok(Delivery::Event(ev)) if ev.topic.starts_with("kv.") => {
                match ev.decode::<KvEventBatch>() {
                    Ok(batch) if batch.worker == id => {
                        index.apply(&batch);
                    }
                    Ok(_) => tracing::warn!(worker = %id, "KV batch from another worker id"),
                    Err(e) => tracing::warn!(worker = %id, "bad KV event: {e}"),
                }
            }
            Ok(Delivery::Event(ev)) => {
                if let Ok(stats) = ev.decode::<SchedulerStats>() {
                    dispatcher.update_load(id, &stats);
                }
            }
            Ok(Delivery::Gap(gap)) => {
                // Lost KV events: our view of this worker's cache is no longer exact.
                // Forget it; routing treats the worker as cold until new blocks arrive.
                if gap.topic.starts_with("kv.") {
                    tracing::warn!(worker = %id, "KV event gap ({gap:?}); clearing its index entries");
                    index.clear_worker(id);
                }
            }
            Err(e) => {
                tracing::warn!(worker = %id, "event subscription failed: {e}");
                return;
            }
        }
    }
}
