//! The cluster file (`turbine up -f cluster.yaml`): which model, which components, how many
//! of each, where they listen, how requests are routed. Every field has a default, so an
//! empty file (or no file) means "serve the default model on CPU on port 8000".
//!
//! Unknown fields are rejected so a typo is an error naming the field, not a silently
//! ignored setting. docs/CONFIG.md documents every field; keep the two in step.

use crate::disagg::DisaggregationConfig;
use crate::kv::BlockSize;
use crate::planner::PlannerConfig;
use crate::router::{MigrationConfig, RouterConfig};
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
    /// Re-issuing a request whose worker died, stalled or drained (see
    /// `router::MigrationConfig`).
    pub migration: MigrationConfig,
    /// Custom stages every request passes before routing, in this order (see
    /// `stages::Stage`, docs/STAGES.md).
    pub stages: Vec<StageSpec>,
    /// Logs: format (text or JSON), filter.
    pub logging: LoggingSection,
    /// Workers turbine does not run (vLLM engines behind a gateway) that `turbine epp`
    /// picks among, KV-aware from their own KV-event publishers.
    pub external_workers: Vec<ExternalWorker>,
    /// Traces: OpenTelemetry export over OTLP (off unless an endpoint is given).
    pub observability: ObservabilitySection,
}

/// A worker turbine does not run, known from the file: a vLLM engine a gateway sends
/// requests to, whose KV cache the router follows through the engine's own event stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalWorker {
    /// The id the router knows it by (the `x-turbine-worker` hint names it); unique among
    /// the file's external workers.
    pub id: u64,
    /// The `ip:port` a gateway sends its requests to (`x-gateway-destination-endpoint`).
    pub gateway_endpoint: String,
    /// Where its KV events come from.
    pub kv_events: KvEventSource,
}

/// A KV-event stream the router follows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
pub enum KvEventSource {
    /// vLLM's ZeroMQ publisher (`--kv-events-config '{"enable_kv_cache_events": true,
    /// "publisher": "zmq", "endpoint": "tcp://*:5557"}'`): `[topic, seq, KVEventBatch]`.
    Vllm {
        /// The publisher's endpoint as a subscriber connects to it (`tcp://HOST:PORT`).
        endpoint: String,
        /// vLLM's `topic` setting (a prefix; `""`, the default, takes every message).
        #[serde(default)]
        topic: String,
    },
}

impl ClusterConfig {
    /// Checks `external_workers`: ids unique, endpoints spelled as a subscriber connects.
    pub fn validate_external_workers(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for (i, w) in self.external_workers.iter().enumerate() {
            if !seen.insert(w.id) {
                return Err(format!(
                    "external_workers[{i}]: id {} is listed twice",
                    w.id
                ));
            }
            if w.gateway_endpoint.trim().is_empty() {
                return Err(format!("external_workers[{i}]: gateway_endpoint is empty"));
            }
            let KvEventSource::Vllm { endpoint, .. } = &w.kv_events;
            if !endpoint.starts_with("tcp://") {
                return Err(format!(
                    "external_workers[{i}].kv_events.endpoint: `{endpoint}` is not a ZeroMQ \
                     endpoint (expected tcp://HOST:PORT)"
                ));
            }
        }
        Ok(())
    }
}

