//! Connectors: how a planner decision becomes running workers. One trait, one target (a
//! [`Replicas`]); each connector answers with the replicas it now has (starting ones
//! included), which may fall short of the target (a floor it cannot go below, a process
//! that failed to start).
//!
//! - [`super::local::LocalProcesses`]: `turbine worker` processes on this machine;
//! - [`KubernetesDryRun`]: the JSON merge patch of each pool's workload, printed, not sent
//!   (the API client is issue #20's);
//! - the simulator's connector lives in `turbine-sim` (it adds and removes simulated
//!   workers on virtual time).

use super::core::Replicas;
use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("the connector cannot size this cluster's pools: {0}")]
    Shape(String),
    #[error("starting a worker: {0}")]
    Start(String),
}

/// Carries a planner decision out.
#[async_trait]
pub trait Connector: Send {
    /// Moves the pools towards `target`; returns the replicas the connector now runs.
    async fn apply(&mut self, target: Replicas) -> Result<Replicas, ConnectorError>;
}

/// A workload's replica count as a Kubernetes JSON merge patch
/// (`application/merge-patch+json`) of its `spec`.
pub fn replicas_patch(replicas: usize) -> serde_json::Value {
    serde_json::json!({ "spec": { "replicas": replicas } })
}

/// One patch the Kubernetes connector would send.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadPatch {
    /// The API path, e.g. `/apis/apps/v1/namespaces/default/deployments/decode`.
    pub path: String,
    pub body: serde_json::Value,
}

/// The Kubernetes connector in dry-run mode: for each pool whose size changes, the patch it
/// would send to the workload's `spec.replicas`, written to `out` (one line each).
pub struct KubernetesDryRun {
    namespace: String,
    workload_kind: String,
    /// Workload names, one per pool, in [`Replicas`] pool order.
    workloads: Vec<String>,
    current: Replicas,
    out: Box<dyn FnMut(&WorkloadPatch) + Send>,
}

impl KubernetesDryRun {
    /// `workloads` names the pools' workloads in pool order (aggregated; or prefill, decode).
    pub fn new(
        namespace: String,
        workload_kind: String,
        workloads: Vec<String>,
        current: Replicas,
        out: Box<dyn FnMut(&WorkloadPatch) + Send>,
    ) -> Result<KubernetesDryRun, ConnectorError> {
        if workloads.len() != current.pools().len() {
            return Err(ConnectorError::Shape(format!(
                "{} workload name(s) for {} pool(s)",
                workloads.len(),
                current.pools().len()
            )));
        }
        Ok(KubernetesDryRun {
            namespace,
            workload_kind,
            workloads,
            current,
            out,
        })
    }

    /// The patches that move the workloads from the current sizes to `target`.
    pub fn patches(&self, target: Replicas) -> Vec<WorkloadPatch> {
        let (from, to) = (self.current.pools(), target.pools());
        self.workloads
            .iter()
            .zip(from.iter().zip(to.iter()))
            .filter(|(_, (a, b))| a != b)
            .map(|(name, (_, &n))| WorkloadPatch {
                path: format!(
                    "/apis/apps/v1/namespaces/{}/{}/{}",
                    self.namespace, self.workload_kind, name
                ),
                body: replicas_patch(n),
            })
            .collect()
    }
}

#[async_trait]
impl Connector for KubernetesDryRun {
    async fn apply(&mut self, target: Replicas) -> Result<Replicas, ConnectorError> {
        if target.pools().len() != self.current.pools().len() {
            return Err(ConnectorError::Shape(
                "the target has another number of pools".into(),
            ));
        }
        for p in self.patches(target) {
            (self.out)(&p);
        }
        // Dry run: the workloads are taken to follow, so the planner's view moves on.
        self.current = target;
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn the_dry_run_prints_one_merge_patch_per_changed_pool() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let mut k = KubernetesDryRun::new(
            "serving".into(),
            "deployments".into(),
            vec!["prefill".into(), "decode".into()],
            Replicas::Disaggregated {
                prefill: 1,
                decode: 2,
            },
            Box::new(move |p| sink.lock().unwrap().push(p.clone())),
        )
        .unwrap();
        let target = Replicas::Disaggregated {
            prefill: 1,
            decode: 4,
        };
        assert_eq!(k.apply(target).await.unwrap(), target);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "the prefill pool did not change");
        assert_eq!(
            seen[0].path,
            "/apis/apps/v1/namespaces/serving/deployments/decode"
        );
        assert_eq!(seen[0].body.to_string(), r#"{"spec":{"replicas":4}}"#);
    }

    #[test]
    fn a_name_per_pool_is_required() {
        let r = KubernetesDryRun::new(
            "d".into(),
            "deployments".into(),
            vec![],
            Replicas::Aggregated { workers: 1 },
            Box::new(|_| {}),
        );
        assert!(r.is_err());
    }
}
