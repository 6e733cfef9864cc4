//! The planner's shell: every `adjustment_interval` it drains the interval's observations
//! from a [`LoadTap`], calls the pure [`Planner`]'s `observe` then `decide`, and hands the
//! target to a [`Connector`]. In between, every `reaction_interval`, it reads the pressure
//! (arrivals so far, requests waiting) and, when [`Planner::react`] grows a pool, applies
//! that at once: a surge does not wait for the interval's end. Each decision is written to
//! a [`DecisionLog`] (the simulator compares two runs' logs; `turbine up` logs them with
//! `tracing`).
//!
//! A connector that fails (a process that would not start) is logged (`applied: None` in
//! the record) and the next interval decides and applies again; the loop itself never
//! stops on a bad interval.

use super::connector::Connector;
use super::core::{Decision, Forecast, IntervalMetrics, Planner, Pressure, Replicas};
use super::sla::{Corrections, DecodeNeed, PrefillNeed};
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
    /// Taken between two intervals on the pressure (then `observed` is empty).
    pub reaction: Option<Pressure>,
    /// The SLA math behind the target (`None` before the first observation).
    pub prefill: Option<PrefillNeed>,
    pub decode: Option<DecodeNeed>,
    pub corrections: Corrections,
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
        let kind = match self.reaction {
            Some(p) => format!("reaction arrivals={} queued={:?}", p.arrivals, p.queued),
            None => format!("requests={}", self.observed.requests),
        };
        format!(
            "t={:.3}s {} forecast={} target={:?} applied={}",
            self.at.as_secs_f64(),
            kind,
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

/// The pressure between two intervals (a [`LoadTap`]'s `pressure`, or the simulator's).
pub type Sense = Box<dyn FnMut() -> Pressure + Send>;

/// The planner's inputs: the interval's observations, and how often (with what) it looks
/// in between (`None`: only at intervals).
pub struct Inputs {
    pub interval: Duration,
    pub observe: Observe,
    pub react: Option<(Duration, Sense)>,
}

impl Inputs {
    /// Both from `tap`; reactions every `react_every` unless zero.
    pub fn from_tap(tap: LoadTap, interval: Duration, react_every: Duration) -> Inputs {
        let sense = tap.clone();
        Inputs {
            interval,
            observe: Box::new(move || tap.take()),
            react: (!react_every.is_zero())
                .then(|| (react_every, Box::new(move || sense.pressure()) as Sense)),
        }
    }
}

/// Runs the planner until the returned task is aborted.
pub fn spawn_planner(
    mut planner: Planner,
    mut inputs: Inputs,
    mut connector: Box<dyn Connector>,
    clock: SharedClock,
    log: DecisionLog,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let start = clock.now();
        let interval = inputs.interval;
        let mut since_tick = Duration::ZERO;
        loop {
            let to_tick = interval.saturating_sub(since_tick);
            let step = match &inputs.react {
                Some((every, _)) if *every < to_tick => *every,
                _ => to_tick,
            };
            clock.sleep(step).await;
            since_tick += step;
            let now = clock.now().saturating_duration_since(start);
            let record = if since_tick >= interval {
                since_tick = Duration::ZERO;
                let observed = (inputs.observe)();
                planner.observe(now, &observed);
                let decision = planner.decide(now);
                let mut r = apply(&mut connector, now, &decision).await;
                r.observed = observed;
                r
            } else if let Some((_, sense)) = &mut inputs.react {
                let pressure = sense();
                let Some(decision) = planner.react(now, &pressure) else {
                    continue;
                };
                let mut r = apply(&mut connector, now, &decision).await;
                r.reaction = Some(pressure);
                r
            } else {
                continue;
            };
            tracing::info!("planner: {}", record.line());
            log.lock().unwrap_or_else(|e| e.into_inner()).push(record);
        }
    })
}

/// Hands `decision` to the connector; the record of it.
async fn apply(
    connector: &mut Box<dyn Connector>,
    now: Duration,
    decision: &Decision,
) -> DecisionRecord {
    let applied = match connector.apply(decision.replicas).await {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!("planner: {e}");
            None
        }
    };
    DecisionRecord {
        at: now,
        observed: IntervalMetrics::default(),
        forecast: decision.forecast,
        target: decision.replicas,
        applied,
        reaction: None,
        prefill: decision.prefill,
        decode: decision.decode,
        corrections: decision.corrections,
    }
}
