//! The planner: forecasts the next interval's load and sizes the worker pools to meet the
//! TTFT and ITL targets (DESIGN.md "Planner"; the math is in docs/PLANNER.md).
//!
//! Pure logic only, one job per module:
//! - [`predictor`] / [`kalman`]: per-interval load forecasts (constant, moving average,
//!   Kalman filter with a local linear trend);
//! - [`capacity`]: what one worker can do, read from an engine profile
//!   ([`crate::engine_profile`]);
//! - [`sla`]: forecast load + capacity + targets → fractional workers per pool;
//! - [`limits`]: replica range, device budget, cooldown;
//! - [`core`]: [`Planner`], `observe(now, metrics)` and `decide(now)`;
//! - [`config`]: the cluster file's `planner:` section.
//!
//! The actor that feeds it metrics and its connectors (local processes, Kubernetes, the
//! simulator) are not written yet.

pub mod capacity;
pub mod config;
pub mod core;
pub mod kalman;
pub mod limits;
pub mod predictor;
pub mod sla;

pub use self::core::{Decision, Forecast, IntervalMetrics, Planner, Replicas};
pub use config::{PlannerConfig, PlannerConfigError, PredictorConfig};
