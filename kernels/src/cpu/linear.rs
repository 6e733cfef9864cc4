//! Linear layers (`y = W x` for a batch of rows), parallel across output rows.
//!
//! Quantized weights stay quantized: the input rows are quantized to 8-bit blocks once
//! ([`Input`]) and every weight row is dotted against them with integer kernels. For a batch
//! of tokens (prefill) each weight row is read once and dotted against a tile of token rows,
//! so the weights stream through the cache once per tile rather than once per token.
//! F32/F16/BF16 weights are widened to f32 at load and use a plain f32 dot product.

use super::quant::{self, BlockKind, PackedBlocks, QuantizedRows, QK};
use crate::backend::BackendError;
use crate::tensor::{DType, WeightTensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Output rows per parallel task: enough work to amortise scheduling, small enough to
/// balance two (or a few) threads on a 576-row matrix.
const ROWS_PER_TASK: usize = 16;
/// Token rows dotted against one weight row before moving on (keeps the tile in L2).
const TOKEN_TILE: usize = 64;

#[derive(Clone, Debug)]
enum Repr {
    Quantized(PackedBlocks),
    F32(Vec<f32>),
}

/// A weight matrix `[rows, cols]` ready for the CPU kernels.
#[derive(Clone, Debug)]
pub struct Linear {
    pub rows: usize,
    pub cols: usize,
    repr: Repr,
}

/// Converts a plain-float tensor's bytes to f32 (None for quantized dtypes).
pub fn floats_of(t: &WeightTensor) -> Option<Vec<f32>> {
    let b = t.bytes();
    Some(match t.dtype {
        DType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::Q4_0 | DType::Q4_1 | DType::Q8_0 => return None,
    })
}

fn block_kind(d: DType) -> Option<BlockKind> {
    match d {
        DType::Q4_0 => Some(BlockKind::Q4_0),
        DType::Q4_1 => Some(BlockKind::Q4_1),
        DType::Q8_0 => Some(BlockKind::Q8_0),
        _ => None,
    }
}

fn unsupported(t: &WeightTensor, reason: String) -> BackendError {
    BackendError::UnsupportedWeight {
        name: t.name.clone(),
        reason,
    }
}

/// Checks that `t` is a `[rows, cols]` matrix whose byte length matches its dtype.
pub fn check_shape(t: &WeightTensor, rows: usize, cols: usize) -> Result<(), BackendError> {
    if t.rows() != rows || t.cols() != cols {
        return Err(unsupported(
            t,
            format!("shape {:?}, expected [{rows}, {cols}]", t.shape),
        ));
    }
    let want = t.dtype.bytes_for(rows * cols).ok_or_else(|| {
        unsupported(
            t,
            format!("{cols} columns are not whole {:?} blocks", t.dtype),
        )
    })?;
    if t.bytes().len() != want {
        return Err(unsupported(
            t,
            format!("{} bytes, expected {want}", t.bytes().len()),
        ));
    }
    Ok(())
}

impl Linear {
    pub fn from_tensor(t: &WeightTensor, rows: usize, cols: usize) -> Result<Linear, BackendError> {
        check_shape(t, rows, cols)?;
        let repr = match block_kind(t.dtype) {
            Some(kind) => Repr::Quantized(PackedBlocks::from_ggml(kind, t.bytes())),
            None => Repr::F32(floats_of(t).unwrap_or_default()),
        };
        Ok(Linear { rows, cols, repr })
    }

    /// Dequantized (or widened) row `r`, for embedding lookups. `out.len()` must be `cols`.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        match &self.repr {
            Repr::Quantized(p) => p.dequantize(r * (self.cols / QK), out),
            Repr::F32(w) => {
                if let Some(src) = w.get(r * self.cols..(r + 1) * self.cols) {
                    out.copy_from_slice(src);
                }
            }
        }
    }

    /// `out[t][r] = sum_c W[r][c] * x[t][c]` for every token row `t` of `input`; `out` holds
    /// `input.n * rows` values. Runs on the current rayon pool.
    pub fn forward(&self, input: &Input<'_>, out: &mut [f32]) {
        forward_group(input, &mut [(self, out)]);
    }

    /// Rows `first_row ..` of this layer for all tokens, into `chunk` laid out
    /// `[row][token]` (`chunk.len() / input.n` rows).
    fn compute_rows(&self, input: &Input<'_>, first_row: usize, chunk: &mut [f32], avx2: bool) {
        let n = input.n;
        let nb = self.cols / QK;
        let dot = |r: usize, t: usize| -> f32 {
            match &self.repr {
                Repr::Quantized(p) => match &input.q {
                    Some(q) => quant::dot_row(p, r, nb, q.row(t), avx2),
                    None => 0.0,
                },
                Repr::F32(w) => f32_dot(
                    w.get(r * self.cols..(r + 1) * self.cols).unwrap_or(&[]),
                    input
                        .x
                        .get(t * self.cols..(t + 1) * self.cols)
                        .unwrap_or(&[]),
                ),
            }
        };
        let rows_here = chunk.len() / n;
        for t0 in (0..n).step_by(TOKEN_TILE) {
            let t1 = (t0 + TOKEN_TILE).min(n);
            for (k, out_row) in chunk.chunks_exact_mut(n).take(rows_here).enumerate() {
                let r = first_row + k;
                let mut t = t0;
                if let (Repr::Quantized(p), Some(q)) = (&self.repr, &input.q) {
                    while t + 4 <= t1 {
                        let rows = [q.row(t), q.row(t + 1), q.row(t + 2), q.row(t + 3)];
                        let v = quant::dot_row_x4(p, r, nb, rows, avx2);
                        out_row[t..t + 4].copy_from_slice(&v);
                        t += 4;
                    }
                }
                for (t, o) in out_row.iter_mut().enumerate().take(t1).skip(t) {
                    *o = dot(r, t);
                }
            }
        }
    }
}

