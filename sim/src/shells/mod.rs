//! The real actor shells on virtual time (`turbine sim --actors`).
//!
//! Where the discrete-event core ([`crate::cluster`]) calls turbine's pure logic itself, this
//! mode runs the *shells* that serve it, unchanged, on a current-thread tokio runtime with
//! paused time:
//!
//! - frontend side: the [`Dispatcher`] (routing shell around the real `KvRouter`), the
//!   embedded registry actor and the discovery watch loop that joins and drops workers and
//!   feeds their KV events into the real `FlashIndexer` (gap handling included);
//! - worker side, per worker: the real engine loop ([`WorkerHandle`]) around the real
//!   `Scheduler` + `BlockManager`, served as the supervised [`WorkerActor`] on its own node,
//!   registered under a lease renewed by heartbeat through the real `EmbeddedDiscovery`
//!   client, publishing KV events and load on the event plane.
//!
//! What is simulated: the executor ([`engine::CostModelEngine`]: a priced step and a
//! made-up sample), the network between the nodes ([`net`]: latency, loss, reordering,
//! partitions, crashed incarnations), and the clients. Every node is an in-memory
//! `turbine_runtime::Node` and every cross-node `Addr` crosses a simulated link, so nothing
//! touches the OS network or the wall clock, and one seed gives one event log.
//!
//! Clients behave like the HTTP frontend's callers: a request refused as retryable (no worker,
//! or its worker was lost before the first token: HTTP 503) is retried after
//! [`RETRY_AFTER`] up to `max_attempts`; a failure after the first token fails the request.
//! (The discrete-event core instead *migrates* such requests; the real pipeline does not.)

pub mod clock;
pub mod engine;
pub mod net;

use crate::cluster::{
    request_violations, Outcome, RequestRecord, SimConfig, SimError, SimOutcome, WorkerRecord,
};
use crate::eventlog::EventLog;
use crate::network::{Network, NodeId};
use crate::real_router::router_config;
use crate::rng::{SeedSplitter, Stream};
use crate::time::{SimDuration, SimTime};
use crate::workload::RequestSpec;
use async_trait::async_trait;
use clock::ScaledClock;
use engine::{CostModelEngine, EngineCounters};
use futures::StreamExt;
use net::{Endpoint, SimNet, SimPublisher};
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use turbine_actors::engine::dispatch::{DispatchRequest, Dispatcher};
use turbine_actors::engine::remote::{
    kv_topic, metrics_topic, report_load, watch_workers, EventFeed, WorkerConnector,
    LOAD_REPORT_EVERY, META_WORKER_ID, REGISTRY_SERVICE, WORKER_COMPONENT,
};
use turbine_actors::engine::service::{worker_service_name, WorkerActor, WorkerService};
use turbine_actors::engine::{EngineTime, Executor, KvEventSink, WorkerHandle};
use turbine_actors::frontend::EngineError;
use turbine_actors::ids::WorkerId;
use turbine_actors::kv::indexer::FlashIndexer;
use turbine_actors::kv::{BlockHash, KvEvent, KvEventBatch};
use turbine_actors::protocol::{FinishReason, SamplingParams, StopConditions};
use turbine_actors::router::{KvRouter, RouterReplicaId};
use turbine_actors::worker::{BlockManager, BlockStats, Scheduler};
use turbine_runtime::discovery::{
    embedded::Registry, Discovery, DiscoveryEvent, EmbeddedDiscovery, EmbeddedRegistry, Instance,
    Lease,
};
use turbine_runtime::{Addr, MetricsRegistry, Node, NodeConfig, SharedClock};

/// How long a client waits before retrying a request refused as retryable.
pub const RETRY_AFTER: SimDuration = SimDuration(200_000_000);
/// How long a run may go without any progress (after the last arrival and fault) before
/// it is called stuck.
const SETTLE_LIMIT: SimDuration = SimDuration(120_000_000_000);
/// How often the run's end conditions are checked.
const POLL: SimDuration = SimDuration(50_000_000);

