//! The Kubernetes discovery backend against an in-test API server that speaks the list and
//! watch protocol with real k8s-openapi objects: lists carry a resourceVersion, watches
//! stream newline-delimited `ADDED`/`MODIFIED`/`DELETED` events from a version, a version
//! compacted away is answered `410 Gone` (an `ERROR` event), Leases are server-side
//! applied and deleted. Pods appear, become ready, go away; a lease that is not renewed
//! expires; a compaction forces a relist that finds what the dead watch missed. Each
//! change must reach the watcher within [`FOLLOWS`].

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease as KubeLease;
use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodCondition, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use turbine_runtime::discovery::kubernetes::KubernetesDiscovery;
use turbine_runtime::discovery::{Discovery, DiscoveryEvent, Instance, WatchStream};

/// How soon the watcher must see a change (a lease expiry: its duration, then at most one
/// 250 ms evaluation tick; a relist: the failed watch, a retry pause and the list).
const FOLLOWS: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Store {
    version: u64,
    /// Versions at or below this are gone: a watch from one gets 410.
    compacted: u64,
    pods: BTreeMap<String, serde_json::Value>,
    leases: BTreeMap<String, serde_json::Value>,
    /// (version, kind, event type, object)
    log: Vec<(u64, &'static str, &'static str, serde_json::Value)>,
}

#[derive(Clone)]
struct Api {
    store: Arc<Mutex<Store>>,
    /// Bumped on every change; a new generation of 0 means "watches end now".
    changed: watch::Sender<(u64, u64)>,
}

impl Api {
    fn write(&self, kind: &'static str, name: &str, obj: Option<serde_json::Value>, logged: bool) {
        let mut s = self.store.lock().unwrap();
        s.version += 1;
        let v = s.version;
        let map = if kind == "pods" {
            &mut s.pods
        } else {
            &mut s.leases
        };
        let event = match obj {
            Some(mut o) => {
                o["metadata"]["resourceVersion"] = v.to_string().into();
                let t = if map.contains_key(name) {
                    "MODIFIED"
                } else {
                    "ADDED"
                };
                map.insert(name.to_string(), o.clone());
                (t, o)
            }
            None => match map.remove(name) {
                Some(mut o) => {
                    o["metadata"]["resourceVersion"] = v.to_string().into();
                    ("DELETED", o)
                }
                None => return,
            },
        };
        if logged {
            s.log.push((v, kind, event.0, event.1));
        }
        drop(s);
        self.changed.send_modify(|(n, _)| *n += 1);
    }

    fn put_pod(&self, pod: &Pod) {
        let name = pod.metadata.name.clone().unwrap();
        self.write(
            "pods",
            &name,
            Some(serde_json::to_value(pod).unwrap()),
            true,
        );
    }

    /// Deletes `pod` without a watch event and compacts the history past it, ending the
    /// open watches: only a relist can learn that the pod is gone.
    fn delete_pod_behind_a_compaction(&self, name: &str) {
        self.write("pods", name, None, false);
        let mut s = self.store.lock().unwrap();
        s.compacted = s.version - 1;
        drop(s);
        self.changed.send_modify(|(n, g)| {
            *n += 1;
            *g += 1;
        });
    }
}

fn selected(obj: &serde_json::Value, selector: Option<&String>) -> bool {
    selector.is_none_or(|sel| {
        sel.split(',').filter(|c| !c.is_empty()).all(|clause| {
            let (k, v) = clause.split_once('=').unwrap_or((clause, ""));
            obj["metadata"]["labels"][k].as_str() == Some(v)
        })
    })
}

async fn list_or_watch(
    State(api): State<Api>,
    kind: &'static str,
    q: HashMap<String, String>,
) -> axum::response::Response {
    let selector = q.get("labelSelector");
    if q.get("watch").map(String::as_str) != Some("true") {
        let s = api.store.lock().unwrap();
        let map = if kind == "pods" { &s.pods } else { &s.leases };
        let items: Vec<_> = map
            .values()
            .filter(|o| selected(o, selector))
            .cloned()
            .collect();
        let body = serde_json::json!({
            "apiVersion": "v1", "kind": "List",
            "metadata": {"resourceVersion": s.version.to_string()},
            "items": items,
        });
        return axum::Json(body).into_response();
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let gone = from < api.store.lock().unwrap().compacted;
    if gone {
        let line = serde_json::json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410}});
        return Body::from(format!("{line}\n")).into_response();
    }
    let rx = api.changed.subscribe();
    let generation = rx.borrow().1;
    let selector = selector.cloned();
    let stream = futures::stream::unfold((from, rx), move |(mut at, mut rx)| {
        let api = api.clone();
        let selector = selector.clone();
        async move {
            loop {
                let lines: Vec<String> = {
                    let s = api.store.lock().unwrap();
                    s.log
                        .iter()
                        .filter(|(v, k, _, o)| {
                            *v > at && *k == kind && selected(o, selector.as_ref())
                        })
                        .map(|(_, _, t, o)| {
                            serde_json::json!({"type": t, "object": o}).to_string() + "\n"
                        })
                        .collect()
                };
                at = api.store.lock().unwrap().version;
                if !lines.is_empty() {
                    return Some((
                        Ok::<_, std::convert::Infallible>(Bytes::from(lines.concat())),
                        (at, rx),
                    ));
                }
                if rx.changed().await.is_err() || rx.borrow().1 != generation {
                    return None;
                }
            }
        }
    });
    Body::from_stream(stream).into_response()
}

