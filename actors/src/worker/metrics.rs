//! Worker-side metrics (queue depth, KV blocks, prefix-cache hit rate, preemptions),
//! exported next to the frontend's on `/metrics`: for a worker in the frontend's process
//! after every step, for a worker in another process from its load reports (when the
//! router follows it in the frontend's process, see `router::membership`).

use crate::frontend::Metrics;
use crate::worker::SchedulerStats;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    pub worker: String,
}

/// Gauges per worker, refreshed after every step from the scheduler's stats.
#[derive(Clone, Default)]
pub struct WorkerMetrics {
    kv_blocks_used: Family<WorkerLabel, Gauge>,
    kv_blocks_free: Family<WorkerLabel, Gauge>,
    kv_blocks_cached: Family<WorkerLabel, Gauge>,
    requests_waiting: Family<WorkerLabel, Gauge>,
    requests_running: Family<WorkerLabel, Gauge>,
    preemptions: Family<WorkerLabel, Gauge>,
    images_encoded: Family<WorkerLabel, Gauge>,
    prefix_cache_hit_rate: Family<WorkerLabel, Gauge<f64, AtomicU64>>,
    kv_usage: Family<WorkerLabel, Gauge<f64, AtomicU64>>,
}

impl WorkerMetrics {
    /// Creates the gauges and registers them in `metrics`' registry.
    pub fn register(metrics: &Metrics) -> WorkerMetrics {
        let m = WorkerMetrics::default();
        metrics.register(
            "turbine_kv_blocks_used",
            "KV blocks held by requests",
            m.kv_blocks_used.clone(),
        );
        metrics.register(
            "turbine_kv_blocks_free",
            "KV blocks not held by any request (including cached ones)",
            m.kv_blocks_free.clone(),
        );
        metrics.register(
            "turbine_kv_blocks_cached",
            "Free KV blocks kept for prefix reuse",
            m.kv_blocks_cached.clone(),
        );
        metrics.register(
            "turbine_requests_waiting",
            "Requests queued on a worker",
            m.requests_waiting.clone(),
        );
        metrics.register(
            "turbine_requests_running",
            "Requests being computed on a worker",
            m.requests_running.clone(),
        );
        metrics.register(
            "turbine_preemptions",
            "Sequences preempted (to be recomputed) since start",
            m.preemptions.clone(),
        );
        metrics.register(
            "turbine_worker_images_encoded",
            "Images a worker ran through its own vision tower since start (where no encoder \
             made their embeddings, or they could not be pulled; a decode worker whose KV \
             was imported encodes none)",
            m.images_encoded.clone(),
        );
        metrics.register(
            "turbine_kv_usage_ratio",
            "KV blocks held by requests over all KV blocks (0..1)",
            m.kv_usage.clone(),
        );
        metrics.register(
            "turbine_prefix_cache_hit_rate",
            "Prompt tokens served from the prefix cache over prompt tokens looked up",
            m.prefix_cache_hit_rate.clone(),
        );
        m
    }

    pub fn update(&self, worker: &str, s: &SchedulerStats) {
        let l = WorkerLabel {
            worker: worker.to_string(),
        };
        let as_i64 = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.kv_blocks_used.get_or_create(&l).set(as_i64(s.kv.used));
        self.kv_blocks_free.get_or_create(&l).set(as_i64(s.kv.free));
        self.kv_blocks_cached
            .get_or_create(&l)
            .set(as_i64(s.kv.cached));
        self.requests_waiting
            .get_or_create(&l)
            .set(as_i64(s.num_waiting));
        self.requests_running
            .get_or_create(&l)
            .set(as_i64(s.num_running));
        self.preemptions
            .get_or_create(&l)
            .set(i64::try_from(s.num_preemptions).unwrap_or(i64::MAX));
        self.images_encoded
            .get_or_create(&l)
            .set(i64::try_from(s.images_encoded).unwrap_or(i64::MAX));
        self.prefix_cache_hit_rate
            .get_or_create(&l)
            .set(s.kv.prefix_hit_rate());
        let total = s.kv.used + s.kv.free;
        let usage = if total == 0 {
            0.0
        } else {
            s.kv.used as f64 / total as f64
        };
        self.kv_usage.get_or_create(&l).set(usage);
    }

    /// The worker gauges under vLLM's names (`vllm:num_requests_running` ...), for
    /// dashboards built on vLLM; `registry` carries the `model_name` label.
    pub fn register_vllm_names(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "vllm:num_requests_running",
            "Requests being computed on a worker",
            self.requests_running.clone(),
        );
        registry.register(
            "vllm:num_requests_waiting",
            "Requests queued on a worker",
            self.requests_waiting.clone(),
        );
        registry.register(
            "vllm:kv_cache_usage_perc",
            "KV blocks held by requests over all KV blocks (0..1, as vLLM's)",
            self.kv_usage.clone(),
        );
        registry.register(
            "vllm:gpu_cache_usage_perc",
            "KV blocks held by requests over all KV blocks (0..1; vLLM's older name)",
            self.kv_usage.clone(),
        );
        registry.register(
            "vllm:prefix_cache_hit_rate",
            "Prompt tokens served from the prefix cache over prompt tokens looked up",
            self.prefix_cache_hit_rate.clone(),
        );
    }

    /// Drops `worker`'s gauges (it left the cluster: its last figures are no longer true).
    pub fn forget(&self, worker: &str) {
        let l = WorkerLabel {
            worker: worker.to_string(),
        };
        self.kv_blocks_used.remove(&l);
        self.kv_blocks_free.remove(&l);
        self.kv_blocks_cached.remove(&l);
        self.requests_waiting.remove(&l);
        self.requests_running.remove(&l);
        self.preemptions.remove(&l);
        self.images_encoded.remove(&l);
        self.prefix_cache_hit_rate.remove(&l);
        self.kv_usage.remove(&l);
    }
}
