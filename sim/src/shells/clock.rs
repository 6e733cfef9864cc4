//! Virtual time for the actor shells: tokio's paused clock, scaled.
//!
//! On a paused runtime tokio jumps its clock to the next timer whenever every task is idle,
//! which is exactly a discrete-event simulator's clock. But tokio's timer wheel counts whole
//! milliseconds, while network hops and short engine steps last microseconds. So the shells
//! run on a [`ScaledClock`]: one simulated microsecond is one tokio millisecond. Everything in
//! the simulated path reads and sleeps on this clock (the runtime's timeouts, leases and
//! heartbeats, the worker loops, the engines, the network), never on tokio's directly.

use crate::time::{SimDuration, SimTime};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use turbine_runtime::clock::Sleep;
use turbine_runtime::Clock;

/// Tokio time per unit of simulated time.
pub const SCALE: u32 = 1000;

/// Simulated time on a paused tokio runtime, `SCALE` times finer than tokio's timers.
#[derive(Clone, Debug)]
pub struct ScaledClock {
    origin: Instant,
    /// Simulated nanoseconds (since `origin`) at which the workload started: [`SimTime`]s
    /// count from there, so the cluster's start-up does not shift the workload's times.
    epoch_ns: Arc<AtomicU64>,
}

impl ScaledClock {
    /// A clock reading zero now. Must be created inside the paused runtime.
    pub fn new() -> Self {
        ScaledClock {
            origin: Instant::now(),
            epoch_ns: Arc::new(AtomicU64::new(0)),
        }
    }

    fn elapsed_ns(&self) -> u64 {
        let tokio_ns = Instant::now()
            .saturating_duration_since(self.origin)
            .as_nanos();
        (tokio_ns / u128::from(SCALE)).min(u128::from(u64::MAX)) as u64
    }

    /// Marks now as time zero of the workload.
    pub fn start_workload(&self) {
        self.epoch_ns.store(self.elapsed_ns(), Ordering::SeqCst);
    }

    /// Simulated time since the workload started (zero before it).
    pub fn sim_now(&self) -> SimTime {
        SimTime(
            self.elapsed_ns()
                .saturating_sub(self.epoch_ns.load(Ordering::SeqCst)),
        )
    }

    /// Sleeps until workload time `at` (at once if it has passed).
    pub async fn sleep_until(&self, at: SimTime) {
        let now = self.sim_now();
        if at > now {
            self.sleep_for(at.since(now)).await;
        }
    }

    /// Sleeps for a simulated duration.
    pub async fn sleep_for(&self, d: SimDuration) {
        self.sleep(Duration::from_nanos(d.0)).await;
    }
}

impl Default for ScaledClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ScaledClock {
    fn now(&self) -> Instant {
        self.origin + Duration::from_nanos(self.elapsed_ns())
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        let scaled = duration.checked_mul(SCALE).unwrap_or(Duration::MAX);
        Box::pin(tokio::time::sleep(scaled))
    }
}
