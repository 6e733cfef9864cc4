//! Frontend metrics on a shared Prometheus registry.
//!
//! WHY a shared registry: GET /metrics must show worker-side metrics too (queue depth, KV
//! blocks, prefix-cache hit rate) that other components register later. [`Metrics`] holds the
//! registry behind `Arc<Mutex<_>>`; anyone holding a clone of [`Metrics::registry`] can
//! register more metrics, and the next scrape includes them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Labels of `turbine_http_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The matched route, e.g. `/v1/chat/completions` (never the raw path: bounded cardinality).
    pub endpoint: String,
    pub status: String,
}

/// Labels of `dynamo_frontend_requests_total` (Dynamo's frontend names them so).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenerationLabels {
    /// `chat_completions` or `completions`.
    pub endpoint: String,
    /// `stream` (SSE) or `unary`.
    pub request_type: String,
    /// `success` (2xx) or `error`.
    pub status: String,
}

/// The HTTP layer's own metrics. Cheap to clone (each metric is an `Arc` inside).
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    generations: Family<GenerationLabels, Counter>,
    in_flight: Gauge,
    queued: Gauge,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    request_duration: Histogram,
}

impl HttpMetrics {
    fn new() -> Self {
        HttpMetrics {
            requests: Family::default(),
            generations: Family::default(),
            in_flight: Gauge::default(),
            queued: Gauge::default(),
            prompt_tokens: Counter::default(),
            completion_tokens: Counter::default(),
            // 1 ms .. ~33 s
            time_to_first_token: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            // 0.1 ms .. ~3.3 s
            inter_token_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            // 1 ms .. ~9 min
            request_duration: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "turbine_http_requests",
            "HTTP requests by endpoint and status",
            self.requests.clone(),
        );
        registry.register(
            "turbine_http_requests_in_flight",
            "Generation requests being served now",
            self.in_flight.clone(),
        );
        registry.register(
            "turbine_http_requests_queued",
            "Generation requests waiting for a running slot (http.max_concurrent_requests)",
            self.queued.clone(),
        );
        registry.register(
            "turbine_prompt_tokens",
            "Prompt tokens of served requests",
            self.prompt_tokens.clone(),
        );
        registry.register(
            "turbine_completion_tokens",
            "Generated tokens sent to clients",
            self.completion_tokens.clone(),
        );
        registry.register(
            "turbine_time_to_first_token_seconds",
            "Time from request arrival to the first generated text",
            self.time_to_first_token.clone(),
        );
        registry.register(
            "turbine_inter_token_latency_seconds",
            "Time between consecutive generated deltas",
            self.inter_token_latency.clone(),
        );
        registry.register(
            "turbine_request_duration_seconds",
            "Time from request arrival to the end of its response",
            self.request_duration.clone(),
        );
    }

