//! Stages in the composition: each `stages:` entry of the file served as a supervised
//! `StageService` actor on the frontend's node ([`start_stages`]), or followed through
//! discovery when it runs in a process of its own ([`run_stage`], `turbine worker --role
//! stage --stage NAME`), and the frontend's [`StageChain`] over all of them.

use super::process::{fresh_worker_id, joining, process_node};
use super::StartError;
use crate::cluster_config::{ClusterConfig, StageSpec};
use crate::stages::service::{stage_service_name, META_STAGE, STAGE_COMPONENT};
use crate::stages::{StageChain, StageHandler, StageLink, StageRegistry, StageService};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use tokio::task::JoinHandle;
use turbine_runtime::discovery::{Discovery, DiscoveryEvent, Instance};
use turbine_runtime::Node;

/// Checks the file's `stages:` against `registry`: every name registered, none twice, and
/// (for those that run here) a config the stage accepts. The error names the entry.
pub fn check_stages(cfg: &ClusterConfig, registry: &StageRegistry) -> Result<(), StartError> {
    let mut seen = BTreeMap::new();
    for (index, spec) in cfg.stages.iter().enumerate() {
        if let Some(first) = seen.insert(spec.name.as_str(), index) {
            return Err(StartError::Config(format!(
                "stages[{index}]: stage `{}` is already listed as stages[{first}]",
                spec.name
            )));
        }
        if spec.remote {
            registry.factory(index, spec).map_err(StartError::Config)?;
        } else {
            registry.build(index, spec).map_err(StartError::Config)?;
        }
    }
    Ok(())
}

/// Serves stage `spec` (entry `index` of the file) on `node` as a supervised actor.
async fn serve_stage(
    node: &Node,
    registry: &StageRegistry,
    index: usize,
    spec: &StageSpec,
) -> Result<(), StartError> {
    let factory = registry.factory(index, spec).map_err(StartError::Config)?;
    let (name, config) = (spec.name.clone(), spec.config.clone());
    node.serve::<StageService, _, _>(&stage_service_name(&spec.name), move || {
        StageHandler::new(&name, &factory, &config)
    })
    .await
    .map_err(|e| StartError::Node(e.to_string()))?;
    Ok(())
}

/// The frontend's stages: the local ones served on `node`, the remote ones followed through
/// `discovery` (the returned task, if any, keeps them pointed at their processes).
pub async fn start_stages(
    cfg: &ClusterConfig,
    registry: &StageRegistry,
    node: &Node,
    discovery: Arc<dyn Discovery>,
) -> Result<(Arc<StageChain>, Option<JoinHandle<()>>), StartError> {
    check_stages(cfg, registry)?;
    let mut links = Vec::new();
    let mut remote = BTreeMap::new();
    for (index, spec) in cfg.stages.iter().enumerate() {
        if spec.remote {
            let link = Arc::new(StageLink::new(&spec.name, None));
            remote.insert(spec.name.clone(), link.clone());
            links.push(link);
        } else {
            serve_stage(node, registry, index, spec).await?;
            let addr = node
                .local::<StageService>(&stage_service_name(&spec.name))
                .map_err(|e| StartError::Node(e.to_string()))?;
            links.push(Arc::new(StageLink::new(&spec.name, Some(addr))));
        }
    }
    let follow = (!remote.is_empty()).then(|| follow_stages(node.clone(), discovery, remote));
    Ok((Arc::new(StageChain::new(links)), follow))
}

/// Keeps each remote stage's link pointed at the latest process registered for it.
fn follow_stages(
    node: Node,
    discovery: Arc<dyn Discovery>,
    links: BTreeMap<String, Arc<StageLink>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        use futures::StreamExt;
        let mut current: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let mut watch =
                turbine_runtime::discovery::watch_until_ok(discovery.as_ref(), STAGE_COMPONENT)
                    .await;
            while let Some(event) = watch.next().await {
                match event {
                    DiscoveryEvent::Added(inst) => {
                        let Some(name) = inst.metadata.get(META_STAGE) else {
                            continue;
                        };
                        let Some(link) = links.get(name) else {
                            tracing::warn!(stage = %name, "a stage process joined that the file does not list as remote");
                            continue;
                        };
                        match node
                            .connect::<StageService>(&inst.endpoint, &stage_service_name(name))
                            .await
                        {
                            Ok(addr) => {
                                tracing::info!(stage = %name, endpoint = %inst.endpoint, "stage joined");
                                link.set(Some(addr));
                                current.insert(name.clone(), inst.id);
                            }
                            Err(e) => {
                                tracing::warn!(stage = %name, "stage process unreachable: {e}")
                            }
                        }
                    }
                    DiscoveryEvent::Removed(inst) => {
                        let Some(name) = inst.metadata.get(META_STAGE) else {
                            continue;
                        };
                        if current.get(name) == Some(&inst.id) {
                            tracing::info!(stage = %name, endpoint = %inst.endpoint, "stage left");
                            if let Some(link) = links.get(name) {
                                link.set(None);
                            }
                            current.remove(name);
                        }
                    }
                }
            }
        }
    })
}

/// Runs stage `index` of `cfg` in this process (`turbine worker --role stage`) until
/// `shutdown` resolves: served on this process's node, registered with discovery (the
/// frontend's registry, or Kubernetes) for frontends to reach.
pub async fn run_stage(
    cfg: &ClusterConfig,
    index: usize,
    registry: &StageRegistry,
    registry_endpoint: Option<String>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let Some(spec) = cfg.stages.get(index) else {
        return Err(StartError::Config(format!(
            "there is no stage {index} (the file lists {})",
            cfg.stages.len()
        )));
    };
    registry.build(index, spec).map_err(StartError::Config)?;
    let join = joining(cfg, registry_endpoint, "worker --role stage")?;
    let node = process_node(cfg, format!("stage-{}", spec.name)).await?;
    serve_stage(&node, registry, index, spec).await?;
    let discovery = join.discovery(&node).await?;
    let instance = Instance {
        component: STAGE_COMPONENT.to_string(),
        id: format!("stage-{}-{}", spec.name, fresh_worker_id().0),
        endpoint: node.endpoint().to_string(),
        metadata: BTreeMap::from([(META_STAGE.to_string(), spec.name.clone())]),
    };
    let lease = discovery
        .register(instance, join.lease)
        .await
        .map_err(|e| StartError::Node(e.to_string()))?;
    println!(
        "turbine stage {} serving on {}, registered with {}",
        spec.name,
        node.endpoint(),
        join.describe()
    );
    shutdown.await;
    lease.revoke().await;
    node.shutdown();
    Ok(())
}
