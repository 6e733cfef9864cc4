//! `turbine up`: a whole serving graph in one process, composed from the root's builders:
//! the router served on this process's node (unless the config's router is `remote`), one
//! executor thread and one worker loop per local worker replica, the [`Pipeline`] the HTTP
//! frontend calls, and the embedded registry that workers in other processes join through.

use super::{
    check_cluster, dispatcher, enable_disaggregation, follow_workers, real_executor, scheduler_for,
    start_router, start_worker_as, transfer_plane, Announcement, StartError, WorkerDisagg,
};
use crate::cluster_config::{ClusterConfig, WorkerGroup};
use crate::disagg::metrics::DisaggMetrics;
use crate::frontend::pipeline::Pipeline;
use crate::frontend::Metrics;
use crate::ids::WorkerId;
use crate::kv::indexer::FlashIndexer;
use crate::router::dispatch::Dispatcher;
use crate::router::membership::{Members, NodeConnector};
use crate::router::service::{RouterCore, RouterService, ROUTER_COMPONENT, ROUTER_SERVICE};
use turbine_runtime::transfer::TransferHub;

use crate::worker::announce::{LOAD_REPORT_EVERY, REGISTRY_SERVICE};
use crate::worker::metrics::WorkerMetrics;
use crate::worker::{EngineTime, WorkerHandle};
use std::sync::Arc;
use std::time::Duration;
use turbine_kernels::loader::LoadedModel;
use turbine_runtime::discovery::{Discovery, DiscoveryEvent, EmbeddedDiscovery, EmbeddedRegistry};
use turbine_runtime::{Node, NodeConfig};

/// A running single-process cluster.
pub struct LocalCluster {
    pub pipeline: Arc<Pipeline>,
    pub metrics: Metrics,
    /// The router's KV index, when the router runs in this process.
    pub index: Option<Arc<FlashIndexer>>,
    /// The router, when it runs in this process (the planner takes leaving workers out).
    pub router: Option<Arc<RouterCore>>,
    /// This process's request-plane node: the workers are served on it, so other
    /// processes could reach them too.
    pub node: Node,
    /// The worker engine loops, for inspection (stats) and tests.
    pub workers: Vec<WorkerHandle>,
    /// The encoders of `role: encoder` groups (E/P/D), for their counts.
    pub encoders: Vec<Arc<crate::encoder::service::Encoder>>,
    /// How this process finds the others (workers, routers, stage processes).
    pub discovery: Arc<dyn Discovery>,
    /// The planner's decisions (empty without a planner), exported on /metrics.
    pub decisions: crate::planner::actor::DecisionLog,
    /// The registry served here (none when this frontend joined another's).
    _registry: Option<EmbeddedRegistry>,
    /// Replica sync with the other frontends' routers (`router.replica_sync`).
    _replicas: Option<crate::router::replica_sync::ReplicaSync>,
    _tasks: Vec<AbortOnDrop>,
}

