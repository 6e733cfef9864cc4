//! Synthetic models: named shapes (`synthetic:llama-3-8b`, ...) and seeded weights, so a
//! backend can be built and benchmarked with no model file. The value hash is the one the
//! device's `init_uniform_*` kernels use, so host-generated weights (for comparing the CPU
//! and CUDA backends on identical bytes) follow the same recipe as device-generated ones.

use crate::model::{LayerWeights, ModelConfig, ModelWeights, RopeStyle};
use crate::tensor::{DType, Storage, WeightTensor};
use std::sync::Arc;

/// The model shapes `synthetic:<name>` accepts.
pub const SYNTHETIC_NAMES: &[&str] = &["llama-3-8b", "smollm2-135m", "tiny"];

/// The config of `synthetic:<name>` (the `synthetic:` prefix is optional).
pub fn synthetic_config(name: &str) -> Option<ModelConfig> {
    let name = name.strip_prefix("synthetic:").unwrap_or(name);
    #[allow(clippy::type_complexity)]
    let (h, l, nh, nkv, ffn, vocab, theta): (usize, usize, usize, usize, usize, usize, f32) =
        match name {
            "llama-3-8b" => (4096, 32, 32, 8, 14336, 128256, 500000.0),
            "smollm2-135m" => (576, 30, 9, 3, 1536, 49152, 100000.0),
            "tiny" => (256, 4, 8, 2, 512, 1000, 10000.0),
            _ => return None,
        };
    Some(ModelConfig {
        arch: "llama".into(),
        vocab_size: vocab,
        hidden_size: h,
        n_layers: l,
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: h / nh,
        intermediate_size: ffn,
        rope_theta: theta,
        rope_style: RopeStyle::Interleaved,
        rms_norm_eps: 1e-5,
        max_position: 131072,
        tie_embeddings: false,
    })
}

/// splitmix64's finaliser (same as the device's `mix64`).
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Value `i` of the seeded uniform stream: `offset + scale * u`, u in [-1, 1).
pub fn uniform_value(seed: u64, i: u64, scale: f32, offset: f32) -> f32 {
    let h = mix64(seed ^ mix64(i));
    let u = (h >> 40) as f32 * (1.0 / 8388608.0) - 1.0;
    offset + scale * u
}

/// How each weight of a synthetic model is drawn: (seed, scale, offset). Linear weights get
/// variance ~1/in so activations stay O(1); the output head is 4x larger so greedy decoding
/// has clear margins; norm weights are 1 ± 0.1.
#[derive(Clone, Copy, Debug)]
pub struct Draw {
    pub seed: u64,
    pub scale: f32,
    pub offset: f32,
}

/// Roles of the tensors of one layer, in a fixed order (seeds derive from the index).
pub const LAYER_ROLES: [&str; 9] = [
    "attn_norm",
    "wq",
    "wk",
    "wv",
    "wo",
    "ffn_norm",
    "w_gate",
    "w_up",
    "w_down",
];

/// Draw parameters of a tensor: `layer` None for the global tensors (embedding 0, output
/// norm 1, head 2).
pub fn draw_for(seed: u64, layer: Option<usize>, role: usize, fan_in: usize) -> Draw {
    let id = match layer {
        None => role as u64,
        Some(l) => 16 + (l as u64) * 16 + role as u64,
    };
    let s = mix64(seed ^ mix64(0xC0FFEE ^ id));
    let lin = (3.0 / fan_in.max(1) as f32).sqrt();
    let (scale, offset) = match (layer, role) {
        (None, 0) => (1.0, 0.0),
        (None, 1) => (0.1, 1.0),
        (None, _) => (4.0 * lin, 0.0),
        (Some(_), 0) | (Some(_), 5) => (0.1, 1.0),
        _ => (lin, 0.0),
    };
    Draw {
        seed: s,
        scale,
        offset,
    }
}

fn bf16_tensor(name: String, shape: Vec<usize>, d: Draw) -> WeightTensor {
    let n: usize = shape.iter().product();
    let mut bytes = Vec::with_capacity(n * 2);
    for i in 0..n {
        let v = half::bf16::from_f32(uniform_value(d.seed, i as u64, d.scale, d.offset));
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    WeightTensor {
        name,
        dtype: DType::BF16,
        shape,
        storage: Storage::Owned(Arc::new(bytes)),
    }
}

fn f32_tensor(name: String, len: usize, d: Draw) -> WeightTensor {
    let mut bytes = Vec::with_capacity(len * 4);
    for i in 0..len {
        bytes.extend_from_slice(&uniform_value(d.seed, i as u64, d.scale, d.offset).to_le_bytes());
    }
    WeightTensor {
        name,
        dtype: DType::F32,
        shape: vec![len],
        storage: Storage::Owned(Arc::new(bytes)),
    }
}

/// Host-side synthetic weights (bf16 matrices, f32 norms) for small configs: the same bytes
/// can be given to the CPU and the CUDA backend.
pub fn synthetic_weights(c: &ModelConfig, seed: u64) -> ModelWeights {
    let (h, q, kv, f) = (
        c.hidden_size,
        c.n_heads * c.head_dim,
        c.n_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    let layers = (0..c.n_layers)
        .map(|l| {
            let d = |role: usize, fan_in: usize| draw_for(seed, Some(l), role, fan_in);
            let nm = |s: &str| format!("blk.{l}.{s}");
            LayerWeights {
                attn_norm: f32_tensor(nm("attn_norm"), h, d(0, h)),
                wq: bf16_tensor(nm("wq"), vec![q, h], d(1, h)),
                wk: bf16_tensor(nm("wk"), vec![kv, h], d(2, h)),
                wv: bf16_tensor(nm("wv"), vec![kv, h], d(3, h)),
                wo: bf16_tensor(nm("wo"), vec![h, q], d(4, q)),
                bq: None,
                bk: None,
                bv: None,
                ffn_norm: f32_tensor(nm("ffn_norm"), h, d(5, h)),
                w_gate: bf16_tensor(nm("w_gate"), vec![f, h], d(6, h)),
                w_up: bf16_tensor(nm("w_up"), vec![f, h], d(7, h)),
                w_down: bf16_tensor(nm("w_down"), vec![h, f], d(8, f)),
            }
        })
        .collect();
    ModelWeights {
        token_embd: bf16_tensor(
            "token_embd".into(),
            vec![c.vocab_size, h],
            draw_for(seed, None, 0, h),
        ),
        layers,
        output_norm: f32_tensor("output_norm".into(), h, draw_for(seed, None, 1, h)),
        output: Some(bf16_tensor(
            "output".into(),
            vec![c.vocab_size, h],
            draw_for(seed, None, 2, h),
        )),
    }
}
