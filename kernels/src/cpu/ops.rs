//! Element-wise and per-row operations of the Llama-family forward pass.

use crate::model::RopeStyle;

/// RMSNorm of each `weight.len()`-wide row of `x` into `out`: `x / sqrt(mean(x^2) + eps) * w`.
/// The sum of squares is accumulated in f64, as ggml does.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let h = weight.len().max(1);
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = 1.0 / ((ss / h as f64) as f32 + eps).sqrt();
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * scale * w;
        }
    }
}

/// cos/sin of each rotary pair's angle at `pos`: angle_i = pos * base^(-2i/dims), computed
/// as ggml does (a running product of the per-pair ratio, in f32).
pub fn rope_angles(pos: usize, dims: usize, base: f32, out: &mut Vec<(f32, f32)>) {
    out.clear();
    let ratio = base.powf(-2.0 / dims as f32);
    let mut theta = pos as f32;
    for _ in 0..dims / 2 {
        out.push((theta.cos(), theta.sin()));
        theta *= ratio;
    }
}

/// Rotates every head (`head_dim` wide) of one token's row `x` in place.
pub fn apply_rope(x: &mut [f32], head_dim: usize, angles: &[(f32, f32)], style: RopeStyle) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        match style {
            RopeStyle::Interleaved => {
                for (pair, &(c, s)) in head.chunks_exact_mut(2).zip(angles) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            }
            RopeStyle::Neox => {
                let (lo, hi) = head.split_at_mut(half);
                for ((a, b), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(angles) {
                    let (x0, x1) = (*a, *b);
                    *a = x0 * c - x1 * s;
                    *b = x0 * s + x1 * c;
                }
            }
        }
    }
}

/// `gate[i] = silu(gate[i]) * up[i]` (SwiGLU), in place.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Adds a bias row to each row of `x`.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    if bias.is_empty() {
        return;
    }
    for row in x.chunks_exact_mut(bias.len()) {
        add_assign(row, bias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_styles_rotate_different_pairs() {
        let angles = vec![(0.0f32, 1.0f32), (1.0, 0.0)]; // 90 degrees, then 0
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        apply_rope(&mut x, 4, &angles, RopeStyle::Interleaved);
        assert_eq!(x, vec![-2.0, 1.0, 3.0, 4.0]);
        let mut y = vec![1.0, 2.0, 3.0, 4.0];
        apply_rope(&mut y, 4, &angles, RopeStyle::Neox);
        assert_eq!(y, vec![-3.0, 2.0, 1.0, 4.0]);
    }

    #[test]
    fn rms_norm_unit_rows() {
        let mut out = vec![0.0; 2];
        rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut out);
        let s = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / s).abs() < 1e-6 && (out[1] - 8.0 / s).abs() < 1e-6);
    }
}