/// Runs several layers that share one input (q/k/v, or gate/up) in ONE parallel region:
/// on few cores a fork-join costs as much as a small matmul, so fewer regions per token
/// matter for decode. Each `(layer, out)` gets `out[t][r]` as in [`Linear::forward`].
pub fn forward_group(input: &Input<'_>, parts: &mut [(&Linear, &mut [f32])]) {
    let n = input.n;
    if n == 0 {
        return;
    }
    let avx2 = quant::have_avx2();
    // For one token the output already is `[row][token]`; for more, compute into
    // row-major scratch so each task owns a contiguous range, then transpose.
    let mut scratch: Vec<Vec<f32>> = if n > 1 {
        parts
            .iter()
            .map(|(l, _)| vec![0.0f32; l.rows * n])
            .collect()
    } else {
        Vec::new()
    };
    let mut tasks: Vec<(&Linear, usize, &mut [f32])> = Vec::new();
    if n == 1 {
        for (l, out) in parts.iter_mut() {
            let l: &Linear = l;
            for (ci, c) in out.chunks_mut(ROWS_PER_TASK).enumerate() {
                tasks.push((l, ci * ROWS_PER_TASK, c));
            }
        }
    } else {
        for ((l, _), s) in parts.iter().zip(scratch.iter_mut()) {
            for (ci, c) in s.chunks_mut(ROWS_PER_TASK * n).enumerate() {
                tasks.push((*l, ci * ROWS_PER_TASK, c));
            }
        }
    }
    tasks
        .into_par_iter()
        .for_each(|(l, r0, c)| l.compute_rows(input, r0, c, avx2));
    for ((l, out), s) in parts.iter_mut().zip(&scratch) {
        transpose_into(s, n, l.rows, out);
    }
}

/// Tokens per block of the transpose: a block's output rows stay in L2 while every weight
/// row's 16 values (one cache line of the scratch) are scattered into them.
const TRANSPOSE_TOKENS: usize = 16;

/// `out[t][r] = s[r][t]` for `rows` rows of `n` tokens, in parallel over token blocks (a
/// serial transpose cost about 4% of a two-thread prefill).
fn transpose_into(s: &[f32], n: usize, rows: usize, out: &mut [f32]) {
    out.par_chunks_mut(TRANSPOSE_TOKENS * rows)
        .enumerate()
        .for_each(|(tb, block)| {
            let t0 = tb * TRANSPOSE_TOKENS;
            for r in 0..rows {
                let Some(src) = s.get(r * n + t0..(r * n + t0 + TRANSPOSE_TOKENS).min((r + 1) * n))
                else {
                    continue;
                };
                for (i, &v) in src.iter().enumerate() {
                    if let Some(o) = block.get_mut(i * rows + r) {
                        *o = v;
                    }
                }
            }
        });
}

/// f32 dot product with 8 independent accumulators (vectorises without intrinsics).
fn f32_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// A batch of `n` input rows for linear layers: the f32 values, and (when the width is a
/// whole number of 32-blocks) their 8-bit quantization, made once and shared by every layer
/// that consumes the same input (q/k/v, gate/up).
pub struct Input<'a> {
    pub x: &'a [f32],
    pub n: usize,
    q: Option<QuantizedRows>,
}

impl<'a> Input<'a> {
    pub fn new(x: &'a [f32], n: usize, cols: usize) -> Input<'a> {
        let q = (cols % QK == 0).then(|| QuantizedRows::quantize(x, n, cols));
        Input { x, n, q }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_parallel_transpose_moves_every_value_once() {
        for (n, rows) in [(1usize, 5usize), (16, 3), (37, 576), (64, 7)] {
            let s: Vec<f32> = (0..n * rows).map(|i| i as f32).collect();
            let mut out = vec![-1.0f32; n * rows];
            super::transpose_into(&s, n, rows, &mut out);
            for t in 0..n {
                for r in 0..rows {
                    assert_eq!(out[t * rows + r], s[r * n + t], "n {n} rows {rows}");
                }
            }
        }
    }
}
