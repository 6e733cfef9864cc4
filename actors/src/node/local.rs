//! Assembles a whole serving graph inside one process from a [`ClusterConfig`] and a loaded
//! model: one executor thread and one worker loop per worker replica, a KV-aware router fed
//! by the workers' KV events, and the [`Pipeline`] the HTTP frontend calls.

use super::device::{backend_builder, Device};
use super::dispatch::Dispatcher;
use super::executor::Executor;
use super::metrics::WorkerMetrics;
use super::pipeline::{index_sink, Pipeline};
use super::remote::{watch_workers, NodeConnector, REGISTRY_SERVICE};
use super::service::{worker_service_name, WorkerActor, WorkerService};
use super::worker::{KvEventSink, WorkerHandle};
use crate::cluster_config::{ClusterConfig, WorkerGroup, WorkerRole};
use crate::frontend::Metrics;
use crate::ids::WorkerId;
use crate::kv::indexer::FlashIndexer;
use crate::kv::BlockSize;
use crate::preprocessor::codec::ModelCodec;
use crate::router::{KvRouter, RouterReplicaId};
use crate::worker::{BlockManager, BlockManagerConfig, Scheduler, SchedulerConfig};
use std::sync::Arc;
use std::time::Duration;
use turbine_kernels::loader::LoadedModel;
use turbine_kernels::model::ModelConfig;
use turbine_runtime::discovery::{EmbeddedDiscovery, EmbeddedRegistry};
use turbine_runtime::{Node, NodeConfig};

/// Why the graph could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("worker {worker}: {reason}")]
    Worker { worker: WorkerId, reason: String },
    #[error("request plane: {0}")]
    Node(String),
}

