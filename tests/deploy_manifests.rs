//! Every manifest under deploy/ parses into its real Kubernetes type (k8s-openapi's
//! structs, the API's schemas) and nothing in it is left over: each object is read, written
//! back and compared with the file, so a misspelt or misplaced field (which the API server
//! would drop or refuse) fails here. The InferencePool (a CRD, not in k8s-openapi) is
//! checked against a strict struct of the GAIE v1 schema; the cluster files in the
//! ConfigMap parse as turbine's own config.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Parses `doc` as `T` and fails when writing it back loses or changes anything.
fn strict<T: DeserializeOwned + Serialize>(file: &str, doc: &serde_json::Value) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: {} does not parse: {e}", doc["kind"]));
    let back = serde_json::to_value(&typed).unwrap();
    assert_same(file, doc, &back, "");
    typed
}

fn assert_same(file: &str, want: &serde_json::Value, got: &serde_json::Value, at: &str) {
    use serde_json::Value;
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, v) in w {
                let path = format!("{at}.{k}");
                match g.get(k) {
                    Some(gv) => assert_same(file, v, gv, &path),
                    None => panic!("{file}: unknown field {path}"),
                }
            }
        }
        (Value::Array(w), Value::Array(g)) => {
            assert_eq!(w.len(), g.len(), "{file}: {at}");
            for (i, (w, g)) in w.iter().zip(g).enumerate() {
                assert_same(file, w, g, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(want, got, "{file}: {at} changed when read as its type"),
    }
}

/// GAIE `inference.networking.k8s.io/v1` InferencePool (the fields turbine uses).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct InferencePool {
    api_version: String,
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: InferencePoolSpec,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct InferencePoolSpec {
    selector: LabelSelector,
    target_ports: Vec<PortNumber>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    app_protocol: Option<String>,
    endpoint_picker_ref: EndpointPickerRef,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LabelSelector {
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortNumber {
    number: u16,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EndpointPickerRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    name: String,
    port: PortNumber,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failure_mode: Option<String>,
}

#[test]
fn every_manifest_is_a_valid_kubernetes_object() {
    use k8s_openapi::api::{apps::v1 as apps, core::v1 as core, rbac::v1 as rbac};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut kinds = BTreeMap::<String, usize>::new();
    let mut deployments = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let yaml = serde_yaml::Value::deserialize(doc).unwrap();
            if yaml.is_null() {
                continue;
            }
            let doc: serde_json::Value = serde_json::to_value(&yaml).unwrap();
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            assert_eq!(doc["metadata"]["namespace"], "turbine", "{file}: {kind}");
            match kind.as_str() {
                "Deployment" => {
                    deployments.push((file.clone(), strict::<apps::Deployment>(&file, &doc)))
                }
                "Service" => drop(strict::<core::Service>(&file, &doc)),
                "ServiceAccount" => drop(strict::<core::ServiceAccount>(&file, &doc)),
                "ConfigMap" => {
                    let cm = strict::<core::ConfigMap>(&file, &doc);
                    for (key, cluster) in cm.data.unwrap_or_default() {
                        serde_yaml::from_str::<turbine_actors::cluster_config::ClusterConfig>(
                            &cluster,
                        )
                        .unwrap_or_else(|e| {
                            panic!("{file}: {key} is not a turbine cluster file: {e}")
                        });
                    }
                }
                "Role" => drop(strict::<rbac::Role>(&file, &doc)),
                "RoleBinding" => drop(strict::<rbac::RoleBinding>(&file, &doc)),
                "InferencePool" => {
                    let pool = strict::<InferencePool>(&file, &doc);
                    assert_eq!(pool.api_version, "inference.networking.k8s.io/v1");
                }
                other => panic!("{file}: no check for kind {other:?}"),
            }
            *kinds.entry(kind).or_default() += 1;
        }
    }
    for kind in [
        "Deployment",
        "Service",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "InferencePool",
    ] {
        assert!(
            kinds.contains_key(kind),
            "no {kind} under deploy/: {kinds:?}"
        );
    }
    // Every pod template: a service account, probes on every container, selectors that
    // match its labels, and the pod name for discovery's Leases.
    let mut components = Vec::new();
    for (file, d) in &deployments {
        let spec = d.spec.as_ref().unwrap();
        let labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap();
        for (k, v) in spec.selector.match_labels.as_ref().unwrap() {
            assert_eq!(
                labels.get(k),
                Some(v),
                "{file}: the selector matches the pods"
            );
        }
        components.push(labels["app.kubernetes.io/component"].clone());
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some("turbine"),
            "{file}"
        );
        for c in &pod.containers {
            assert!(
                c.liveness_probe.is_some() && c.readiness_probe.is_some(),
                "{file}: {} has probes",
                c.name
            );
            let env = c.env.clone().unwrap_or_default();
            assert!(
                env.iter().any(|e| e.name == "POD_NAME"),
                "{file}: {} knows its pod",
                c.name
            );
        }
    }
    components.sort();
    assert_eq!(
        components,
        ["decode", "epp", "frontend", "prefill", "router"]
    );
}
