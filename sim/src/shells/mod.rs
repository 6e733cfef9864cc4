//! The simulator's run: turbine's real nodes on virtual time.
//!
//! The nodes are composed by `turbine_actors::node`, as `turbine up` and `turbine worker`
//! compose them, on a current-thread tokio runtime with paused time:
//!
//! - frontend side, composed by `turbine_actors::node` as `turbine up` composes it: the
//!   router served as `RouterService` (the real `KvRouter` + `FlashIndexer`) and the
//!   dispatcher asking it through its address, the embedded registry actor and the
//!   discovery watch loop that joins and drops workers and feeds their KV events into the
//!   index (gap handling included);
//! - worker side, per worker, composed by `turbine_actors::node::start_worker`: the real
//!   engine loop around the real `Scheduler` + `BlockManager`, served as the supervised
//!   `WorkerActor` on its own node,
//!   registered under a lease renewed by heartbeat through the real `EmbeddedDiscovery`
//!   client, publishing KV events and load on the event plane.
//!
//! What is simulated: the executor ([`engine::CostModelEngine`]: a priced step and a
//! made-up sample), the network between the nodes ([`net`]: latency, loss, reordering,
//! partitions, crashed incarnations), and the clients. Every node is an in-memory
//! `turbine_runtime::Node` and every cross-node `Addr` crosses a simulated link, so nothing
//! touches the OS network or the wall clock, and one seed gives one event log.
//!
//! Clients read their streams through the frontend's migration shell
//! (`router::migrating::MigratingStream`), as the HTTP pipeline does: a request whose worker
//! crashes, is cut off or stalls mid-stream continues on another worker, up to the
//! migration limit. A request refused as retryable (no worker left: HTTP 503) is retried
//! after [`RETRY_AFTER`] up to `max_attempts`, as an HTTP client retries a 503.

mod checks;
mod client;
pub mod clock;
pub mod engine;
mod fleet;
pub mod net;
pub mod planner;

use crate::eventlog::EventLog;
use crate::network::{Network, NodeId};
use crate::rng::{SeedSplitter, Stream};
use crate::run::router_config;
use crate::run::{request_violations, RequestRecord, SimConfig, SimError, SimOutcome};
use crate::time::{SimDuration, SimTime};
use crate::workload::RequestSpec;
use checks::{check_workers, log_membership, worker_records, workers_idle};
use clock::ScaledClock;
use fleet::{node_config, SimConnector, Slot, World};
use net::SimNet;
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use turbine_actors::ids::WorkerId;
use turbine_actors::kv::BlockHash;
use turbine_actors::node;
use turbine_actors::router::membership::Members;
use turbine_actors::worker::announce::REGISTRY_SERVICE;
use turbine_actors::worker::BlockStats;
use turbine_runtime::discovery::{Discovery, EmbeddedDiscovery, EmbeddedRegistry};
use turbine_runtime::{MetricsRegistry, Node, SharedClock};

/// How long a client waits before retrying a request refused as retryable.
pub const RETRY_AFTER: SimDuration = SimDuration(200_000_000);
/// How long a run may go without any progress (after the last arrival and fault) before
/// it is called stuck.
const SETTLE_LIMIT: SimDuration = SimDuration(120_000_000_000);
/// How often the run's end conditions are checked.
const POLL: SimDuration = SimDuration(50_000_000);

pub(crate) type Log = Arc<Mutex<EventLog>>;
/// Blocks a worker announced as stored and not since removed.
pub(crate) type Held = Arc<Mutex<BTreeSet<BlockHash>>>;

