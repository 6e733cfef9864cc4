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
//! Its shell and the world around it:
//! - [`tap`]: the interval's observations, written by the serving path ([`tap::MeteredEngine`]
//!   in the frontend, the simulator's client);
//! - [`actor`]: every interval, observe, decide, act through a connector;
//! - [`connector`]: the one trait; [`local`]: `turbine worker` processes on this machine;
//!   [`kubernetes`]: workloads' scale (the simulator's connector is in `turbine-sim`).

pub mod actor;
pub mod capacity;
pub mod config;
pub mod connector;
pub mod core;
pub mod kalman;
pub mod kubernetes;
pub mod limits;
pub mod local;
pub mod predictor;
pub mod prometheus;
pub mod sla;
pub mod tap;

pub use self::core::{Decision, Forecast, IntervalMetrics, Planner, Pressure, Replicas};
pub use config::{ConnectorConfig, PlannerConfig, PlannerConfigError, PredictorConfig};