type Log = Arc<Mutex<EventLog>>;
/// Blocks a worker announced as stored and not since removed.
type Held = Arc<Mutex<BTreeSet<BlockHash>>>;

fn record(log: &Log, at: SimTime, kind: &'static str, a: u64, b: u64, c: u64) {
    log.lock()
        .unwrap_or_else(|e| e.into_inner())
        .record(at, kind, a, b, c);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs one simulation through the real actor shells (see the module doc).
pub fn simulate_actors(cfg: &SimConfig, workload: &[RequestSpec]) -> Result<SimOutcome, SimError> {
    if cfg.workers == 0 {
        return Err(SimError::NoWorkers);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| SimError::Shells(format!("tokio runtime: {e}")))?;
    runtime.block_on(run(cfg, workload))
}

/// What the frontend's connector needs to reach a registered worker.
#[derive(Clone)]
struct Reachable {
    node: Node,
    endpoint: Endpoint,
    publisher: String,
}

/// Reaches simulated workers: their service through a simulated link, their events through
/// a simulated subscription.
struct SimConnector {
    net: Arc<SimNet>,
    frontend: Endpoint,
    directory: Arc<Mutex<BTreeMap<String, Reachable>>>,
}

#[async_trait]
impl WorkerConnector for SimConnector {
    async fn connect(
        &self,
        inst: &Instance,
        id: WorkerId,
    ) -> Result<(Addr<WorkerService>, EventFeed), String> {
        let Some(target) = lock(&self.directory).get(&inst.endpoint).cloned() else {
            return Err(format!("no simulated node at {}", inst.endpoint));
        };
        let addr = target
            .node
            .local::<WorkerService>(&worker_service_name(id))
            .map_err(|e| e.to_string())?
            .via(self.net.link(self.frontend, target.endpoint));
        Ok((addr, self.net.subscribe(&target.publisher)))
    }
}

/// One running worker incarnation.
struct Running {
    id: WorkerId,
    node: Node,
    handle: WorkerHandle,
    counters: Arc<Mutex<EngineCounters>>,
    /// From its own events, before the network.
    held: Held,
    lease: Arc<Mutex<Option<Lease>>>,
    tasks: Vec<JoinHandle<()>>,
}

/// A worker slot over its incarnations.
struct Slot {
    running: Option<Running>,
    last_id: WorkerId,
    crashes: u32,
    /// Figures of incarnations that crashed.
    retired_busy: Duration,
    retired_steps: u64,
    retired_kv: BlockStats,
}

/// Everything the run shares between its tasks.
struct World {
    cfg: SimConfig,
    clock: ScaledClock,
    shared_clock: SharedClock,
    log: Log,
    net: Arc<SimNet>,
    frontend: Node,
    frontend_ep: Endpoint,
    directory: Arc<Mutex<BTreeMap<String, Reachable>>>,
    slots: Mutex<Vec<Slot>>,
    next_worker_id: Mutex<u64>,
}

fn node_config(name: String) -> NodeConfig {
    NodeConfig {
        name,
        ..NodeConfig::default()
    }
}

impl World {
    /// Starts a fresh incarnation of worker `slot` (1-based) and registers it in the
    /// background (registration crosses the network, so it may be held by a partition).
    async fn start_worker(self: &Arc<Self>, slot: u32) -> Result<(), SimError> {
        let id = {
            let mut next = lock(&self.next_worker_id);
            *next += 1;
            WorkerId(*next)
        };
        let endpoint = self.net.bring_up(NodeId(slot));
        let name = format!("worker-{}", id.0);
        let node = Node::in_memory(
            node_config(name.clone()),
            self.shared_clock.clone(),
            MetricsRegistry::new(),
        );
        let profile = &self.cfg.profile;
        let counters = Arc::new(Mutex::new(EngineCounters::default()));
        let executor = Executor::simulated(
            Arc::new(CostModelEngine {
                worker: id,
                cost: profile.step_time.clone(),
                clock: self.clock.clone(),
                log: self.log.clone(),
                counters: counters.clone(),
            }),
            self.shared_clock.clone(),
        );
        let scheduler = Scheduler::new(
            profile.scheduler.clone(),
            BlockManager::new(profile.block_manager_config()),
        )?;
        let publisher = Arc::new(SimPublisher::new(self.net.clone(), endpoint, name.clone()));
        let held = Arc::new(Mutex::new(BTreeSet::new()));
        let kv_sink: KvEventSink = {
            let (publisher, held) = (publisher.clone(), held.clone());
            Box::new(move |batch: KvEventBatch| {
                track_held(&mut lock(&held), &batch.events);
                publisher.publish(&kv_topic(batch.worker), &batch);
            })
        };
        let handle = WorkerHandle::spawn_on(
            id,
            scheduler,
            executor,
            kv_sink,
            EngineTime {
                clock: self.shared_clock.clone(),
                wall_epoch_s: 0.0,
            },
        );
        let served = handle.clone();
        node.serve::<WorkerService, _, _>(&worker_service_name(id), move || {
            WorkerActor::new(served.clone())
        })
        .await
        .map_err(|e| SimError::Shells(format!("serving {id}: {e}")))?;

        // Load when what the router reads changes and at least every LOAD_REPORT_EVERY, as
        // `turbine worker` publishes it.
        let stats_pub = publisher.clone();
        let load_task = tokio::spawn(report_load(
            handle.watch_stats(),
            LOAD_REPORT_EVERY,
            self.shared_clock.clone(),
            move |s| stats_pub.publish(&metrics_topic(id), s),
        ));

        lock(&self.directory).insert(
            node.endpoint().to_string(),
            Reachable {
                node: node.clone(),
                endpoint,
                publisher: name,
            },
        );
        let lease = Arc::new(Mutex::new(None));
        let register_task = tokio::spawn(register(
            self.clone(),
            endpoint,
            Instance {
                component: WORKER_COMPONENT.to_string(),
                id: id.0.to_string(),
                endpoint: node.endpoint().to_string(),
                metadata: BTreeMap::from([(META_WORKER_ID.to_string(), id.0.to_string())]),
            },
            lease.clone(),
        ));
        record(
            &self.log,
            self.clock.sim_now(),
            "start",
            id.0,
            u64::from(slot),
            0,
        );
        let mut slots = lock(&self.slots);
        if let Some(s) = slots.get_mut(slot as usize - 1) {
            s.last_id = id;
            s.running = Some(Running {
                id,
                node,
                handle,
                counters,
                held,
                lease,
                tasks: vec![load_task, register_task],
            });
        }
        Ok(())
    }

    /// The worker in `slot` dies: its loop, its actors, its heartbeats and its links.
    /// False when the slot was already down (overlapping crashes): nothing to restart then.
    fn crash(&self, slot: u32) -> bool {
        let mut slots = lock(&self.slots);
        let Some(s) = slots.get_mut(slot as usize - 1) else {
            return false;
        };
        let Some(r) = s.running.take() else {
            return false;
        };
        self.net.take_down(NodeId(slot));
        r.handle.stop_now();
        r.node.shutdown();
        for t in &r.tasks {
            t.abort();
        }
        // Dropping the lease stops its heartbeats: the registry expires it, as for a
        // process that died.
        drop(lock(&r.lease).take());
        let c = *lock(&r.counters);
        s.retired_busy += c.busy;
        s.retired_steps += c.steps;
        let kv = r.handle.stats().kv;
        s.retired_kv.prefix_query_tokens += kv.prefix_query_tokens;
        s.retired_kv.prefix_hit_tokens += kv.prefix_hit_tokens;
        s.crashes += 1;
        record(
            &self.log,
            self.clock.sim_now(),
            "crash",
            r.id.0,
            u64::from(slot),
            0,
        );
        true
    }

    fn live_workers(&self) -> Vec<(WorkerId, WorkerHandle, Held)> {
        lock(&self.slots)
            .iter()
            .filter_map(|s| s.running.as_ref())
            .map(|r| (r.id, r.handle.clone(), r.held.clone()))
            .collect()
    }
}

/// Registers a worker with the frontend's registry across the network, retrying until it
/// gets through (a partition may hold the first attempts back past the call timeout).
async fn register(
    world: Arc<World>,
    from: Endpoint,
    instance: Instance,
    slot_lease: Arc<Mutex<Option<Lease>>>,
) {
    let registry = match world.frontend.local::<Registry>(REGISTRY_SERVICE) {
        Ok(addr) => addr.via(world.net.link(from, world.frontend_ep)),
        Err(_) => return,
    };
    let discovery = EmbeddedDiscovery::new(registry, world.shared_clock.clone());
    loop {
        match discovery
            .register(instance.clone(), world.cfg.lease.as_duration())
            .await
        {
            Ok(lease) => {
                *lock(&slot_lease) = Some(lease);
                return;
            }
            Err(_) => world.clock.sleep_for(world.cfg.heartbeat).await,
        }
    }
}

fn track_held(held: &mut BTreeSet<BlockHash>, events: &[KvEvent]) {
    for e in events {
        match e {
            KvEvent::BlockStored { block_hashes, .. } => held.extend(block_hashes.iter().copied()),
            KvEvent::BlockRemoved { block_hashes } => {
                for h in block_hashes {
                    held.remove(h);
                }
            }
            KvEvent::AllBlocksCleared => held.clear(),
        }
    }
}

/// One client: waits for its arrival time, sends, retries when told to, reads its stream.
async fn client(
    world: Arc<World>,
    dispatcher: Arc<Dispatcher>,
    records: Arc<Mutex<Vec<RequestRecord>>>,
    index: usize,
    spec: RequestSpec,
) {
    let clock = world.clock.clone();
    clock.sleep_until(spec.arrival).await;
    let i = index as u64;
    record(&world.log, clock.sim_now(), "arrive", i, 0, 0);
    let request = DispatchRequest {
        token_ids: spec.prompt(i),
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens: spec.output_len.max(1),
            stop_token_ids: vec![],
            ignore_eos: true,
        },
        logprobs: None,
    };
    let mut attempts = 0u32;
    let outcome = loop {
        attempts += 1;
        let retry = |e: &EngineError| {
            matches!(e, EngineError::Overloaded(_)) && attempts < world.cfg.max_attempts
        };
        let mut dispatched = match dispatcher.dispatch(request.clone()).await {
            Ok(d) => d,
            Err(e) if retry(&e) => {
                record(
                    &world.log,
                    clock.sim_now(),
                    "retry",
                    i,
                    u64::from(attempts),
                    0,
                );
                clock.sleep_for(RETRY_AFTER).await;
                continue;
            }
            Err(e) => break Outcome::Failed(e.to_string()),
        };
        record(
            &world.log,
            clock.sim_now(),
            "route",
            i,
            dispatched.worker.0,
            u64::from(attempts),
        );
        let mut received = 0u64;
        let ended = loop {
            let Some(out) = dispatched.next_output().await else {
                break Err(EngineError::Internal(
                    "the stream ended without a finish".into(),
                ));
            };
            let out = match out {
                Ok(out) => out,
                Err(e) => break Err(e),
            };
            let now = clock.sim_now();
            for _ in &out.token_ids {
                record(&world.log, now, "token", i, received, 0);
                received += 1;
                lock(&records)[index].token_times.push(now);
            }
            match out.finish {
                Some(FinishReason::Error(msg)) => break Err(EngineError::Internal(msg)),
                Some(_) => break Ok(()),
                None => {}
            }
        };
        match ended {
            Ok(()) => break Outcome::Completed,
            Err(e) if received == 0 && retry(&e) => {
                record(
                    &world.log,
                    clock.sim_now(),
                    "retry",
                    i,
                    u64::from(attempts),
                    0,
                );
                drop(dispatched);
                clock.sleep_for(RETRY_AFTER).await;
            }
            Err(e) => break Outcome::Failed(e.to_string()),
        }
    };
    let now = clock.sim_now();
    let failed = matches!(outcome, Outcome::Failed(_));
    record(
        &world.log,
        now,
        if failed { "fail" } else { "done" },
        i,
        0,
        0,
    );
    let mut recs = lock(&records);
    let r = &mut recs[index];
    r.attempts = attempts;
    r.finished = Some(now);
    r.outcome = Some(outcome);
    r.resolutions += 1;
}

