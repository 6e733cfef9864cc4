//! Model hyper-parameters, read from GGUF metadata or an HF `config.json`.

/// How RoPE pairs up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): ggml's "normal" mode; GGUF Llama weights are permuted for it.
    Interleaved,
    /// First half with second half (i, i + d/2): HF's `rotate_half`, and Qwen2 in GGUF.
    Neox,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Architecture name as the file gives it ("llama", "qwen2").
    pub arch: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rms_norm_eps: f32,
    /// Longest context the model was trained for.
    pub max_position: usize,
    /// The output head reuses the token embedding matrix.
    pub tie_embeddings: bool,
}

impl ModelConfig {
    /// Query heads per KV head (grouped-query attention).
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads.max(1)
    }

    /// Bytes of K and V for one token across all layers, at `elem_bytes` per element.
    pub fn kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim * elem_bytes
    }
}