async fn apply_lease(
    State(api): State<Api>,
    Path((_ns, name)): Path<(String, String)>,
    body: Bytes,
) -> axum::response::Response {
    let lease: KubeLease = serde_json::from_slice(&body).expect("a Lease");
    api.write(
        "leases",
        &name,
        Some(serde_json::to_value(&lease).unwrap()),
        true,
    );
    let s = api.store.lock().unwrap();
    axum::Json(s.leases[&name].clone()).into_response()
}

async fn delete_lease(
    State(api): State<Api>,
    Path((_ns, name)): Path<(String, String)>,
) -> axum::response::Response {
    let obj = api.store.lock().unwrap().leases.get(&name).cloned();
    api.write("leases", &name, None, true);
    axum::Json(obj.unwrap_or_default()).into_response()
}

async fn start_api() -> (Api, String) {
    let api = Api {
        store: Arc::new(Mutex::new(Store::default())),
        changed: watch::Sender::new((0, 0)),
    };
    let app = Router::new()
        .route(
            "/api/v1/namespaces/{ns}/pods",
            get(|s: State<Api>, q: Query<HashMap<String, String>>| list_or_watch(s, "pods", q.0)),
        )
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
            get(|s: State<Api>, q: Query<HashMap<String, String>>| list_or_watch(s, "leases", q.0)),
        )
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
            axum::routing::patch(apply_lease).delete(delete_lease),
        )
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (api, url)
}

fn pod(name: &str, ip: &str, ready: bool) -> Pod {
    let port = |n: &str, p| ContainerPort {
        name: Some(n.into()),
        container_port: p,
        ..ContainerPort::default()
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([("app".to_string(), "turbine-decode".to_string())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "worker".into(),
                ports: Some(vec![
                    port("request", 7100),
                    port("events", 7101),
                    port("http", 8000),
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

fn instance(id: &str) -> Instance {
    Instance {
        component: "worker".into(),
        id: id.into(),
        endpoint: "tcp://0.0.0.0:7100".into(),
        metadata: [("worker_id".to_string(), id.to_string())].into(),
    }
}

async fn next(watch: &mut WatchStream, what: &str) -> DiscoveryEvent {
    tokio::time::timeout(FOLLOWS, watch.next())
        .await
        .unwrap_or_else(|_| panic!("no event within {FOLLOWS:?}: {what}"))
        .expect("the watch goes on")
}

async fn quiet(watch: &mut WatchStream, what: &str) {
    if let Ok(e) = tokio::time::timeout(Duration::from_millis(700), watch.next()).await {
        panic!("{what}: unexpected {e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_and_leases_drive_membership_through_list_watch_and_relist() {
    let (api, url) = start_api().await;
    let config = kube::Config::new(url.parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let discovery = |pod: &str| {
        KubernetesDiscovery::with_client(client.clone(), "serving", "app=turbine-decode")
            .with_pod_name(pod)
    };
    let (da, db) = (discovery("pod-a"), discovery("pod-b"));

    // A registered instance in a pod that is not ready yet is not there.
    api.put_pod(&pod("pod-a", "192.0.2.10", false));
    let lease_a = da
        .register(instance("a"), Duration::from_secs(1))
        .await
        .unwrap();
    let mut watch = da.watch("worker").await.unwrap();
    quiet(&mut watch, "pod-a is not ready").await;

    // Ready: it joins, at its pod's IP and named ports.
    api.put_pod(&pod("pod-a", "192.0.2.10", true));
    let DiscoveryEvent::Added(a) = next(&mut watch, "pod-a ready").await else {
        panic!("expected pod-a to join")
    };
    assert_eq!(a.id, "a");
    assert_eq!(a.endpoint, "tcp://192.0.2.10:7100");
    assert_eq!(a.metadata["events"], "tcp://192.0.2.10:7101");
    assert_eq!(a.metadata["gateway_endpoint"], "192.0.2.10:8000");
    assert_eq!(da.list("worker").await.unwrap(), vec![a.clone()]);

    // A second pod joins; then it hangs (stops renewing its lease): it drops out.
    api.put_pod(&pod("pod-b", "192.0.2.11", true));
    let lease_b = db
        .register(instance("b"), Duration::from_secs(1))
        .await
        .unwrap();
    assert!(
        matches!(next(&mut watch, "pod-b joins").await, DiscoveryEvent::Added(b) if b.id == "b")
    );
    drop(lease_b);
    assert!(
        matches!(next(&mut watch, "pod-b's lease expires").await, DiscoveryEvent::Removed(b) if b.id == "b")
    );
    quiet(&mut watch, "a's lease is renewed").await;

    // pod-a is deleted while the history is compacted: the watch gets 410, relists, and
    // learns from the list that it is gone.
    api.delete_pod_behind_a_compaction("pod-a");
    assert!(
        matches!(next(&mut watch, "the relist after 410").await, DiscoveryEvent::Removed(x) if x.id == "a")
    );

    // The watch resumed after the relist: pod-a comes back.
    api.put_pod(&pod("pod-a", "192.0.2.12", true));
    let DiscoveryEvent::Added(a) = next(&mut watch, "pod-a back").await else {
        panic!("expected pod-a back")
    };
    assert_eq!(a.endpoint, "tcp://192.0.2.12:7100");

    // Revoking deregisters at once.
    lease_a.revoke().await;
    assert!(
        matches!(next(&mut watch, "a revoked").await, DiscoveryEvent::Removed(x) if x.id == "a")
    );
}