async fn run(cfg: &SimConfig, workload: &[RequestSpec]) -> Result<SimOutcome, SimError> {
    let clock = ScaledClock::new();
    let shared_clock: SharedClock = Arc::new(clock.clone());
    let log: Log = Arc::new(Mutex::new(EventLog::new(cfg.keep_event_log)));
    let seeds = SeedSplitter::new(cfg.seed);
    let net = SimNet::new(
        Network::new(
            cfg.net.clone(),
            cfg.faults.partitions.clone(),
            seeds.stream(Stream::Network),
        ),
        clock.clone(),
        log.clone(),
    );

    // Frontend: registry, dispatcher (router + index), discovery watch.
    let frontend_ep = net.bring_up(NodeId::ROUTER);
    let frontend = Node::in_memory(
        node_config("frontend".into()),
        shared_clock.clone(),
        MetricsRegistry::new(),
    );
    let block_size = cfg.profile.block_size();
    let index = Arc::new(FlashIndexer::default());
    let router = KvRouter::new(
        RouterReplicaId(0),
        router_config(cfg.policy, block_size, seeds.stream(Stream::Router).gen()),
        Some(index.clone()),
    )?;
    let dispatcher = Arc::new(Dispatcher::new(block_size, router, 1, shared_clock.clone()));
    let registry =
        EmbeddedRegistry::serve(&frontend, REGISTRY_SERVICE, cfg.heartbeat.as_duration())
            .await
            .map_err(|e| SimError::Shells(format!("registry: {e}")))?;
    let directory = Arc::new(Mutex::new(BTreeMap::new()));
    let discovery: Arc<dyn Discovery> = Arc::new(EmbeddedDiscovery::new(
        registry.addr().clone(),
        shared_clock.clone(),
    ));
    let watcher = watch_workers(
        Arc::new(SimConnector {
            net: net.clone(),
            frontend: frontend_ep,
            directory: directory.clone(),
        }),
        discovery.clone(),
        dispatcher.clone(),
        index.clone(),
    );
    let leases_expired = Arc::new(Mutex::new(0u64));
    let membership = tokio::spawn(log_membership(
        discovery,
        clock.clone(),
        log.clone(),
        leases_expired.clone(),
    ));

    let world = Arc::new(World {
        cfg: cfg.clone(),
        clock: clock.clone(),
        shared_clock,
        log: log.clone(),
        net: net.clone(),
        frontend,
        frontend_ep,
        directory,
        slots: Mutex::new(
            (0..cfg.workers)
                .map(|_| Slot {
                    running: None,
                    last_id: WorkerId(0),
                    crashes: 0,
                    retired_busy: Duration::ZERO,
                    retired_steps: 0,
                    retired_kv: BlockStats::default(),
                })
                .collect(),
        ),
        next_worker_id: Mutex::new(0),
    });
    for slot in 1..=cfg.workers {
        world.start_worker(slot).await?;
    }
    // The workload starts once every worker has joined (or after ten leases at most).
    let joined_by = clock.sim_now().plus(SimDuration(cfg.lease.0 * 10));
    while dispatcher.worker_ids().len() < cfg.workers as usize && clock.sim_now() < joined_by {
        clock.sleep_for(SimDuration::from_millis(1)).await;
    }
    // Workload time starts at zero: the network's FIFO clamps, kept in start-up time, are
    // reset with it (start-up events stay in the log at their start-up times, before the
    // `workload` line).
    clock.start_workload();
    net.restart_time();
    record(
        &log,
        clock.sim_now(),
        "workload",
        dispatcher.worker_ids().len() as u64,
        0,
        0,
    );

    let records = Arc::new(Mutex::new(
        workload.iter().map(RequestRecord::new).collect::<Vec<_>>(),
    ));
    let mut tasks = Vec::new();
    for (i, spec) in workload.iter().enumerate() {
        tasks.push(tokio::spawn(client(
            world.clone(),
            dispatcher.clone(),
            records.clone(),
            i,
            spec.clone(),
        )));
    }
    for c in cfg.faults.crashes.clone() {
        let world = world.clone();
        tasks.push(tokio::spawn(async move {
            world.clock.sleep_until(c.at).await;
            if !world.crash(c.slot) {
                return; // already down: the crash that took it down restarts it
            }
            world.clock.sleep_for(c.down_for).await;
            if world.start_worker(c.slot).await.is_err() {
                record(
                    &world.log,
                    world.clock.sim_now(),
                    "restart_failed",
                    u64::from(c.slot),
                    0,
                    0,
                );
            }
        }));
    }

    // Run until every request is resolved and both that and the last fault are `settle`
    // behind, and every live worker is idle. Give up when nothing has progressed (no token
    // delivered, no request resolved) for SETTLE_LIMIT after the last arrival and fault:
    // an overloaded cluster is slow, a stuck one is silent.
    let last_arrival = workload
        .iter()
        .map(|r| r.arrival)
        .max()
        .unwrap_or(SimTime::ZERO);
    let faults_over = cfg.faults.last_fault_end().plus(cfg.settle);
    let mut resolved_at = None;
    let (mut progress, mut progressed_at) = (0usize, SimTime::ZERO);
    loop {
        let now = clock.sim_now();
        let (done, delivered) = {
            let recs = lock(&records);
            let done = recs.iter().filter(|r| r.resolutions > 0).count();
            let delivered: usize = recs.iter().map(|r| r.token_times.len()).sum();
            (done, delivered)
        };
        if done + delivered != progress {
            (progress, progressed_at) = (done + delivered, now);
        }
        if resolved_at.is_none() && done == workload.len() {
            resolved_at = Some(now);
        }
        // `settle` after the last request too: load reports must reveal any trailing loss.
        let settled_from = resolved_at.map(|t| t.plus(cfg.settle).max(faults_over));
        if settled_from.is_some_and(|t| now >= t) && workers_idle(&world) {
            break;
        }
        let quiet_since = progressed_at.max(last_arrival).max(faults_over);
        if now >= quiet_since.plus(SETTLE_LIMIT) {
            break;
        }
        clock.sleep_for(POLL).await;
    }
    let end = clock.sim_now();
    let mut violations = check_workers(&world, &index).await;
    for t in tasks {
        t.abort();
    }
    watcher.abort();
    membership.abort();
    let routed = lock(dispatcher.router()).metrics();
    let leases_expired = *lock(&leases_expired);
    let records = std::mem::take(&mut *lock(&records));
    violations.extend(request_violations(&records));
    let workers = worker_records(&world).await;
    let log = lock(&log);
    Ok(SimOutcome {
        router_impl: "actors".to_string(),
        end,
        event_log_hash: log.hash(),
        events: log.count(),
        requests: records,
        workers,
        net: net.stats(),
        resyncs: net.kv_gaps(),
        leases_expired,
        migrations: 0,
        routed_overlap_blocks: routed.overlap_blocks,
        routed_blocks: routed.request_blocks,
        invariant_violations: violations,
        event_log_lines: log.lines().map(<[String]>::to_vec),
    })
}