/// `observability:` in the cluster file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObservabilitySection {
    /// OpenTelemetry traces (see `turbine_runtime::telemetry::otlp`); the environment's
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_TRACES_SAMPLER_ARG` and `OTEL_SERVICE_NAME`
    /// override it.
    pub tracing: turbine_runtime::telemetry::TracingConfig,
}

/// One entry of `stages:`: a stage the binary registered under `name`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    /// The registered name (`turbine` ships `key_guard` and `redact`).
    pub name: String,
    /// Runs in a process of its own (`turbine worker --role stage --stage NAME`) that joins
    /// through discovery, instead of in the frontend's process.
    #[serde(default)]
    pub remote: bool,
    /// The stage's own settings, given to its factory as they are written.
    #[serde(default)]
    pub config: serde_yaml::Value,
}

/// How the processes of this cluster log (stderr).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    /// `text` (human-readable lines) or `json` (one JSON object a line, for a log pipeline).
    pub format: LogFormat,
}

impl Default for LoggingSection {
    fn default() -> Self {
        LoggingSection {
            format: LogFormat::Text,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
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
            migration: MigrationConfig::default(),
            stages: Vec::new(),
            logging: LoggingSection::default(),
            external_workers: Vec::new(),
            observability: ObservabilitySection::default(),
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
    /// Generations running at once in this frontend (0 = no limit and no queue).
    pub max_concurrent_requests: usize,
    /// Generations waiting for a running slot; more are refused with 429 + Retry-After.
    pub max_queued_requests: usize,
    /// Default deadline of a generation in milliseconds, arrival to last byte (none when
    /// absent); clients can ask for a shorter one with the `x-request-timeout-ms` header.
    pub request_timeout_ms: Option<u64>,
    /// Limits on the images of a chat request (count, bytes, pixels).
    pub images: crate::frontend::ImageLimits,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            host: "127.0.0.1".to_string(),
            port: 8000,
            max_body_bytes: 4 << 20,
            max_concurrent_requests: 256,
            max_queued_requests: 1024,
            request_timeout_ms: None,
            images: crate::frontend::ImageLimits::default(),
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
    /// Runs the vision tower of a multimodal model: images in, embeddings out over the
    /// transfer plane to the prefill or aggregated worker (E/P/D). Holds no KV.
    Encoder,
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
    /// Share of the step budget one prompt's prefill chunk may take while other requests
    /// want budget too (0 < share <= 1; 1: no cap). See `SchedulerConfig::contended_prefill_chunk`.
    pub long_prefill_share: f64,
    /// CPU threads for the CPU executor (0 = all cores).
    pub threads: usize,
    /// Started by separate `turbine worker --group N` processes that join over the
    /// network, not by `turbine up`.
    pub remote: bool,
    /// On SIGTERM a `turbine worker` stops taking requests and lets those in flight run
    /// for up to this long; the rest are released to other workers (migration).
    pub drain_timeout_ms: u64,
    /// An encoder group: bytes of embeddings its cache keeps (image content hash to
    /// embeddings, least recently used out; 0 disables it). Ignored by other roles.
    pub embedding_cache_bytes: usize,
}

impl WorkerGroup {
    /// The prefill chunk cap under contention, in tokens, from `long_prefill_share`: at
    /// least one token, at most the whole budget.
    pub fn contended_prefill_chunk(&self) -> Result<usize, String> {
        let share = self.long_prefill_share;
        if !(share > 0.0 && share <= 1.0) {
            return Err(format!(
                "long_prefill_share must be more than 0 and at most 1 (got {share})"
            ));
        }
        let budget = self.max_num_batched_tokens as f64;
        Ok(((budget * share).ceil() as usize).max(1))
    }
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
            long_prefill_share: 0.5,
            threads: 0,
            remote: false,
            drain_timeout_ms: 30_000,
            embedding_cache_bytes: 256 << 20,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportSection {
    /// Where this process's request-plane ROUTER binds (port 0 = any free port).
    #[serde(deserialize_with = "addr_field::transport_bind")]
    pub bind: SocketAddr,
    /// Where the event plane's PUB socket binds.
    #[serde(deserialize_with = "addr_field::transport_events_bind")]
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
        #[serde(default, deserialize_with = "addr_field::discovery_registry")]
        registry: Option<SocketAddr>,
        #[serde(default = "default_lease_ms")]
        lease_ms: u64,
    },
    /// Fixed list of worker addresses.
    Static {
        #[serde(deserialize_with = "addr_field::discovery_workers")]
        workers: Vec<SocketAddr>,
    },
    /// Pods by label in a namespace, liveness by the Lease each instance renews
    /// (`turbine_runtime::discovery::kubernetes`).
    Kubernetes {
        namespace: String,
        label_selector: String,
        /// How long a registration lives without renewal (rounded up to whole seconds).
        #[serde(default = "default_k8s_lease_ms")]
        lease_ms: u64,
    },
}

fn default_lease_ms() -> u64 {
    3_000
}

fn default_k8s_lease_ms() -> u64 {
    10_000
}

impl Default for DiscoverySection {
    fn default() -> Self {
        DiscoverySection::Embedded {
            registry: None,
            lease_ms: default_lease_ms(),
        }
    }
}

/// Socket addresses in the file: `IP:port`, or the request plane's own spelling
/// `tcp://IP:port` (what `turbine up` prints and `--registry` takes). A bad one is refused
/// with the field's path, so the user knows which line to fix.
mod addr_field {
    use serde::{Deserialize, Deserializer};
    use std::net::SocketAddr;

