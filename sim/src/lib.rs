//! turbine-sim: runs turbine's own nodes on virtual time.
//!
//! A run ([`run`]) composes the frontend's node (router service + KV index, dispatcher,
//! embedded registry, discovery watch) and N worker nodes (engine loop around the real
//! `Scheduler` + `BlockManager`, `WorkerService` actor, registration under a lease, KV and
//! load publishing) with `turbine_actors::node`, exactly as `turbine up` and `turbine worker`
//! do, on a current-thread tokio runtime with paused time ([`shells`]). What is simulated:
//! the executor (a cost-model step time, [`profile`]), the network between the nodes
//! ([`network`]: latency, loss, reordering, partitions), crashes per a fault plan
//! ([`faults`]) and the clients. All randomness comes from one seed ([`rng`]); the event log
//! hash ([`eventlog`]) is the determinism check. See docs/SIMULATOR.md.

pub mod campaign;
pub mod cli;
pub mod eventlog;
pub mod faults;
pub mod network;
pub mod plot;
pub mod profile;
pub mod report;
pub mod rng;
pub mod run;
pub mod shells;
pub mod time;
pub mod worker;
pub mod workload;

pub use cli::{build_config, build_workload, comparison_table, run, run_cli, SimArgs};
pub use report::{Report, Slo};
pub use run::{simulate, Outcome, SimConfig, SimError, SimOutcome};
pub use shells::simulate_actors;
