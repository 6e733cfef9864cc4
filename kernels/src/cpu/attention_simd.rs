//! The inner loops of CPU attention, in two implementations chosen once at run time:
//! AVX2 intrinsics where the CPU has them, and portable Rust everywhere else.
//!
//! WHY bit-identical: greedy decoding on the real model agrees with llama.cpp token for
//! token (kernels/tests/greedy_matches_llamacpp.rs), and that agreement is fragile: the
//! 8-bit re-quantization of activations in every matmul turns a last-bit change in one
//! attention score into logit changes of 0.1-0.3, enough to flip a greedy token. Fused
//! multiply-adds, another summation order or an exp within 2 ulp each did. So the AVX2
//! kernels reproduce the portable arithmetic exactly: dot products in eight lanes of unfused
//! multiply-adds summed lane 0 to 7, weighted sums unfused in position order, and an `exp`
//! equal to libm's at every input (checked over all 1.1e9 f32 values in [-110, 0]).
//!
//! The kernels work on row slices: a key or value row is `head_dim` contiguous floats
//! anywhere in the paged pool, so no packing or transposition of the cache is needed.

/// Which implementation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Portable,
    /// x86-64 with AVX2, FMA and F16C (checked at run time).
    Avx2,
}

impl Isa {
    /// The best implementation this CPU supports.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// `scores[r][j] = q[r] . keys[j]` for `r < q.len() (1 or 2)`, `j < 4`; keys are f16
    /// bits. Every slice has the same length.
    #[inline]
    pub fn dots_4keys<const R: usize>(self, q: [&[f32]; R], keys: [&[u16]; 4]) -> [[f32; 4]; R] {
        #[cfg(target_arch = "x86_64")]
        if self == Isa::Avx2 && q[0].len() % 8 == 0 {
            // SAFETY: AVX2 and FMA were detected; lengths are checked inside.
            return unsafe { avx2::dots_4keys(q, keys) };
        }
        portable::dots_4keys(q, keys)
    }

    /// `acc[r] += sum_j w[r][j] * values[j]` for `r < R (1 or 2)`; values are f16 bits.
    /// `w[r].len()` equals `values.len()`; every value row and `acc[r]` has the same length.
    #[inline]
    pub fn weighted_sum<const R: usize>(
        self,
        w: [&[f32]; R],
        values: &[&[u16]],
        acc: [&mut [f32]; R],
    ) {
        #[cfg(target_arch = "x86_64")]
        if self == Isa::Avx2 && acc[0].len() % 8 == 0 {
            // SAFETY: AVX2 and FMA were detected; lengths are checked inside.
            return unsafe { avx2::weighted_sum(w, values, acc) };
        }
        portable::weighted_sum(w, values, acc)
    }

    /// Softmax of `s * scale` over `s` in place, each weight rounded to f16 (values kept as
    /// f32). `s` must be non-empty and finite.
    #[inline]
    pub fn softmax_f16(self, s: &mut [f32], scale: f32) {
        #[cfg(target_arch = "x86_64")]
        if self == Isa::Avx2 {
            // SAFETY: AVX2 and FMA were detected.
            return unsafe { avx2::softmax_f16(s, scale) };
        }
        portable::softmax_f16(s, scale)
    }
}

/// `x` rounded to the nearest f16 value (kept as f32).
#[inline]
pub fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

mod portable {
    use super::round_f16;
    use half::f16;

    fn widen(x: u16) -> f32 {
        f16::from_bits(x).to_f32()
    }

    pub fn dots_4keys<const R: usize>(q: [&[f32]; R], keys: [&[u16]; 4]) -> [[f32; 4]; R] {
        let mut out = [[0.0f32; 4]; R];
        for (o, qr) in out.iter_mut().zip(q) {
            for (s, k) in o.iter_mut().zip(keys) {
                *s = dot(qr, k);
            }
        }
        out
    }

