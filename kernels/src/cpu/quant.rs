//! Block-quantized weights (ggml's Q4_0, Q4_1, Q8_0 encodings), 8-bit activation blocks, and
//! the integer dot products between them.
//!
//! WHY this scheme: llama.cpp multiplies Q4_1 weights with activations quantized to q8_1 and
//! Q4_0/Q8_0 weights with q8_0 activations. Doing the same (per-block f16-rounded scale,
//! round-half-even, exact integer block sums) keeps our logits within float-summation-order
//! noise of llama.cpp's, so greedy decoding matches it, while the weights stay 4-bit in memory
//! (the decode step is memory-bound).
//!
//! Weights are repacked once at load into separate arrays (nibbles / int8 values, and f32
//! scales) so the inner loops do aligned-free contiguous loads and no f16 conversion.

use half::f16;
use rayon::prelude::*;

/// Elements per quantization block.
pub const QK: usize = 32;

/// A weight matrix's quantized blocks, repacked: row `r` owns blocks `r*nb .. (r+1)*nb`.
#[derive(Clone, Debug)]
pub struct PackedBlocks {
    pub kind: BlockKind,
    /// 16 bytes of nibbles per block (Q4_*), or 32 `i8` stored as `u8` per block (Q8_0).
    pub qs: Vec<u8>,
    /// Per-block scale.
    pub d: Vec<f32>,
    /// Per-block minimum (Q4_1 only; empty otherwise).
    pub m: Vec<f32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl BlockKind {
    /// Bytes of one block in the ggml file encoding.
    pub fn file_block_bytes(self) -> usize {
        match self {
            BlockKind::Q4_0 => 18,
            BlockKind::Q4_1 => 20,
            BlockKind::Q8_0 => 34,
        }
    }

    /// Bytes of quantized values per block after repacking.
    pub fn packed_qs_bytes(self) -> usize {
        match self {
            BlockKind::Q4_0 | BlockKind::Q4_1 => 16,
            BlockKind::Q8_0 => 32,
        }
    }
}

fn f16_at(bytes: &[u8]) -> f32 {
    match bytes {
        [a, b, ..] => f16::from_le_bytes([*a, *b]).to_f32(),
        _ => 0.0,
    }
}

impl PackedBlocks {
    /// Repacks ggml-encoded blocks. `raw.len()` must be a whole number of blocks (checked by
    /// the caller against the tensor's shape); a trailing partial block is ignored.
    pub fn from_ggml(kind: BlockKind, raw: &[u8]) -> PackedBlocks {
        let bb = kind.file_block_bytes();
        let nblocks = raw.len() / bb;
        let mut qs = Vec::with_capacity(nblocks * kind.packed_qs_bytes());
        let mut d = Vec::with_capacity(nblocks);
        let mut m = Vec::new();
        for blk in raw.chunks_exact(bb) {
            d.push(f16_at(blk));
            match kind {
                BlockKind::Q4_0 => qs.extend_from_slice(&blk[2..18]),
                BlockKind::Q4_1 => {
                    m.push(f16_at(&blk[2..]));
                    qs.extend_from_slice(&blk[4..20]);
                }
                BlockKind::Q8_0 => qs.extend_from_slice(&blk[2..34]),
            }
        }
        PackedBlocks { kind, qs, d, m }
    }