    /// Counts a finished request by route and status; `streamed`: it was answered with SSE.
    pub fn record_request(&self, endpoint: &str, status: u16, streamed: bool) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_string(),
                status: status.to_string(),
            })
            .inc();
        let generation = match endpoint {
            "/v1/chat/completions" => "chat_completions",
            "/v1/completions" => "completions",
            _ => return,
        };
        self.generations
            .get_or_create(&GenerationLabels {
                endpoint: generation.to_string(),
                request_type: if streamed { "stream" } else { "unary" }.to_string(),
                status: if (200..300).contains(&status) {
                    "success"
                } else {
                    "error"
                }
                .to_string(),
            })
            .inc();
    }

    /// The same figures under the names Dynamo's frontend exports (`dynamo_frontend_*`), so
    /// dashboards built for it work unchanged; `registry` carries the `model` label.
    fn register_dynamo_names(&self, registry: &mut Registry) {
        registry.register(
            "dynamo_frontend_requests",
            "Generation requests by endpoint, request type and status",
            self.generations.clone(),
        );
        registry.register(
            "dynamo_frontend_inflight_requests",
            "Generation requests being served now",
            self.in_flight.clone(),
        );
        registry.register(
            "dynamo_frontend_queued_requests",
            "Generation requests waiting for a running slot",
            self.queued.clone(),
        );
        registry.register(
            "dynamo_frontend_time_to_first_token_seconds",
            "Time from request arrival to the first generated text",
            self.time_to_first_token.clone(),
        );
        registry.register(
            "dynamo_frontend_inter_token_latency_seconds",
            "Time between consecutive generated deltas",
            self.inter_token_latency.clone(),
        );
        registry.register(
            "dynamo_frontend_request_duration_seconds",
            "Time from request arrival to the end of its response",
            self.request_duration.clone(),
        );
        registry.register(
            "dynamo_frontend_input_tokens",
            "Prompt tokens of served requests",
            self.prompt_tokens.clone(),
        );
        registry.register(
            "dynamo_frontend_output_tokens",
            "Generated tokens sent to clients",
            self.completion_tokens.clone(),
        );
    }

    /// vLLM's names (`vllm:*`) for the request-level figures; `registry` carries the
    /// `model_name` label.
    fn register_vllm_names(&self, registry: &mut Registry) {
        registry.register(
            "vllm:prompt_tokens",
            "Prompt tokens of served requests",
            self.prompt_tokens.clone(),
        );
        registry.register(
            "vllm:generation_tokens",
            "Generated tokens sent to clients",
            self.completion_tokens.clone(),
        );
        registry.register(
            "vllm:time_to_first_token_seconds",
            "Time from request arrival to the first generated text",
            self.time_to_first_token.clone(),
        );
        registry.register(
            "vllm:inter_token_latency_seconds",
            "Time between consecutive generated deltas",
            self.inter_token_latency.clone(),
        );
        registry.register(
            "vllm:e2e_request_latency_seconds",
            "Time from request arrival to the end of its response",
            self.request_duration.clone(),
        );
    }

    /// The gauge of requests waiting for admission (the admission queue moves it).
    pub fn queued_gauge(&self) -> Gauge {
        self.queued.clone()
    }

    pub fn request_started(&self) {
        self.in_flight.inc();
    }

    pub fn request_ended(&self, duration: Duration) {
        self.in_flight.dec();
        self.request_duration.observe(duration.as_secs_f64());
    }

    pub fn add_prompt_tokens(&self, n: u64) {
        self.prompt_tokens.inc_by(n);
    }

    pub fn add_completion_tokens(&self, n: u64) {
        self.completion_tokens.inc_by(n);
    }

    pub fn observe_time_to_first_token(&self, elapsed: Duration) {
        self.time_to_first_token.observe(elapsed.as_secs_f64());
    }

    pub fn observe_inter_token_latency(&self, gap: Duration) {
        self.inter_token_latency.observe(gap.as_secs_f64());
    }
}

/// The registry plus the HTTP metrics registered in it. Clone freely.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    http: HttpMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with the HTTP metrics in it.
    pub fn new() -> Self {
        Metrics::with_registry(Arc::new(Mutex::new(Registry::default())))
    }

    /// Registers the HTTP metrics into an existing registry shared with other components
    /// (once per registry: a second call would duplicate the metric families).
    pub fn with_registry(registry: Arc<Mutex<Registry>>) -> Self {
        let http = HttpMetrics::new();
        http.register(&mut lock(&registry));
        Metrics { registry, http }
    }

    /// The shared registry, for registering worker-side metrics.
    pub fn registry(&self) -> Arc<Mutex<Registry>> {
        Arc::clone(&self.registry)
    }

    /// Registers another component's metric (queue depth, KV blocks, ...) so GET /metrics
    /// shows it. Register each name once per registry.
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        lock(&self.registry).register(name, help, metric);
    }

    pub fn http(&self) -> &HttpMetrics {
        &self.http
    }

    /// Registers the dashboard names (Dynamo's `dynamo_frontend_*` with a `model` label,
    /// vLLM's `vllm:*` with `model_name`) for the HTTP metrics. Once per registry, when the
    /// served model's name is known; the workers' vLLM names join through
    /// [`Metrics::with_labelled`]. docs/METRICS.md lists every name.
    pub fn register_dashboard_names(&self, model: &str) {
        let mut registry = lock(&self.registry);
        self.http.register_dynamo_names(
            registry.sub_registry_with_label(("model".into(), model.to_string().into())),
        );
        self.http.register_vllm_names(
            registry.sub_registry_with_label(("model_name".into(), model.to_string().into())),
        );
    }

    /// Runs `f` on a scope of the registry whose metrics all carry `label=value`.
    pub fn with_labelled(&self, label: &'static str, value: &str, f: impl FnOnce(&mut Registry)) {
        let mut registry = lock(&self.registry);
        f(registry.sub_registry_with_label((label.into(), value.to_string().into())));
    }

    /// Prometheus text exposition of everything registered.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &lock(&self.registry))?;
        Ok(text)
    }
}

/// A panic while holding the lock cannot leave a registry half-updated in a way that matters
/// for scraping, so a poisoned lock is used as is.
fn lock(registry: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
