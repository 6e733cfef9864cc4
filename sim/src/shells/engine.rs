//! The simulated engine behind a real worker loop: the profile's cost model prices each step
//! (times the fault plan's slowdown for the worker's slot, if one covers the step's start)
//! and a pure function of (request, index) stands in for the sampler.

use super::clock::ScaledClock;
use crate::eventlog::EventLog;
use crate::faults::FaultPlan;
use crate::profile::{StepCost, StepPricing};
use crate::time::{SimDuration, SimTime};
use crate::worker::sample_step;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use turbine_actors::executor::{ExecError, ExecSeq, SimulatedEngine};
use turbine_actors::ids::WorkerId;
use turbine_actors::worker::SampledToken;

/// Forward-pass time and step count of one worker incarnation.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineCounters {
    pub busy: Duration,
    pub steps: u64,
}

pub struct CostModelEngine {
    pub worker: WorkerId,
    /// The worker's slot, for the fault plan's slowdowns.
    pub slot: u32,
    pub faults: Arc<FaultPlan>,
    /// When the last slowed step (of any worker) ends: the slowdown is over only then.
    pub slowed_until: Arc<Mutex<SimTime>>,
    pub cost: StepCost,
    pub clock: ScaledClock,
    pub log: Arc<Mutex<EventLog>>,
    pub counters: Arc<Mutex<EngineCounters>>,
}

impl SimulatedEngine for CostModelEngine {
    fn step(&self, batch: &[ExecSeq]) -> (Duration, Result<Vec<SampledToken>, ExecError>) {
        let d = self.cost.step_time_of(batch.iter().map(|e| &e.seq));
        // A slow worker (`slow:` faults): the same step, k times as long.
        let now = self.clock.sim_now();
        let slow = self.faults.slowdown(self.slot, now);
        let d = if slow > 1.0 {
            let d = SimDuration((d.0 as f64 * slow) as u64);
            let mut until = self.slowed_until.lock().unwrap_or_else(|e| e.into_inner());
            *until = (*until).max(now.plus(d));
            d
        } else {
            d
        };
        {
            let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            c.busy += Duration::from_nanos(d.0);
            c.steps += 1;
        }
        let tokens: u64 = batch.iter().map(|e| e.seq.tokens.len() as u64).sum();
        self.log.lock().unwrap_or_else(|e| e.into_inner()).record(
            self.clock.sim_now(),
            "step",
            self.worker.0,
            tokens,
            d.0,
        );
        let sampled = sample_step(batch.iter().map(|e| &e.seq));
        (Duration::from_nanos(d.0), Ok(sampled))
    }
}
