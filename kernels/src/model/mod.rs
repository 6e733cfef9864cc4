//! The Llama-family model: configuration and weights, shared by every backend.

pub mod config;
pub mod weights;

pub use config::{ModelConfig, RopeStyle};
pub use weights::{LayerWeights, ModelWeights};
