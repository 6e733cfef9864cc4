//! The planner role in `turbine up`'s process: the pure planner from the file's `planner:`
//! section and its profile, fed by the frontend's [`LoadTap`], acting through the
//! connector the section names.

use super::follow_workers;
use super::local::LocalCluster;
use super::StartError;
use crate::cluster_config::ClusterConfig;
use crate::cluster_config::WorkerRole;
use crate::engine_profile::Profile;
use crate::planner::actor::{spawn_planner, DecisionLog, Inputs};
use crate::planner::config::ConnectorConfig;
use crate::planner::connector::Connector;
use crate::planner::kubernetes::KubernetesScaler;
use crate::planner::local::{LocalProcesses, LocalSpec};
use crate::planner::tap::LoadTap;
use crate::planner::{Planner, PlannerConfig, Replicas};
use crate::router::membership::{Members, NodeConnector};
use crate::router::service::{LoadNotice, LoadWatcher, PoolRole};
use crate::worker::announce::role_name;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// A running planner.
pub struct PlannerNode {
    pub task: JoinHandle<()>,
    pub decisions: DecisionLog,
    /// Feeding the workers' load into the tap: the in-process workers' stats, and with
    /// `router.remote` the membership watch for the other processes' load reports.
    batches: Vec<JoinHandle<()>>,
}

impl Drop for PlannerNode {
    fn drop(&mut self) {
        for b in &self.batches {
            b.abort();
        }
    }
}

/// The router pool a worker of `role` serves.
fn pool_of(role: WorkerRole) -> PoolRole {
    match role {
        WorkerRole::Prefill => PoolRole::Prefill,
        // Encoders are no pool of the router; the planner does not scale them (yet).
        WorkerRole::Aggregated | WorkerRole::Decode | WorkerRole::Encoder => PoolRole::Decode,
    }
}

/// The profile a `planner:` section names; a relative path is read from the cluster file's
/// directory, so a file and its profile move together.
pub fn planner_profile(cfg: &PlannerConfig, cluster_file: &Path) -> Result<Profile, StartError> {
    let path = Path::new(&cfg.profile);
    let path = if path.is_relative() {
        cluster_file
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(path)
    } else {
        path.to_path_buf()
    };
    Profile::from_file(&path).map_err(|e| StartError::Config(format!("planner.profile: {e}")))
}

