//! Kubernetes discovery: instances are pods, their liveness is a Lease each one renews.
//!
//! No extra cluster to run: the API server is the registry.
//! - **Registration** ([`Discovery::register`]) writes a `coordination.k8s.io/v1` Lease named
//!   after the component and the instance id, labelled [`COMPONENT_LABEL`], annotated with
//!   the instance ([`INSTANCE_ANNOTATION`], JSON) and the pod it runs in ([`POD_ANNOTATION`];
//!   `POD_NAME` from the downward API, else `HOSTNAME`, which Kubernetes sets to the pod
//!   name). A task renews it every third of its duration; revoking deletes it.
//! - **Watching** lists and watches the pods of `label_selector` and the component's Leases
//!   in the namespace. An instance is there while its Lease is fresh (`renewTime` +
//!   `leaseDurationSeconds` after now), the pod it names exists, is not being deleted, has
//!   an IP and its `Ready` condition is `True`. So a pod that fails its readiness probe, is
//!   deleted, or hangs (stops renewing) drops out. Its endpoints are rewritten to the pod's
//!   IP: the request plane from the container port named [`PORT_REQUEST`] (else the
//!   registered port), the event plane from [`PORT_EVENTS`] (metadata `events`), and a
//!   gateway endpoint from [`PORT_HTTP`] (metadata `gateway_endpoint`).
//! - A watch that ends is re-opened from the last resourceVersion; `410 Gone` (the version
//!   was compacted away) relists, and the new list replaces the old view wholesale.
//!
//! The view is pure ([`instances`]: pods, leases, `now` in, instances out); the shell
//! diffs successive views into [`DiscoveryEvent`]s and re-evaluates on every change and on
//! a tick (for lease expiry).
//!
//! RBAC (namespaced Role): `pods`: get, list, watch; `coordination.k8s.io` `leases`: get,
//! list, watch, create, update, patch, delete.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease as KubeLease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::chrono::{DateTime, Utc};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Discovery, DiscoveryError, DiscoveryEvent, Instance, Lease, WatchStream};

/// Label on a Lease: the component it registers.
pub const COMPONENT_LABEL: &str = "turbine.dev/component";
/// Annotation on a Lease: the registered [`Instance`], as JSON.
pub const INSTANCE_ANNOTATION: &str = "turbine.dev/instance";
/// Annotation on a Lease: the pod the instance runs in.
pub const POD_ANNOTATION: &str = "turbine.dev/pod";
/// Container port name of the request plane.
pub const PORT_REQUEST: &str = "request";
/// Container port name of the event plane (metadata `events`).
pub const PORT_EVENTS: &str = "events";
/// Container port name of a frontend beside the instance (metadata `gateway_endpoint`).
pub const PORT_HTTP: &str = "http";
/// The field manager of the Leases this backend applies.
const FIELD_MANAGER: &str = "turbine";
/// How often the view is re-evaluated without a change (lease expiry).
const TICK: Duration = Duration::from_millis(250);
/// How long a failed list or watch waits before it is tried again.
const RETRY: Duration = Duration::from_millis(500);

/// Pods and leases in one namespace, through a kube client.
#[derive(Clone)]
pub struct KubernetesDiscovery {
    client: Client,
    namespace: String,
    selector: String,
    pod_name: Option<String>,
}

impl KubernetesDiscovery {
    /// The backend for `namespace`, with pods chosen by `label_selector`, through the
    /// in-cluster service account (or `KUBECONFIG`).
    pub async fn from_environment(
        namespace: &str,
        label_selector: &str,
    ) -> Result<KubernetesDiscovery, DiscoveryError> {
        let client = Client::try_default()
            .await
            .map_err(|e| DiscoveryError::Protocol(format!("kubernetes client: {e}")))?;
        Ok(KubernetesDiscovery::with_client(
            client,
            namespace,
            label_selector,
        ))
    }

    /// The backend over `client`. The pod registrations name is `POD_NAME`, else `HOSTNAME`.
    pub fn with_client(client: Client, namespace: &str, label_selector: &str) -> Self {
        let pod_name = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .ok();
        KubernetesDiscovery {
            client,
            namespace: namespace.to_string(),
            selector: label_selector.to_string(),
            pod_name,
        }
    }

    /// Registrations from this backend name pod `name`.
    pub fn with_pod_name(mut self, name: &str) -> Self {
        self.pod_name = Some(name.to_string());
        self
    }

