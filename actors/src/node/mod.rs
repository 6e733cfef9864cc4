//! The composition root: every node of a serving graph is built here, from the config, for
//! one role. `turbine up` ([`local`]), `turbine worker` ([`process`]) and the simulator's
//! shells all call these builders; what differs between them is passed in as a seam:
//!
//! - the clock (real, or paused tokio time) and the node's transport (ZeroMQ, or an
//!   in-memory node whose addresses cross simulated links): the caller builds the [`Node`];
//! - how workers are reached ([`WorkerConnector`]) and how discovery is spoken;
//! - the executor (a real backend on its own thread, or a simulated engine): the caller
//!   hands a built [`Executor`] to [`start_worker`];
//! - where a worker's KV events and load reports go ([`Announce`]).
//!
//! Roles today: frontend (with the router in its process, or reaching a router process),
//! router, aggregated worker, planner (in `turbine up`'s process, [`planner`]). A new role (prefill, decode, encoder, planner, stage) is one
//! more arm of [`Role`] and one builder here.

pub mod local;
pub mod planner;
pub mod process;

use crate::cluster_config::{ClusterConfig, WorkerGroup, WorkerRole};
use crate::executor::device::{backend_builder, Device};
use crate::executor::Executor;
use crate::ids::WorkerId;
use crate::kv::indexer::FlashIndexer;
use crate::kv::{BlockSize, KvEventBatch};
use crate::router::dispatch::Dispatcher;
use crate::router::membership::{watch_workers, Members, WorkerConnector};
use crate::router::service::{RouterCore, RouterService, ROUTER_SERVICE};
use crate::router::{KvRouter, MigrationConfig, RouterConfig, RouterReplicaId};
use crate::worker::announce::{
    report_load, LOAD_REPORT_EVERY, META_EVENTS, META_WORKER_ID, WORKER_COMPONENT,
};
use crate::worker::service::{worker_service_name, WorkerActor, WorkerService};
use crate::worker::{
    BlockManager, BlockManagerConfig, EngineTime, Scheduler, SchedulerConfig, SchedulerStats,
    WorkerHandle,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::task::JoinHandle;
use turbine_kernels::loader::LoadedModel;
use turbine_kernels::model::ModelConfig;
use turbine_runtime::discovery::{Discovery, Instance};
use turbine_runtime::{Addr, Node, SharedClock};

/// Why a node could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("worker {worker}: {reason}")]
    Worker { worker: WorkerId, reason: String },
    #[error("request plane: {0}")]
    Node(String),
}

/// What a process (or a simulated node) is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The HTTP frontend, with the router in its process unless the config's router is
    /// `remote` (then it reaches a router process found through discovery).
    Frontend,
    /// The router and its KV index, serving [`RouterService`] to frontends.
    Router,
    /// Worker group `group` of the config.
    Worker { group: usize },
}

/// Validates the worker groups and returns (block size, usable context length): the model's
/// context, capped by the config and by what the smallest worker's KV pool can hold. The
/// frontend and every `turbine worker` compute the same figures from the same file.
pub fn check_cluster(
    cfg: &ClusterConfig,
    model: &ModelConfig,
) -> Result<(BlockSize, usize), StartError> {
    let block_size = block_size_of(cfg)?;
    cfg.migration.validate().map_err(StartError::Config)?;
    let groups: Vec<&WorkerGroup> = cfg.workers.iter().filter(|g| g.replicas > 0).collect();
    if let Some(g) = groups.iter().find(|g| g.role != WorkerRole::Aggregated) {
        return Err(StartError::Config(format!(
            "role {:?} needs disaggregated serving, which this build does not run yet; use role: aggregated",
            g.role
        )));
    }
    let pool_tokens = groups
        .iter()
        .map(|g| g.kv_blocks * block_size.as_usize())
        .min()
        .unwrap_or(0);
    let context_length = cfg
        .model
        .max_context
        .unwrap_or(model.max_position)
        .min(model.max_position)
        .min(pool_tokens);
    if context_length < 2 {
        return Err(StartError::Config(format!(
            "the usable context is {context_length} tokens: raise kv_blocks"
        )));
    }
    Ok((block_size, context_length))
}

/// The block size every worker group shares (the router hashes requests with it).
pub fn block_size_of(cfg: &ClusterConfig) -> Result<BlockSize, StartError> {
    let mut groups = cfg.workers.iter().filter(|g| g.replicas > 0);
    let Some(first) = groups.next() else {
        return Err(StartError::Config("no workers configured".into()));
    };
    if groups.any(|g| g.block_size != first.block_size) {
        return Err(StartError::Config(
            "every worker group must use the same block_size".into(),
        ));
    }
    Ok(first.block_size)
}

// ---------------------------------------------------------------------------------------
// Router role
// ---------------------------------------------------------------------------------------

/// A running router: its state and the address it is served at on its node.
pub struct RouterNode {
    pub core: Arc<RouterCore>,
    pub addr: Addr<RouterService>,
}

/// Builds the router (events-fed KV index, the configured policy) and serves it as
/// [`RouterService`] on `node`.
pub async fn start_router(
    node: &Node,
    mut config: RouterConfig,
    block_size: BlockSize,
    clock: SharedClock,
) -> Result<RouterNode, StartError> {
    config.block_size = block_size;
    let index = Arc::new(FlashIndexer::default());
    let router = KvRouter::new(RouterReplicaId(0), config, Some(index.clone()))
        .map_err(|e| StartError::Config(format!("router: {e}")))?;
    let core = RouterCore::new(router, index, clock);
    let addr = core
        .serve(node, ROUTER_SERVICE)
        .await
        .map_err(|e| StartError::Node(e.to_string()))?;
    Ok(RouterNode { core, addr })
}

