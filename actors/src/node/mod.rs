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
//! router, workers of role aggregated, prefill or decode ([`start_worker_as`]: a prefill or
//! decode worker gets a transfer plane, [`transfer_plane`]), planner (in `turbine up`'s
//! process, [`planner`]). A new role (encoder, stage) is one more arm of [`Role`] and one
//! builder here.

pub mod epp;
pub mod local;
pub mod planner;
pub mod process;
pub mod stages;

use crate::cluster_config::{ClusterConfig, WorkerGroup, WorkerRole};
use crate::encoder::service::{encoder_service_name, Encoder, EncoderActor, EncoderService};
use crate::executor::device::{backend_builder, vision_on, Device};
use crate::executor::Executor;
use crate::ids::WorkerId;
use crate::kv::indexer::FlashIndexer;
use crate::kv::{BlockSize, KvEventBatch};
use crate::router::dispatch::Dispatcher;
use crate::router::membership::{watch_workers, Members, WorkerConnector};
use crate::router::replica_sync::{start_replica_sync, ReplicaSync};
use crate::router::service::{RouterCore, RouterService, ROUTER_SERVICE};
use crate::router::{KvRouter, MigrationConfig, RouterConfig, RouterReplicaId};
use crate::worker::announce::{
    report_load, role_name, LOAD_REPORT_EVERY, META_EVENTS, META_ROLE, META_WORKER_ID,
    WORKER_COMPONENT,
};
use crate::worker::service::{worker_service_name, WorkerActor, WorkerService};
use crate::worker::{
    BlockManager, BlockManagerConfig, EngineTime, Scheduler, SchedulerConfig, SchedulerStats,
    WorkerHandle,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::task::JoinHandle;
use turbine_kernels::grammar::Grammars;
use turbine_kernels::loader::LoadedModel;
use turbine_kernels::model::ModelConfig;
use turbine_runtime::discovery::{Discovery, Instance};
use turbine_runtime::transfer::{TransferHub, TransferPlane};
use turbine_runtime::{Addr, MetricsRegistry, Node, SharedClock};

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
    /// Entry `index` of the config's `stages:` (a custom stage in a process of its own).
    Stage { index: usize },
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
    // Encoders hold no KV: they neither serve requests nor bound the context.
    let groups: Vec<&WorkerGroup> = cfg
        .workers
        .iter()
        .filter(|g| g.replicas > 0 && g.role != WorkerRole::Encoder)
        .collect();
    if groups.iter().any(|g| g.role == WorkerRole::Prefill)
        && groups.iter().all(|g| g.role == WorkerRole::Prefill)
    {
        return Err(StartError::Config(
            "prefill workers need a decode (or aggregated) worker to hand their KV to".into(),
        ));
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
    disagg: &crate::disagg::DisaggregationConfig,
    block_size: BlockSize,
    clock: SharedClock,
) -> Result<RouterNode, StartError> {
    config.block_size = block_size;
    let index = Arc::new(FlashIndexer::default());
    // Replicas tell each other's events apart by id: a fresh one each, unique across
    // restarts; a router alone keeps 0 (the simulator's runs stay byte for byte).
    let replica = if config.replica_sync {
        RouterReplicaId(process::fresh_worker_id().0)
    } else {
        RouterReplicaId(0)
    };
    let router = KvRouter::new(replica, config, Some(index.clone()))
        .map_err(|e| StartError::Config(format!("router: {e}")))?;
    let core = RouterCore::new(router, index, clock);
    core.set_disaggregation(disagg.clone());
    let addr = core
        .serve(node, ROUTER_SERVICE)
        .await
        .map_err(|e| StartError::Node(e.to_string()))?;
    Ok(RouterNode { core, addr })
}

/// With `router.replica_sync`, keeps `core` in step with the other router replicas
/// registered with `discovery` (see [`crate::router::replica_sync`]); `None` otherwise.
/// Its events go out on a PUB socket bound at the file's `transport.events_bind`.
pub async fn sync_router_replicas(
    cfg: &ClusterConfig,
    core: &Arc<RouterCore>,
    node: &Node,
    discovery: Arc<dyn Discovery>,
) -> Result<Option<ReplicaSync>, StartError> {
    if !cfg.router.replica_sync {
        return Ok(None);
    }
    let lease = match &cfg.discovery {
        crate::cluster_config::DiscoverySection::Embedded { lease_ms, .. }
        | crate::cluster_config::DiscoverySection::Kubernetes { lease_ms, .. } => *lease_ms,
        crate::cluster_config::DiscoverySection::Static { .. } => {
            return Err(StartError::Config(
                "router.replica_sync: replicas find each other through discovery; the static backend has no registry (use embedded or kubernetes)".into(),
            ))
        }
    };
    start_replica_sync(
        core.clone(),
        &format!("tcp://{}", cfg.transport.events_bind),
        discovery,
        std::time::Duration::from_millis(lease),
        node.metrics().clone(),
    )
    .await
    .map(Some)
    .map_err(|e| StartError::Node(e.to_string()))
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

/// Whether `cfg` describes a disaggregated cluster (some prefill workers).
pub fn is_disaggregated(cfg: &ClusterConfig) -> bool {
    cfg.workers
        .iter()
        .any(|g| g.replicas > 0 && g.role == WorkerRole::Prefill)
}

/// Sends `dispatcher`'s requests through the disaggregated flow (when `cfg` has prefill
/// workers), counting into `metrics`. Returns whether it did.
pub fn enable_disaggregation(
    cfg: &ClusterConfig,
    dispatcher: &Dispatcher,
    metrics: crate::disagg::metrics::DisaggMetrics,
) -> bool {
    if !is_disaggregated(cfg) {
        return false;
    }
    dispatcher.enable_disaggregation(crate::disagg::flow::DisaggSettings {
        metrics,
        prefill_timeout: std::time::Duration::from_millis(
            cfg.disaggregation.remote_prefill_timeout_ms,
        ),
    });
    true
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
    Scheduler::new(scheduler_config(group, context_length)?, blocks).map_err(|e| e.to_string())
}

/// The scheduler limits of a worker of `group` (what `turbine profile` records for the
/// simulator too).
pub fn scheduler_config(
    group: &WorkerGroup,
    context_length: usize,
) -> Result<SchedulerConfig, String> {
    Ok(SchedulerConfig {
        max_num_batched_tokens: group.max_num_batched_tokens,
        max_num_seqs: group.max_num_seqs,
        max_model_len: context_length,
        enable_chunked_prefill: true,
        contended_prefill_chunk: group.contended_prefill_chunk()?,
    })
}

/// The grammar engine over `model`'s vocabulary (constrained decoding: `response_format`,
/// forced tool calls), built and warmed once per process and shared by its executors and
/// its frontend's codec.
pub fn grammars_for(model: &LoadedModel) -> Result<Arc<Grammars>, StartError> {
    Grammars::new(&model.tokenizer, &model.stop_ids)
        .map(Arc::new)
        .map_err(|e| StartError::Config(format!("constrained decoding: {e}")))
}

/// The executor of a real worker: the backend the group's `device` names, built on the
/// executor's own OS thread (a CUDA context stays there).
pub fn real_executor(
    id: WorkerId,
    group: &WorkerGroup,
    model: &LoadedModel,
    grammars: Arc<Grammars>,
) -> Result<Executor, StartError> {
    let fail = |reason: String| StartError::Worker { worker: id, reason };
    let device = Device::parse(&group.device).map_err(|e| StartError::Config(e.to_string()))?;
    let build = backend_builder(device, group, model).map_err(|e| fail(e.to_string()))?;
    let executor = Executor::spawn_with(&format!("executor-{id}"), build)
        .map(|e| e.with_grammars(grammars))
        .map_err(|e| fail(format!("device {device}: {e}")))?;
    // The vision tower runs beside the executor, on the group's device (its images are
    // encoded before admission, on a blocking thread).
    Ok(match &model.vision {
        Some(v) => executor.with_vision(Arc::new(vision_for(group, v)?)),
        None => executor,
    })
}

/// `vision` with its tower on `group`'s device (a GPU copy of the weights for `cuda:N`):
/// what a worker or an encoder of the group encodes images with.
pub fn vision_for(
    group: &WorkerGroup,
    vision: &turbine_kernels::loader::VisionModel,
) -> Result<turbine_kernels::loader::VisionModel, StartError> {
    let device = Device::parse(&group.device).map_err(|e| StartError::Config(e.to_string()))?;
    vision_on(device, vision).map_err(|e| StartError::Config(e.to_string()))
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
    let disagg = WorkerDisagg {
        role: WorkerRole::Aggregated,
        plane: None,
    };
    start_worker_as(
        node,
        id,
        scheduler,
        executor,
        time,
        announce,
        events_endpoint,
        disagg,
    )
    .await
}

/// A worker's part in disaggregated serving: its role, and the transfer plane a prefill
/// worker exports on and a decode worker pulls with.
pub struct WorkerDisagg {
    pub role: WorkerRole,
    pub plane: Option<TransferPlane>,
}

/// The transfer plane of worker `id` of `role` (none for an aggregated worker): in memory
/// on `hub` (every plane of one process shares it, so a pull is a slice of the same bytes),
/// or bound on the config's `disaggregation.transfer.bind` for workers in other processes.
pub async fn transfer_plane(
    cfg: &ClusterConfig,
    id: WorkerId,
    role: WorkerRole,
    hub: &TransferHub,
    networked: bool,
    clock: SharedClock,
) -> Result<Option<TransferPlane>, StartError> {
    // An aggregated worker needs a plane only to pull image embeddings from encoders.
    if role == WorkerRole::Aggregated && !has_encoders(cfg) {
        return Ok(None);
    }
    let config = cfg.disaggregation.transfer.to_runtime();
    // Each plane has its own registry: several planes in one process would register the
    // same metric names twice. The frontend counts transfers from the import reports.
    let registry = MetricsRegistry::new();
    if networked {
        TransferPlane::start(config, clock, &registry, hub)
            .await
            .map(Some)
            .map_err(|e| StartError::Node(format!("transfer plane of {id}: {e}")))
    } else {
        Ok(Some(TransferPlane::in_memory(
            &format!("worker-{}", id.0),
            config,
            clock,
            &registry,
            hub,
        )))
    }
}

/// Whether the cluster has encoder workers (E/P/D).
pub fn has_encoders(cfg: &ClusterConfig) -> bool {
    cfg.workers
        .iter()
        .any(|g| g.replicas > 0 && g.role == WorkerRole::Encoder)
}

/// Starts encoder `index` on `node`: `vision` on a blocking thread behind
/// [`EncoderService`], its embeddings exported on `plane`. Returns its local address.
pub async fn start_encoder(
    node: &Node,
    index: u64,
    group: &WorkerGroup,
    vision: Arc<turbine_kernels::loader::VisionModel>,
    plane: TransferPlane,
) -> Result<(Addr<EncoderService>, Arc<Encoder>), StartError> {
    let encoder = Encoder::new(vision, plane, group.embedding_cache_bytes);
    let name = encoder_service_name(index);
    let served = encoder.clone();
    node.serve::<EncoderService, _, _>(&name, move || EncoderActor::new(served.clone()))
        .await
        .map_err(|e| StartError::Node(format!("serving {name}: {e}")))?;
    let addr = node
        .local::<EncoderService>(&name)
        .map_err(|e| StartError::Node(e.to_string()))?;
    Ok((addr, encoder))
}

/// [`start_worker`] for a worker of any role.
#[allow(clippy::too_many_arguments)]
pub async fn start_worker_as(
    node: &Node,
    id: WorkerId,
    scheduler: Scheduler,
    executor: Executor,
    time: EngineTime,
    announce: Announce,
    events_endpoint: Option<&str>,
    disagg: WorkerDisagg,
) -> Result<WorkerNode, StartError> {
    let kv = announce.clone();
    let handle = WorkerHandle::spawn_with_plane(
        id,
        scheduler,
        executor,
        Box::new(move |batch| kv(Announcement::Kv(batch))),
        time,
        disagg.plane,
    );
    let served = handle.clone();
    node.serve::<WorkerService, _, _>(&worker_service_name(id), move || {
        WorkerActor::new(served.clone())
    })
    .await
    .map_err(|e| StartError::Node(format!("serving {id}: {e}")))?;
    let mut metadata = BTreeMap::from([
        (META_WORKER_ID.to_string(), id.0.to_string()),
        (META_ROLE.to_string(), role_name(disagg.role).to_string()),
    ]);
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

/// The model's text side (tokenizer, chat template, stop ids) and its name, for a node that
/// tokenizes (the frontend's pipeline, the endpoint picker). The weights are dropped.
pub fn codec_of(
    model: LoadedModel,
) -> Result<(crate::preprocessor::codec::ModelCodec, String), StartError> {
    let (bos, eos) = (model.bos_token(), model.eos_token());
    let LoadedModel {
        tokenizer,
        chat_template,
        stop_ids,
        name,
        vision,
        ..
    } = model;
    let mut codec = crate::preprocessor::codec::ModelCodec::new(
        Arc::new(tokenizer),
        chat_template.as_deref(),
        bos,
        eos,
        stop_ids,
    )
    .map_err(StartError::Config)?;
    if let Some(v) = vision {
        codec = codec
            .with_vision(v.processor, v.image_token_id)
            .map_err(StartError::Config)?;
    }
    Ok((codec, name))
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
