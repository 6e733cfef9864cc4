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
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use turbine_runtime::discovery::{Discovery, DiscoveryEvent, Instance};
use turbine_runtime::events::{Delivery, EventSubscriber};
use turbine_runtime::{Addr, Node, SharedClock};

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

/// Watches `discovery` for workers and keeps `dispatcher` (and the KV `index`) in step with
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

/// How often a worker reports its load even when nothing changed: the report doubles as a
/// heartbeat of its KV event count (see [`TrailingLoss`]).
pub const LOAD_REPORT_EVERY: Duration = Duration::from_secs(1);

/// What the router reads from a load report (see [`Dispatcher::update_load`] and
/// [`TrailingLoss`]); a report is due when this changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RoutingView {
    running: usize,
    waiting: usize,
    load_blocks: u64,
    kv_batches: u64,
}

impl RoutingView {
    fn of(s: &SchedulerStats) -> Self {
        RoutingView {
            running: s.num_running,
            waiting: s.num_waiting,
            load_blocks: s.load_blocks(),
            kv_batches: s.kv_batches,
        }
    }
}

/// Publishes a worker's load (`publish`) when what the router reads from it changes, and at
/// least every `every` on `clock` (a heartbeat for [`TrailingLoss`]), until the worker loop
/// is gone. Steps that change only counters (most decode steps: no block boundary crossed,
/// nobody admitted or finished) send nothing.
pub async fn report_load(
    mut stats: watch::Receiver<SchedulerStats>,
    every: Duration,
    clock: SharedClock,
    mut publish: impl FnMut(&SchedulerStats),
) {
    let mut last: Option<RoutingView> = None;
    let mut due = clock.now() + every;
    loop {
        let wait = due.saturating_duration_since(clock.now());
        let heartbeat = tokio::select! {
            biased;
            changed = stats.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
            _ = clock.sleep(wait) => true,
        };
        let s = stats.borrow_and_update().clone();
        let view = RoutingView::of(&s);
        if heartbeat || last != Some(view) {
            publish(&s);
            last = Some(view);
            due = clock.now() + every;
        }
    }
}

/// Notices a lost *trailing* KV batch: the sequence gap detector only sees a loss when a
/// later batch arrives, which never happens if the worker goes quiet. Load reports carry the
/// number of batches published; when a report counts batches that had not arrived by the
/// *previous* report either, they were lost. (The worker publishes batches and reports in
/// one ordered queue, so a report cannot overtake its batches there; the one report of slack
/// covers transports that may reorder them.) The first report is the baseline: batches
/// published before the subscription are not expected.
#[derive(Debug, Default)]
pub struct TrailingLoss {
    /// Highest batch sequence number seen (batches count from 0).
    seen: Option<u64>,
    /// What the previous load report claimed (`None` before the first report).
    claimed: Option<u64>,
}

impl TrailingLoss {
    pub fn on_batch(&mut self, seq: u64) {
        self.seen = Some(self.seen.map_or(seq, |s| s.max(seq)));
    }

    /// A load report claiming `kv_batches` published; true when batches were lost.
    pub fn on_load_report(&mut self, kv_batches: u64) -> bool {
        let Some(claimed) = self.claimed.replace(kv_batches) else {
            // Baseline: whatever was published before we subscribed counts as seen.
            let before = kv_batches.checked_sub(1);
            self.seen = self.seen.max(before);
            return false;
        };
        let arrived = self.seen.map_or(0, |s| s.saturating_add(1));
        let lost = claimed > arrived;
        if lost {
            // Cleared: what arrives from now on is the new baseline.
            self.seen = kv_batches.checked_sub(1);
        }
        lost
    }
}

/// Applies a worker's events until its feed ends: KV batches into the index, load into the
/// router; a gap in its KV events (or a lost trailing batch) clears its index entries.
async fn feed_events(
    id: WorkerId,
    mut feed: EventFeed,
    dispatcher: Arc<Dispatcher>,
    index: Arc<FlashIndexer>,
) {
    let mut trailing = TrailingLoss::default();
    while let Some(item) = feed.next().await {
        match item {
            Ok(Delivery::Event(ev)) if ev.topic.starts_with("kv.") => {
                match ev.decode::<KvEventBatch>() {
                    Ok(batch) if batch.worker == id => {
                        trailing.on_batch(batch.seq);
                        index.apply(&batch);
                    }
                    Ok(_) => tracing::warn!(worker = %id, "KV batch from another worker id"),
                    Err(e) => tracing::warn!(worker = %id, "bad KV event: {e}"),
                }
            }
            Ok(Delivery::Event(ev)) => {
                if let Ok(stats) = ev.decode::<SchedulerStats>() {
                    dispatcher.update_load(id, &stats);
                    if trailing.on_load_report(stats.kv_batches) {
                        tracing::warn!(worker = %id, "trailing KV events lost; clearing its index entries");
                        index.clear_worker(id);
                    }
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

#[cfg(test)]
mod tests {
    use super::TrailingLoss;

    #[test]
    fn a_lost_last_batch_is_noticed_one_report_later() {
        let mut t = TrailingLoss::default();
        assert!(!t.on_load_report(0), "the first report is the baseline");
        t.on_batch(0);
        t.on_batch(1);
        // Batch 2 is lost; the report after it claims 3 batches.
        assert!(!t.on_load_report(3), "one report of slack");
        assert!(t.on_load_report(3), "the next report reveals the loss");
        assert!(!t.on_load_report(3), "and only once");
    }

    #[test]
    fn batches_published_before_the_subscription_are_not_a_loss() {
        let mut t = TrailingLoss::default();
        assert!(!t.on_load_report(40));
        t.on_batch(40);
        assert!(!t.on_load_report(41));
        assert!(!t.on_load_report(41));
    }

    #[test]
    fn a_batch_published_after_its_report_is_not_a_loss() {
        let mut t = TrailingLoss::default();
        assert!(!t.on_load_report(0));
        t.on_batch(0);
        assert!(!t.on_load_report(2)); // batch 1 not here yet
        t.on_batch(1);
        assert!(!t.on_load_report(2));
    }

    #[test]
    fn reports_without_batches_are_quiet() {
        let mut t = TrailingLoss::default();
        for _ in 0..3 {
            assert!(!t.on_load_report(0));
        }
    }
}
