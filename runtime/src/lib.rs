//! turbine-runtime: a generic actor runtime on ractor + tokio.
//!
//! Supervision trees, location-transparent actor references (local, or remote through a
//! ZeroMQ-bridged proxy), the wire format, the request / event / discovery planes, a `Clock`
//! (real or simulated), config loading and telemetry. No LLM words live here.

pub mod addr;
pub mod clock;
pub mod config;
pub mod discovery;
pub mod events;
mod local;
pub mod node;
mod peer;
pub mod service;
pub mod supervisor;
pub mod telemetry;
pub mod wire;

pub use addr::{Addr, ReplyStream};
pub use clock::{Clock, ManualClock, SharedClock, TokioClock};
pub use config::{from_yaml_str, load_yaml, ConfigError};
pub use node::{Node, NodeConfig, NodeError, ServiceHandle};
pub use service::{
    CallError, Handler, HandlerError, RequestCtx, Service, StreamClosed, StreamSink,
};
pub use supervisor::{RestartPolicy, SupervisorEvent};
pub use telemetry::{DropReason, MetricsRegistry, RuntimeMetrics};