/// How a `turbine up` process joins a larger cluster.
#[derive(Clone, Debug, Default)]
pub struct LocalOptions {
    /// Join the embedded registry another frontend serves (its request-plane endpoint,
    /// `tcp://HOST:PORT`) instead of serving one: a second frontend of the same cluster.
    pub registry: Option<String>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl LocalCluster {
    /// Starts every worker the config describes on the current tokio runtime, each served
    /// as a supervised `WorkerService` on this process's node, and the router (here, or
    /// followed in a router process).
    pub async fn start(
        cfg: &ClusterConfig,
        model: LoadedModel,
    ) -> Result<LocalCluster, StartError> {
        Self::start_with(cfg, model, LocalOptions::default()).await
    }

    /// [`LocalCluster::start`], joining the cluster as `options` say.
    pub async fn start_with(
        cfg: &ClusterConfig,
        model: LoadedModel,
        options: LocalOptions,
    ) -> Result<LocalCluster, StartError> {
        let (block_size, context_length) = check_cluster(cfg, &model.config)?;
        let groups: Vec<&WorkerGroup> = cfg
            .workers
            .iter()
            .filter(|g| g.replicas > 0 && !g.remote)
            .collect();
        let node_err = |e: &dyn std::fmt::Display| StartError::Node(e.to_string());

        let metrics = Metrics::new();
        let worker_metrics = WorkerMetrics::register(&metrics);
        let node = Node::start(NodeConfig {
            name: "frontend".to_string(),
            bind: format!("tcp://{}", cfg.transport.bind),
            call_timeout_ms: cfg.transport.call_timeout_ms,
            ..NodeConfig::default()
        })
        .await
        .map_err(|e| node_err(&e))?;
        cfg.validate_external_workers()
            .map_err(StartError::Config)?;
        if !cfg.external_workers.is_empty() {
            tracing::warn!(
                "external_workers: {} listed; turbine epp picks among them (a gateway sends \
                 their requests), this frontend routes to turbine workers only",
                cfg.external_workers.len()
            );
        }
        if cfg.router.replica_sync && !cfg.router.remote && !groups.is_empty() {
            return Err(StartError::Config(
                "router.replica_sync: every worker group must be remote: true (each frontend's router follows the workers through discovery; workers inside one frontend's process are invisible to the others)".into(),
            ));
        }
        // Workers and routers in other processes join through the embedded registry here,
        // unless this frontend joins another's. With `discovery.backend: kubernetes` the
        // workers are pods with Leases instead.
        let serve_registry = || async {
            EmbeddedRegistry::serve(&node, REGISTRY_SERVICE, Duration::from_millis(250))
                .await
                .map_err(|e| node_err(&e))
        };
        let (registry, discovery): (Option<EmbeddedRegistry>, Arc<dyn Discovery>) = match (
            &options.registry,
            &cfg.discovery,
        ) {
            (Some(_), crate::cluster_config::DiscoverySection::Kubernetes { .. }) => {
                return Err(StartError::Config(
                    "--registry joins an embedded registry; this file's discovery is kubernetes"
                        .into(),
                ))
            }
            (Some(joined), _) => (
                None,
                Arc::new(super::process::registry_client(&node, joined).await?),
            ),
            (
                None,
                crate::cluster_config::DiscoverySection::Kubernetes {
                    namespace,
                    label_selector,
                    ..
                },
            ) => (
                Some(serve_registry().await?),
                Arc::new(
                    turbine_runtime::discovery::KubernetesDiscovery::from_environment(
                        namespace,
                        label_selector,
                    )
                    .await
                    .map_err(|e| node_err(&e))?,
                ),
            ),
            (None, _) => {
                let served = serve_registry().await?;
                let discovery = EmbeddedDiscovery::new(served.addr().clone(), node.clock().clone());
                (Some(served), Arc::new(discovery))
            }
        };

        // The router: served here, or (`router.remote`) a router process found through
        // discovery, which then follows the workers itself.
        let (router, router_addr) = if cfg.router.remote {
            if !groups.is_empty() {
                return Err(StartError::Config(
                    "with router.remote, every worker group must be remote too (the router process follows the workers' events)".into(),
                ));
            }
            (None, None)
        } else {
            let r = start_router(
                &node,
                cfg.router.clone(),
                &cfg.disaggregation,
                block_size,
                node.clock().clone(),
            )
            .await?;
            (Some(r.core), Some(r.addr))
        };
        let replicas = match &router {
            Some(core) => super::sync_router_replicas(cfg, core, &node, discovery.clone()).await?,
            None => None,
        };

        let grammars = super::grammars_for(&model)?;
        let mut workers = Vec::new();
        let mut roles = Vec::new();
        let mut next_id = 0u64;
        // One hub: a decode worker pulls a prefill worker's KV as slices of the same bytes.
        let hub = TransferHub::new();
        let mut encoders = Vec::new();
        let mut encoder_addrs = Vec::new();
        let networked = planes_networked(cfg);
        for group in groups {
            if group.role == crate::cluster_config::WorkerRole::Encoder {
                let vision = model.vision.clone().ok_or_else(|| {
                    StartError::Config(
                        "an encoder group needs a multimodal model (one with a vision tower)"
                            .into(),
                    )
                })?;
                let vision = Arc::new(super::vision_for(group, &vision)?);
                for _ in 0..group.replicas {
                    let index = encoders.len() as u64;
                    let plane = turbine_runtime::transfer::TransferPlane::in_memory(
                        &format!("encoder-{index}"),
                        cfg.disaggregation.transfer.to_runtime(),
                        node.clock().clone(),
                        &turbine_runtime::MetricsRegistry::new(),
                        &hub,
                    );
                    let (addr, encoder) =
                        super::start_encoder(&node, index, group, vision.clone(), plane).await?;
                    encoder_addrs.push(addr);
                    encoders.push(encoder);
                }
                continue;
            }
            for _ in 0..group.replicas {
                let id = WorkerId(next_id);
                next_id += 1;
                let scheduler = scheduler_for(group, context_length)
                    .map_err(|reason| StartError::Worker { worker: id, reason })?;
                let executor = real_executor(id, group, &model, grammars.clone())?;
                // A local worker's KV events go straight into the router's index.
                let core = router.clone();
                let announce: super::Announce = Arc::new(move |a| {
                    if let (Some(core), Announcement::Kv(batch)) = (&core, a) {
                        core.apply_kv(&batch);
                    }
                });
                // In memory, unless workers in other processes pull from it or it from them.
                let plane =
                    transfer_plane(cfg, id, group.role, &hub, networked, node.clock().clone())
                        .await?;
                let disagg = WorkerDisagg {
                    role: group.role,
                    plane,
                };
                let w = start_worker_as(
                    &node,
                    id,
                    scheduler,
                    executor,
                    EngineTime::real(),
                    announce,
                    None,
                    disagg,
                )
                .await?;
                workers.push(w.handle);
                roles.push(group.role);
            }
        }

        let (codec, name) = super::codec_of(model)?;
        let codec = codec.with_grammars(grammars);
        let model_id = cfg.model.served_name.clone().unwrap_or(name);
        // The names Dynamo's and vLLM's dashboards query, labelled by the served model.
        metrics.register_dashboard_names(&model_id);
        metrics.with_labelled("model_name", &model_id, |r| {
            worker_metrics.register_vllm_names(r)
        });
        let dispatch = dispatcher(
            block_size,
            router_addr,
            Pipeline::first_request_id(),
            cfg.migration.clone(),
            node.clock().clone(),
        );
        let mut tasks = Vec::new();
        if cfg.router.remote {
            tasks.push(follow_router(
                node.clone(),
                discovery.clone(),
                dispatch.clone(),
            ));
        }
        let mut pipeline =
            Pipeline::new(model_id, context_length, Arc::new(codec), dispatch.clone());
        // Encoders here, and any encoder process that registers (`turbine worker` of an
        // encoder group).
        let encoder_pool = if super::has_encoders(cfg) {
            let m = crate::encoder::client::EncoderMetrics::register(&metrics);
            let pool = Arc::new(crate::encoder::client::EncoderPool::new(m));
            for (i, addr) in encoder_addrs.into_iter().enumerate() {
                pool.add(format!("local-{i}"), addr);
            }
            pipeline = pipeline.with_encoders(pool.clone());
            Some(pool)
        } else {
            None
        };
        let pipeline = Arc::new(pipeline);
        // Per-worker routing decisions on /metrics, as this frontend received them.
        // (A poisoned registry lock still guards a usable registry.)
        metrics
            .registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register_collector(Box::new(crate::router::prometheus::RouterCollector::new(
                dispatch.clone(),
            )));
        // The router's own view (in-flight requests, replica sync), when it is here.
        if let Some(core) = &router {
            metrics
                .registry()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .register_collector(Box::new(
                    crate::router::prometheus::RouterStateCollector::new(core.clone()),
                ));
        }

        let decisions = crate::planner::actor::DecisionLog::default();
        metrics
            .registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register_collector(Box::new(crate::planner::prometheus::PlannerCollector::new(
                decisions.clone(),
            )));
        enable_disaggregation(cfg, &dispatch, DisaggMetrics::register(&metrics));
        dispatch.count_hints_into(crate::router::hints::HintMetrics::register(&metrics));
        for (handle, role) in workers.iter().zip(roles) {
            let name = crate::worker::service::worker_service_name(handle.id());
            let addr = node
                .local::<crate::worker::service::WorkerService>(&name)
                .map_err(|e| node_err(&e))?;
            if let Some(core) = &router {
                core.add_worker_as(handle.id(), role);
            }
            dispatch.add_worker(handle.id(), addr);
            spawn_load_mirror(
                handle,
                router.clone(),
                worker_metrics.clone(),
                node.clock().clone(),
            );
        }
        if let Some(pool) = encoder_pool {
            tasks.push(follow_encoders(node.clone(), discovery.clone(), pool));
        }
        tasks.push(follow_workers(
            Arc::new(NodeConnector::new(node.clone())),
            discovery.clone(),
            Members {
                router: router.clone(),
                frontend: Some(dispatch),
                gauges: Some(worker_metrics),
                endpoints: None,
                loads: None,
            },
        ));
        Ok(LocalCluster {
            pipeline,
            metrics,
            index: router.as_ref().map(|r| r.index().clone()),
            router,
            node,
            workers,
            encoders,
            discovery,
            decisions,
            _registry: registry,
            _replicas: replicas,
            _tasks: tasks.into_iter().map(AbortOnDrop).collect(),
        })
    }
}

impl LocalCluster {
    /// Starts the file's `stages:` from `registry` (the local ones on this node, the remote
    /// ones followed through discovery) and returns the chain the HTTP frontend walks.
    pub async fn start_stages(
        &mut self,
        cfg: &ClusterConfig,
        registry: &crate::stages::StageRegistry,
    ) -> Result<Arc<crate::stages::StageChain>, StartError> {
        let (chain, follow) =
            super::stages::start_stages(cfg, registry, &self.node, self.discovery.clone()).await?;
        self._tasks.extend(follow.map(AbortOnDrop));
        Ok(chain)
    }
}

/// Keeps `dispatcher` pointed at the router process discovery lists (the latest one to
/// register), until the returned task is aborted.
fn follow_router(
    node: Node,
    discovery: Arc<dyn Discovery>,
    dispatcher: Arc<Dispatcher>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use futures::StreamExt;
        let mut current: Option<String> = None;
        loop {
            let mut watch =
                turbine_runtime::discovery::watch_until_ok(discovery.as_ref(), ROUTER_COMPONENT)
                    .await;
            while let Some(event) = watch.next().await {
                match event {
                    DiscoveryEvent::Added(inst) => {
                        match node
                            .connect::<RouterService>(&inst.endpoint, ROUTER_SERVICE)
                            .await
                        {
                            Ok(addr) => {
                                tracing::info!(endpoint = %inst.endpoint, "router joined");
                                dispatcher.set_router(Some(addr));
                                current = Some(inst.id);
                            }
                            Err(e) => tracing::warn!("router {} unreachable: {e}", inst.id),
                        }
                    }
                    DiscoveryEvent::Removed(inst) => {
                        if current.as_deref() == Some(inst.id.as_str()) {
                            tracing::info!(endpoint = %inst.endpoint, "router left");
                            dispatcher.set_router(None);
                            current = None;
                        }
                    }
                }
            }
        }
    })
}

