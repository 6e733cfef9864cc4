//! Router decisions on `/metrics`, read from the router at scrape time.
//!
//! WHY a collector instead of counters bumped on the request path: the dispatcher already
//! counts every decision it received ([`Dispatcher::worker_route_counts`]; the router may be
//! in another process, so the frontend counts what it was told); reading it when
//! Prometheus scrapes keeps the request path free of metric code, and a scrape right after a
//! response always includes that response's decision (no mirror task to lag behind).
//!
//! Exported (all labelled by `worker`, the worker's id):
//! - `turbine_router_decisions_total`: requests routed to the worker;
//! - `turbine_router_overlap_blocks_total`: request blocks the KV index said the worker
//!   already held when it was chosen;
//! - `turbine_router_request_blocks_total`: full blocks of the requests routed to it.
//!
//! The frontend's queue of requests held while every worker is busy (`router.busy_threshold`;
//! the dispatcher holds them, wherever the router runs):
//! - `turbine_router_queued_requests` (gauge): held now;
//! - `turbine_router_all_busy_total`: requests that found every worker busy and were held;
//! - `turbine_router_queue_timeouts_total`: held ones refused after `router.queue_timeout_ms`.
//!
//! The router's own view, when it runs in this process ([`RouterStateCollector`]):
//! - `turbine_router_in_flight_requests{worker}` (gauge): requests routed to the worker
//!   and not finished, by this router or (`router.replica_sync`) by its peers;
//! - `turbine_router_replica_peers` (gauge): peer replicas followed;
//! - `turbine_router_replica_events_total`: peer routing events applied;
//! - `turbine_router_replica_resyncs_total`: a peer's in-flight requests dropped (a gap in
//!   its events, or it left).

use super::dispatch::{Dispatcher, QueueStats};
use super::kv_router::{KvRouter, WorkerRouteCounts};
use super::service::RouterCore;
use crate::ids::WorkerId;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: String,
}

/// Whatever counts routing decisions per worker: the frontend's dispatcher (what it was
/// told), or a router itself.
pub trait RouteCounts: Send + Sync + 'static {
    fn worker_route_counts(&self) -> Vec<(WorkerId, WorkerRouteCounts)>;

    /// The queue of requests held while every worker is busy, where this source holds one.
    fn queue_stats(&self) -> Option<QueueStats> {
        None
    }
}

impl RouteCounts for Dispatcher {
    fn worker_route_counts(&self) -> Vec<(WorkerId, WorkerRouteCounts)> {
        Dispatcher::worker_route_counts(self)
    }

    fn queue_stats(&self) -> Option<QueueStats> {
        Some(Dispatcher::queue_stats(self))
    }
}

impl RouteCounts for Mutex<KvRouter> {
    fn worker_route_counts(&self) -> Vec<(WorkerId, WorkerRouteCounts)> {
        // A panic elsewhere while holding the router lock does not make its counters wrong.
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .worker_route_counts()
    }
}

/// Register with `registry.register_collector(Box::new(RouterCollector::new(source)))`.
pub struct RouterCollector {
    source: Arc<dyn RouteCounts>,
}

impl RouterCollector {
    pub fn new(source: Arc<dyn RouteCounts>) -> Self {
        RouterCollector { source }
    }
}

impl std::fmt::Debug for RouterCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouterCollector")
    }
}

impl Collector for RouterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.source.worker_route_counts();
        type Pick = fn(&WorkerRouteCounts) -> u64;
        let families: [(&str, &str, Pick); 3] = [
            (
                "turbine_router_decisions",
                "Requests the router sent to each worker",
                |c| c.decisions,
            ),
            (
                "turbine_router_overlap_blocks",
                "Request KV blocks the chosen worker already held, per the KV index",
                |c| c.overlap_blocks,
            ),
            (
                "turbine_router_request_blocks",
                "Full KV blocks of the requests routed to each worker",
                |c| c.request_blocks,
            ),
        ];
        for (name, help, pick) in families {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (worker, c) in &counts {
                let label = WorkerLabel {
                    worker: worker.to_string(),
                };
                ConstCounter::new(pick(c)).encode(family.encode_family(&label)?)?;
            }
        }
        if let Some(q) = self.source.queue_stats() {
            let gauge = encoder.encode_descriptor(
                "turbine_router_queued_requests",
                "Requests held at the frontend while every worker is busy (router.busy_threshold)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(q.queued as i64).encode(gauge)?;
            let counters: [(&str, &str, u64); 2] = [
                (
                    "turbine_router_all_busy",
                    "Requests that found every worker busy and were held",
                    q.all_busy,
                ),
                (
                    "turbine_router_queue_timeouts",
                    "Held requests refused after router.queue_timeout_ms",
                    q.timeouts,
                ),
            ];
            for (name, help, value) in counters {
                let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                ConstCounter::new(value).encode(family)?;
            }
        }
        Ok(())
    }
}

/// The router's own state on `/metrics`, read from its core at scrape time (a router in
/// this process): in-flight requests per worker and replica sync. Register with
/// `registry.register_collector(Box::new(RouterStateCollector::new(core)))`.
pub struct RouterStateCollector {
    core: Arc<RouterCore>,
}

impl RouterStateCollector {
    pub fn new(core: Arc<RouterCore>) -> Self {
        RouterStateCollector { core }
    }
}

impl std::fmt::Debug for RouterStateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouterStateCollector")
    }
}

impl Collector for RouterStateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "turbine_router_in_flight_requests",
            "Requests routed to each worker and not finished, by this router or its replica peers",
            None,
            MetricType::Gauge,
        )?;
        for (worker, n) in self.core.in_flight_by_worker() {
            let label = WorkerLabel {
                worker: worker.to_string(),
            };
            ConstGauge::new(i64::from(n)).encode(family.encode_family(&label)?)?;
        }
        let r = self.core.replica_stats();
        let peers = encoder.encode_descriptor(
            "turbine_router_replica_peers",
            "Router replicas this router follows (router.replica_sync)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(r.peers as i64).encode(peers)?;
        let counters: [(&str, &str, u64); 2] = [
            (
                "turbine_router_replica_events",
                "Routing events of peer replicas applied to this router's view",
                r.events_applied,
            ),
            (
                "turbine_router_replica_resyncs",
                "Times a peer replica's in-flight requests were dropped (events lost, or it left)",
                r.resyncs,
            ),
        ];
        for (name, help, value) in counters {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(family)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RequestId;
    use crate::kv::hash::BlockHash;
    use crate::router::{RouteRequest, RouterConfig, RouterReplicaId};
    use prometheus_client::registry::Registry;
    use std::time::Duration;

    #[test]
    fn scrape_shows_each_workers_decisions() {
        let mut router = KvRouter::new(RouterReplicaId(0), RouterConfig::default(), None)
            .expect("default config is valid");
        router.add_worker(WorkerId(3));
        let req = RouteRequest {
            id: RequestId(1),
            hashes: vec![BlockHash(1), BlockHash(2)],
            token_count: 32,
            avoid: Vec::new(),
            overrides: Default::default(),
        };
        router.route(Duration::ZERO, &req).expect("one worker");
        let router = Arc::new(Mutex::new(router));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(RouterCollector::new(router.clone())));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(
            text.contains("turbine_router_decisions_total{worker=\"w3\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("turbine_router_request_blocks_total{worker=\"w3\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("turbine_router_overlap_blocks_total{worker=\"w3\"} 0"),
            "{text}"
        );
    }
}