/// Follows worker membership through `discovery`, for the router and/or the frontend of
/// this process (see [`Members`]), until the returned task is aborted.
pub fn follow_workers(
    connector: Arc<dyn WorkerConnector>,
    discovery: Arc<dyn Discovery>,
    members: Members,
) -> JoinHandle<()> {
    watch_workers(connector, discovery, members)
}

// ---------------------------------------------------------------------------------------
// Frontend role (its routing side; the HTTP and text side is `frontend::pipeline`)
// ---------------------------------------------------------------------------------------

/// The frontend's dispatcher, asking the router at `router` (`None`: set when a router
/// process joins).
pub fn dispatcher(
    block_size: BlockSize,
    router: Option<Addr<RouterService>>,
    first_request_id: u64,
    migration: MigrationConfig,
    clock: SharedClock,
) -> Arc<Dispatcher> {
    Arc::new(Dispatcher::new(block_size, router, first_request_id).with_migration(migration, clock))
}

// ---------------------------------------------------------------------------------------
// Worker role
// ---------------------------------------------------------------------------------------

/// What a worker publishes on its event plane, in one ordered stream (so a load report
/// never overtakes the KV batches it counts).
pub enum Announcement {
    Kv(KvEventBatch),
    Load(SchedulerStats),
}

/// Where a worker's announcements go: the event plane of a `turbine worker`, a simulated
/// publisher, or straight into a router in the same process.
pub type Announce = Arc<dyn Fn(Announcement) + Send + Sync>;

/// A started worker: its engine loop, served as [`WorkerService`] on its node, and the
/// discovery instance to register it under.
pub struct WorkerNode {
    pub handle: WorkerHandle,
    pub instance: Instance,
}

/// The worker's pure core from its group's settings.
pub fn scheduler_for(group: &WorkerGroup, context_length: usize) -> Result<Scheduler, String> {
    let blocks = BlockManager::new(BlockManagerConfig {
        num_blocks: u32::try_from(group.kv_blocks).map_err(|_| "kv_blocks is too large")?,
        block_size: group.block_size,
        enable_prefix_caching: true,
    });
    Scheduler::new(
        SchedulerConfig {
            max_num_batched_tokens: group.max_num_batched_tokens,
            max_num_seqs: group.max_num_seqs,
            max_model_len: context_length,
            enable_chunked_prefill: true,
        },
        blocks,
    )
    .map_err(|e| e.to_string())
}

/// The executor of a real worker: the backend the group's `device` names, built on the
/// executor's own OS thread (a CUDA context stays there).
pub fn real_executor(
    id: WorkerId,
    group: &WorkerGroup,
    model: &LoadedModel,
) -> Result<Executor, StartError> {
    let fail = |reason: String| StartError::Worker { worker: id, reason };
    let device = Device::parse(&group.device).map_err(|e| StartError::Config(e.to_string()))?;
    let build = backend_builder(device, group, model).map_err(|e| fail(e.to_string()))?;
    Executor::spawn_with(&format!("executor-{id}"), build)
        .map_err(|e| fail(format!("device {device}: {e}")))
}

/// Starts worker `id`: its engine loop around `scheduler` and `executor`, KV events into
/// `announce`, served as [`WorkerService`] on `node`. `events_endpoint` is where its event
/// plane can be subscribed to, if it has one of its own. Load reports are separate
/// ([`report_loads`]): a worker in the frontend's process mirrors every step instead.
pub async fn start_worker(
    node: &Node,
    id: WorkerId,
    scheduler: Scheduler,
    executor: Executor,
    time: EngineTime,
    announce: Announce,
    events_endpoint: Option<&str>,
) -> Result<WorkerNode, StartError> {
    let kv = announce.clone();
    let handle = WorkerHandle::spawn_on(
        id,
        scheduler,
        executor,
        Box::new(move |batch| kv(Announcement::Kv(batch))),
        time,
    );
    let served = handle.clone();
    node.serve::<WorkerService, _, _>(&worker_service_name(id), move || {
        WorkerActor::new(served.clone())
    })
    .await
    .map_err(|e| StartError::Node(format!("serving {id}: {e}")))?;
    let mut metadata = BTreeMap::from([(META_WORKER_ID.to_string(), id.0.to_string())]);
    if let Some(ep) = events_endpoint {
        metadata.insert(META_EVENTS.to_string(), ep.to_string());
    }
    Ok(WorkerNode {
        handle,
        instance: Instance {
            component: WORKER_COMPONENT.to_string(),
            id: id.0.to_string(),
            endpoint: node.endpoint().to_string(),
            metadata,
        },
    })
}

/// Publishes `worker`'s load into `announce` when what the router reads changes and at
/// least every [`LOAD_REPORT_EVERY`] on `clock`, until its loop is gone.
pub fn report_loads(
    worker: &WorkerHandle,
    clock: SharedClock,
    announce: Announce,
) -> JoinHandle<()> {
    tokio::spawn(report_load(
        worker.watch_stats(),
        LOAD_REPORT_EVERY,
        clock,
        move |s| announce(Announcement::Load(s.clone())),
    ))
}

/// Registers `instance` under a lease of `lease`, retrying every `retry` until the registry
/// answers (a partition may hold the first attempts back past the call timeout).
pub async fn register_until_done(
    discovery: &dyn Discovery,
    instance: Instance,
    lease: std::time::Duration,
    retry: std::time::Duration,
    clock: &SharedClock,
) -> turbine_runtime::discovery::Lease {
    loop {
        match discovery.register(instance.clone(), lease).await {
            Ok(lease) => return lease,
            Err(e) => {
                tracing::debug!("registering {}: {e}; retrying", instance.id);
                clock.sleep(retry).await;
            }
        }
    }
}
