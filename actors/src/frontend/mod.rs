//! The OpenAI-compatible HTTP frontend.
//!
//! `openai` holds the wire types, `validate` turns a body into a [`engine::GenerateRequest`],
//! `engine` is the seam to whatever generates tokens, `generation` drives one engine stream
//! (stop strings, token counting), `render` shapes responses, `http` is the axum server and
//! `metrics` the Prometheus registry it exposes.

pub mod engine;
pub mod error;
pub mod generation;
pub mod http;
pub mod metrics;
pub mod openai;
pub mod render;
pub mod validate;

pub use engine::{
    ChatEngine, ChatMessage, Delta, DeltaStream, EngineError, GenerateRequest, Prompt,
    TokenLogprobs, TopLogprob, Usage,
};
pub use error::ApiError;
pub use http::{router, serve, HttpConfig};
pub use metrics::Metrics;
