//! Workers in other processes: `turbine worker` registers with the frontend's embedded
//! registry, serves [`WorkerService`] on its own node and publishes its KV events
//! (`kv.<worker>`) and load (`metrics.<worker>`) on its event-plane PUB socket. The
//! frontend watches the registry: a new worker is connected, subscribed to and routed to;
//! one whose lease expires is forgotten, with its KV blocks.

use super::pipeline::Pipeline;
use super::service::{worker_service_name, WorkerService};
use crate::ids::WorkerId;
use crate::kv::indexer::FlashIndexer;
use crate::kv::KvEventBatch;
use crate::worker::SchedulerStats;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::task::JoinHandle;
use turbine_runtime::discovery::{Discovery, DiscoveryEvent, Instance};
use turbine_runtime::events::{Delivery, EventSubscriber};
use turbine_runtime::Node;

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

/// What the frontend keeps per remote worker: the task feeding its events in.
struct Joined {
    id: WorkerId,
    events: JoinHandle<()>,
}

/// Watches `discovery` for workers and keeps `pipeline` (and the KV `index`) in step with
/// them, until the returned task is aborted. A watch that ends (registry restart) is
/// re-opened and its snapshot taken as the truth.
pub fn watch_workers(
    node: Node,
    discovery: Arc<dyn Discovery>,
    pipeline: Arc<Pipeline>,
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
            use futures::StreamExt;
            while let Some(event) = watch.next().await {
                match event {
                    DiscoveryEvent::Added(inst) => {
                        if joined.contains_key(&inst.id) {
                            continue;
                        }
                        match join(&node, &inst, &pipeline, &index).await {
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
                            pipeline.remove_worker(j.id);
                        }
                    }
                }
            }
        }
    })
}

async fn join(
    node: &Node,
    inst: &Instance,
    pipeline: &Arc<Pipeline>,
    index: &Arc<FlashIndexer>,
) -> Result<Joined, String> {
    let id = inst
        .metadata
        .get(META_WORKER_ID)
        .and_then(|v| v.parse().ok())
        .map(WorkerId)
        .ok_or("no worker_id in its registration")?;
    let events_endpoint = inst
        .metadata
        .get(META_EVENTS)
        .ok_or("no events endpoint in its registration")?
        .clone();
    let addr = node
        .connect::<WorkerService>(&inst.endpoint, &worker_service_name(id))
        .await
        .map_err(|e| e.to_string())?;
    let mut sub = EventSubscriber::new(16 << 20, node.metrics().clone());
    sub.connect(&events_endpoint)
        .await
        .map_err(|e| e.to_string())?;
    for topic in [kv_topic(id), metrics_topic(id)] {
        sub.subscribe(&topic).await.map_err(|e| e.to_string())?;
    }
    pipeline.add_worker(id, addr);
    let (pipeline, index) = (pipeline.clone(), index.clone());
    let events = tokio::spawn(async move {
        loop {
            match sub.recv().await {
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
                        pipeline.update_load(id, &stats);
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
    });
    Ok(Joined { id, events })
}