/// Keeps `pool` in step with the encoder processes discovery lists, until aborted.
fn follow_encoders(
    node: Node,
    discovery: Arc<dyn Discovery>,
    pool: Arc<crate::encoder::client::EncoderPool>,
) -> tokio::task::JoinHandle<()> {
    use crate::encoder::service::EncoderService;
    tokio::spawn(async move {
        use futures::StreamExt;
        loop {
            let mut watch = turbine_runtime::discovery::watch_until_ok(
                discovery.as_ref(),
                crate::encoder::service::ENCODER_COMPONENT,
            )
            .await;
            while let Some(event) = watch.next().await {
                match event {
                    DiscoveryEvent::Added(inst) => {
                        let service = crate::encoder::service::encoder_service_name(0);
                        match node
                            .connect::<EncoderService>(&inst.endpoint, &service)
                            .await
                        {
                            Ok(addr) => {
                                tracing::info!(endpoint = %inst.endpoint, "encoder joined");
                                pool.add(inst.id.clone(), addr);
                            }
                            Err(e) => tracing::warn!("encoder {} unreachable: {e}", inst.id),
                        }
                    }
                    DiscoveryEvent::Removed(inst) => {
                        tracing::info!(endpoint = %inst.endpoint, "encoder left");
                        pool.remove(&inst.id);
                    }
                }
            }
        }
    })
}

