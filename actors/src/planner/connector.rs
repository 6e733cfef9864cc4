//! Connectors: how a planner decision becomes running workers. One trait, one target (a
//! [`Replicas`]); each connector answers with the replicas it now has (starting ones
//! included), which may fall short of the target (a floor it cannot go below, a process
//! that failed to start).
//!
//! - [`super::local::LocalProcesses`]: `turbine worker` processes on this machine;
//! - [`super::kubernetes::KubernetesScaler`]: each pool a Deployment or StatefulSet, scaled
//!   through its `scale` subresource (or, in a dry run, the patch printed);
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
    #[error("kubernetes: {0}")]
    Kubernetes(String),
}

/// Carries a planner decision out.
#[async_trait]
pub trait Connector: Send {
    /// Moves the pools towards `target`; returns the replicas the connector now runs.
    async fn apply(&mut self, target: Replicas) -> Result<Replicas, ConnectorError>;
}
