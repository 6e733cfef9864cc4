//! turbine-sim: runs turbine's scheduling and routing logic on virtual time.
//!
//! A discrete-event core ([`queue::EventQueue`], ordered by (time, sequence number)) drives a
//! simulated cluster ([`cluster`]): one router node and N workers, each worker being the real
//! `turbine_actors::worker::Scheduler` + `BlockManager` with a cost-model step time
//! ([`profile`]); messages cross a simulated network ([`network`]) with latency, loss,
//! reordering and partitions; workers crash and restart per a fault plan ([`faults`]).
//! All randomness comes from one seed ([`rng`]); the event log hash ([`eventlog`]) is the
//! determinism check. See docs/SIMULATOR.md.

pub mod cli;
pub mod cluster;
pub mod eventlog;
pub mod faults;
pub mod network;
pub mod profile;
pub mod queue;
pub mod real_router;
pub mod report;
pub mod rng;
pub mod router;
pub mod shells;
pub mod time;
pub mod worker;
pub mod workload;

pub use cli::{build_config, build_workload, comparison_table, run, run_cli, SimArgs};
pub use cluster::{simulate, simulate_with, Outcome, RouterImpl, SimConfig, SimError, SimOutcome};
pub use report::{Report, Slo};
pub use shells::simulate_actors;
