//! `turbine epp`: the endpoint picker's process. It joins the cluster like a router process
//! (the frontend's embedded registry; the workers' KV events and load reports over the
//! event plane, through the same membership code), keeps a router core of its own (never
//! served to frontends, never registered), and serves Envoy's ext_proc on `listen`.
//!
//! The file's `external_workers` (vLLM engines a gateway reaches directly) join its router
//! too: each at its `gateway_endpoint`, its KV cache followed from the engine's own ZeroMQ
//! KV-event publisher ([`crate::kv::vllm_feed`]). A file with `discovery: {backend: static,
//! workers: []}` has only those: the picker then needs no registry at all.

use super::process::{joining, process_node};
use super::{codec_of, follow_workers, start_router, StartError};
use crate::cluster_config::{ClusterConfig, DiscoverySection, KvEventSource, WorkerRole};
use crate::epp::picker::Picker;
use crate::epp::proto::ExternalProcessorServer;
use crate::epp::EndpointPicker;
use crate::ids::WorkerId;
use crate::kv::vllm_feed::keep_following_vllm_publisher;
use crate::router::endpoints::WorkerEndpoints;
use crate::router::membership::{Members, NodeConnector};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use turbine_kernels::loader::LoadedModel;

/// Where the endpoint picker listens and what it answers for workers without a gateway
/// endpoint of their own.
pub struct EppOptions {
    /// ext_proc (gRPC) listen address.
    pub listen: SocketAddr,
    /// `ip:port` for workers that registered no gateway endpoint (e.g. the frontend
    /// Service); without it such workers are not eligible.
    pub default_endpoint: Option<String>,
    /// Overrides the config's `discovery.registry`.
    pub registry: Option<String>,
}

/// Runs the endpoint picker until `shutdown` resolves.
pub async fn run_epp(
    cfg: &ClusterConfig,
    model: LoadedModel,
    options: EppOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    cfg.validate_external_workers()
        .map_err(StartError::Config)?;
    // No registry to join: only the file's external workers (a gateway in front of vLLM).
    let standalone = options.registry.is_none()
        && matches!(&cfg.discovery, DiscoverySection::Static { workers } if workers.is_empty())
        && !cfg.external_workers.is_empty();
    let join = if standalone {
        None
    } else {
        Some(joining(cfg, options.registry, "epp")?)
    };
    let (block_size, _) = super::check_cluster(cfg, &model.config)?;
    let (codec, name) = codec_of(model)?;
    let model_id = cfg.model.served_name.clone().unwrap_or(name);
    let node = process_node(cfg, "epp".to_string()).await?;
    let router = start_router(
        &node,
        cfg.router.clone(),
        &cfg.disaggregation,
        block_size,
        node.clock().clone(),
    )
    .await?;
    let endpoints = Arc::new(WorkerEndpoints::new(options.default_endpoint));
    let mut tasks = Vec::new();
    if let Some(join) = &join {
        let discovery = join.discovery(&node).await?;
        tasks.push(follow_workers(
            Arc::new(NodeConnector::new(node.clone())),
            discovery,
            Members {
                router: Some(router.core.clone()),
                frontend: None,
                gauges: None,
                endpoints: Some(endpoints.clone()),
                loads: None,
            },
        ));
    }
    for w in &cfg.external_workers {
        let id = WorkerId(w.id);
        router.core.add_worker_as(id, WorkerRole::Aggregated);
        endpoints.insert(id, Some(w.gateway_endpoint.clone()));
        let KvEventSource::Vllm { endpoint, topic } = &w.kv_events;
        let (task, _feed) = keep_following_vllm_publisher(
            endpoint.clone(),
            topic.clone(),
            id,
            router.core.index().clone(),
        );
        tasks.push(task);
    }
    let following = match &join {
        Some(join) => format!("following workers registered with {}", join.describe()),
        None => "no registry".to_string(),
    };
    let picker = Picker::new(router.core, endpoints, Arc::new(codec), model_id);
    let service = ExternalProcessorServer::new(Arc::new(EndpointPicker::new(Arc::new(picker))));
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| StartError::Node(format!("binding ext_proc on {}: {e}", options.listen)))?;
    let local = listener
        .local_addr()
        .map_err(|e| StartError::Node(e.to_string()))?;
    println!(
        "turbine epp serving ext_proc on {local}, {following}, {} external worker(s)",
        cfg.external_workers.len()
    );
    let served = tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(
            service,
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await;
    for t in tasks {
        t.abort();
    }
    node.shutdown();
    served.map_err(|e| StartError::Node(format!("ext_proc server: {e}")))
}