    fn leases(&self) -> Api<KubeLease> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

fn backend(e: kube::Error) -> DiscoveryError {
    DiscoveryError::Protocol(format!("kubernetes API: {e}"))
}

/// A Lease name for `component`/`id`: a DNS subdomain (lower case, `[a-z0-9.-]`).
pub fn lease_name(component: &str, id: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| match c.to_ascii_lowercase() {
                c @ ('a'..='z' | '0'..='9' | '-' | '.') => c,
                _ => '-',
            })
            .collect()
    };
    let name = format!("turbine-{}-{}", clean(component), clean(id));
    name.chars().take(253).collect()
}

/// The Lease that registers `instance` from pod `pod`, renewed at `now`.
pub fn lease_object(
    instance: &Instance,
    pod: &str,
    lease: Duration,
    now: DateTime<Utc>,
) -> KubeLease {
    let json = serde_json::to_string(instance).unwrap_or_default();
    KubeLease {
        metadata: ObjectMeta {
            name: Some(lease_name(&instance.component, &instance.id)),
            labels: Some([(COMPONENT_LABEL.to_string(), instance.component.clone())].into()),
            annotations: Some(
                [
                    (INSTANCE_ANNOTATION.to_string(), json),
                    (POD_ANNOTATION.to_string(), pod.to_string()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(instance.id.clone()),
            lease_duration_seconds: Some(lease.as_secs_f64().ceil().max(1.0) as i32),
            renew_time: Some(MicroTime(now)),
            ..LeaseSpec::default()
        }),
    }
}

/// The instances of `component` that pods and leases show at `now`, by id.
pub fn instances(
    pods: &BTreeMap<String, Pod>,
    leases: &BTreeMap<String, KubeLease>,
    component: &str,
    now: DateTime<Utc>,
) -> BTreeMap<String, Instance> {
    leases
        .values()
        .filter(|l| l.labels().get(COMPONENT_LABEL).map(String::as_str) == Some(component))
        .filter(|l| lease_is_fresh(l, now))
        .filter_map(|l| {
            let registered: Instance =
                serde_json::from_str(l.annotations().get(INSTANCE_ANNOTATION)?).ok()?;
            let pod = pods.get(l.annotations().get(POD_ANNOTATION)?)?;
            let instance = on_pod(registered, pod)?;
            Some((instance.id.clone(), instance))
        })
        .collect()
}

fn lease_is_fresh(lease: &KubeLease, now: DateTime<Utc>) -> bool {
    let Some(spec) = &lease.spec else {
        return false;
    };
    match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(MicroTime(renewed)), Some(secs)) => {
            *renewed + k8s_openapi::chrono::Duration::seconds(i64::from(secs)) > now
        }
        _ => false,
    }
}

/// `registered` as it is reached on `pod`, if the pod is ready.
fn on_pod(mut registered: Instance, pod: &Pod) -> Option<Instance> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let ip = status.pod_ip.as_ref().filter(|ip| !ip.is_empty())?;
    if !ready {
        return None;
    }
    let ports: BTreeMap<&str, i32> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| Some((p.name.as_deref()?, p.container_port)))
        .collect();
    let port_of = |endpoint: &str| endpoint.rsplit(':').next().map(str::to_string);
    let request_port = ports
        .get(PORT_REQUEST)
        .map(|p| p.to_string())
        .or_else(|| port_of(&registered.endpoint))?;
    registered.endpoint = format!("tcp://{ip}:{request_port}");
    let events = ports
        .get(PORT_EVENTS)
        .map(|p| p.to_string())
        .or_else(|| registered.metadata.get("events").and_then(|e| port_of(e)));
    if let Some(port) = events {
        registered
            .metadata
            .insert("events".to_string(), format!("tcp://{ip}:{port}"));
    }
    if let Some(port) = ports.get(PORT_HTTP) {
        registered
            .metadata
            .entry("gateway_endpoint".to_string())
            .or_insert_with(|| format!("{ip}:{port}"));
    }
    Some(registered)
}

/// What changed between two views, removals first.
pub fn diff(
    before: &BTreeMap<String, Instance>,
    after: &BTreeMap<String, Instance>,
) -> Vec<DiscoveryEvent> {
    let removed = before
        .iter()
        .filter(|(id, i)| after.get(*id) != Some(*i))
        .map(|(_, i)| DiscoveryEvent::Removed(i.clone()));
    let added = after
        .iter()
        .filter(|(id, i)| before.get(*id) != Some(*i))
        .map(|(_, i)| DiscoveryEvent::Added(i.clone()));
    removed.chain(added).collect()
}