/// A running single-process cluster.
pub struct LocalCluster {
    pub pipeline: Arc<Pipeline>,
    pub metrics: Metrics,
    pub index: Arc<FlashIndexer>,
    /// This process's request-plane node: the workers are served on it, so other
    /// processes could reach them too.
    pub node: Node,
    /// The worker engine loops, for inspection (stats) and tests.
    pub workers: Vec<WorkerHandle>,
    _registry: EmbeddedRegistry,
    _watcher: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl LocalCluster {
    /// Starts every worker the config describes on the current tokio runtime, each served
    /// as a supervised [`WorkerService`] on this process's node.
    pub async fn start(
        cfg: &ClusterConfig,
        model: LoadedModel,
    ) -> Result<LocalCluster, StartError> {
        let (block_size, context_length) = check_cluster(cfg, &model.config)?;
        let groups: Vec<&WorkerGroup> = cfg
            .workers
            .iter()
            .filter(|g| g.replicas > 0 && !g.remote)
            .collect();

        let metrics = Metrics::new();
        let worker_metrics = WorkerMetrics::register(&metrics);
        let index = Arc::new(FlashIndexer::default());
        let mut router_cfg = cfg.router.clone();
        router_cfg.block_size = block_size;
        let router = KvRouter::new(RouterReplicaId(0), router_cfg, Some(index.clone()))
            .map_err(|e| StartError::Config(format!("router: {e}")))?;

        let mut workers = Vec::new();
        let mut next_id = 0u64;
        for group in groups {
            for _ in 0..group.replicas {
                let id = WorkerId(next_id);
                next_id += 1;
                workers.push(start_worker(
                    id,
                    group,
                    &model,
                    context_length,
                    index_sink(index.clone()),
                )?);
            }
        }

        let (bos, eos) = (model.bos_token(), model.eos_token());
        let LoadedModel {
            tokenizer,
            chat_template,
            stop_ids,
            name,
            ..
        } = model;
        let codec = ModelCodec::new(
            Arc::new(tokenizer),
            chat_template.as_deref(),
            bos,
            eos,
            stop_ids,
        )
        .map_err(StartError::Config)?;
        let model_id = cfg.model.served_name.clone().unwrap_or(name);
        let pipeline = Arc::new(Pipeline::new(
            model_id,
            context_length,
            block_size,
            Arc::new(codec),
            router,
        ));
        // Per-worker routing decisions on /metrics, read from the router at scrape time.
        // (A poisoned registry lock still guards a usable registry.)
        metrics
            .registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register_collector(Box::new(crate::router::prometheus::RouterCollector::new(
                pipeline.dispatcher().router().clone(),
            )));

        let node = Node::start(NodeConfig {
            name: "frontend".to_string(),
            bind: format!("tcp://{}", cfg.transport.bind),
            call_timeout_ms: cfg.transport.call_timeout_ms,
            ..NodeConfig::default()
        })
        .await
        .map_err(|e| StartError::Node(e.to_string()))?;
        for handle in &workers {
            let name = worker_service_name(handle.id());
            let served = handle.clone();
            node.serve::<WorkerService, _, _>(&name, move || WorkerActor::new(served.clone()))
                .await
                .map_err(|e| StartError::Node(e.to_string()))?;
            let addr = node
                .local::<WorkerService>(&name)
                .map_err(|e| StartError::Node(e.to_string()))?;
            pipeline.dispatcher().add_worker(handle.id(), addr);
            spawn_load_mirror(
                handle,
                pipeline.dispatcher().clone(),
                worker_metrics.clone(),
            );
        }
        // Workers in other processes join through the embedded registry on this node.
        let registry = EmbeddedRegistry::serve(&node, REGISTRY_SERVICE, Duration::from_millis(250))
            .await
            .map_err(|e| StartError::Node(e.to_string()))?;
        let discovery = Arc::new(EmbeddedDiscovery::new(
            registry.addr().clone(),
            node.clock().clone(),
        ));
        let watcher = watch_workers(
            Arc::new(NodeConnector::new(node.clone())),
            discovery,
            pipeline.dispatcher().clone(),
            index.clone(),
        );
        Ok(LocalCluster {
            pipeline,
            metrics,
            index,
            node,
            workers,
            _registry: registry,
            _watcher: AbortOnDrop(watcher),
        })
    }
}

/// Validates the worker groups and returns (block size, usable context length): the model's
/// context, capped by the config and by what the smallest worker's KV pool can hold. The
/// frontend and every `turbine worker` compute the same figures from the same file.
pub fn check_cluster(
    cfg: &ClusterConfig,
    model: &ModelConfig,
) -> Result<(BlockSize, usize), StartError> {
    let groups: Vec<&WorkerGroup> = cfg.workers.iter().filter(|g| g.replicas > 0).collect();
    let Some(first) = groups.first() else {
        return Err(StartError::Config("no workers configured".into()));
    };
    let block_size = first.block_size;
    if groups.iter().any(|g| g.block_size != block_size) {
        return Err(StartError::Config(
            "every worker group must use the same block_size".into(),
        ));
    }
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

/// Starts one worker: its executor thread (the backend the group's `device` names) and its
/// engine loop, publishing KV events into `kv_events`.
pub fn start_worker(
    id: WorkerId,
    group: &WorkerGroup,
    model: &LoadedModel,
    context_length: usize,
    kv_events: KvEventSink,
) -> Result<WorkerHandle, StartError> {
    let fail = |reason: String| StartError::Worker { worker: id, reason };
    // The backend is built on the executor's own thread (a CUDA context stays there).
    let device = Device::parse(&group.device).map_err(|e| StartError::Config(e.to_string()))?;
    let build = backend_builder(device, group, model).map_err(|e| fail(e.to_string()))?;
    let executor = Executor::spawn_with(&format!("executor-{id}"), build)
        .map_err(|e| fail(format!("device {device}: {e}")))?;
    let blocks = BlockManager::new(BlockManagerConfig {
        num_blocks: u32::try_from(group.kv_blocks)
            .map_err(|_| fail("kv_blocks is too large".into()))?,
        block_size: group.block_size,
        enable_prefix_caching: true,
    });
    let scheduler = Scheduler::new(
        SchedulerConfig {
            max_num_batched_tokens: group.max_num_batched_tokens,
            max_num_seqs: group.max_num_seqs,
            max_model_len: context_length,
            enable_chunked_prefill: true,
        },
        blocks,
    )
    .map_err(|e| fail(e.to_string()))?;
    Ok(WorkerHandle::spawn(id, scheduler, executor, kv_events))
}

/// After every step of `worker`: its load into the router, its gauges into the metrics.
fn spawn_load_mirror(worker: &WorkerHandle, dispatcher: Arc<Dispatcher>, metrics: WorkerMetrics) {
    let mut stats = worker.watch_stats();
    let id = worker.id();
    let name = id.to_string();
    metrics.update(&name, &stats.borrow());
    tokio::spawn(async move {
        while stats.changed().await.is_ok() {
            let s = stats.borrow_and_update().clone();
            dispatcher.update_load(id, &s);
            metrics.update(&name, &s);
        }
    });
}
