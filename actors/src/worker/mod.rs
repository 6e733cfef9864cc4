//! The worker's engine core: KV block allocation and continuous-batching scheduling.
//!
//! Pure logic: no I/O, no clock (callers pass `now`), no randomness, deterministic iteration.
//! The worker actor and the simulator drive the very same [`Scheduler`].
//!
//! # Policy
//! - [`block_manager`]: a pool of fixed-size KV blocks with per-sequence block tables and a
//!   prefix cache keyed by `kv::hash` sequence hashes (LRU eviction of unreferenced cached
//!   blocks; `BlockStored` / `BlockRemoved` events).
//! - [`scheduler`]: per step, decodes first (1 token each), then continuing prefill chunks,
//!   then FIFO admission of waiting requests (reusing cached prefixes), all under a token
//!   budget and a sequence cap; when blocks run out, the most recently admitted sequence is
//!   preempted and later recomputed, without re-emitting any token.
//!
//! # Driving it (the actor shell, or the simulator)
//! ```text
//! on request:  scheduler.add_request(req, now)  -> Err(AdmitError) => reply with an error
//! on cancel:   scheduler.abort(id)              (blocks freed at once)
//! loop {
//!     let plan = scheduler.schedule(now)?;       // StepPlan; empty => wait for work
//!     if plan.is_empty() { wait for a request; continue }
//!     // one SeqStep per plan.seqs entry: tokens, start_pos, block_table, want_logits
//!     match backend.forward(&steps) {
//!         Ok(logits) => {
//!             // for each entry with want_logits: sample with
//!             // scheduler.sampling_context(entry.request) and entry.sample_index
//!             let outputs = scheduler.on_step_done(&plan, &sampled, now)?;
//!             stream each (request, TokenOutput); `finish.is_some()` ends that stream
//!         }
//!         Err(e) => stream scheduler.on_step_failed(&plan, &e.to_string())?
//!     }
//!     if let Some(batch) = sequencer.batch(scheduler.drain_kv_events(), ts) { publish }
//! }
//! ```
//! Rules for the driver: at most one step in flight (`schedule` refuses a second one until
//! `on_step_done`/`on_step_failed`); `abort` may be called at any time, also while a step
//! is in flight (its result for that request is dropped; no further step touches its blocks,
//! because nothing is scheduled until the step in flight completes).

pub mod announce;
pub mod bias;
pub mod block_manager;
pub mod config;
pub mod constrained;
pub mod events;
pub mod images;
pub mod metrics;
mod phases;
pub mod plan;
pub mod remote;
pub mod scheduler;
mod sequence;
pub mod service;
pub mod worker_loop;

pub use block_manager::{
    AllocError, BlockId, BlockManager, BlockManagerConfig, BlockStats, InvariantViolation,
    PrefixHit, StartKind,
};
pub use config::{ConfigError, SchedulerConfig};
pub use events::KvEventSequencer;
pub use plan::{
    PromptLogprobsAsk, PromptLogprobsChunk, SampledToken, ScheduledSeq, StepId, StepPlan,
};
pub use scheduler::{
    AdmitError, Prefilled, RemoteKvAdmission, SamplingContext, Scheduler, SchedulerStats, StepError,
};
pub use worker_loop::{EngineTime, KvEventSink, TokenStream, WorkerError, WorkerHandle};
