//! `turbine worker`: one worker in a process of its own, joining a frontend over ZeroMQ.
//!
//! It serves [`WorkerService`] on its own request-plane node, publishes its KV events and
//! load on its event-plane PUB socket, and registers with the frontend's embedded registry
//! under a lease it renews by heartbeat. When it stops, it deregisters at once; when it
//! dies, its lease expires and the frontend forgets it.

use super::local::{check_cluster, start_worker, StartError};
use super::remote::{
    kv_topic, metrics_topic, report_load, LOAD_REPORT_EVERY, META_EVENTS, META_WORKER_ID,
    REGISTRY_SERVICE, WORKER_COMPONENT,
};
use super::service::{worker_service_name, WorkerActor, WorkerService};
use crate::cluster_config::{ClusterConfig, DiscoverySection};
use crate::ids::WorkerId;
use crate::kv::KvEventBatch;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use turbine_kernels::loader::LoadedModel;
use turbine_runtime::discovery::embedded::Registry;
use turbine_runtime::discovery::{Discovery, EmbeddedDiscovery, Instance};
use turbine_runtime::events::EventPublisher;
use turbine_runtime::{Node, NodeConfig};

/// What the worker publishes on its event plane, in one ordered queue.
enum Outgoing {
    Kv(KvEventBatch),
    Load(crate::worker::SchedulerStats),
}

/// A fresh id for a worker process: unique across restarts, so KV state from a previous
/// incarnation is never attributed to this one.
fn fresh_worker_id() -> WorkerId {
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

/// Runs worker group `group` of `cfg` until `shutdown` resolves. `registry` overrides the
/// config's `discovery.registry` (the frontend's request-plane endpoint).
pub async fn run_worker(
    cfg: &ClusterConfig,
    group: usize,
    model: LoadedModel,
    registry: Option<String>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let Some(group_cfg) = cfg.workers.get(group) else {
        return Err(StartError::Config(format!(
            "there is no worker group {group} (the file has {})",
            cfg.workers.len()
        )));
    };
    let (lease_ms, cfg_registry) = match &cfg.discovery {
        DiscoverySection::Embedded { registry, lease_ms } => (*lease_ms, *registry),
        other => {
            return Err(StartError::Config(format!(
                "turbine worker joins through the embedded registry; discovery {other:?} is not supported yet"
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
    let (_, context_length) = check_cluster(cfg, &model.config)?;
    let id = fresh_worker_id();
    let node_err = |e: &dyn std::fmt::Display| StartError::Node(e.to_string());

    let node = Node::start(NodeConfig {
        name: format!("worker-{}", id.0),
        bind: format!("tcp://{}", cfg.transport.bind),
        call_timeout_ms: cfg.transport.call_timeout_ms,
        ..NodeConfig::default()
    })
    .await
    .map_err(|e| node_err(&e))?;
    let publisher = Arc::new(
        EventPublisher::bind(&format!("tcp://{}", cfg.transport.events_bind), node.name())
            .await
            .map_err(|e| node_err(&e))?,
    );

    // KV events leave the engine loop synchronously; one task publishes them and the load
    // reports in order, so a report never overtakes the batches it counts.
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Outgoing>();
    let out_pub = publisher.clone();
    tokio::spawn(async move {
        while let Some(item) = out_rx.recv().await {
            let sent = match &item {
                Outgoing::Kv(batch) => out_pub.publish(&kv_topic(batch.worker), batch).await,
                Outgoing::Load(stats) => out_pub.publish(&metrics_topic(id), stats).await,
            };
            if let Err(e) = sent {
                tracing::warn!("publishing worker events: {e}");
            }
        }
    });
    let kv_tx = out_tx.clone();
    let handle = start_worker(
        id,
        group_cfg,
        &model,
        context_length,
        Box::new(move |batch| {
            let _ = kv_tx.send(Outgoing::Kv(batch));
        }),
    )?;
    drop(model);

    let served = handle.clone();
    node.serve::<WorkerService, _, _>(&worker_service_name(id), move || {
        WorkerActor::new(served.clone())
    })
    .await
    .map_err(|e| node_err(&e))?;

    // Load when what the router reads changes (and at least every second).
    tokio::spawn(report_load(
        handle.watch_stats(),
        LOAD_REPORT_EVERY,
        node.clock().clone(),
        move |s| {
            let _ = out_tx.send(Outgoing::Load(s.clone()));
        },
    ));

    let registry_addr = node
        .connect::<Registry>(&registry, REGISTRY_SERVICE)
        .await
        .map_err(|e| node_err(&e))?;
    let discovery = EmbeddedDiscovery::new(registry_addr, node.clock().clone());
    let instance = Instance {
        component: WORKER_COMPONENT.to_string(),
        id: id.0.to_string(),
        endpoint: node.endpoint().to_string(),
        metadata: BTreeMap::from([
            (META_EVENTS.to_string(), publisher.endpoint().to_string()),
            (META_WORKER_ID.to_string(), id.0.to_string()),
        ]),
    };
    let lease = discovery
        .register(instance, Duration::from_millis(lease_ms))
        .await
        .map_err(|e| node_err(&e))?;
    println!(
        "turbine worker {id} serving on {} (events {}), registered with {registry}",
        node.endpoint(),
        publisher.endpoint()
    );
    shutdown.await;
    lease.revoke().await;
    node.shutdown();
    Ok(())
}