    pub fn weighted_sum<const R: usize>(w: [&[f32]; R], values: &[&[u16]], acc: [&mut [f32]; R]) {
        for (wr, a) in w.into_iter().zip(acc) {
            for (&wj, v) in wr.iter().zip(values) {
                for (x, &y) in a.iter_mut().zip(v.iter()) {
                    *x += wj * widen(y);
                }
            }
        }
    }

    pub fn softmax_f16(s: &mut [f32], scale: f32) {
        let mut max = f32::NEG_INFINITY;
        for x in s.iter_mut() {
            *x *= scale;
            max = max.max(*x);
        }
        let mut sum = 0.0f64;
        for x in s.iter_mut() {
            *x = (*x - max).exp();
            sum += *x as f64;
        }
        let inv = (1.0 / sum) as f32;
        for x in s.iter_mut() {
            *x = round_f16(*x * inv);
        }
    }

    /// Dot product of f32 and f16 rows with 8 independent accumulators.
    pub fn dot(a: &[f32], b: &[u16]) -> f32 {
        let mut acc = [0.0f32; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f32 = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(x, &y)| x * widen(y))
            .sum();
        for (x, y) in ca.zip(cb) {
            for i in 0..8 {
                acc[i] += x[i] * widen(y[i]);
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Eight f16 values widened to f32 (exact).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// The eight vectors' lane sums, each added lane 0 first to lane 7 last (the order of
    /// the portable dot product's final `sum`), through an 8x8 transpose.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lane_sums(a: [__m256; 8]) -> __m256 {
        let t0 = _mm256_unpacklo_ps(a[0], a[1]);
        let t1 = _mm256_unpackhi_ps(a[0], a[1]);
        let t2 = _mm256_unpacklo_ps(a[2], a[3]);
        let t3 = _mm256_unpackhi_ps(a[2], a[3]);
        let t4 = _mm256_unpacklo_ps(a[4], a[5]);
        let t5 = _mm256_unpackhi_ps(a[4], a[5]);
        let t6 = _mm256_unpacklo_ps(a[6], a[7]);
        let t7 = _mm256_unpackhi_ps(a[6], a[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        // Row i of the transpose holds lane i of every input vector.
        let lanes = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        let mut s = lanes[0];
        for l in &lanes[1..] {
            s = _mm256_add_ps(s, *l);
        }
        s
    }

    /// Lane-for-lane the portable dot product: eight accumulators of unfused multiply-adds
    /// over the row in steps of 8, summed lane 0 to 7, so both give bit-identical scores
    /// (greedy decoding's agreement with llama.cpp rests on them).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dots_4keys<const R: usize>(q: [&[f32]; R], keys: [&[u16]; 4]) -> [[f32; 4]; R] {
        let n = q[0].len();
        if R > 2
            || n % 8 != 0
            || q.iter().any(|r| r.len() != n)
            || keys.iter().any(|k| k.len() != n)
        {
            return super::portable::dots_4keys(q, keys);
        }
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i < n {
            let k = [
                load_f16(keys[0].as_ptr().add(i)),
                load_f16(keys[1].as_ptr().add(i)),
                load_f16(keys[2].as_ptr().add(i)),
                load_f16(keys[3].as_ptr().add(i)),
            ];
            for r in 0..R {
                let qv = _mm256_loadu_ps(q[r].as_ptr().add(i));
                for j in 0..4 {
                    let a = &mut acc[4 * r + j];
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(qv, k[j]));
                }
            }
            i += 8;
        }
        let mut sums = [0.0f32; 8];
        _mm256_storeu_ps(sums.as_mut_ptr(), lane_sums(acc));
        let mut out = [[0.0f32; 4]; R];
        for r in 0..R {
            out[r].copy_from_slice(&sums[4 * r..4 * r + 4]);
        }
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum<const R: usize>(
        w: [&[f32]; R],
        values: &[&[u16]],
        mut acc: [&mut [f32]; R],
    ) {
        let n = acc[0].len();
        let ok = n % 8 == 0
            && acc.iter().all(|a| a.len() == n)
            && values.iter().all(|v| v.len() == n)
            && w.iter().all(|wr| wr.len() == values.len());
        if !ok {
            return super::portable::weighted_sum(w, values, acc);
        }
        // Four vectors (32 floats) of each row's accumulator at a time: 4R registers.
        let mut d = 0;
        while d < n {
            let width = (n - d).min(32) / 8;
            let mut a = [[_mm256_setzero_ps(); 4]; R];
            for (ar, src) in a.iter_mut().zip(acc.iter()) {
                for (c, v) in ar.iter_mut().enumerate().take(width) {
                    *v = _mm256_loadu_ps(src.as_ptr().add(d + 8 * c));
                }
            }
            for (j, v) in values.iter().enumerate() {
                let p = v.as_ptr().add(d);
                let vv = [
                    load_f16(p),
                    if width > 1 {
                        load_f16(p.add(8))
                    } else {
                        _mm256_setzero_ps()
                    },
                    if width > 2 {
                        load_f16(p.add(16))
                    } else {
                        _mm256_setzero_ps()
                    },
                    if width > 3 {
                        load_f16(p.add(24))
                    } else {
                        _mm256_setzero_ps()
                    },
                ];
                for r in 0..R {
                    let wj = _mm256_set1_ps(*w[r].get_unchecked(j));
                    for c in 0..4 {
                        a[r][c] = _mm256_add_ps(a[r][c], _mm256_mul_ps(wj, vv[c]));
                    }
                }
            }
            for (ar, dst) in a.iter().zip(acc.iter_mut()) {
                for (c, v) in ar.iter().enumerate().take(width) {
                    _mm256_storeu_ps(dst.as_mut_ptr().add(d + 8 * c), *v);
                }
            }
            d += 8 * width;
        }
    }

    /// `exp(x)` rounded to f32, for `x <= 0`, bit-identical to `f32::exp` (the platform
    /// libm), which the portable path and the agreement with llama.cpp's greedy tokens were
    /// measured with: a faster f32 polynomial within 2 ulp changed greedy tokens on the real
    /// model. Evaluated in f64 (error about 1e-16) and rounded once, which is libm's result
    /// unless the value lies so close to a rounding boundary that libm's own error (under
    /// 0.502 ulp) could take it across: such lanes, about 0.3% of them, are recomputed by
    /// libm itself.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn exp_nonpositive(x: __m256) -> __m256 {
        let lo = exp_f32_lanes(_mm256_castps256_ps128(x));
        let hi = exp_f32_lanes(_mm256_extractf128_ps::<1>(x));
        _mm256_set_m128(hi, lo)
    }

    /// Four lanes of [`exp_nonpositive`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn exp_f32_lanes(x: __m128) -> __m128 {
        const MARGIN: f64 = 4e-10;
        let y = exp_f64(_mm256_cvtps_pd(x));
        let f = _mm256_cvtpd_ps(y);
        let below = _mm256_cvtpd_ps(_mm256_mul_pd(y, _mm256_set1_pd(1.0 - MARGIN)));
        let above = _mm256_cvtpd_ps(_mm256_mul_pd(y, _mm256_set1_pd(1.0 + MARGIN)));
        let unsure = _mm_movemask_ps(_mm_cmpneq_ps(below, above));
        if unsure == 0 {
            return f;
        }
        let mut lanes = [0.0f32; 4];
        let mut xs = [0.0f32; 4];
        _mm_storeu_ps(lanes.as_mut_ptr(), f);
        _mm_storeu_ps(xs.as_mut_ptr(), x);
        for i in 0..4 {
            if unsure & (1 << i) != 0 {
                lanes[i] = xs[i].exp();
            }
        }
        _mm_loadu_ps(lanes.as_ptr())
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn exp_f64(x: __m256d) -> __m256d {
        // Below -104 the f32 result is 0; clamp so 2^k stays a normal f64.
        let x = _mm256_max_pd(x, _mm256_set1_pd(-110.0));
        let k = _mm256_round_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_pd(x, _mm256_set1_pd(std::f64::consts::LOG2_E)),
        );
        // ln2 split so k * LN2_HI is exact for |k| < 2^11.
        const LN2_HI: f64 = 0.693_147_180_369_123_8;
        const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
        let r = _mm256_fnmadd_pd(k, _mm256_set1_pd(LN2_HI), x);
        let r = _mm256_fnmadd_pd(k, _mm256_set1_pd(LN2_LO), r);
        let mut p = _mm256_set1_pd(1.0 / 479_001_600.0);
        let mut fact = 479_001_600.0f64;
        for n in (1..12).rev() {
            fact /= (n + 1) as f64;
            p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / fact));
        }
        let p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0));
        // 2^k from its exponent bits.
        let ki = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(k));
        let scale = _mm256_slli_epi64::<52>(_mm256_add_epi64(ki, _mm256_set1_epi64x(1023)));
        _mm256_mul_pd(p, _mm256_castsi256_pd(scale))
    }

    /// `x` (non-negative, at most 65504) rounded to the nearest f16 value, ties to even:
    /// normal f16 range by dropping 13 mantissa bits, the subnormal range (below 2^-14) by
    /// adding and removing 0.5, whose f32 spacing there equals f16's 2^-24.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn round_f16_nonnegative(x: __m256) -> __m256 {
        let b = _mm256_castps_si256(x);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<13>(b), _mm256_set1_epi32(1));
        let rounded = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x0FFF), lsb));
        let normal = _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(!0x1FFF)));
        let half = _mm256_set1_ps(0.5);
        let sub = _mm256_sub_ps(_mm256_add_ps(x, half), half);
        let is_sub = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(6.103_515_6e-5));
        _mm256_blendv_ps(normal, sub, is_sub)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn softmax_f16(s: &mut [f32], scale: f32) {
        let n = s.len();
        let p = s.as_mut_ptr();
        let sc = _mm256_set1_ps(scale);
        let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), sc);
            _mm256_storeu_ps(p.add(i), v);
            vmax = _mm256_max_ps(vmax, v);
            i += 8;
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
        let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for x in s[i..].iter_mut() {
            *x *= scale;
            max = max.max(*x);
        }
        let vm = _mm256_set1_ps(max);
        // The sum in f64, as the portable softmax keeps it.
        let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let mut i = 0;
        while i + 8 <= n {
            let e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vm));
            _mm256_storeu_ps(p.add(i), e);
            lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
            hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
            i += 8;
        }
        let mut halves = [0.0f64; 4];
        _mm256_storeu_pd(halves.as_mut_ptr(), _mm256_add_pd(lo, hi));
        let mut sum: f64 = halves.iter().sum();
        let tail = i;
        for x in s[tail..].iter_mut() {
            *x = exp_scalar(*x - max);
            sum += *x as f64;
        }
        let inv = (1.0 / sum) as f32;
        let vi = _mm256_set1_ps(inv);
        let mut i = 0;
        while i + 8 <= n {
            let w = round_f16_nonnegative(_mm256_mul_ps(_mm256_loadu_ps(p.add(i)), vi));
            _mm256_storeu_ps(p.add(i), w);
            i += 8;
        }
        for x in s[i..].iter_mut() {
            *x = super::round_f16(*x * inv);
        }
    }

    /// The vector `exp` on one value, so a row's tail gets the same function as its body.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn exp_scalar(x: f32) -> f32 {
        _mm256_cvtss_f32(exp_nonpositive(_mm256_set1_ps(x)))
    }

    #[cfg(test)]
    pub unsafe fn exp_lane(x: f32) -> f32 {
        exp_scalar(x)
    }

    #[cfg(test)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn round_lane(x: f32) -> f32 {
        _mm256_cvtss_f32(round_f16_nonnegative(_mm256_set1_ps(x)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn rows(n: usize, len: usize, seed: &mut u64) -> Vec<Vec<f32>> {
        (0..n)
            .map(|_| (0..len).map(|_| round_f16(lcg(seed))).collect())
            .collect()
    }

    fn f16_rows(n: usize, len: usize, seed: &mut u64) -> Vec<Vec<u16>> {
        (0..n)
            .map(|_| {
                (0..len)
                    .map(|_| half::f16::from_f32(lcg(seed)).to_bits())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn both_implementations_give_identical_dots_and_weighted_sums() {
        let isa = Isa::detect();
        let mut seed = 7;
        for len in [8usize, 64, 72, 128] {
            let q = rows(2, len, &mut seed);
            let k = f16_rows(4, len, &mut seed);
            let keys = [&k[0][..], &k[1][..], &k[2][..], &k[3][..]];
            let fast = isa.dots_4keys([&q[0][..], &q[1][..]], keys);
            let slow = Isa::Portable.dots_4keys([&q[0][..], &q[1][..]], keys);
            let one = isa.dots_4keys([&q[1][..]], keys);
            for j in 0..4 {
                for r in 0..2 {
                    assert_eq!(fast[r][j].to_bits(), slow[r][j].to_bits(), "len {len}");
                }
                assert_eq!(one[0][j], fast[1][j]);
            }
            let values = f16_rows(37, len, &mut seed);
            let vrefs: Vec<&[u16]> = values.iter().map(|v| &v[..]).collect();
            let w = rows(2, 37, &mut seed);
            let (mut a, mut b) = (vec![0.5f32; len], vec![0.25f32; len]);
            isa.weighted_sum([&w[0][..], &w[1][..]], &vrefs, [&mut a, &mut b]);
            let (mut ra, mut rb) = (vec![0.5f32; len], vec![0.25f32; len]);
            Isa::Portable.weighted_sum([&w[0][..], &w[1][..]], &vrefs, [&mut ra, &mut rb]);
            assert_eq!((a, b), (ra, rb), "len {len}");
        }
    }

    #[test]
    fn softmax_weights_sum_to_one_and_equal_the_portable_ones() {
        let isa = Isa::detect();
        let mut seed = 11;
        for n in [1usize, 7, 8, 33, 500] {
            let s: Vec<f32> = (0..n).map(|_| lcg(&mut seed) * 40.0).collect();
            let (mut fast, mut slow) = (s.clone(), s.clone());
            isa.softmax_f16(&mut fast, 0.125);
            Isa::Portable.softmax_f16(&mut slow, 0.125);
            let total: f32 = fast.iter().sum();
            assert!(
                (total - 1.0).abs() < 2e-3 * (n as f32).sqrt(),
                "n {n}: {total}"
            );
            assert_eq!(fast, slow, "n {n}");
            assert!(
                fast.iter().all(|&w| w == round_f16(w)),
                "weights are f16 values"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_equals_libm_and_vector_rounding_equals_half() {
        if Isa::detect() != Isa::Avx2 {
            return;
        }
        // Equal to libm's expf at every 61st f32 from 0 down to -110 (where it is 0).
        let mut b = 0x8000_0000u32;
        while f32::from_bits(b) > -110.0 {
            let x = f32::from_bits(b);
            // SAFETY: AVX2, FMA and F16C detected above.
            let (got, want) = (unsafe { avx2::exp_lane(x) }, x.exp());
            assert_eq!(got.to_bits(), want.to_bits(), "exp({x:e})");
            b += 61;
        }
        // Every f32 from 0 to 1.0 at a stride that covers all f16 subnormals' ties, normals.
        let mut b = 0u32;
        while b <= 1.0f32.to_bits() {
            let x = f32::from_bits(b);
            // SAFETY: AVX2 detected above.
            assert_eq!(unsafe { avx2::round_lane(x) }, round_f16(x), "{x:e}");
            b += 97;
        }
        for x in [
            2.0f32.powi(-25),
            3.0 * 2.0f32.powi(-25),
            2.0f32.powi(-14),
            1.0 + 2.0f32.powi(-11),
        ] {
            assert_eq!(unsafe { avx2::round_lane(x) }, round_f16(x), "{x:e}");
        }
    }
}
