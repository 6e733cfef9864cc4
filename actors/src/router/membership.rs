//! Worker membership, from discovery: a new worker is connected and routed to; one whose
//! lease expires is forgotten, with its KV blocks. Two parties follow it, in one process or
//! in two ([`Members`]): the router (the worker's load and KV events, subscribed to on
//! `kv.<worker>` and `metrics.<worker>`, see [`crate::worker::announce`] for the worker's
//! side) and the frontend's dispatcher (the worker's request-plane address). A gap in a
//! worker's KV events (or a lost trailing batch, [`TrailingLoss`]) clears its index entries.
//! A third may follow the load reports alone ([`Members::loads`]): the planner in a
//! frontend's process whose router runs elsewhere (`router.remote`).
//!
//! How a registered worker is reached is a [`WorkerConnector`]: over ZeroMQ
//! ([`NodeConnector`]) in a deployment, over a simulated network in the simulator; the
//! watch loop and the event handling are the same code either way.

use super::dispatch::Dispatcher;
use super::endpoints::{WorkerEndpoints, META_GATEWAY_ENDPOINT};
use super::service::{LoadNotice, LoadWatcher, PoolRole, RouterCore};
use crate::ids::WorkerId;
use crate::kv::KvEventBatch;
use crate::worker::announce::{
    kv_topic, metrics_topic, META_EVENTS, META_WORKER_ID, WORKER_COMPONENT,
};
use crate::worker::metrics::WorkerMetrics;
use crate::worker::service::{worker_service_name, WorkerService};
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

/// A worker's event-plane feed as the router receives it (events and gap notices); an
/// `Err` ends the feed.
pub type EventFeed = BoxStream<'static, Result<Delivery, String>>;

/// Reaches a worker that registered: its request-plane address (for the frontend) and its
/// event feed (for the router: its `kv.<id>` and `metrics.<id>` topics).
#[async_trait]
pub trait WorkerConnector: Send + Sync + 'static {
    async fn addr(&self, inst: &Instance, id: WorkerId) -> Result<Addr<WorkerService>, String>;
    async fn events(&self, inst: &Instance, id: WorkerId) -> Result<EventFeed, String>;
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
    async fn addr(&self, inst: &Instance, id: WorkerId) -> Result<Addr<WorkerService>, String> {
        self.node
            .connect::<WorkerService>(&inst.endpoint, &worker_service_name(id))
            .await
            .map_err(|e| e.to_string())
    }

    async fn events(&self, inst: &Instance, id: WorkerId) -> Result<EventFeed, String> {
        let events_endpoint = inst
            .metadata
            .get(META_EVENTS)
            .ok_or("no events endpoint in its registration")?
            .clone();
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
        Ok(feed.boxed())
    }
}

/// Who follows worker membership in this process: the router (loads, KV events), the
/// frontend (addresses), the endpoint picker (gateway endpoints), or several.
#[derive(Clone, Default)]
pub struct Members {
    pub router: Option<Arc<RouterCore>>,
    pub frontend: Option<Arc<Dispatcher>>,
    /// Where each worker's load reports also go (the frontend's `/metrics`, so a user sees
    /// every worker's KV blocks and queue from one place); only fed while `router` follows.
    pub gauges: Option<WorkerMetrics>,
    /// The workers' gateway endpoints (the endpoint picker's table).
    pub endpoints: Option<Arc<WorkerEndpoints>>,
    /// Told every worker's load reports and its leaving, where no `router` follows here
    /// (with one, watch its loads instead: [`RouterCore::watch_loads`]).
    pub loads: Option<LoadWatcher>,
}

/// What is kept per joined worker: the task feeding its events in, if the router follows.
struct Joined {
    id: WorkerId,
    events: Option<JoinHandle<()>>,
}