/// Starts the planner for `cluster` (`turbine up -f cluster_file`), with `binary` the
/// `turbine` executable the local connector starts workers with.
pub async fn start_planner(
    cfg: &ClusterConfig,
    cluster_file: &Path,
    binary: PathBuf,
    cluster: &LocalCluster,
    tap: LoadTap,
) -> Result<Option<PlannerNode>, StartError> {
    let Some(p) = &cfg.planner else {
        return Ok(None);
    };
    let config_err = |e: &dyn std::fmt::Display| StartError::Config(e.to_string());
    let current = Replicas::of_workers(&cfg.workers).map_err(|e| config_err(&e))?;
    let profile = planner_profile(p, cluster_file)?;
    let planner = Planner::new(p, profile, current).map_err(|e| config_err(&e))?;
    let connector: Box<dyn Connector> = match &p.connector {
        ConnectorConfig::Local {
            group,
            prefill_group,
            decode_group,
            drain_timeout_ms,
        } => {
            // Each pool's group: named, else the first group of the pool's role.
            let pick = |named: &Option<usize>, role: WorkerRole| match named {
                Some(g) => Ok(*g),
                None => cfg
                    .workers
                    .iter()
                    .position(|g| g.role == role)
                    .ok_or_else(|| {
                        StartError::Config(format!(
                            "planner.connector: the file has no worker group of role {}",
                            role_name(role)
                        ))
                    }),
            };
            let groups = match current {
                Replicas::Aggregated { .. } => {
                    vec![(pick(group, WorkerRole::Aggregated)?, WorkerRole::Aggregated)]
                }
                Replicas::Disaggregated { .. } => vec![
                    (
                        pick(prefill_group, WorkerRole::Prefill)?,
                        WorkerRole::Prefill,
                    ),
                    (pick(decode_group, WorkerRole::Decode)?, WorkerRole::Decode),
                ],
            };
            let mut specs = Vec::new();
            for (group, role) in groups {
                let Some(g) = cfg.workers.get(group) else {
                    return Err(StartError::Config(format!(
                        "planner.connector: group {group}: the file has {} worker group(s)",
                        cfg.workers.len()
                    )));
                };
                if g.role != role {
                    return Err(StartError::Config(format!(
                        "planner.connector: group {group} is a {} group, not {}",
                        role_name(g.role),
                        role_name(role)
                    )));
                }
                specs.push(LocalSpec {
                    binary: binary.clone(),
                    cluster_file: cluster_file.to_path_buf(),
                    group,
                    registry: cluster.node.endpoint().to_string(),
                    floor: if g.remote { 0 } else { g.replicas },
                    drain_timeout: Duration::from_millis(*drain_timeout_ms),
                });
            }
            Box::new(
                LocalProcesses::new(
                    current,
                    specs,
                    cluster.router.clone(),
                    cluster.node.metrics().clone(),
                )
                .map_err(|e| config_err(&e))?,
            )
        }
        kubernetes @ ConnectorConfig::Kubernetes { .. } => Box::new(
            KubernetesScaler::from_config(
                kubernetes,
                current,
                Box::new(|patch| println!("planner (kubernetes dry run): {}", patch.line())),
            )
            .await
            .map_err(|e| config_err(&e))?,
        ),
    };
    // Load reports: the in-process workers' stats, and those of `turbine worker` processes
    // (through the router when it runs here, else from their event planes directly). Each
    // gives the decode batch and the queue.
    let local_roles = cfg
        .workers
        .iter()
        .filter(|g| g.replicas > 0 && !g.remote)
        .flat_map(|g| std::iter::repeat_n(g.role, g.replicas));
    let mut batches: Vec<JoinHandle<()>> = cluster
        .workers
        .iter()
        .zip(local_roles)
        .map(|(w, role)| {
            let (mut stats, tap, id) = (w.watch_stats(), tap.clone(), w.id());
            let pool = pool_of(role);
            tokio::spawn(async move {
                while stats.changed().await.is_ok() {
                    let s = stats.borrow_and_update().clone();
                    tap.worker_load(id, pool, s.num_running, s.num_waiting);
                }
            })
        })
        .collect();
    let watcher: LoadWatcher = {
        let tap = tap.clone();
        Arc::new(move |notice| match notice {
            LoadNotice::Report {
                worker,
                role,
                stats,
            } => tap.worker_load(worker, role, stats.num_running, stats.num_waiting),
            LoadNotice::Left(worker) => tap.worker_left(worker),
        })
    };
    match &cluster.router {
        Some(router) => router.watch_loads(watcher),
        // The router runs in another process (`router.remote`): the planner follows the
        // workers' membership itself, for their load reports alone.
        None => batches.push(follow_workers(
            Arc::new(NodeConnector::new(cluster.node.clone())),
            cluster.discovery.clone(),
            Members {
                loads: Some(watcher),
                ..Members::default()
            },
        )),
    }
    // The cluster's log: /metrics reads the planner's decisions from it.
    let decisions = cluster.decisions.clone();
    let inputs = Inputs::from_tap(
        tap,
        Duration::from_millis(p.adjustment_interval_ms),
        Duration::from_millis(p.reaction_interval_ms),
    );
    let task = spawn_planner(
        planner,
        inputs,
        connector,
        cluster.node.clock().clone(),
        decisions.clone(),
    );
    Ok(Some(PlannerNode {
        task,
        decisions,
        batches,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn example(name: &str) -> (PathBuf, ClusterConfig, PlannerConfig, Replicas) {
        let file = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(name);
        let text = std::fs::read_to_string(&file).unwrap();
        let cfg: ClusterConfig = serde_yaml::from_str(&text).unwrap();
        let p = cfg.planner.clone().expect("a planner section");
        let current = Replicas::of_workers(&cfg.workers).unwrap();
        let profile = planner_profile(&p, &file).unwrap();
        assert!(Planner::new(&p, profile, current).is_ok(), "{name}");
        (file, cfg, p, current)
    }

    #[test]
    fn the_planner_examples_parse_and_their_planners_can_be_built() {
        let (_, _, p, current) = example("planner.yaml");
        assert!(matches!(
            p.connector,
            ConnectorConfig::Local { group: Some(0), .. }
        ));
        assert_eq!(current, Replicas::Aggregated { workers: 1 });
        let (_, _, p, current) = example("planner-disagg.yaml");
        assert!(matches!(
            p.connector,
            ConnectorConfig::Local {
                prefill_group: Some(0),
                decode_group: Some(1),
                ..
            }
        ));
        assert_eq!(
            current,
            Replicas::Disaggregated {
                prefill: 1,
                decode: 1
            }
        );
    }

    #[tokio::test]
    async fn the_kubernetes_example_is_a_dry_run_that_prints_the_scale_patches() {
        let (_, _, p, current) = example("planner-kubernetes.yaml");
        let printed = Arc::new(Mutex::new(Vec::new()));
        let sink = printed.clone();
        let mut k = KubernetesScaler::from_config(
            &p.connector,
            current,
            Box::new(move |patch| sink.lock().unwrap().push(patch.line())),
        )
        .await
        .unwrap();
        let target = Replicas::Disaggregated {
            prefill: 2,
            decode: 3,
        };
        assert_eq!(k.apply(target).await.unwrap(), target);
        let path = |n: &str| format!("/apis/apps/v1/namespaces/serving/deployments/{n}/scale");
        assert_eq!(
            *printed.lock().unwrap(),
            vec![
                format!(
                    "PATCH {} application/merge-patch+json {{\"spec\":{{\"replicas\":2}}}}",
                    path("turbine-prefill")
                ),
                format!(
                    "PATCH {} application/merge-patch+json {{\"spec\":{{\"replicas\":3}}}}",
                    path("turbine-decode")
                ),
            ]
        );
    }
}
