//! The `kubernetes` connector: each pool is a workload (a Deployment or a StatefulSet) whose
//! replica count the planner sets through its `scale` subresource; Kubernetes then starts
//! or stops the pods (a pod leaving gets SIGTERM, on which `turbine worker` drains).
//!
//! Two modes, one patch: for each pool whose size changes, the JSON merge patch
//! `{"spec":{"replicas":N}}` of its scale ([`crate::kubernetes::replicas_patch`]); a dry run
//! prints it ([`KubernetesScaler::patches`]), the API mode sends it with the client built in
//! [`crate::kubernetes`]. In API mode the first decision reads the workloads' replicas
//! first, so a pool that someone already scaled is not patched to what it already is.

use super::config::ConnectorConfig;
use super::connector::{Connector, ConnectorError};
use super::core::Replicas;
use crate::kubernetes::{self, replicas_patch, Client, Workload};
use async_trait::async_trait;

/// One patch the connector sends (or, in a dry run, prints).
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadPatch {
    /// The API path, e.g. `/apis/apps/v1/namespaces/default/deployments/decode/scale`.
    pub path: String,
    /// The JSON merge patch (`application/merge-patch+json`).
    pub body: serde_json::Value,
}

impl WorkloadPatch {
    /// The line a dry run prints.
    pub fn line(&self) -> String {
        format!(
            "PATCH {} application/merge-patch+json {}",
            self.path, self.body
        )
    }
}

/// Where the patches go.
pub enum Mode {
    /// Printed through the function, not sent; the workloads are taken to follow.
    DryRun(Box<dyn FnMut(&WorkloadPatch) + Send>),
    /// Sent to the API server.
    Api(Client),
}

/// Sizes the pools' workloads (see the module doc).
pub struct KubernetesScaler {
    /// One per pool, in [`Replicas`] pool order (aggregated; or prefill, decode).
    workloads: Vec<Workload>,
    /// The pools' sizes as last set or read; `None` in API mode until the first read.
    current: Option<Replicas>,
    /// The cluster's shape (its variant), for the replicas answered.
    shape: Replicas,
    mode: Mode,
}

impl KubernetesScaler {
    /// `current` is the cluster file's replicas: the dry run's starting point, and the shape
    /// of the cluster (aggregated, or prefill and decode) in either mode.
    pub fn new(
        workloads: Vec<Workload>,
        current: Replicas,
        mode: Mode,
    ) -> Result<KubernetesScaler, ConnectorError> {
        if workloads.len() != current.pools().len() {
            return Err(ConnectorError::Shape(format!(
                "{} workload name(s) for {} pool(s)",
                workloads.len(),
                current.pools().len()
            )));
        }
        let known = matches!(mode, Mode::DryRun(_)).then_some(current);
        Ok(KubernetesScaler {
            workloads,
            current: known,
            shape: current,
            mode,
        })
    }

    /// The connector a `planner.connector: {kind: kubernetes, ...}` section describes; a dry
    /// run prints with `out`. API mode builds its client here (inside a tokio runtime): from
    /// `api_server` when set, else from the environment (kubeconfig or in-cluster).
    pub async fn from_config(
        cfg: &ConnectorConfig,
        current: Replicas,
        out: Box<dyn FnMut(&WorkloadPatch) + Send>,
    ) -> Result<KubernetesScaler, ConnectorError> {
        let ConnectorConfig::Kubernetes {
            namespace,
            workload_kind,
            aggregated,
            prefill,
            decode,
            dry_run,
            api_server,
        } = cfg
        else {
            return Err(ConnectorError::Shape(
                "not a kubernetes connector section".into(),
            ));
        };
        let workloads = [aggregated, prefill, decode]
            .into_iter()
            .flatten()
            .map(|name| Workload {
                kind: *workload_kind,
                namespace: namespace.clone(),
                name: name.clone(),
            })
            .collect();
        let mode = if *dry_run {
            Mode::DryRun(out)
        } else {
            let client = match api_server {
                Some(url) => kubernetes::client_at(url),
                None => kubernetes::client().await,
            }
            .map_err(|e| ConnectorError::Kubernetes(e.to_string()))?;
            Mode::Api(client)
        };
        KubernetesScaler::new(workloads, current, mode)
    }