/// Logs workers joining and leaving the registry (a second watcher beside the frontend's),
/// counting departures.
async fn log_membership(
    discovery: Arc<dyn Discovery>,
    clock: ScaledClock,
    log: Log,
    departures: Arc<Mutex<u64>>,
) {
    let Ok(mut watch) = discovery.watch(WORKER_COMPONENT).await else {
        return;
    };
    while let Some(event) = watch.next().await {
        let (kind, inst) = match &event {
            DiscoveryEvent::Added(i) => ("join", i),
            DiscoveryEvent::Removed(i) => {
                *lock(&departures) += 1;
                ("leave", i)
            }
        };
        let id = inst.id.parse().unwrap_or(u64::MAX);
        record(&log, clock.sim_now(), kind, id, 0, 0);
    }
}

/// Every live worker reported itself idle after its last step (read from its load watch, not
/// by asking: a command would make it publish again).
fn workers_idle(world: &World) -> bool {
    world.live_workers().iter().all(|(_, handle, _)| {
        let s = handle.stats();
        s.num_running + s.num_waiting == 0
    })
}

/// The settled-state invariants: every live worker passes its block manager's checks, holds
/// no blocks for requests and still caches what it announced; the index lists only live
/// workers, and for each only blocks it announced and still holds.
async fn check_workers(world: &Arc<World>, index: &FlashIndexer) -> Vec<String> {
    let mut problems = Vec::new();
    let live = world.live_workers();
    let live_ids: BTreeSet<WorkerId> = live.iter().map(|(id, _, _)| *id).collect();
    for w in index.workers() {
        let n = index.worker_block_count(w);
        if n > 0 && !live_ids.contains(&w) {
            problems.push(format!(
                "index holds {n} blocks of {w}, which is not a live worker"
            ));
        }
    }
    for (id, handle, held) in live {
        let announced: Vec<BlockHash> = lock(&held).iter().copied().collect();
        let check = handle
            .inspect(move |s| {
                let bm = s.block_manager();
                let mut p = Vec::new();
                if let Err(e) = s.check_invariants() {
                    p.push(format!("{id}: {}", e.0));
                }
                if !s.is_idle() {
                    p.push(format!("{id} still has requests after the run"));
                }
                if bm.num_used_blocks() != 0 {
                    p.push(format!(
                        "{id}: {} blocks still referenced by requests after the run",
                        bm.num_used_blocks()
                    ));
                }
                let lost: Vec<BlockHash> = announced
                    .iter()
                    .copied()
                    .filter(|h| !bm.is_cached(*h))
                    .collect();
                (p, lost, announced)
            })
            .await;
        let Ok((p, lost, announced)) = check else {
            problems.push(format!("{id} stopped answering"));
            continue;
        };
        problems.extend(p);
        if let Some(h) = lost.first() {
            problems.push(format!("{id}: announced block {h} is not cached"));
        }
        let indexed = index.worker_block_count(id);
        let indexed_and_held = announced
            .iter()
            .filter(|h| index.holders(**h).contains(&id))
            .count();
        if indexed != indexed_and_held {
            problems.push(format!(
                "index holds {} blocks of {id} that it does not hold",
                indexed - indexed_and_held.min(indexed)
            ));
        }
    }
    problems
}

