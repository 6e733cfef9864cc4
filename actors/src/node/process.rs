//! `turbine worker`: one node in a process of its own, joining a frontend over ZeroMQ.
//!
//! A worker ([`run_worker`]) serves `WorkerService` on its own request-plane node,
//! publishes its KV events and load on its event-plane PUB socket, and registers with the
//! frontend's embedded registry under a lease it renews by heartbeat. A router
//! ([`run_router`], `--role router`) serves `RouterService`, follows the workers through
//! the same registry and registers itself for frontends to find. When either stops, it
//! deregisters at once; when it dies, its lease expires and the others forget it.

use super::{
    block_size_of, check_cluster, follow_workers, real_executor, report_loads, scheduler_for,
    start_router, start_worker_as, transfer_plane, Announce, Announcement, StartError,
    WorkerDisagg,
};
use crate::cluster_config::{ClusterConfig, DiscoverySection};
use crate::ids::WorkerId;
use crate::router::endpoints::META_GATEWAY_ENDPOINT;
use crate::router::membership::{Members, NodeConnector};
use crate::router::service::{ROUTER_COMPONENT, ROUTER_SERVICE};
use crate::worker::announce::{kv_topic, metrics_topic, REGISTRY_SERVICE};
use crate::worker::worker_loop::WorkerHandle;
use crate::worker::EngineTime;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use turbine_kernels::loader::LoadedModel;
use turbine_runtime::discovery::embedded::Registry;
use turbine_runtime::discovery::{
    Discovery, EmbeddedDiscovery, Instance, KubernetesDiscovery, Lease,
};
use turbine_runtime::events::EventPublisher;
use turbine_runtime::transfer::TransferHub;
use turbine_runtime::{Node, NodeConfig};

/// A fresh id for a worker (or router) process: unique across restarts, so KV state from a previous
/// incarnation is never attributed to this one.
pub(super) fn fresh_worker_id() -> WorkerId {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut z = nanos ^ (u64::from(std::process::id()) << 32);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    // Keep it below 2^53 so it survives any JSON tooling that reads it.
    WorkerId((z ^ (z >> 31)) >> 11)
}

/// How a process joins: through the frontend's embedded registry, or through the
/// Kubernetes API (pods and Leases in a namespace), and the lease it registers under.
pub(super) struct Joining {
    via: JoinVia,
    pub(super) lease: Duration,
}

enum JoinVia {
    Registry(String),
    Kubernetes {
        namespace: String,
        label_selector: String,
    },
}

impl Joining {
    /// The discovery backend this process registers with and watches through.
    pub(super) async fn discovery(&self, node: &Node) -> Result<Arc<dyn Discovery>, StartError> {
        Ok(match &self.via {
            JoinVia::Registry(registry) => Arc::new(registry_client(node, registry).await?),
            JoinVia::Kubernetes {
                namespace,
                label_selector,
            } => Arc::new(
                KubernetesDiscovery::from_environment(namespace, label_selector)
                    .await
                    .map_err(|e| StartError::Node(e.to_string()))?,
            ),
        })
    }

    /// Where it joined, for the start-up line.
    pub(super) fn describe(&self) -> String {
        match &self.via {
            JoinVia::Registry(registry) => registry.clone(),
            JoinVia::Kubernetes { namespace, .. } => format!("kubernetes namespace {namespace}"),
        }
    }
}

/// Reads the discovery settings; `registry` overrides `discovery.registry`.
pub(super) fn joining(
    cfg: &ClusterConfig,
    registry: Option<String>,
    what: &str,
) -> Result<Joining, StartError> {
    let (lease_ms, cfg_registry) = match &cfg.discovery {
        DiscoverySection::Embedded { registry, lease_ms } => (*lease_ms, *registry),
        DiscoverySection::Kubernetes {
            namespace,
            label_selector,
            lease_ms,
        } => {
            return Ok(Joining {
                via: JoinVia::Kubernetes {
                    namespace: namespace.clone(),
                    label_selector: label_selector.clone(),
                },
                lease: Duration::from_millis(*lease_ms),
            })
        }
        other => {
            return Err(StartError::Config(format!(
                "turbine {what} joins through the embedded registry or kubernetes; discovery {other:?} has no registry to join"
            )))
        }
    };
    let registry = registry
        .or_else(|| cfg_registry.map(|a| format!("tcp://{a}")))
        .ok_or_else(|| {
            StartError::Config(
                "no registry: set discovery.registry in the file or pass --registry".into(),
            )
        })?;
    Ok(Joining {
        via: JoinVia::Registry(registry),
        lease: Duration::from_millis(lease_ms),
    })
}

