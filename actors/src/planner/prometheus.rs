//! Planner decisions on `/metrics`, read from the decision log at scrape time (as the
//! router's are from the dispatcher: no metric code in the planner's loop).
//!
//! Exported:
//! - `turbine_planner_decisions_total{kind}`: decisions taken, `kind` = `interval` (every
//!   adjustment interval) or `reaction` (between intervals, on pressure);
//! - `turbine_planner_apply_failures_total`: decisions the connector failed to carry out;
//! - `turbine_planner_target_replicas{pool}` / `turbine_planner_applied_replicas{pool}`: the
//!   latest decision's pool sizes and what the connector reported running, `pool` =
//!   `workers` (aggregated) or `prefill` / `decode`.

use super::actor::DecisionLog;
use super::core::Replicas;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    pool: &'static str,
}

/// Register with `registry.register_collector(Box::new(PlannerCollector::new(log)))`.
#[derive(Debug)]
pub struct PlannerCollector {
    log: DecisionLog,
}

impl PlannerCollector {
    pub fn new(log: DecisionLog) -> PlannerCollector {
        PlannerCollector { log }
    }
}

fn pools(r: Replicas) -> Vec<(&'static str, usize)> {
    match r {
        Replicas::Aggregated { workers } => vec![("workers", workers)],
        Replicas::Disaggregated { prefill, decode } => {
            vec![("prefill", prefill), ("decode", decode)]
        }
    }
}

impl Collector for PlannerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (interval, reaction, failures, last) = {
            let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            let reaction = log.iter().filter(|r| r.reaction.is_some()).count() as u64;
            let failures = log.iter().filter(|r| r.applied.is_none()).count() as u64;
            let last = log.last().map(|r| (r.target, r.applied));
            (log.len() as u64 - reaction, reaction, failures, last)
        };
        let mut family = encoder.encode_descriptor(
            "turbine_planner_decisions",
            "Planner decisions by kind (interval, reaction)",
            None,
            MetricType::Counter,
        )?;
        for (kind, n) in [("interval", interval), ("reaction", reaction)] {
            ConstCounter::new(n).encode(family.encode_family(&KindLabel { kind })?)?;
        }
        let metric = encoder.encode_descriptor(
            "turbine_planner_apply_failures",
            "Planner decisions the connector failed to carry out",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(failures).encode(metric)?;
        let (target, applied) = match last {
            Some((t, a)) => (Some(t), a),
            None => (None, None),
        };
        for (name, help, replicas) in [
            (
                "turbine_planner_target_replicas",
                "Workers per pool the planner's latest decision asked for",
                target,
            ),
            (
                "turbine_planner_applied_replicas",
                "Workers per pool running after the latest decision, as the connector reported",
                applied,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (pool, n) in replicas.map(pools).unwrap_or_default() {
                ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&PoolLabel { pool })?)?;
            }
        }
        Ok(())
    }
}