/// Watches `discovery` for workers and keeps `members` in step with them, until the
/// returned task is aborted. A watch that ends (registry restart) is re-opened and its
/// snapshot taken as the truth.
pub fn watch_workers(
    connector: Arc<dyn WorkerConnector>,
    discovery: Arc<dyn Discovery>,
    members: Members,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut joined: BTreeMap<String, Joined> = BTreeMap::new();
        loop {
            let mut watch =
                turbine_runtime::discovery::watch_until_ok(discovery.as_ref(), WORKER_COMPONENT)
                    .await;
            while let Some(event) = watch.next().await {
                match event {
                    DiscoveryEvent::Added(inst) => {
                        if joined.contains_key(&inst.id) {
                            continue;
                        }
                        match join(connector.as_ref(), &inst, &members).await {
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
                            if let Some(events) = j.events {
                                events.abort();
                            }
                            leave(&members, j.id);
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
    members: &Members,
) -> Result<Joined, String> {
    let id = inst
        .metadata
        .get(META_WORKER_ID)
        .and_then(|v| v.parse().ok())
        .map(WorkerId)
        .ok_or("no worker_id in its registration")?;
    let addr = match &members.frontend {
        Some(_) => Some(connector.addr(inst, id).await?),
        None => None,
    };
    let feed = match (&members.router, &members.loads) {
        (None, None) => None,
        _ => Some(connector.events(inst, id).await?),
    };
    if let (Some(frontend), Some(addr)) = (&members.frontend, addr) {
        frontend.add_worker(id, addr);
    }
    if let Some(endpoints) = &members.endpoints {
        endpoints.insert(id, inst.metadata.get(META_GATEWAY_ENDPOINT).cloned());
    }
    let role = crate::worker::announce::role_of(inst);
    let events = match (&members.router, &members.loads, feed) {
        (Some(router), _, Some(feed)) => {
            router.add_worker_as(id, role);
            let gauges = members.gauges.clone();
            Some(tokio::spawn(feed_events(id, feed, router.clone(), gauges)))
        }
        (None, Some(loads), Some(feed)) => {
            let pool = match role {
                crate::cluster_config::WorkerRole::Prefill => PoolRole::Prefill,
                _ => PoolRole::Decode,
            };
            Some(tokio::spawn(feed_loads(id, pool, feed, loads.clone())))
        }
        _ => None,
    };
    Ok(Joined { id, events })
}

/// Both parties forget `id`: the router first, so no decision names a worker the
/// frontend can no longer reach for longer than one in flight.
fn leave(members: &Members, id: WorkerId) {
    if let Some(router) = &members.router {
        router.remove_worker(id);
    }
    if let Some(frontend) = &members.frontend {
        frontend.remove_worker(id);
    }
    if let Some(gauges) = &members.gauges {
        gauges.forget(&id.to_string());
    }
    if let Some(endpoints) = &members.endpoints {
        endpoints.remove(id);
    }
    if let (None, Some(loads)) = (&members.router, &members.loads) {
        loads(LoadNotice::Left(id));
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
    router: Arc<RouterCore>,
    gauges: Option<WorkerMetrics>,
) {
    let mut trailing = TrailingLoss::default();
    let name = id.to_string();
    while let Some(item) = feed.next().await {
        match item {
            Ok(Delivery::Event(ev)) if ev.topic.starts_with("kv.") => {
                match ev.decode::<KvEventBatch>() {
                    Ok(batch) if batch.worker == id => {
                        trailing.on_batch(batch.seq);
                        router.apply_kv(&batch);
                    }
                    Ok(_) => tracing::warn!(worker = %id, "KV batch from another worker id"),
                    Err(e) => tracing::warn!(worker = %id, "bad KV event: {e}"),
                }
            }
            Ok(Delivery::Event(ev)) => {
                if let Ok(stats) = ev.decode::<SchedulerStats>() {
                    router.update_load(id, &stats);
                    if let Some(g) = &gauges {
                        g.update(&name, &stats);
                    }
                    if trailing.on_load_report(stats.kv_batches) {
                        tracing::warn!(worker = %id, "trailing KV events lost; clearing its index entries");
                        router.clear_kv(id);
                    }
                }
            }
            Ok(Delivery::Gap(gap)) => {
                // Lost KV events: our view of this worker's cache is no longer exact.
                // Forget it; routing treats the worker as cold until new blocks arrive.
                if gap.topic.starts_with("kv.") {
                    tracing::warn!(worker = %id, "KV event gap ({gap:?}); clearing its index entries");
                    router.clear_kv(id);
                }
            }
            Err(e) => {
                tracing::warn!(worker = %id, "event subscription failed: {e}");
                return;
            }
        }
    }
}

/// Hands a worker's load reports to `loads` until its feed ends (its KV events are not
/// read: no router follows here).
async fn feed_loads(id: WorkerId, role: PoolRole, mut feed: EventFeed, loads: LoadWatcher) {
    let metrics = metrics_topic(id);
    while let Some(item) = feed.next().await {
        match item {
            Ok(Delivery::Event(ev)) if ev.topic == metrics => match ev.decode::<SchedulerStats>() {
                Ok(stats) => loads(LoadNotice::Report {
                    worker: id,
                    role,
                    stats: &stats,
                }),
                Err(e) => tracing::warn!(worker = %id, "bad load report: {e}"),
            },
            Ok(_) => {}
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

#[cfg(test)]
mod load_follower_tests {
    use super::*;
    use crate::worker::announce::META_ROLE;
    use std::sync::Mutex;
    use std::time::Duration;
    use turbine_runtime::discovery::StaticDiscovery;
    use turbine_runtime::events::Event;

    /// Serves each worker's event feed from a list: a KV batch (not read), then load
    /// reports; no request plane (no frontend follows here).
    struct Reports;

    #[async_trait]
    impl WorkerConnector for Reports {
        async fn addr(&self, _: &Instance, _: WorkerId) -> Result<Addr<WorkerService>, String> {
            Err("no request plane in this test".into())
        }

        async fn events(&self, _: &Instance, id: WorkerId) -> Result<EventFeed, String> {
            let event = |topic: String, seq, payload| {
                Ok(Delivery::Event(Event {
                    topic,
                    publisher: id.to_string(),
                    seq,
                    payload,
                }))
            };
            let stats = |waiting| SchedulerStats {
                num_running: 3,
                num_waiting: waiting,
                ..SchedulerStats::default()
            };
            let wire = |v: &SchedulerStats| turbine_runtime::wire::to_payload(v).unwrap();
            let items = vec![
                event(kv_topic(id), 1, bytes::Bytes::from_static(b"not read")),
                event(metrics_topic(id), 1, wire(&stats(1))),
                event(metrics_topic(id), 2, wire(&stats(id.0 as usize * 10))),
            ];
            Ok(futures::stream::iter(items)
                .chain(futures::stream::pending())
                .boxed())
        }
    }

    fn worker(id: u64, role: &str) -> Instance {
        Instance {
            component: WORKER_COMPONENT.into(),
            id: format!("w{id}"),
            endpoint: format!("tcp://127.0.0.1:{}", 7000 + id),
            metadata: [
                (META_WORKER_ID.to_string(), id.to_string()),
                (META_ROLE.to_string(), role.to_string()),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[tokio::test]
    async fn without_a_router_the_load_follower_gets_every_workers_reports_with_its_pool() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let loads: LoadWatcher = Arc::new(move |n| {
            if let LoadNotice::Report {
                worker,
                role,
                stats,
            } = n
            {
                sink.lock()
                    .unwrap()
                    .push((worker.0, role, stats.num_waiting));
            }
        });
        let discovery = StaticDiscovery::new(vec![worker(1, "prefill"), worker(2, "decode")]);
        let task = watch_workers(
            Arc::new(Reports),
            Arc::new(discovery),
            Members {
                loads: Some(loads),
                ..Members::default()
            },
        );
        let want = vec![
            (1, PoolRole::Prefill, 1),
            (1, PoolRole::Prefill, 10),
            (2, PoolRole::Decode, 1),
            (2, PoolRole::Decode, 20),
        ];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut got = seen.lock().unwrap().clone();
            got.sort_by_key(|&(w, _, q)| (w, q));
            if got == want {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{got:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
    }
}
