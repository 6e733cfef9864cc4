//! Client-side tools that measure an OpenAI-compatible server (turbine's or any other).
//!
//! `serve` is the load generator behind `turbine bench serve`; the other modules are its
//! parts, public so that tests and other tools can reuse them.

pub mod client;
pub mod prompts;
pub mod serve;
pub mod sse;
pub mod stats;
pub mod trace;
