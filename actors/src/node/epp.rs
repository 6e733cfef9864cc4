//! `turbine epp`: the endpoint picker's process. It joins the cluster like a router process
//! (the frontend's embedded registry; the workers' KV events and load reports over the
//! event plane, through the same membership code), keeps a router core of its own (never
//! served to frontends, never registered), and serves Envoy's ext_proc on `listen`.

use super::process::{joining, process_node};
use super::{codec_of, follow_workers, start_router, StartError};
use crate::cluster_config::ClusterConfig;
use crate::epp::picker::Picker;
use crate::epp::proto::ExternalProcessorServer;
use crate::epp::EndpointPicker;
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
    let join = joining(cfg, options.registry, "epp")?;
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
    let discovery = join.discovery(&node).await?;
    let follow = follow_workers(
        Arc::new(NodeConnector::new(node.clone())),
        discovery,
        Members {
            router: Some(router.core.clone()),
            frontend: None,
            gauges: None,
            endpoints: Some(endpoints.clone()),
        },
    );
    let picker = Picker::new(router.core, endpoints, Arc::new(codec), model_id);
    let service = ExternalProcessorServer::new(Arc::new(EndpointPicker::new(Arc::new(picker))));
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| StartError::Node(format!("binding ext_proc on {}: {e}", options.listen)))?;
    let local = listener
        .local_addr()
        .map_err(|e| StartError::Node(e.to_string()))?;
    println!(
        "turbine epp serving ext_proc on {local}, following workers registered with {}",
        join.describe()
    );
    let served = tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(
            service,
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await;
    follow.abort();
    node.shutdown();
    served.map_err(|e| StartError::Node(format!("ext_proc server: {e}")))
}