    /// The patches that move the workloads from `from` to `target`, changed pools only.
    pub fn patches(&self, from: Replicas, target: Replicas) -> Vec<WorkloadPatch> {
        let (from, to) = (from.pools(), target.pools());
        self.workloads
            .iter()
            .zip(from.iter().zip(to.iter()))
            .filter(|(_, (a, b))| a != b)
            .map(|(w, (_, &n))| WorkloadPatch {
                path: w.scale_path(),
                body: replicas_patch(n),
            })
            .collect()
    }

    fn shaped(&self, sizes: &[usize]) -> Replicas {
        self.shape.with_pools(sizes)
    }
}

/// API mode: the workloads' replicas as the server holds them, in pool order.
async fn read(workloads: &[Workload], client: &Client) -> Result<Vec<usize>, ConnectorError> {
    let mut sizes = Vec::with_capacity(workloads.len());
    for w in workloads {
        let n = w
            .replicas(client)
            .await
            .map_err(|e| ConnectorError::Kubernetes(e.to_string()))?;
        sizes.push(n);
    }
    Ok(sizes)
}

#[async_trait]
impl Connector for KubernetesScaler {
    async fn apply(&mut self, target: Replicas) -> Result<Replicas, ConnectorError> {
        if target.pools().len() != self.workloads.len() {
            return Err(ConnectorError::Shape(
                "the target has another number of pools".into(),
            ));
        }
        let client = match &self.mode {
            Mode::Api(client) => client.clone(),
            Mode::DryRun(_) => {
                let patches = self.patches(self.current.unwrap_or(self.shape), target);
                if let Mode::DryRun(out) = &mut self.mode {
                    patches.iter().for_each(out);
                }
                self.current = Some(target);
                return Ok(target);
            }
        };
        let from = match self.current {
            Some(r) => r,
            None => {
                let sizes = read(&self.workloads, &client).await?;
                let r = self.shaped(&sizes);
                self.current = Some(r);
                r
            }
        };
        let mut sizes = from.pools();
        let goal = target.pools();
        let mut failed = None;
        for (i, w) in self.workloads.iter().enumerate() {
            if sizes[i] == goal[i] {
                continue;
            }
            match w.scale(&client, goal[i]).await {
                Ok(now) => {
                    tracing::info!(workload = %w, from = sizes[i], to = now, "planner: scaled");
                    sizes[i] = now;
                }
                // That pool stays as it was; the next interval tries again.
                Err(e) => {
                    failed = Some(ConnectorError::Kubernetes(e.to_string()));
                    break;
                }
            }
        }
        let now = self.shaped(&sizes);
        self.current = Some(now);
        match failed {
            Some(e) => Err(e),
            None => Ok(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::WorkloadKind;
    use std::sync::{Arc, Mutex};

    fn workload(name: &str) -> Workload {
        Workload {
            kind: WorkloadKind::Deployments,
            namespace: "serving".into(),
            name: name.into(),
        }
    }

    #[tokio::test]
    async fn the_dry_run_prints_one_scale_patch_per_changed_pool() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let mut k = KubernetesScaler::new(
            vec![workload("prefill"), workload("decode")],
            Replicas::Disaggregated {
                prefill: 1,
                decode: 2,
            },
            Mode::DryRun(Box::new(move |p| sink.lock().unwrap().push(p.line()))),
        )
        .unwrap();
        let target = Replicas::Disaggregated {
            prefill: 1,
            decode: 4,
        };
        assert_eq!(k.apply(target).await.unwrap(), target);
        assert_eq!(k.apply(target).await.unwrap(), target);
        let seen = seen.lock().unwrap();
        assert_eq!(
            *seen,
            vec![
                "PATCH /apis/apps/v1/namespaces/serving/deployments/decode/scale \
                 application/merge-patch+json {\"spec\":{\"replicas\":4}}"
                    .to_string()
            ],
            "one patch: the prefill pool did not change, nor anything the second time"
        );
    }

    #[test]
    fn a_name_per_pool_is_required() {
        let r = KubernetesScaler::new(
            vec![],
            Replicas::Aggregated { workers: 1 },
            Mode::DryRun(Box::new(|_| {})),
        );
        assert!(r.is_err());
    }
}