    /// Dequantizes blocks `first_block .. first_block + out.len()/32` into `out`.
    pub fn dequantize(&self, first_block: usize, out: &mut [f32]) {
        let qb = self.kind.packed_qs_bytes();
        for (i, o) in out.chunks_exact_mut(QK).enumerate() {
            let b = first_block + i;
            let d = self.d.get(b).copied().unwrap_or(0.0);
            let q = self.qs.get(b * qb..(b + 1) * qb).unwrap_or(&[]);
            match self.kind {
                BlockKind::Q8_0 => {
                    for (o, &v) in o.iter_mut().zip(q) {
                        *o = (v as i8) as f32 * d;
                    }
                }
                BlockKind::Q4_0 | BlockKind::Q4_1 => {
                    let (lo, hi) = o.split_at_mut(QK / 2);
                    let m = self.m.get(b).copied();
                    for ((l, h), &byte) in lo.iter_mut().zip(hi.iter_mut()).zip(q) {
                        let (ql, qh) = ((byte & 0xF) as f32, (byte >> 4) as f32);
                        match m {
                            Some(m) => {
                                *l = ql * d + m;
                                *h = qh * d + m;
                            }
                            None => {
                                *l = (ql - 8.0) * d;
                                *h = (qh - 8.0) * d;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Rows of activations quantized to 8-bit blocks of 32: ggml's q8_1 (which is q8_0 plus the
/// block sum), so one quantization serves Q4_0, Q4_1 and Q8_0 weights alike.
#[derive(Clone, Debug, Default)]
pub struct QuantizedRows {
    pub rows: usize,
    pub cols: usize,
    pub qs: Vec<i8>,
    /// Block scale `amax / 127`, rounded through f16 as ggml stores it.
    pub d: Vec<f32>,
    /// `d * sum(q)` rounded through f16 (q8_1's `s`), for Q4_1's minimum term.
    pub s: Vec<f32>,
}

/// One quantized activation row.
#[derive(Clone, Copy, Debug)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
}

impl QuantizedRows {
    /// Quantizes `rows` rows of `cols` values (`cols` a multiple of 32).
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> QuantizedRows {
        let nb = cols / QK;
        let mut out = QuantizedRows {
            rows,
            cols,
            qs: vec![0; rows * cols],
            d: vec![0.0; rows * nb],
            s: vec![0.0; rows * nb],
        };
        // In parallel on the current rayon pool for a prefill's many rows (serial, it was 2%
        // of a two-thread prefill); blocks are independent, so the result is the same.
        let n_blocks = (rows * nb).min(x.len() / QK);
        let x = &x[..n_blocks * QK];
        x.par_chunks_exact(QK)
            .zip(out.qs.par_chunks_exact_mut(QK))
            .zip(out.d.par_iter_mut())
            .zip(out.s.par_iter_mut())
            .with_min_len(1024)
            .for_each(|(((src, q), d), s)| quantize_block(src, q, d, s));
        out
    }
    pub fn row(&self, r: usize) -> ActRow<'_> {
        let nb = self.cols / QK;
        ActRow {
            qs: self
                .qs
                .get(r * self.cols..(r + 1) * self.cols)
                .unwrap_or(&[]),
            d: self.d.get(r * nb..(r + 1) * nb).unwrap_or(&[]),
            s: self.s.get(r * nb..(r + 1) * nb).unwrap_or(&[]),
        }
    }
}

/// One 32-value block of an activation row: q8 values, scale `d` and `d * sum(q)` (both
/// rounded through f16, as llama.cpp's q8_1).
#[inline]
fn quantize_block(src: &[f32], q: &mut [i8], d: &mut f32, s: &mut f32) {
    let amax = src.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let dd = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in q.iter_mut().zip(src) {
        let r = round_ties_even_small(v * id) as i32;
        *q = r.clamp(-127, 127) as i8;
        sum += r;
    }
    *d = f16::from_f32(dd).to_f32();
    *s = f16::from_f32(sum as f32 * dd).to_f32();
}

/// `x.round_ties_even()` for |x| < 2^22, without a libm call: adding 1.5 * 2^23 leaves a
/// sum whose unit in the last place is 1, so the FPU's default round-to-nearest-even does the
/// rounding, and subtracting is exact. `round_ties_even` compiles to a `rintf` call on the
/// baseline x86-64 target (no SSE4.1), which cost ~6% of a prefill; this form vectorises.
/// Values here are at most ~127 in magnitude (or NaN, which stays NaN).
#[inline]
fn round_ties_even_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    (x + MAGIC) - MAGIC
}

/// Whether the AVX2+FMA kernels can run here (checked once; the macro caches it).
#[inline]
pub fn have_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Dot product of weight row `row` (blocks `row*nb ..`) with an activation row.
#[inline]
pub fn dot_row(w: &PackedBlocks, row: usize, nb: usize, a: ActRow<'_>, avx2: bool) -> f32 {
    let qb = w.kind.packed_qs_bytes();
    let qs = w.qs.get(row * nb * qb..(row + 1) * nb * qb).unwrap_or(&[]);
    let d = w.d.get(row * nb..(row + 1) * nb).unwrap_or(&[]);
    let m = w.m.get(row * nb..(row + 1) * nb).unwrap_or(&[]);
    // Every slice must cover `nb` blocks; anything shorter is a construction bug, answered
    // with 0 rather than out-of-bounds reads in the SIMD path.
    if d.len() < nb || qs.len() < nb * qb || a.d.len() < nb || a.qs.len() < nb * QK {
        return 0.0;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the CPU supports AVX2+FMA (`avx2` comes from `have_avx2`), and the slice
        // lengths were checked above to cover `nb` blocks.
        unsafe {
            return match w.kind {
                BlockKind::Q4_0 => avx2::dot_q4_0(qs, d, a, nb),
                BlockKind::Q4_1 if m.len() >= nb && a.s.len() >= nb => {
                    avx2::dot_q4_1(qs, d, m, a, nb)
                }
                BlockKind::Q4_1 => 0.0,
                BlockKind::Q8_0 => avx2::dot_q8_0(qs, d, a, nb),
            };
        }
    }
    let _ = avx2;
    scalar::dot(w.kind, qs, d, m, a)
}

/// Dot products of weight row `row` with four activation rows at once: each weight block is
/// decoded once and reused for the four rows (the prefill / batched-decode fast path).
#[inline]
pub fn dot_row_x4(
    w: &PackedBlocks,
    row: usize,
    nb: usize,
    a: [ActRow<'_>; 4],
    avx2: bool,
) -> [f32; 4] {
    let qb = w.kind.packed_qs_bytes();
    let covered = a
        .iter()
        .all(|r| r.d.len() >= nb && r.s.len() >= nb && r.qs.len() >= nb * QK);
    let qs = w.qs.get(row * nb * qb..(row + 1) * nb * qb);
    let d = w.d.get(row * nb..(row + 1) * nb);
    let m_ok = w.kind != BlockKind::Q4_1 || w.m.len() >= (row + 1) * nb;
    #[cfg(target_arch = "x86_64")]
    if let (true, true, true, Some(qs), Some(d)) = (avx2, covered, m_ok, qs, d) {
        // SAFETY: AVX2+FMA are available (`avx2` comes from `have_avx2`); every slice covers
        // `nb` blocks (checked above).
        unsafe {
            return match w.kind {
                BlockKind::Q4_0 => avx2::dot_q4_0_x4(qs, d, &a, nb),
                BlockKind::Q4_1 => avx2::dot_q4_1_x4(qs, d, &w.m[row * nb..(row + 1) * nb], &a, nb),
                BlockKind::Q8_0 => avx2::dot_q8_0_x4(qs, d, &a, nb),
            };
        }
    }
    let _ = (covered, m_ok, qs, d);
    a.map(|r| dot_row(w, row, nb, r, avx2))
}

/// Portable reference kernels (also the fallback without AVX2).
pub mod scalar {
    use super::{ActRow, BlockKind, QK};

    pub fn dot(kind: BlockKind, qs: &[u8], d: &[f32], m: &[f32], a: ActRow<'_>) -> f32 {
        let qb = kind.packed_qs_bytes();
        let mut acc = 0.0f32;
        let blocks = qs.chunks_exact(qb).zip(d).zip(a.qs.chunks_exact(QK));
        for (b, ((q, &dx), y)) in blocks.enumerate() {
            let dy = a.d.get(b).copied().unwrap_or(0.0);
            let sumi: i32 = match kind {
                BlockKind::Q8_0 => q
                    .iter()
                    .zip(y)
                    .map(|(&x, &y)| (x as i8) as i32 * y as i32)
                    .sum(),
                BlockKind::Q4_0 => q
                    .iter()
                    .zip(y.iter().zip(&y[QK / 2..]))
                    .map(|(&x, (&yl, &yh))| {
                        ((x & 0xF) as i32 - 8) * yl as i32 + ((x >> 4) as i32 - 8) * yh as i32
                    })
                    .sum(),
                BlockKind::Q4_1 => q
                    .iter()
                    .zip(y.iter().zip(&y[QK / 2..]))
                    .map(|(&x, (&yl, &yh))| {
                        (x & 0xF) as i32 * yl as i32 + (x >> 4) as i32 * yh as i32
                    })
                    .sum(),
            };
            acc += dx * dy * sumi as f32;
            if kind == BlockKind::Q4_1 {
                acc += m.get(b).copied().unwrap_or(0.0) * a.s.get(b).copied().unwrap_or(0.0);
            }
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{ActRow, QK};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 32 nibbles of a block as bytes 0..15: low nibbles first, then high nibbles.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
        let q = _mm_loadu_si128(p as *const __m128i);
        let hi = _mm_srli_epi16(q, 4);
        _mm256_and_si256(_mm256_set_m128i(hi, q), _mm256_set1_epi8(0x0F))
    }

    /// Sum of pairwise products of two signed byte vectors as 8 f32 lanes (ggml's trick:
    /// |x| * sign(y, x), so `maddubs` sees an unsigned first operand).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn mul_sum_i8(x: __m256i, y: __m256i) -> __m256 {
        let ax = _mm256_sign_epi8(x, x);
        let sy = _mm256_sign_epi8(y, x);
        let p16 = _mm256_maddubs_epi16(ax, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_0(qs: &[u8], d: &[f32], a: ActRow<'_>, nb: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let eight = _mm256_set1_epi8(8);
        for b in 0..nb {
            let x = _mm256_sub_epi8(unpack_nibbles(qs.as_ptr().add(b * 16)), eight);
            let y = _mm256_loadu_si256(a.qs.as_ptr().add(b * QK) as *const __m256i);
            let scale = _mm256_set1_ps(*d.get_unchecked(b) * *a.d.get_unchecked(b));
            acc = _mm256_fmadd_ps(scale, mul_sum_i8(x, y), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_1(qs: &[u8], d: &[f32], m: &[f32], a: ActRow<'_>, nb: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0.0f32;
        let ones = _mm256_set1_epi16(1);
        for b in 0..nb {
            let x = unpack_nibbles(qs.as_ptr().add(b * 16));
            let y = _mm256_loadu_si256(a.qs.as_ptr().add(b * QK) as *const __m256i);
            let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(x, y), ones));
            let scale = _mm256_set1_ps(*d.get_unchecked(b) * *a.d.get_unchecked(b));
            acc = _mm256_fmadd_ps(scale, p, acc);
            summs += *m.get_unchecked(b) * *a.s.get_unchecked(b);
        }
        hsum(acc) + summs
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_0(qs: &[u8], d: &[f32], a: ActRow<'_>, nb: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for b in 0..nb {
            let x = _mm256_loadu_si256(qs.as_ptr().add(b * QK) as *const __m256i);
            let y = _mm256_loadu_si256(a.qs.as_ptr().add(b * QK) as *const __m256i);
            let scale = _mm256_set1_ps(*d.get_unchecked(b) * *a.d.get_unchecked(b));
            acc = _mm256_fmadd_ps(scale, mul_sum_i8(x, y), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_1_x4(
        qs: &[u8],
        d: &[f32],
        m: &[f32],
        a: &[ActRow<'_>; 4],
        nb: usize,
    ) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut summs = [0.0f32; 4];
        let ones = _mm256_set1_epi16(1);
        for b in 0..nb {
            let x = unpack_nibbles(qs.as_ptr().add(b * 16));
            let (dx, mx) = (*d.get_unchecked(b), *m.get_unchecked(b));
            for j in 0..4 {
                let r = a.get_unchecked(j);
                let y = _mm256_loadu_si256(r.qs.as_ptr().add(b * QK) as *const __m256i);
                let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(x, y), ones));
                let scale = _mm256_set1_ps(dx * *r.d.get_unchecked(b));
                acc[j] = _mm256_fmadd_ps(scale, p, acc[j]);
                summs[j] += mx * *r.s.get_unchecked(b);
            }
        }
        [
            hsum(acc[0]) + summs[0],
            hsum(acc[1]) + summs[1],
            hsum(acc[2]) + summs[2],
            hsum(acc[3]) + summs[3],
        ]
    }

    /// Shared body of the signed-weight kernels (Q4_0 after re-centring, Q8_0).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn signed_x4(x: __m256i, dx: f32, b: usize, a: &[ActRow<'_>; 4], acc: &mut [__m256; 4]) {
        let ax = _mm256_sign_epi8(x, x);
        let ones = _mm256_set1_epi16(1);
        for (r, acc) in a.iter().zip(acc.iter_mut()) {
            let y = _mm256_loadu_si256(r.qs.as_ptr().add(b * QK) as *const __m256i);
            let sy = _mm256_sign_epi8(y, x);
            let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones));
            let scale = _mm256_set1_ps(dx * *r.d.get_unchecked(b));
            *acc = _mm256_fmadd_ps(scale, p, *acc);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_0_x4(qs: &[u8], d: &[f32], a: &[ActRow<'_>; 4], nb: usize) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let eight = _mm256_set1_epi8(8);
        for b in 0..nb {
            let x = _mm256_sub_epi8(unpack_nibbles(qs.as_ptr().add(b * 16)), eight);
            signed_x4(x, *d.get_unchecked(b), b, a, &mut acc);
        }
        [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_0_x4(qs: &[u8], d: &[f32], a: &[ActRow<'_>; 4], nb: usize) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..nb {
            let x = _mm256_loadu_si256(qs.as_ptr().add(b * QK) as *const __m256i);
            signed_x4(x, *d.get_unchecked(b), b, a, &mut acc);
        }
        [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_rounding_equals_round_ties_even_over_the_quantizer_range() {
        // Every f32 in [-128, 128] with a 1/1024 step, the exact halves, and neighbours of
        // each half: the cases where ties-to-even and ties-away differ.
        let mut xs: Vec<f32> = (-131_072..=131_072).map(|i| i as f32 / 1024.0).collect();
        for i in -128..128 {
            let half = i as f32 + 0.5;
            xs.extend([half, half.next_up(), half.next_down()]);
        }
        for x in xs {
            assert_eq!(round_ties_even_small(x), x.round_ties_even(), "x = {x}");
        }
        assert!(round_ties_even_small(f32::NAN).is_nan());
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    fn random_blocks(kind: BlockKind, nblocks: usize, seed: &mut u64) -> Vec<u8> {
        let mut raw = Vec::new();
        for _ in 0..nblocks {
            raw.extend_from_slice(&f16::from_f32(0.01 + lcg(seed).abs() * 0.05).to_le_bytes());
            if kind == BlockKind::Q4_1 {
                raw.extend_from_slice(&f16::from_f32(lcg(seed) * 0.1).to_le_bytes());
            }
            for _ in 0..kind.packed_qs_bytes() {
                raw.push((lcg(seed).abs() * 255.0) as u8);
            }
        }
        raw
    }

    #[test]
    fn kernels_agree_with_dequantized_dot() {
        let mut seed = 7u64;
        let cols = 256;
        let nb = cols / QK;
        let x: Vec<f32> = (0..cols).map(|_| lcg(&mut seed)).collect();
        let a = QuantizedRows::quantize(&x, 1, cols);
        // Dequantized activations, to isolate the weight side.
        let xq: Vec<f32> = (0..cols).map(|i| a.qs[i] as f32 * a.d[i / QK]).collect();
        for kind in [BlockKind::Q4_0, BlockKind::Q4_1, BlockKind::Q8_0] {
            let w = PackedBlocks::from_ggml(kind, &random_blocks(kind, 2 * nb, &mut seed));
            for row in 0..2 {
                let mut wf = vec![0.0; cols];
                w.dequantize(row * nb, &mut wf);
                let want: f32 = wf.iter().zip(&xq).map(|(a, b)| a * b).sum();
                let got_scalar = dot_row(&w, row, nb, a.row(0), false);
                let got_simd = dot_row(&w, row, nb, a.row(0), have_avx2());
                // Q4_1's minimum term uses the f16-rounded block sum, as ggml does.
                let tol = 1e-3 * (1.0 + want.abs());
                assert!(
                    (got_scalar - want).abs() < tol,
                    "{kind:?} scalar {got_scalar} vs {want}"
                );
                assert!(
                    (got_simd - got_scalar).abs() < 1e-4 * (1.0 + want.abs()),
                    "{kind:?}"
                );
            }
        }
    }

    #[test]
    fn four_row_kernels_equal_single_row_kernels() {
        let mut seed = 11u64;
        let cols = 128;
        let nb = cols / QK;
        let x: Vec<f32> = (0..4 * cols).map(|_| lcg(&mut seed)).collect();
        let a = QuantizedRows::quantize(&x, 4, cols);
        for kind in [BlockKind::Q4_0, BlockKind::Q4_1, BlockKind::Q8_0] {
            let w = PackedBlocks::from_ggml(kind, &random_blocks(kind, 3 * nb, &mut seed));
            for row in 0..3 {
                let rows = [a.row(0), a.row(1), a.row(2), a.row(3)];
                for avx2 in [false, have_avx2()] {
                    let got = dot_row_x4(&w, row, nb, rows, avx2);
                    for (j, g) in got.iter().enumerate() {
                        let want = dot_row(&w, row, nb, a.row(j), avx2);
                        assert!(
                            (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{kind:?} {j}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn activation_quantization_is_close_and_bounded() {
        let mut seed = 3u64;
        let x: Vec<f32> = (0..64).map(|_| lcg(&mut seed) * 4.0).collect();
        let a = QuantizedRows::quantize(&x, 1, 64);
        for (i, &v) in x.iter().enumerate() {
            let back = a.qs[i] as f32 * a.d[i / QK];
            assert!(
                (back - v).abs() <= a.d[i / QK] * 0.51 + 1e-3,
                "{i}: {v} vs {back}"
            );
        }
        let zero = QuantizedRows::quantize(&[0.0; 32], 1, 32);
        assert_eq!(zero.d[0], 0.0);
        assert!(zero.qs.iter().all(|&q| q == 0));
    }
}
