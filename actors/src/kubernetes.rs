//! The one place turbine builds a Kubernetes API client (kube-rs) and the calls it makes on
//! workloads. The planner's `kubernetes` connector scales workloads through it; Kubernetes
//! discovery and `turbine epp` (issue #20) build their client here too, so credentials,
//! TLS (rustls with ring, no openssl) and timeouts are decided once.
//!
//! Scaling goes through a workload's `scale` subresource
//! (`/apis/apps/v1/namespaces/NS/KIND/NAME/scale`), the call `kubectl scale` makes: the
//! service account needs only `patch` (and `get`) on `deployments/scale` or
//! `statefulsets/scale`, not the right to rewrite the whole workload.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v1::Scale;
use kube::api::{Patch, PatchParams};
use kube::{Api, Config};
use serde::{Deserialize, Serialize};

pub use kube::Client;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "no Kubernetes configuration: neither a kubeconfig (KUBECONFIG, ~/.kube/config) nor \
         the in-cluster service account was usable ({0})"
    )]
    NoConfig(String),
    #[error("`{url}` is not a Kubernetes API server address: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("building the Kubernetes client: {0}")]
    Client(String),
    #[error("{call} {workload}: {reason}")]
    Call {
        call: &'static str,
        workload: String,
        reason: String,
    },
}

/// A client from the environment: the kubeconfig (`KUBECONFIG`, else `~/.kube/config`, its
/// current context), else the in-cluster service account (a pod's token and CA).
pub async fn client() -> Result<Client, KubeError> {
    let config = Config::infer()
        .await
        .map_err(|e| KubeError::NoConfig(e.to_string()))?;
    Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))
}

/// A client for the API server at `url`, without credentials: `kubectl proxy`
/// (`http://127.0.0.1:8001`, which adds the user's), or a test's server.
pub fn client_at(url: &str) -> Result<Client, KubeError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| KubeError::BadUrl {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    if uri.scheme().is_none() || uri.authority().is_none() {
        return Err(KubeError::BadUrl {
            url: url.to_string(),
            reason: "expected scheme://host[:port]".into(),
        });
    }
    Client::try_from(Config::new(uri)).map_err(|e| KubeError::Client(e.to_string()))
}

/// The workload kinds turbine scales (the path segment of their API).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    Deployments,
    StatefulSets,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployments => "deployments",
            WorkloadKind::StatefulSets => "statefulsets",
        }
    }
}

/// One named workload in a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} {}", self.namespace, self.kind.as_str(), self.name)
    }
}

/// The JSON merge patch (`application/merge-patch+json`) that sets a scale's replicas.
pub fn replicas_patch(replicas: usize) -> serde_json::Value {
    serde_json::json!({ "spec": { "replicas": replicas } })
}

impl Workload {
    /// The path of its scale subresource, as the API server sees it.
    pub fn scale_path(&self) -> String {
        format!(
            "/apis/apps/v1/namespaces/{}/{}/{}/scale",
            self.namespace,
            self.kind.as_str(),
            self.name
        )
    }

    /// Its desired replicas now (`spec.replicas` of its scale).
    pub async fn replicas(&self, client: &Client) -> Result<usize, KubeError> {
        let scale = match self.kind {
            WorkloadKind::Deployments => self.api::<Deployment>(client).get_scale(&self.name).await,
            WorkloadKind::StatefulSets => {
                self.api::<StatefulSet>(client).get_scale(&self.name).await
            }
        };
        self.spec_replicas("get scale", scale)
    }

    /// Sets its desired replicas; returns what the API server then holds.
    pub async fn scale(&self, client: &Client, replicas: usize) -> Result<usize, KubeError> {
        let patch = Patch::Merge(replicas_patch(replicas));
        let params = PatchParams::default();
        let scale = match self.kind {
            WorkloadKind::Deployments => {
                self.api::<Deployment>(client)
                    .patch_scale(&self.name, &params, &patch)
                    .await
            }
            WorkloadKind::StatefulSets => {
                self.api::<StatefulSet>(client)
                    .patch_scale(&self.name, &params, &patch)
                    .await
            }
        };
        self.spec_replicas("patch scale", scale)
    }

    fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(client.clone(), &self.namespace)
    }

    fn spec_replicas(
        &self,
        call: &'static str,
        scale: Result<Scale, kube::Error>,
    ) -> Result<usize, KubeError> {
        let err = |reason: String| KubeError::Call {
            call,
            workload: self.to_string(),
            reason,
        };
        let scale = scale.map_err(|e| err(e.to_string()))?;
        let n = scale.spec.and_then(|s| s.replicas).unwrap_or(0);
        usize::try_from(n).map_err(|_| err(format!("the server answered {n} replicas")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_path_names_namespace_kind_and_name() {
        let w = Workload {
            kind: WorkloadKind::StatefulSets,
            namespace: "serving".into(),
            name: "decode".into(),
        };
        assert_eq!(
            w.scale_path(),
            "/apis/apps/v1/namespaces/serving/statefulsets/decode/scale"
        );
        assert_eq!(replicas_patch(3).to_string(), r#"{"spec":{"replicas":3}}"#);
    }

    #[tokio::test]
    async fn an_api_server_address_must_be_a_url() {
        for bad in ["", "not a url", "127.0.0.1:8001"] {
            let e = client_at(bad).err().expect(bad);
            assert!(e.to_string().contains("API server address"), "{bad}: {e}");
        }
        assert!(client_at("http://127.0.0.1:8001").is_ok());
    }
}
