//! The OpenAI-compatible HTTP frontend.
//!
//! `openai` holds the wire types, `fields` the table of every request field and what is
//! done with it, `validate` turns a body into a [`validate::Validated`] request (one
//! [`engine::GenerateRequest`] per choice),
//! `engine` is the seam to whatever generates tokens, `generation` drives one engine stream
//! (stop strings, token counting), `render` shapes responses, `http` is the axum server and
//! `metrics` the Prometheus registry it exposes, `admission` the overload limits and
//! request deadlines.
//!
//! Wiring (what `turbine up` does once an engine exists):
//! ```ignore
//! let metrics = Metrics::new(); // or Metrics::with_registry(shared) / metrics.register(..)
//! let app = frontend::router(Arc::new(my_engine), metrics.clone(), HttpConfig::default());
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8000").await?;
//! frontend::serve(listener, app, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! ```

pub mod admission;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod fields;
pub mod generation;
pub mod http;
pub mod images;
pub mod metrics;
pub mod openai;
pub mod pipeline;
pub mod render;
pub mod request_id;
pub mod stages;
pub mod tools;
pub mod validate;

pub use engine::{
    ChatEngine, ChatMessage, Delta, DeltaStream, EngineError, GenerateRequest, Prompt,
    TokenLogprobs, TopLogprob, Usage,
};
pub use error::ApiError;
pub use http::{router, serve, HttpConfig, Readiness};
pub use images::ImageLimits;
pub use metrics::Metrics;
