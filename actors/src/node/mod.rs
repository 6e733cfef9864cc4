//! The serving engine's actor shells: the executor (a backend on its own OS thread) and the
//! worker loop that drives the pure scheduler against it.

pub mod device;
pub mod dispatch;
pub mod executor;
pub mod local;
pub mod metrics;
pub mod pipeline;
pub mod remote;
pub mod service;
pub mod worker;
pub mod worker_process;

pub use executor::{ExecError, ExecSeq, Executor, SampleSpec, SimulatedEngine};
pub use worker::{EngineTime, KvEventSink, TokenStream, WorkerError, WorkerHandle};
