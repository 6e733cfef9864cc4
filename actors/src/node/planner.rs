//! The planner role in `turbine up`'s process: the pure planner from the file's `planner:`
//! section and its profile, fed by the frontend's [`LoadTap`], acting through the
//! connector the section names.

use super::local::LocalCluster;
use super::StartError;
use crate::cluster_config::ClusterConfig;
use crate::engine_profile::Profile;
use crate::planner::actor::{from_tap, spawn_planner, DecisionLog};
use crate::planner::config::ConnectorConfig;
use crate::planner::connector::{Connector, KubernetesDryRun};
use crate::planner::local::{LocalProcesses, LocalSpec};
use crate::planner::tap::LoadTap;
use crate::planner::{Planner, PlannerConfig, Replicas};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::task::JoinHandle;

/// A running planner.
pub struct PlannerNode {
    pub task: JoinHandle<()>,
    pub decisions: DecisionLog,
    /// Feeding the in-process workers' running batches into the tap.
    batches: Vec<JoinHandle<()>>,
}

impl Drop for PlannerNode {
    fn drop(&mut self) {
        for b in &self.batches {
            b.abort();
        }
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
pub fn start_planner(
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
            drain_timeout_ms,
        } => {
            let Some(g) = cfg.workers.get(*group) else {
                return Err(StartError::Config(format!(
                    "planner.connector.group {group}: the file has {} worker group(s)",
                    cfg.workers.len()
                )));
            };
            let floor = if g.remote { 0 } else { g.replicas };
            Box::new(LocalProcesses::new(
                LocalSpec {
                    binary,
                    cluster_file: cluster_file.to_path_buf(),
                    group: *group,
                    registry: cluster.node.endpoint().to_string(),
                    floor,
                    drain_timeout: Duration::from_millis(*drain_timeout_ms),
                },
                cluster.router.clone(),
                cluster.node.metrics().clone(),
            ))
        }
        ConnectorConfig::Kubernetes {
            namespace,
            workload_kind,
            aggregated,
            prefill,
            decode,
            ..
        } => {
            let workloads = [aggregated, prefill, decode]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            Box::new(
                KubernetesDryRun::new(
                    namespace.clone(),
                    workload_kind.clone(),
                    workloads,
                    current,
                    Box::new(|patch| {
                        println!(
                            "planner (kubernetes dry run): PATCH {} application/merge-patch+json {}",
                            patch.path, patch.body
                        )
                    }),
                )
                .map_err(|e| config_err(&e))?,
            )
        }
    };
    // The in-process workers' running batches, for the decode correction. (Worker
    // processes' load reports are not forwarded yet: docs/PLANNER.md "What is left".)
    let batches: Vec<JoinHandle<()>> = cluster
        .workers
        .iter()
        .map(|w| {
            let (mut stats, tap) = (w.watch_stats(), tap.clone());
            tokio::spawn(async move {
                while stats.changed().await.is_ok() {
                    let running = stats.borrow_and_update().num_running;
                    if running > 0 {
                        tap.decode_batch(running);
                    }
                }
            })
        })
        .collect();
    let decisions = DecisionLog::default();
    let task = spawn_planner(
        planner,
        Duration::from_millis(p.adjustment_interval_ms),
        from_tap(tap),
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

    #[test]
    fn the_planner_example_parses_and_its_planner_can_be_built() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/planner.yaml");
        let text = std::fs::read_to_string(&file).unwrap();
        let cfg: ClusterConfig = serde_yaml::from_str(&text).unwrap();
        let p = cfg.planner.as_ref().expect("a planner section");
        assert!(matches!(
            p.connector,
            ConnectorConfig::Local { group: 0, .. }
        ));
        let current = Replicas::of_workers(&cfg.workers).unwrap();
        assert_eq!(current, Replicas::Aggregated { workers: 1 });
        let profile = planner_profile(p, &file).unwrap();
        assert!(Planner::new(p, profile, current).is_ok());
    }
}
