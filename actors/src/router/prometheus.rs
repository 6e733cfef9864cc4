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

use super::dispatch::Dispatcher;
use super::kv_router::{KvRouter, WorkerRouteCounts};
use crate::ids::WorkerId;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
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
}

impl RouteCounts for Dispatcher {
    fn worker_route_counts(&self) -> Vec<(WorkerId, WorkerRouteCounts)> {
        Dispatcher::worker_route_counts(self)
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
