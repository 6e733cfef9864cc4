//! Custom stages: user-written actors every request passes before routing.
//!
//! A stage is a Rust type implementing [`Stage`] (`on_request`: inspect, rewrite or reject
//! a request; optionally `on_stream`: a [`StreamFilter`] that observes or transforms the
//! text of each output stream). A binary registers stages by name in a [`StageRegistry`];
//! the cluster file lists the ones to run under `stages:`, in order. Each runs as a
//! supervised actor ([`StageService`], [`StageHandler`]) in the frontend's process, or in a
//! process of its own (`turbine worker --role stage --stage NAME`) reached over the request
//! plane; the frontend walks them through its [`StageChain`]. docs/STAGES.md teaches
//! writing one; `examples/stages/` holds two.
//!
//! ```
//! use async_trait::async_trait;
//! use turbine_actors::stages::{Stage, StageError, StageRequest};
//!
//! /// Refuses requests without an API key.
//! struct NeedsKey;
//!
//! #[async_trait]
//! impl Stage for NeedsKey {
//!     async fn on_request(&mut self, request: &mut StageRequest) -> Result<(), StageError> {
//!         match request.meta.api_key {
//!             Some(_) => Ok(()),
//!             None => Err(StageError::invalid_api_key("an API key is required")),
//!         }
//!     }
//! }
//!
//! let mut registry = turbine_actors::stages::StageRegistry::new();
//! registry.register("needs_key", |_config| Ok(Box::new(NeedsKey)));
//! assert_eq!(registry.names(), ["needs_key"]);
//! ```

pub mod api;
pub mod chain;
pub mod registry;
pub mod service;

pub use api::{parse_config, RequestMeta, Stage, StageError, StageRequest, StreamFilter};
pub use chain::{StageChain, StageFlow, StageLink};
pub use registry::{StageFactory, StageRegistry};
pub use service::{StageCall, StageHandler, StageReply, StageService};