/// After every step of `worker`: its load into the router (when it is in this process),
/// its gauges into the metrics. Between steps, at least every [`LOAD_REPORT_EVERY`] on
/// `clock`, a heartbeat: the router hears the worker is alive (as from a worker process's
/// periodic reports), so a local worker inside one long step (a long prefill on a loaded
/// machine) is slow, not silent, to the liveness check, and keeps its streams. The
/// heartbeat carries no load: its snapshot may predate requests routed since, which a load
/// report would count as acknowledged.
fn spawn_load_mirror(
    worker: &WorkerHandle,
    router: Option<Arc<RouterCore>>,
    metrics: WorkerMetrics,
    clock: turbine_runtime::SharedClock,
) {
    let mut stats = worker.watch_stats();
    let id = worker.id();
    let name = id.to_string();
    metrics.update(&name, &stats.borrow());
    tokio::spawn(async move {
        loop {
            let changed = tokio::select! {
                biased;
                changed = stats.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    true
                }
                _ = clock.sleep(LOAD_REPORT_EVERY) => false,
            };
            let s = stats.borrow_and_update().clone();
            match &router {
                Some(router) if changed => router.update_load(id, &s),
                Some(router) => router.note_alive(id, &s),
                None => {}
            }
            if changed {
                metrics.update(&name, &s);
            }
        }
    });
}

/// Whether this process's workers need transfer planes other processes reach (ZeroMQ)
/// rather than in-memory ones: encoders in other processes hand out embeddings to pull;
/// prefill or decode workers in other processes (a `remote` group, or the ones the
/// planner's local connector starts) pull KV from this process's workers or have it pulled.
fn planes_networked(cfg: &ClusterConfig) -> bool {
    use crate::cluster_config::WorkerRole;
    let remote = |role: WorkerRole| {
        cfg.workers
            .iter()
            .any(|g| g.replicas > 0 && g.remote && g.role == role)
    };
    let disaggregated = cfg
        .workers
        .iter()
        .any(|g| matches!(g.role, WorkerRole::Prefill | WorkerRole::Decode));
    let planner_starts_processes = cfg.planner.as_ref().is_some_and(|p| {
        matches!(
            p.connector,
            crate::planner::config::ConnectorConfig::Local { .. }
        )
    });
    remote(WorkerRole::Encoder)
        || remote(WorkerRole::Prefill)
        || remote(WorkerRole::Decode)
        || (disaggregated && planner_starts_processes)
}
