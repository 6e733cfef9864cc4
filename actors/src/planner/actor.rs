//! The planner's shell: every `adjustment_interval` it drains the interval's observations
//! from a [`LoadTap`], calls the pure [`Planner`]'s `observe` then `decide`, and hands the
//! target to a [`Connector`]. Each decision is written to a [`DecisionLog`] (the simulator
//! compares two runs' logs; `turbine up` logs them with `tracing`).
//!
//! A connector that fails (a process that would not start) is logged (`applied: None` in
//! the record) and the next interval decides and applies again; the loop itself never
//! stops on a bad interval.

use super::connector::Connector;
use super::core::{Forecast, IntervalMetrics, Planner, Replicas};
use super::tap::LoadTap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use turbine_runtime::SharedClock;

/// One interval's decision, as the planner took it.
#[derive(Clone, Debug, PartialEq)]
pub struct DecisionRecord {
    /// Since the planner started.
    pub at: Duration,
    pub observed: IntervalMetrics,
    pub forecast: Option<Forecast>,
    /// What the planner asked for.
    pub target: Replicas,
    /// What the connector reported running afterwards (`None`: it failed).
    pub applied: Option<Replicas>,
}

impl DecisionRecord {
    /// One line: time, observed requests, forecast requests, target and applied workers.
    pub fn line(&self) -> String {
        let forecast = self
            .forecast
            .map(|f| format!("{:.2}", f.requests))
            .unwrap_or_else(|| "-".into());
        let applied = self
            .applied
            .map(|r| r.total().to_string())
            .unwrap_or_else(|| "failed".into());
        format!(
            "t={:.3}s requests={} forecast={} target={:?} applied={}",
            self.at.as_secs_f64(),
            self.observed.requests,
            forecast,
            self.target,
            applied
        )
    }
}

/// Where decisions are kept (shared with whoever reads them: the simulator's report, a
/// test).
pub type DecisionLog = Arc<Mutex<Vec<DecisionRecord>>>;

/// The interval's observations, taken once per interval (a [`LoadTap`]'s `take`, or the
/// simulator's records).
pub type Observe = Box<dyn FnMut() -> IntervalMetrics + Send>;

/// An [`Observe`] that drains `tap`.
pub fn from_tap(tap: LoadTap) -> Observe {
    Box::new(move || tap.take())
}

/// Runs the planner until the returned task is aborted.
pub fn spawn_planner(
    mut planner: Planner,
    interval: Duration,
    mut observe: Observe,
    mut connector: Box<dyn Connector>,
    clock: SharedClock,
    log: DecisionLog,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let start = clock.now();
        loop {
            clock.sleep(interval).await;
            let now = clock.now().saturating_duration_since(start);
            let observed = observe();
            planner.observe(now, &observed);
            let decision = planner.decide(now);
            let applied = match connector.apply(decision.replicas).await {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!("planner: {e}");
                    None
                }
            };
            let record = DecisionRecord {
                at: now,
                observed,
                forecast: decision.forecast,
                target: decision.replicas,
                applied,
            };
            tracing::info!("planner: {}", record.line());
            log.lock().unwrap_or_else(|e| e.into_inner()).push(record);
        }
    })
}