/// This process's request-plane node, bound where the config says.
pub(super) async fn process_node(cfg: &ClusterConfig, name: String) -> Result<Node, StartError> {
    Node::start(NodeConfig {
        name,
        bind: format!("tcp://{}", cfg.transport.bind),
        call_timeout_ms: cfg.transport.call_timeout_ms,
        ..NodeConfig::default()
    })
    .await
    .map_err(|e| StartError::Node(e.to_string()))
}

/// Discovery through the frontend's embedded registry at `registry`.
pub(crate) async fn registry_client(
    node: &Node,
    registry: &str,
) -> Result<EmbeddedDiscovery, StartError> {
    let addr = node
        .connect::<Registry>(registry, REGISTRY_SERVICE)
        .await
        .map_err(|e| StartError::Node(e.to_string()))?;
    Ok(EmbeddedDiscovery::new(addr, node.clock().clone()))
}

/// Runs worker group `group` of `cfg` until `shutdown` resolves. `registry` overrides the
/// config's `discovery.registry` (the frontend's request-plane endpoint);
/// `gateway_endpoint` is the `ip:port` a gateway's endpoint picker sends this worker's
/// requests to (a frontend beside it), registered for `turbine epp`.
pub async fn run_worker(
    cfg: &ClusterConfig,
    group: usize,
    model: LoadedModel,
    registry: Option<String>,
    gateway_endpoint: Option<String>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let Some(group_cfg) = cfg.workers.get(group) else {
        return Err(StartError::Config(format!(
            "there is no worker group {group} (the file has {})",
            cfg.workers.len()
        )));
    };
    if group_cfg.role == crate::cluster_config::WorkerRole::Encoder {
        return run_encoder(cfg, group_cfg, model, registry, shutdown).await;
    }
    let join = joining(cfg, registry, "worker")?;
    let (_, context_length) = check_cluster(cfg, &model.config)?;
    let id = fresh_worker_id();
    let node_err = |e: &dyn std::fmt::Display| StartError::Node(e.to_string());

    let node = process_node(cfg, format!("worker-{}", id.0)).await?;
    let publisher = Arc::new(
        EventPublisher::bind(&format!("tcp://{}", cfg.transport.events_bind), node.name())
            .await
            .map_err(|e| node_err(&e))?,
    );

    // KV events leave the engine loop synchronously; one task publishes them and the load
    // reports in order, so a report never overtakes the batches it counts.
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Announcement>();
    let out_pub = publisher.clone();
    tokio::spawn(async move {
        while let Some(item) = out_rx.recv().await {
            let sent = match &item {
                Announcement::Kv(batch) => out_pub.publish(&kv_topic(batch.worker), batch).await,
                Announcement::Load(stats) => out_pub.publish(&metrics_topic(id), stats).await,
            };
            if let Err(e) = sent {
                tracing::warn!("publishing worker events: {e}");
            }
        }
    });
    let announce: Announce = Arc::new(move |a| {
        let _ = out_tx.send(a);
    });
    let scheduler = scheduler_for(group_cfg, context_length)
        .map_err(|reason| StartError::Worker { worker: id, reason })?;
    let executor = real_executor(id, group_cfg, &model, super::grammars_for(&model)?)?;
    drop(model);
    // A prefill or decode worker moves KV over its own transfer plane (ZeroMQ).
    let hub = TransferHub::new();
    let plane = transfer_plane(cfg, id, group_cfg.role, &hub, true, node.clock().clone()).await?;
    let disagg = WorkerDisagg {
        role: group_cfg.role,
        plane: plane.clone(),
    };
    let worker = start_worker_as(
        &node,
        id,
        scheduler,
        executor,
        EngineTime::real(),
        announce.clone(),
        Some(publisher.endpoint()),
        disagg,
    )
    .await?;
    // Load when what the router reads changes (and at least every second).
    report_loads(&worker.handle, node.clock().clone(), announce);

    let discovery = join.discovery(&node).await?;
    let mut instance = worker.instance;
    if let Some(ep) = gateway_endpoint {
        instance
            .metadata
            .insert(META_GATEWAY_ENDPOINT.to_string(), ep);
    }
    let lease = discovery
        .register(instance, join.lease)
        .await
        .map_err(|e| node_err(&e))?;
    println!(
        "turbine worker {id} serving on {} (events {}), registered with {}",
        node.endpoint(),
        publisher.endpoint(),
        join.describe()
    );
    shutdown.await;
    let drain_timeout = Duration::from_millis(group_cfg.drain_timeout_ms);
    drain(&worker.handle, lease, drain_timeout).await;
    if let Some(plane) = plane {
        exports_pulled(id, &plane, drain_timeout).await;
        plane.shutdown();
    }
    node.shutdown();
    Ok(())
}