pub(crate) fn record(log: &Log, at: SimTime, kind: &'static str, a: u64, b: u64, c: u64) {
    log.lock()
        .unwrap_or_else(|e| e.into_inner())
        .record(at, kind, a, b, c);
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
    // The frontend's node, composed as `turbine up` composes it: the router served on it,
    // the dispatcher asking it through its address.
    let router_cfg = router_config(cfg.policy, block_size, seeds.stream(Stream::Router).gen());
    router_cfg.validate()?;
    let router = node::start_router(
        &frontend,
        router_cfg,
        &cfg.disagg,
        block_size,
        shared_clock.clone(),
    )
    .await
    .map_err(|e| SimError::Shells(e.to_string()))?;
    let dispatcher = node::dispatcher(
        block_size,
        Some(router.addr.clone()),
        1,
        cfg.migration.clone(),
        shared_clock.clone(),
    );
    let disagg_metrics = (cfg.prefill_workers > 0).then(|| {
        // Disaggregated: the same flow `turbine up` runs with prefill workers.
        let metrics = turbine_actors::disagg::metrics::DisaggMetrics::default();
        dispatcher.enable_disaggregation(turbine_actors::disagg::flow::DisaggSettings {
            metrics: metrics.clone(),
            prefill_timeout: Duration::from_millis(cfg.disagg.remote_prefill_timeout_ms),
        });
        metrics
    });
    let registry =
        EmbeddedRegistry::serve(&frontend, REGISTRY_SERVICE, cfg.heartbeat.as_duration())
            .await
            .map_err(|e| SimError::Shells(format!("registry: {e}")))?;
    let directory = Arc::new(Mutex::new(BTreeMap::new()));
    let discovery: Arc<dyn Discovery> = Arc::new(EmbeddedDiscovery::new(
        registry.addr().clone(),
        shared_clock.clone(),
    ));
    let watcher = node::follow_workers(
        Arc::new(SimConnector {
            net: net.clone(),
            frontend: frontend_ep,
            directory: directory.clone(),
        }),
        discovery.clone(),
        Members {
            router: Some(router.core.clone()),
            frontend: Some(dispatcher.clone()),
            gauges: None,
            endpoints: None,
            loads: None,
        },
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
        hub: turbine_runtime::transfer::TransferHub::new(),
        planes: Mutex::new(BTreeMap::new()),
        prefill_slots: prefill_slots(cfg),
        // With a planner, a slot for each worker it may add.
        slots: Mutex::new(
            (0..slot_count(cfg))
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
        slowed_until: Arc::new(Mutex::new(SimTime::ZERO)),
    });
    let initial = initial_slots(cfg);
    for &slot in &initial {
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
    let mut planned = None;
    if let Some(p) = &cfg.planner {
        let (task, decisions, timeline) = planner::start(
            world.clone(),
            router.core.clone(),
            records.clone(),
            p,
            &initial,
            slot_count(cfg),
        )
        .map_err(SimError::Shells)?;
        tasks.push(task);
        planned = Some((decisions, timeline));
    }
    for (i, spec) in workload.iter().enumerate() {
        tasks.push(tokio::spawn(client::client(
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
    let mut resolved_at = None;
    let (mut progress, mut progressed_at) = (0usize, SimTime::ZERO);
    loop {
        let now = clock.sim_now();
        // A slowed step that started inside its fault's window runs past it.
        let faults_over = cfg
            .faults
            .last_fault_end()
            .max(*lock(&world.slowed_until))
            .plus(cfg.settle);
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
    let mut violations = check_workers(&world, router.core.index()).await;
    for t in tasks {
        t.abort();
    }
    watcher.abort();
    membership.abort();
    let routed = router.core.metrics();
    let leases_expired = *lock(&leases_expired);
    let records = std::mem::take(&mut *lock(&records));
    violations.extend(request_violations(&records));
    let workers = worker_records(&world).await;
    let planner = planned.map(|(d, t)| crate::run::PlannerOutcome {
        decisions: lock(&d).clone(),
        timeline: lock(&t).clone(),
    });
    let log = lock(&log);
    Ok(SimOutcome {
        end,
        event_log_hash: log.hash(),
        events: log.count(),
        requests: records,
        workers,
        net: net.stats(),
        resyncs: net.kv_gaps(),
        leases_expired,
        routed_overlap_blocks: routed.overlap_blocks,
        routed_blocks: routed.request_blocks,
        invariant_violations: violations,
        event_log_lines: log.lines().map(<[String]>::to_vec),
        planner,
        disagg: disagg_metrics.map(|m| m.summary()),
    })
}

/// The most workers the run's planner may run in one pool (0 without a planner).
fn planner_pool_max(cfg: &SimConfig) -> u32 {
    cfg.planner
        .as_ref()
        .map_or(0, |p| p.config.max_replicas as u32)
}

/// Prefill slots come first: the run's prefill workers, or as many as its planner may run
/// in the prefill pool.
fn prefill_slots(cfg: &SimConfig) -> u32 {
    match cfg.prefill_workers {
        0 => 0,
        n => n.max(planner_pool_max(cfg)),
    }
}

/// Worker slots of a run: its workers, or as many as its planner may run (per pool).
fn slot_count(cfg: &SimConfig) -> u32 {
    let most = planner_pool_max(cfg);
    match cfg.prefill_workers {
        0 => cfg.workers.max(most),
        p => prefill_slots(cfg) + cfg.workers.saturating_sub(p).max(most),
    }
}

/// The slots the run starts with: `workers` in a row; disaggregated, the prefill workers
/// from slot 1 and the decode workers right after the prefill slots.
fn initial_slots(cfg: &SimConfig) -> Vec<u32> {
    let p = cfg.prefill_workers.min(cfg.workers);
    let decode_from = prefill_slots(cfg) + 1;
    (1..=p)
        .chain(decode_from..decode_from + (cfg.workers - p))
        .collect()
}