async fn worker_records(world: &Arc<World>) -> Vec<WorkerRecord> {
    // Figures of the crashed incarnations, plus the live one's handle and engine counters
    // (taken under the lock; the live block stats are asked for after it is released).
    let snapshot: Vec<(WorkerRecord, Option<WorkerHandle>)> = lock(&world.slots)
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let live = s
                .running
                .as_ref()
                .map(|r| *lock(&r.counters))
                .unwrap_or_default();
            let record = WorkerRecord {
                slot: i as u32 + 1,
                final_id: s.last_id,
                busy_s: (s.retired_busy + live.busy).as_secs_f64(),
                steps: s.retired_steps + live.steps,
                crashes: s.crashes,
                prefix_query_tokens: s.retired_kv.prefix_query_tokens,
                prefix_hit_tokens: s.retired_kv.prefix_hit_tokens,
            };
            (record, s.running.as_ref().map(|r| r.handle.clone()))
        })
        .collect();
    let mut out = Vec::new();
    for (mut record, handle) in snapshot {
        if let Some(h) = handle {
            let kv = h
                .inspect(|s| s.block_manager().stats())
                .await
                .unwrap_or_default();
            record.prefix_query_tokens += kv.prefix_query_tokens;
            record.prefix_hit_tokens += kv.prefix_hit_tokens;
        }
        out.push(record);
    }
    out
}