/// Waits, up to `deadline`, until nothing this worker exported on its transfer plane is
/// still pinned: a prefill worker's requests are done once their first token is out, but
/// their KV still has to be pulled by the decode worker; stopping the plane before that
/// would make the decode worker compute the prompt again (`owner_gone`).
async fn exports_pulled(
    id: WorkerId,
    plane: &turbine_runtime::transfer::TransferPlane,
    deadline: Duration,
) {
    let (pinned, _) = plane.pinned();
    if pinned == 0 {
        return;
    }
    println!(
        "turbine worker {id}: {pinned} KV export(s) not pulled yet, waiting up to {deadline:?}"
    );
    let start = tokio::time::Instant::now();
    while plane.pinned().0 > 0 && start.elapsed() < deadline {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let (left, _) = plane.pinned();
    if left > 0 {
        println!("turbine worker {id}: stopping with {left} KV export(s) not pulled");
    }
}

/// Runs an encoder of a `role: encoder` group until `shutdown` resolves: the model's vision
/// tower behind `EncoderService` on this node, embeddings exported on a ZeroMQ transfer
/// plane, registered with the frontend's registry as an `encoder` instance (frontends send
/// it images; a worker pulls the embeddings). No KV, no events.
async fn run_encoder(
    cfg: &ClusterConfig,
    group_cfg: &crate::cluster_config::WorkerGroup,
    model: LoadedModel,
    registry: Option<String>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    use crate::encoder::service::ENCODER_COMPONENT;
    let join = joining(cfg, registry, "encoder")?;
    let cpu_vision = model.vision.clone().ok_or_else(|| {
        StartError::Config(
            "an encoder group needs a multimodal model (one with a vision tower)".into(),
        )
    })?;
    drop(model);
    // On a GPU, the host copy of the tower goes once its weights are up.
    let vision = super::vision_for(group_cfg, &cpu_vision)?;
    drop(cpu_vision);
    let id = fresh_worker_id();
    let node_err = |e: &dyn std::fmt::Display| StartError::Node(e.to_string());
    let node = process_node(cfg, format!("encoder-{}", id.0)).await?;
    let hub = TransferHub::new();
    let plane = turbine_runtime::transfer::TransferPlane::start(
        cfg.disaggregation.transfer.to_runtime(),
        node.clock().clone(),
        &turbine_runtime::MetricsRegistry::new(),
        &hub,
    )
    .await
    .map_err(|e| node_err(&e))?;
    let (_, _encoder) =
        super::start_encoder(&node, 0, group_cfg, Arc::new(vision), plane.clone()).await?;
    let discovery = join.discovery(&node).await?;
    let instance = Instance {
        component: ENCODER_COMPONENT.to_string(),
        id: format!("encoder-{}", id.0),
        endpoint: node.endpoint().to_string(),
        metadata: BTreeMap::from([(
            crate::worker::announce::META_ROLE.to_string(),
            "encoder".to_string(),
        )]),
    };
    let lease = discovery
        .register(instance, join.lease)
        .await
        .map_err(|e| node_err(&e))?;
    println!(
        "turbine encoder {id} serving on {} (transfer {}), registered with {}",
        node.endpoint(),
        plane.endpoint(),
        join.describe()
    );
    shutdown.await;
    lease.revoke().await;
    plane.shutdown();
    node.shutdown();
    Ok(())
}

/// How long a drained worker's node stays up after the last outputs were queued, so the
/// final tokens and the release notices reach the frontends before the sockets close.
const DRAIN_FLUSH: Duration = Duration::from_millis(300);

/// How often a draining worker looks whether its requests are done.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Graceful drain: stop admissions (the load report says `draining`, so the router stops
/// routing here; a request that still arrives is released at once), let the requests in
/// flight finish for up to `deadline`, release the rest (each ends with
/// `FinishReason::Migrate`, so the frontend continues it on another worker), give the
/// outputs time to leave, and deregister. The
/// planner's scale-down drains a worker the same way (by SIGTERM to its process).
pub async fn drain(worker: &WorkerHandle, lease: Lease, deadline: Duration) {
    // Draining shows in the next load report; the router stops routing here. The lease
    // stays until the end: a departure would make frontends migrate the open streams.
    worker.stop_admissions();
    let start = tokio::time::Instant::now();
    let in_flight = worker.num_requests();
    println!(
        "turbine worker {} draining: {in_flight} request(s) in flight, up to {deadline:?}",
        worker.id()
    );
    while worker.num_requests() > 0 && start.elapsed() < deadline {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let left = worker.num_requests();
    if left > 0 {
        println!(
            "turbine worker {}: releasing {left} request(s) to other workers",
            worker.id()
        );
    }
    worker.release_all();
    tokio::time::sleep(DRAIN_FLUSH).await;
    lease.revoke().await;
    println!("turbine worker {} drained", worker.id());
}

/// Runs a router process (`turbine worker --role router`) until `shutdown` resolves: the
/// router served as `RouterService` on this node, following the workers registered with
/// the frontend's registry (their KV events and load, over the event plane), and itself
/// registered there so frontends with `router.remote` route through it.
pub async fn run_router(
    cfg: &ClusterConfig,
    registry: Option<String>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let join = joining(cfg, registry, "worker --role router")?;
    let block_size = block_size_of(cfg)?;
    let node = process_node(cfg, "router".to_string()).await?;
    let router = start_router(
        &node,
        cfg.router.clone(),
        &cfg.disaggregation,
        block_size,
        node.clock().clone(),
    )
    .await?;
    let discovery = join.discovery(&node).await?;
    // Several router processes keep one view (`router.replica_sync`).
    let replicas = super::sync_router_replicas(cfg, &router.core, &node, discovery.clone()).await?;
    let follow = follow_workers(
        Arc::new(NodeConnector::new(node.clone())),
        discovery.clone(),
        Members {
            router: Some(router.core.clone()),
            frontend: None,
            gauges: None,
            endpoints: None,
            loads: None,
        },
    );
    let instance = Instance {
        component: ROUTER_COMPONENT.to_string(),
        id: format!("router-{}", fresh_worker_id().0),
        endpoint: node.endpoint().to_string(),
        metadata: BTreeMap::from([("service".to_string(), ROUTER_SERVICE.to_string())]),
    };
    let lease = discovery
        .register(instance, join.lease)
        .await
        .map_err(|e| StartError::Node(e.to_string()))?;
    println!(
        "turbine router serving on {}, registered with {}",
        node.endpoint(),
        join.describe()
    );
    shutdown.await;
    lease.revoke().await;
    if let Some(r) = replicas {
        r.stop().await;
    }
    follow.abort();
    node.shutdown();
    Ok(())
}
