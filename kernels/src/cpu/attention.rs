//! Grouped-query attention over the paged KV pool.
//!
//! Each (token, query head) pair is an independent task: it reads the K/V of every position
//! up to and including its own through its sequence's block table, so a prefill chunk is
//! causal within itself and sees everything cached before it.
//!
//! Precision: K and V are stored rounded to f16 (see `kv_cache`), and like llama.cpp's
//! (non-flash) attention, which multiplies in f16 with f32 accumulation, the query and the
//! normalised attention weights are rounded to f16 before their dot products. That keeps
//! greedy decoding on real models token-for-token with llama.cpp where f32 attention would
//! drift on near-ties.

use crate::kv_cache::PagedKvPool;
use rayon::prelude::*;

/// Where one token of the flattened batch sits.
#[derive(Clone, Copy, Debug)]
pub struct TokenSlot<'a> {
    pub pos: usize,
    pub block_table: &'a [u32],
}

pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// `out[t][h] = softmax(q[t][h] . K[0..=pos_t] / sqrt(d)) V[0..=pos_t]` for every token `t`
/// and query head `h` (KV head `h / group`). `q` and `out` are `[tokens][n_heads][head_dim]`.
/// The new tokens' K/V must already be in the pool.
pub fn attention(
    pool: &PagedKvPool,
    layer: usize,
    shape: &AttentionShape,
    tokens: &[TokenSlot<'_>],
    q: &[f32],
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let group = (shape.n_heads / shape.n_kv_heads.max(1)).max(1);
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
        let (t, h) = (idx / shape.n_heads, idx % shape.n_heads);
        let (Some(tok), Some(qh)) = (tokens.get(t), q.get(idx * hd..(idx + 1) * hd)) else {
            return;
        };
        let kv_off = (h / group) * hd;
        let qh: Vec<f32> = qh.iter().map(|&x| round_f16(x)).collect();
        let qh = &qh[..];
        let bs = shape.block_size;
        let row = shape.n_kv_heads * hd;
        let len = tok.pos + 1;
        let mut scores = Vec::with_capacity(len);
        let mut max = f32::NEG_INFINITY;
        for (bi, &block) in tok.block_table.iter().take(len.div_ceil(bs)).enumerate() {
            let (kb, _) = pool.block(layer, block);
            let slots = (len - bi * bs).min(bs);
            for k in kb.chunks_exact(row).take(slots) {
                let s = dot(qh, k.get(kv_off..kv_off + hd).unwrap_or(&[])) * scale;
                max = max.max(s);
                scores.push(s);
            }
        }
        let mut sum = 0.0f64;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s as f64;
        }
        let inv = (1.0 / sum) as f32;
        o.fill(0.0);
        let mut weights = scores.iter();
        for &block in tok.block_table.iter().take(len.div_ceil(bs)) {
            let (_, vb) = pool.block(layer, block);
            for (v, &w) in vb.chunks_exact(row).zip(weights.by_ref().take(bs)) {
                let w = round_f16(w * inv);
                for (a, &b) in o.iter_mut().zip(&v[kv_off..kv_off + hd]) {
                    *a += w * b;
                }
            }
        }
    });
}

/// `x` rounded to the nearest f16 value (kept as f32).
#[inline]
pub fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}
