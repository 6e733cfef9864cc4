//! turbine-kernels: the model side. Knows nothing of actors or the network.
//!
//! Loaders turn a file (GGUF, or an HF directory) into a [`model::ModelConfig`] and
//! [`model::ModelWeights`]; backends (CPU here, CUDA behind a feature) run the Llama-family
//! forward pass over a paged KV cache; sampling turns logits into tokens.

pub mod backend;
pub mod chat;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gguf;
pub mod grammar;
pub mod kv_cache;
pub mod kv_chunks;
pub mod kv_ipc;
pub mod loader;
pub mod model;
pub mod quant;
pub mod safetensors;
pub mod sampling;
pub mod tensor;
pub mod tokenizer;
pub mod vision;
