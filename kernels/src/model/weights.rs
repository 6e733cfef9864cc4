//! The model's weights, by role rather than by file-specific tensor name. Loaders (GGUF,
//! safetensors) map their names onto this; backends consume it.

use crate::tensor::WeightTensor;

#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attn_norm: WeightTensor,
    pub wq: WeightTensor,
    pub wk: WeightTensor,
    pub wv: WeightTensor,
    pub wo: WeightTensor,
    /// Qwen2 has biases on q/k/v; Llama has none.
    pub bq: Option<WeightTensor>,
    pub bk: Option<WeightTensor>,
    pub bv: Option<WeightTensor>,
    pub ffn_norm: WeightTensor,
    pub w_gate: WeightTensor,
    pub w_up: WeightTensor,
    pub w_down: WeightTensor,
}

#[derive(Clone, Debug)]
pub struct ModelWeights {
    /// `[vocab_size, hidden_size]`.
    pub token_embd: WeightTensor,
    pub layers: Vec<LayerWeights>,
    pub output_norm: WeightTensor,
    /// `[vocab_size, hidden_size]`; `None` when tied to `token_embd`.
    pub output: Option<WeightTensor>,
}

impl ModelWeights {
    /// The output head's weight: its own, or the tied embedding.
    pub fn lm_head(&self) -> &WeightTensor {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }
}
