//! The planner's `kubernetes` connector against an HTTP server that speaks the Kubernetes
//! API for the calls it makes (the `scale` subresource of Deployments and StatefulSets),
//! answering real `k8s-openapi` objects: the connector reads the workloads' replicas once,
//! then sends a JSON merge patch for each pool whose size changes; a refused patch is a
//! connector error naming the workload and the server's reason, and the pool stays as the
//! server holds it.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use k8s_openapi::api::autoscaling::v1::{Scale, ScaleSpec, ScaleStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Status};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use turbine_actors::planner::config::ConnectorConfig;
use turbine_actors::planner::connector::Connector;
use turbine_actors::planner::kubernetes::KubernetesScaler;
use turbine_actors::planner::Replicas;

/// One call the server saw.
#[derive(Clone, Debug, PartialEq)]
struct Call {
    method: Method,
    path: String,
    content_type: Option<String>,
    body: Option<serde_json::Value>,
}

#[derive(Default)]
struct Cluster {
    /// (kind, name) → spec.replicas.
    replicas: BTreeMap<(String, String), i32>,
    calls: Vec<Call>,
    /// Patches to this workload are refused (403), as RBAC would.
    forbidden: Option<String>,
}

type Shared = Arc<Mutex<Cluster>>;

fn scale(ns: &str, name: &str, replicas: i32) -> Scale {
    Scale {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(ns.to_string()),
            ..ObjectMeta::default()
        },
        spec: Some(ScaleSpec {
            replicas: Some(replicas),
        }),
        status: Some(ScaleStatus {
            replicas,
            selector: None,
        }),
    }
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let s = Status {
        code: Some(i32::from(code)),
        message: Some(message),
        reason: Some(reason.to_string()),
        status: Some("Failure".to_string()),
        ..Status::default()
    };
    let mut body = serde_json::to_value(&s).unwrap();
    body["kind"] = "Status".into();
    body["apiVersion"] = "v1".into();
    (StatusCode::from_u16(code).unwrap(), Json(body)).into_response()
}

async fn scale_call(
    State(cluster): State<Shared>,
    Path((ns, kind, name)): Path<(String, String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut c = cluster.lock().unwrap();
    c.calls.push(Call {
        method: method.clone(),
        path: format!("/apis/apps/v1/namespaces/{ns}/{kind}/{name}/scale"),
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body: serde_json::from_slice(&body).ok(),
    });
    let key = (kind.clone(), name.clone());
    let Some(&current) = c.replicas.get(&key) else {
        return status(404, "NotFound", format!("{kind}.apps \"{name}\" not found"));
    };
    if method == Method::PATCH {
        if c.forbidden.as_deref() == Some(name.as_str()) {
            return status(
                403,
                "Forbidden",
                format!("cannot patch resource \"{kind}/scale\" \"{name}\""),
            );
        }
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let Some(n) = body["spec"]["replicas"].as_i64() else {
            return status(422, "Invalid", "spec.replicas: required".into());
        };
        c.replicas.insert(key, n as i32);
        return Json(scale(&ns, &name, n as i32)).into_response();
    }
    Json(scale(&ns, &name, current)).into_response()
}

/// A server on 127.0.0.1 with these workloads; its URL.
async fn serve(cluster: Shared) -> String {
    let app = Router::new()
        .route(
            "/apis/apps/v1/namespaces/{ns}/{kind}/{name}/scale",
            get(scale_call).patch(scale_call),
        )
        .with_state(cluster);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn section(yaml: &str) -> ConnectorConfig {
    serde_yaml::from_str(yaml).unwrap()
}

#[tokio::test]
async fn the_connector_reads_then_patches_each_changed_pools_scale() {
    let cluster = Shared::default();
    {
        let mut c = cluster.lock().unwrap();
        c.replicas.insert(("deployments".into(), "pf".into()), 2);
        c.replicas.insert(("deployments".into(), "dc".into()), 3);
    }
    let url = serve(cluster.clone()).await;
    let cfg = section(&format!(
        "{{kind: kubernetes, namespace: serving, prefill: pf, decode: dc, dry_run: false, \
         api_server: '{url}'}}"
    ));
    // The file says 1 + 1; the cluster holds 2 + 3: the connector starts from the cluster.
    let start = Replicas::Disaggregated {
        prefill: 1,
        decode: 1,
    };
    let mut k = KubernetesScaler::from_config(&cfg, start, Box::new(|_| panic!("not a dry run")))
        .await
        .unwrap();
    let target = Replicas::Disaggregated {
        prefill: 2,
        decode: 5,
    };
    assert_eq!(k.apply(target).await.unwrap(), target);
    // Unchanged: nothing sent.
    assert_eq!(k.apply(target).await.unwrap(), target);

    let calls = cluster.lock().unwrap().calls.clone();
    let path = |name: &str| format!("/apis/apps/v1/namespaces/serving/deployments/{name}/scale");
    assert_eq!(
        calls,
        vec![
            Call {
                method: Method::GET,
                path: path("pf"),
                content_type: None,
                body: None
            },
            Call {
                method: Method::GET,
                path: path("dc"),
                content_type: None,
                body: None
            },
            Call {
                method: Method::PATCH,
                path: path("dc"),
                content_type: Some("application/merge-patch+json".into()),
                body: Some(serde_json::json!({"spec": {"replicas": 5}})),
            },
        ],
        "two reads, then one patch: the prefill pool already had 2"
    );
    assert_eq!(
        cluster.lock().unwrap().replicas[&("deployments".into(), "dc".into())],
        5
    );
}

#[tokio::test]
async fn a_refused_patch_is_an_error_naming_the_workload_and_the_pool_stays() {
    let cluster = Shared::default();
    {
        let mut c = cluster.lock().unwrap();
        c.replicas
            .insert(("statefulsets".into(), "serve".into()), 1);
        c.forbidden = Some("serve".into());
    }
    let url = serve(cluster.clone()).await;
    let cfg = section(&format!(
        "{{kind: kubernetes, workload_kind: statefulsets, aggregated: serve, dry_run: false, \
         api_server: '{url}'}}"
    ));
    let one = Replicas::Aggregated { workers: 1 };
    let mut k = KubernetesScaler::from_config(&cfg, one, Box::new(|_| {}))
        .await
        .unwrap();
    let e = k
        .apply(Replicas::Aggregated { workers: 4 })
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("default/statefulsets serve") && e.contains("cannot patch"),
        "{e}"
    );
    // Allowed again: the next interval's patch goes through from the pool's real size.
    cluster.lock().unwrap().forbidden = None;
    let four = Replicas::Aggregated { workers: 4 };
    assert_eq!(k.apply(four).await.unwrap(), four);
    let patches = cluster
        .lock()
        .unwrap()
        .calls
        .iter()
        .filter(|c| c.method == Method::PATCH)
        .count();
    assert_eq!(patches, 2);
}

#[tokio::test]
async fn a_missing_workload_is_named() {
    let url = serve(Shared::default()).await;
    let cfg = section(&format!(
        "{{kind: kubernetes, aggregated: nowhere, dry_run: false, api_server: '{url}'}}"
    ));
    let mut k =
        KubernetesScaler::from_config(&cfg, Replicas::Aggregated { workers: 1 }, Box::new(|_| {}))
            .await
            .unwrap();
    let e = k
        .apply(Replicas::Aggregated { workers: 2 })
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("get scale default/deployments nowhere") && e.contains("not found"),
        "{e}"
    );
}
