//! The cluster file (`turbine up -f cluster.yaml`): which model, which components, how many
//! of each, where they listen, how requests are routed. Every field has a default, so an
//! empty file (or no file) means "serve the default model on CPU on port 8000".
//!
//! Unknown fields are rejected so a typo is an error naming the field, not a silently
//! ignored setting. docs/CONFIG.md documents every field; keep the two in step.

use crate::disagg::DisaggregationConfig;
use crate::kv::BlockSize;
use crate::planner::PlannerConfig;
use crate::router::RouterConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Which model to serve.
    pub model: ModelSpec,
    pub http: HttpSection,
    /// Routing policy and its weights (see `router::RouterConfig`).
    pub router: RouterConfig,
    /// Worker groups; each group is `replicas` identical workers.
    pub workers: Vec<WorkerGroup>,
    pub transport: TransportSection,
    pub discovery: DiscoverySection,
    /// SLA-driven scaling of the worker pools (see `planner::PlannerConfig`); absent: the
    /// pools keep their `replicas`.
    pub planner: Option<PlannerConfig>,
    /// Prefill/decode disaggregation: when a prefill goes to a `prefill` worker, and how KV
    /// moves to the `decode` worker (see `disagg::DisaggregationConfig`).
    pub disaggregation: DisaggregationConfig,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            model: ModelSpec::default(),
            http: HttpSection::default(),
            router: RouterConfig::default(),
            workers: vec![WorkerGroup::default()],
            transport: TransportSection::default(),
            discovery: DiscoverySection::default(),
            planner: None,
            disaggregation: DisaggregationConfig::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    /// A .gguf file, an HF directory (config.json + *.safetensors + tokenizer.json), or
    /// `default` for SmolLM2-135M-Instruct from the model cache (fetched when missing).
    pub path: String,
    /// The name clients put in `"model"`; defaults to the file's stem.
    pub served_name: Option<String>,
    /// Longest prompt + completion accepted; defaults to the model's trained context,
    /// capped by what the KV pool can hold.
    pub max_context: Option<usize>,
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec {
            path: "default".to_string(),
            served_name: None,
            max_context: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    pub host: String,
    pub port: u16,
    /// Request bodies over this many bytes get 413.
    pub max_body_bytes: usize,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            host: "127.0.0.1".to_string(),
            port: 8000,
            max_body_bytes: 4 << 20,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerRole {
    /// Prefill and decode in one worker.
    Aggregated,
    Prefill,
    Decode,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerGroup {
    pub role: WorkerRole,
    pub replicas: usize,
    /// `cpu`, or `cuda:N`.
    pub device: String,
    /// Physical KV blocks in this worker's pool.
    pub kv_blocks: usize,
    pub block_size: BlockSize,
    /// Token budget of one scheduler step (prefill chunks + decodes).
    pub max_num_batched_tokens: usize,
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// CPU threads for the CPU executor (0 = all cores).
    pub threads: usize,
    /// Started by separate `turbine worker --group N` processes that join over the
    /// network, not by `turbine up`.
    pub remote: bool,
}

impl Default for WorkerGroup {
    fn default() -> Self {
        WorkerGroup {
            role: WorkerRole::Aggregated,
            replicas: 1,
            device: "cpu".to_string(),
            kv_blocks: 2048,
            block_size: BlockSize::DEFAULT,
            max_num_batched_tokens: 512,
            max_num_seqs: 64,
            threads: 0,
            remote: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportSection {
    /// Where this process's request-plane ROUTER binds (port 0 = any free port).
    pub bind: SocketAddr,
    /// Where the event plane's PUB socket binds.
    pub events_bind: SocketAddr,
    /// A call that gets no reply within this many milliseconds fails.
    pub call_timeout_ms: u64,
}

impl Default for TransportSection {
    fn default() -> Self {
        TransportSection {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            events_bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            call_timeout_ms: 30_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case", deny_unknown_fields)]
pub enum DiscoverySection {
    /// A registry inside the frontend process; workers register with a lease.
    Embedded {
        /// Request-plane address of the process holding the registry (for `turbine worker`).
        #[serde(default)]
        registry: Option<SocketAddr>,
        #[serde(default = "default_lease_ms")]
        lease_ms: u64,
    },
    /// Fixed list of worker addresses.
    Static { workers: Vec<SocketAddr> },
    /// Watch pods by label (not yet implemented: selecting it is an error at start-up).
    Kubernetes {
        namespace: String,
        label_selector: String,
    },
}

fn default_lease_ms() -> u64 {
    3_000
}

impl Default for DiscoverySection {
    fn default() -> Self {
        DiscoverySection::Embedded {
            registry: None,
            lease_ms: default_lease_ms(),
        }
    }
}

/// Where the default model lives and what it is called.
pub fn model_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TURBINE_MODEL_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("turbine").join("models")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_defaults() {
        let c: ClusterConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(c, ClusterConfig::default());
        assert_eq!(c.http.port, 8000);
        assert_eq!(c.workers.len(), 1);
    }

    #[test]
    fn typo_is_rejected_with_the_field_name() {
        let err = serde_yaml::from_str::<ClusterConfig>("htp: {port: 1}").unwrap_err();
        assert!(err.to_string().contains("htp"), "{err}");
    }

    #[test]
    fn a_planner_section_parses_and_rejects_typos() {
        let c: ClusterConfig =
            serde_yaml::from_str("planner: {profile: p.yaml, ttft_ms: 500}").unwrap();
        assert_eq!(c.planner.map(|p| p.ttft_ms), Some(500.0));
        let err =
            serde_yaml::from_str::<ClusterConfig>("planner: {profile: p, ttf_ms: 1}").unwrap_err();
        assert!(err.to_string().contains("ttf_ms"), "{err}");
    }

    #[test]
    fn disaggregation_section_parses_into_the_cluster_file() {
        let c: ClusterConfig = serde_yaml::from_str(
            "disaggregation: {policy: never, transfer: {pull_timeout_ms: 100}}",
        )
        .unwrap();
        assert_eq!(
            c.disaggregation.policy,
            crate::disagg::DisaggPolicyKind::Never
        );
        assert_eq!(c.disaggregation.transfer.pull_timeout_ms, 100);
        let err =
            serde_yaml::from_str::<ClusterConfig>("disaggregation: {polcy: never}").unwrap_err();
        assert!(err.to_string().contains("polcy"), "{err}");
    }

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../examples/cluster.yaml");
        let c: ClusterConfig = serde_yaml::from_str(text).unwrap();
        assert_eq!(c.router.policy, crate::router::PolicyKind::Kv);
        assert!(c.workers.iter().map(|w| w.replicas).sum::<usize>() >= 2);
    }

    #[test]
    fn shipped_router_process_example_parses_with_everything_remote() {
        let text = include_str!("../../examples/cluster-router-process.yaml");
        let c: ClusterConfig = serde_yaml::from_str(text).unwrap();
        assert!(c.router.remote);
        assert!(c.workers.iter().all(|w| w.remote));
        assert!(matches!(
            c.discovery,
            DiscoverySection::Embedded {
                registry: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn shipped_gpu_example_parses_and_names_a_cuda_device() {
        let text = include_str!("../../examples/cluster-gpu.yaml");
        let c: ClusterConfig = serde_yaml::from_str(text).unwrap();
        assert_eq!(c.workers.len(), 1);
        assert_eq!(
            crate::executor::device::Device::parse(&c.workers[0].device).ok(),
            Some(crate::executor::device::Device::Cuda(0))
        );
    }

    #[test]
    fn shipped_disagg_example_parses_with_one_prefill_and_one_decode_worker() {
        use crate::disagg::DisaggPolicyKind;
        let text = include_str!("../../examples/disagg.yaml");
        let c: ClusterConfig = serde_yaml::from_str(text).unwrap();
        let roles: Vec<(WorkerRole, usize)> =
            c.workers.iter().map(|w| (w.role, w.replicas)).collect();
        assert_eq!(
            roles,
            vec![(WorkerRole::Prefill, 1), (WorkerRole::Decode, 1)]
        );
        assert_eq!(c.disaggregation.policy, DisaggPolicyKind::Conditional);
        // A ~600-token prompt goes remote.
        assert!(c.disaggregation.remote_prefill_min_tokens <= 600);
        assert!(c.workers.iter().all(|w| w.device == "cpu" && !w.remote));
        assert!(crate::node::is_disaggregated(&c));
    }
}
