//! turbine-runtime: a generic actor runtime on ractor + tokio.
//!
//! Supervision, location-transparent service addresses (local actors, or remote ones
//! through a ZeroMQ-bridged proxy), the wire format, the request / event / discovery
//! planes, a [`Clock`] (real or simulated), config loading and telemetry. No LLM words
//! live here.
//!
//! # The model in five lines
//! * A [`Service`] names a request and a response type. A [`Handler`] serves it with
//!   `&mut self` inside a supervised ractor actor ([`Node::serve`]); a handler that
//!   panics or returns [`HandlerError::fatal`] is restarted from its factory per the
//!   [`RestartPolicy`], and the [`SupervisorEvent`]s say why.
//! * An [`Addr<S>`] is the only handle callers use: [`Addr::call`] (with the configured
//!   timeout), [`Addr::cast`], [`Addr::stream`]. It is the same type whether the service is
//!   in this process (requests are moved, never serialised) or on another [`Node`]
//!   (requests travel as MessagePack [`wire::Envelope`]s over ZeroMQ, one ROUTER bound per
//!   node, one DEALER per peer).
//! * Streams are bounded end to end (local channels; a credit window across the wire), and
//!   dropping a [`ReplyStream`] cancels the producer ([`StreamSink::send`] fails,
//!   [`StreamSink::cancelled`] fires).
//! * Failures are typed: [`CallError::UnknownActor`], [`CallError::Timeout`],
//!   [`CallError::PeerGone`], [`CallError::Handler`], ... Bad frames are dropped and
//!   counted ([`RuntimeMetrics::dropped`]); the connection lives on.
//! * Event plane: [`events::EventPublisher`] / [`events::EventSubscriber`] (PUB/SUB with
//!   per-publisher sequence numbers and [`events::Gap`] notices). Discovery plane:
//!   [`discovery::Discovery`] with static and embedded (leased registry) backends.
//!
//! # Example
//! ```
//! use async_trait::async_trait;
//! use serde::{Deserialize, Serialize};
//! use turbine_runtime::{Handler, HandlerError, Node, NodeConfig, RequestCtx, Service};
//!
//! /// The protocol: a marker type with request and response types.
//! struct Greeter;
//! #[derive(Serialize, Deserialize)]
//! struct Hello(String);
//! impl Service for Greeter {
//!     type Req = Hello;
//!     type Resp = String;
//! }
//!
//! /// The server side: state plus a handler, run inside a supervised actor.
//! struct GreeterHandler {
//!     greeted: u64,
//! }
//! #[async_trait]
//! impl Handler<Greeter> for GreeterHandler {
//!     async fn call(&mut self, req: Hello, _ctx: &RequestCtx) -> Result<String, HandlerError> {
//!         self.greeted += 1;
//!         Ok(format!("hello {} (#{})", req.0, self.greeted))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Two nodes on loopback; port 0 picks a free port.
//! let server = Node::start(NodeConfig { name: "server".into(), ..NodeConfig::default() }).await?;
//! let client = Node::start(NodeConfig { name: "client".into(), ..NodeConfig::default() }).await?;
//! server.serve::<Greeter, _, _>("greeter", || GreeterHandler { greeted: 0 }).await?;
//!
//! // The same Addr API, remote or local.
//! let remote = client.connect::<Greeter>(server.endpoint(), "greeter").await?;
//! assert_eq!(remote.call(Hello("ada".into())).await?, "hello ada (#1)");
//! let local = server.local::<Greeter>("greeter")?;
//! assert_eq!(local.call(Hello("bob".into())).await?, "hello bob (#2)");
//! # Ok(())
//! # }
//! ```
//!
//! # Modules
//! * [`node`]: [`Node`] (sockets, service registry), [`NodeConfig`].
//! * [`addr`], [`service`]: the caller's and the callee's API.
//! * [`supervisor`]: a reusable one-child supervisor for any ractor actor.
//! * [`wire`]: envelope, frame encoding, frame errors.
//! * [`events`], [`discovery`]: the event and discovery planes.
//! * [`transfer`]: the transfer plane (bulk bytes pulled by descriptor, outside envelopes).
//! * [`clock`], [`config`], [`telemetry`]: time, YAML config, logs, OpenTelemetry traces
//!   (the trace context travels in every envelope) and Prometheus.

pub mod addr;
pub mod clock;
pub mod config;
pub mod discovery;
pub mod events;
pub mod link;
mod local;
pub mod node;
mod peer;
pub mod service;
pub mod supervisor;
pub mod telemetry;
pub mod transfer;
pub mod wire;

pub use addr::{Addr, ReplyStream};
pub use clock::{Clock, ManualClock, SharedClock, TokioClock};
pub use config::{from_yaml_str, load_yaml, ConfigError};
pub use link::{Direction, Link, Transit};
pub use node::{Node, NodeConfig, NodeError, ServiceHandle};
pub use service::{
    CallError, Handler, HandlerError, RequestCtx, Service, StreamClosed, StreamSink,
};
pub use supervisor::{RestartPolicy, SupervisorEvent};
pub use telemetry::{init_tracing, DropReason, MetricsRegistry, RuntimeMetrics, TraceContext};