    /// Parses one address of the field `field`.
    pub fn parse(field: &str, text: &str) -> Result<SocketAddr, String> {
        let bare = text.trim();
        let bare = bare.strip_prefix("tcp://").unwrap_or(bare);
        bare.parse().map_err(|_| {
            format!(
                "`{field}`: `{text}` is not a socket address (expected IP:port or \
                 tcp://IP:port, e.g. 127.0.0.1:7100)"
            )
        })
    }

    fn one<'de, D: Deserializer<'de>>(field: &str, d: D) -> Result<SocketAddr, D::Error> {
        let text = String::deserialize(d)?;
        parse(field, &text).map_err(serde::de::Error::custom)
    }

    pub fn transport_bind<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        one("transport.bind", d)
    }

    pub fn transport_events_bind<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        one("transport.events_bind", d)
    }

    pub fn discovery_registry<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| parse("discovery.registry", &text).map_err(serde::de::Error::custom))
            .transpose()
    }

    pub fn discovery_workers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .enumerate()
            .map(|(i, text)| {
                parse(&format!("discovery.workers[{i}]"), text).map_err(serde::de::Error::custom)
            })
            .collect()
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
    fn external_vllm_workers_parse_and_are_checked() {
        let c: ClusterConfig = serde_yaml::from_str(
            "external_workers:\n\
             \x20 - {id: 1, gateway_endpoint: '10.0.0.5:8000', \
             kv_events: {source: vllm, endpoint: 'tcp://10.0.0.5:5557', topic: kv}}\n",
        )
        .unwrap();
        assert_eq!(
            c.external_workers[0].kv_events,
            KvEventSource::Vllm {
                endpoint: "tcp://10.0.0.5:5557".into(),
                topic: "kv".into()
            }
        );
        assert!(c.validate_external_workers().is_ok());
        let err = serde_yaml::from_str::<ClusterConfig>(
            "external_workers: [{id: 1, gateway_endpoint: a, kv_events: {source: sglang, endpoint: x}}]",
        )
        .unwrap_err();
        assert!(err.to_string().contains("sglang"), "{err}");
        let twice: ClusterConfig = serde_yaml::from_str(
            "external_workers:\n\
             \x20 - {id: 3, gateway_endpoint: a, kv_events: {source: vllm, endpoint: 'tcp://h:1'}}\n\
             \x20 - {id: 3, gateway_endpoint: b, kv_events: {source: vllm, endpoint: 'h:2'}}\n",
        )
        .unwrap();
        assert!(twice
            .validate_external_workers()
            .unwrap_err()
            .contains("listed twice"));
    }

    #[test]
    fn registry_takes_the_tcp_form_too() {
        for text in [
            "discovery: {backend: embedded, registry: tcp://127.0.0.1:7100}",
            "discovery: {backend: embedded, registry: 127.0.0.1:7100}",
        ] {
            let c: ClusterConfig = serde_yaml::from_str(text).unwrap();
            assert_eq!(
                c.discovery,
                DiscoverySection::Embedded {
                    registry: Some(SocketAddr::from(([127, 0, 0, 1], 7100))),
                    lease_ms: default_lease_ms(),
                }
            );
        }
        let c: ClusterConfig =
            serde_yaml::from_str("transport: {bind: 'tcp://0.0.0.0:7100'}").unwrap();
        assert_eq!(c.transport.bind, SocketAddr::from(([0, 0, 0, 0], 7100)));
    }

    #[test]
    fn a_bad_address_names_its_field() {
        let cases = [
            (
                "discovery: {backend: embedded, registry: 'tcp://nowhere'}",
                "discovery.registry",
            ),
            ("transport: {bind: 'localhost'}", "transport.bind"),
            ("transport: {events_bind: ':1'}", "transport.events_bind"),
            (
                "discovery: {backend: static, workers: ['127.0.0.1:1', 'x:2']}",
                "discovery.workers[1]",
            ),
        ];
        for (text, field) in cases {
            let err = serde_yaml::from_str::<ClusterConfig>(text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("`{field}`")), "{text}: {err}");
            assert!(!err.contains("invalid socket address syntax"), "{err}");
        }
    }

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../examples/cluster.yaml");
        let c: ClusterConfig = serde_yaml::from_str(text).unwrap();
        assert_eq!(c.router.policy, crate::router::PolicyKind::Kv);
        assert!(c.workers.iter().map(|w| w.replicas).sum::<usize>() >= 2);
        assert_eq!(c.migration, MigrationConfig::default());
        assert_eq!(c.workers[0].drain_timeout_ms, 30_000);
        assert_eq!(c.observability, ObservabilitySection::default());
        let err =
            serde_yaml::from_str::<ClusterConfig>("migration: {migration_limt: 1}").unwrap_err();
        assert!(err.to_string().contains("migration_limt"), "{err}");
    }

    #[test]
    fn the_contended_prefill_chunk_is_a_share_of_the_budget() {
        let group = |share: f64| WorkerGroup {
            long_prefill_share: share,
            ..WorkerGroup::default()
        };
        assert_eq!(group(0.5).contended_prefill_chunk(), Ok(256));
        assert_eq!(group(1.0).contended_prefill_chunk(), Ok(512));
        assert_eq!(group(1e-9).contended_prefill_chunk(), Ok(1));
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            let why = group(bad).contended_prefill_chunk().unwrap_err();
            assert!(why.contains("long_prefill_share"), "{why}");
        }
    }

    #[test]
    fn observability_tracing_is_off_by_default_and_names_a_typo() {
        let c: ClusterConfig = serde_yaml::from_str(
            "observability: {tracing: {otlp_endpoint: \"http://c:4317\", sampling_ratio: 0.5}}",
        )
        .unwrap();
        let t = &c.observability.tracing;
        assert_eq!(t.otlp_endpoint.as_deref(), Some("http://c:4317"));
        assert_eq!(
            (t.sampling_ratio, t.service_name.as_str()),
            (0.5, "turbine")
        );
        assert_eq!(
            ClusterConfig::default().observability.tracing.otlp_endpoint,
            None
        );
        let err = serde_yaml::from_str::<ClusterConfig>("observability: {tracing: {endpoint: x}}")
            .unwrap_err();
        assert!(err.to_string().contains("endpoint"), "{err}");
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
    fn shipped_replica_and_vllm_examples_parse() {
        let text = include_str!("../../examples/router-replicas.yaml");
        let c: ClusterConfig = serde_yaml::from_str(text).unwrap();
        assert!(c.router.replica_sync && !c.router.remote);
        assert!(c.workers.iter().all(|w| w.remote));
        let text = include_str!("../../examples/epp-vllm.yaml");
        let c: ClusterConfig = serde_yaml::from_str(text).unwrap();
        assert_eq!(c.external_workers.len(), 2);
        assert!(c.validate_external_workers().is_ok());
        assert_eq!(
            c.discovery,
            DiscoverySection::Static {
                workers: Vec::new()
            }
        );
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

    #[test]
    fn shipped_epd_example_parses_with_an_encoder_a_prefill_and_a_decode_worker() {
        let text = include_str!("../../examples/epd.yaml");
        let c: ClusterConfig = serde_yaml::from_str(text).unwrap();
        let roles: Vec<(WorkerRole, usize)> =
            c.workers.iter().map(|w| (w.role, w.replicas)).collect();
        assert_eq!(
            roles,
            vec![
                (WorkerRole::Encoder, 1),
                (WorkerRole::Prefill, 1),
                (WorkerRole::Decode, 1)
            ]
        );
        assert!(crate::node::has_encoders(&c) && crate::node::is_disaggregated(&c));
        // Image URLs are fetched by default, within the limits.
        let images = &c.http.images;
        assert!(
            images.remote_urls && images.fetch_timeout_ms > 0 && images.allowed_hosts.is_empty()
        );
    }
}