/// One change of a followed kind of object.
enum Change<K> {
    /// A fresh list: the whole truth.
    Relisted(Vec<K>),
    Upsert(K),
    Delete(K),
}

/// Lists and watches `api` (objects matching `selector`) into `tx` until `tx` closes:
/// re-watching from the last resourceVersion when a watch ends, relisting on `410 Gone`
/// or any other failure.
async fn follow<K>(api: Api<K>, selector: String, tx: mpsc::Sender<Change<K>>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    loop {
        let list = match api.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!("kubernetes discovery: listing: {e}; retrying");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let mut version = list.metadata.resource_version.clone().unwrap_or_default();
        if tx.send(Change::Relisted(list.items)).await.is_err() {
            return;
        }
        'watching: loop {
            let params = WatchParams::default().labels(&selector).timeout(290);
            let events = match api.watch(&params, &version).await {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!("kubernetes discovery: watching: {e}; relisting");
                    tokio::time::sleep(RETRY).await;
                    break 'watching;
                }
            };
            let mut events = events.boxed();
            loop {
                let change = match events.try_next().await {
                    Ok(Some(WatchEvent::Added(o) | WatchEvent::Modified(o))) => {
                        version = o.resource_version().unwrap_or(version);
                        Change::Upsert(o)
                    }
                    Ok(Some(WatchEvent::Deleted(o))) => {
                        version = o.resource_version().unwrap_or(version);
                        Change::Delete(o)
                    }
                    Ok(Some(WatchEvent::Bookmark(b))) => {
                        version = b.metadata.resource_version;
                        continue;
                    }
                    Ok(Some(WatchEvent::Error(e))) => {
                        if e.code == 410 {
                            tracing::info!("kubernetes discovery: resourceVersion {version} is gone; relisting");
                        } else {
                            tracing::warn!("kubernetes discovery: watch error {e:?}; relisting");
                        }
                        break 'watching;
                    }
                    // The server closed the watch (its timeout): watch on from `version`.
                    Ok(None) => continue 'watching,
                    Err(e) => {
                        tracing::warn!("kubernetes discovery: watch stream: {e}; relisting");
                        break 'watching;
                    }
                };
                if tx.send(change).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn apply<K: Resource>(map: &mut BTreeMap<String, K>, change: Change<K>) {
    match change {
        Change::Relisted(items) => {
            *map = items
                .into_iter()
                .map(|o| (o.meta().name.clone().unwrap_or_default(), o))
                .collect();
        }
        Change::Upsert(o) => {
            map.insert(o.meta().name.clone().unwrap_or_default(), o);
        }
        Change::Delete(o) => {
            map.remove(o.meta().name.as_deref().unwrap_or_default());
        }
    }
}

#[async_trait]
impl Discovery for KubernetesDiscovery {
    async fn register(&self, instance: Instance, lease: Duration) -> Result<Lease, DiscoveryError> {
        let pod = self.pod_name.clone().ok_or_else(|| {
            DiscoveryError::Protocol(
                "kubernetes discovery: set POD_NAME (the downward API's metadata.name) to register"
                    .into(),
            )
        })?;
        let api = self.leases();
        let name = lease_name(&instance.component, &instance.id);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let object = lease_object(&instance, &pod, lease, Utc::now());
        api.patch(&name, &params, &Patch::Apply(&object))
            .await
            .map_err(backend)?;
        let stop = CancellationToken::new();
        let renewing = stop.clone();
        let (renew_api, renew_name) = (api.clone(), name.clone());
        tokio::spawn(async move {
            let every = (lease / 3).max(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = renewing.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let object = lease_object(&instance, &pod, lease, Utc::now());
                if let Err(e) = renew_api
                    .patch(&renew_name, &params, &Patch::Apply(&object))
                    .await
                {
                    tracing::warn!("kubernetes discovery: renewing lease {renew_name}: {e}");
                }
            }
        });
        let revoke = Box::pin(async move {
            if let Err(e) = api.delete(&name, &DeleteParams::default()).await {
                tracing::warn!("kubernetes discovery: deleting lease {name}: {e}");
            }
        });
        Ok(Lease::new(stop, revoke))
    }

    async fn list(&self, component: &str) -> Result<Vec<Instance>, DiscoveryError> {
        let pods = self
            .pods()
            .list(&ListParams::default().labels(&self.selector))
            .await
            .map_err(backend)?;
        let leases = self
            .leases()
            .list(&ListParams::default().labels(&format!("{COMPONENT_LABEL}={component}")))
            .await
            .map_err(backend)?;
        let (mut p, mut l) = (BTreeMap::new(), BTreeMap::new());
        apply(&mut p, Change::Relisted(pods.items));
        apply(&mut l, Change::Relisted(leases.items));
        Ok(instances(&p, &l, component, Utc::now())
            .into_values()
            .collect())
    }

    async fn watch(&self, component: &str) -> Result<WatchStream, DiscoveryError> {
        let (pod_tx, mut pod_rx) = mpsc::channel(64);
        let (lease_tx, mut lease_rx) = mpsc::channel(64);
        let pods = tokio::spawn(follow(self.pods(), self.selector.clone(), pod_tx));
        let leases = tokio::spawn(follow(
            self.leases(),
            format!("{COMPONENT_LABEL}={component}"),
            lease_tx,
        ));
        let (tx, rx) = mpsc::channel(64);
        let component = component.to_string();
        tokio::spawn(async move {
            let (mut p, mut l) = (BTreeMap::new(), BTreeMap::new());
            let mut shown = BTreeMap::new();
            let mut tick = tokio::time::interval(TICK);
            loop {
                tokio::select! {
                    Some(c) = pod_rx.recv() => apply(&mut p, c),
                    Some(c) = lease_rx.recv() => apply(&mut l, c),
                    _ = tick.tick() => {}
                    _ = tx.closed() => break,
                }
                let now_shown = instances(&p, &l, &component, Utc::now());
                for event in diff(&shown, &now_shown) {
                    if tx.send(event).await.is_err() {
                        break;
                    }
                }
                shown = now_shown;
            }
            pods.abort();
            leases.abort();
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodCondition, PodSpec, PodStatus};

    fn pod(name: &str, ip: &str, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "turbine".into(),
                    ports: Some(vec![
                        ContainerPort {
                            name: Some(PORT_REQUEST.into()),
                            container_port: 7100,
                            ..ContainerPort::default()
                        },
                        ContainerPort {
                            name: Some(PORT_EVENTS.into()),
                            container_port: 7101,
                            ..ContainerPort::default()
                        },
                    ]),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some(ip.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    fn registered(id: &str) -> Instance {
        Instance {
            component: "worker".into(),
            id: id.into(),
            endpoint: "tcp://0.0.0.0:7100".into(),
            metadata: [
                ("worker_id".to_string(), "5".to_string()),
                ("events".to_string(), "tcp://0.0.0.0:7101".to_string()),
            ]
            .into(),
        }
    }

    #[test]
    fn ready_pods_with_fresh_leases_are_instances_at_their_pod_ip() {
        let t0 = Utc::now();
        let lease = lease_object(&registered("a"), "pod-a", Duration::from_secs(2), t0);
        let leases = BTreeMap::from([("l".to_string(), lease)]);
        let mut pods = BTreeMap::from([("pod-a".to_string(), pod("pod-a", "192.0.2.7", false))]);
        assert!(
            instances(&pods, &leases, "worker", t0).is_empty(),
            "not ready"
        );
        pods.insert("pod-a".into(), pod("pod-a", "192.0.2.7", true));
        let seen = instances(&pods, &leases, "worker", t0);
        let a = &seen["a"];
        assert_eq!(a.endpoint, "tcp://192.0.2.7:7100");
        assert_eq!(a.metadata["events"], "tcp://192.0.2.7:7101");
        assert_eq!(a.metadata["worker_id"], "5");
        assert!(
            instances(&pods, &leases, "router", t0).is_empty(),
            "another component"
        );
        let later = t0 + k8s_openapi::chrono::Duration::seconds(3);
        assert!(
            instances(&pods, &leases, "worker", later).is_empty(),
            "the lease expired"
        );
        assert!(
            instances(&BTreeMap::new(), &leases, "worker", t0).is_empty(),
            "no pod"
        );
    }

    #[test]
    fn a_changed_instance_is_removed_then_added() {
        let a = registered("a");
        let mut moved = a.clone();
        moved.endpoint = "tcp://h:2".into();
        let before = BTreeMap::from([("a".to_string(), a.clone())]);
        let after = BTreeMap::from([("a".to_string(), moved.clone())]);
        assert_eq!(
            diff(&before, &after),
            [DiscoveryEvent::Removed(a), DiscoveryEvent::Added(moved)]
        );
        assert!(diff(&after, &after).is_empty());
        assert_eq!(lease_name("Worker", "ID_7"), "turbine-worker-id-7");
    }
}
