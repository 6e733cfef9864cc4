//! The CPU backend's forward pass against a naive f64 reference (no paging, no batching, no
//! quantized activations) on tiny synthetic weights: batching, chunked prefill, paging with
//! scattered block ids, GQA, both RoPE styles, biases, tied/untied heads, quantized weights,
//! KV export/import, and input validation.

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use turbine_kernels::backend::{Backend, BackendError, SeqStep};
use turbine_kernels::cpu::{CpuBackend, CpuBackendOptions};
use turbine_kernels::model::{LayerWeights, ModelConfig, ModelWeights, RopeStyle};
use turbine_kernels::tensor::{DType, Storage, WeightTensor};

// ---------- synthetic weights ----------

#[derive(Clone, Copy)]
struct Variant {
    rope: RopeStyle,
    biases: bool,
    tied: bool,
    /// dtype of the matrices (norms stay F32).
    dtype: DType,
}

const PLAIN: Variant = Variant {
    rope: RopeStyle::Interleaved,
    biases: false,
    tied: true,
    dtype: DType::F32,
};

fn config(v: Variant) -> ModelConfig {
    ModelConfig {
        arch: "llama".into(),
        vocab_size: 61,
        hidden_size: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        intermediate_size: 96,
        rope_theta: 10000.0,
        rope_style: v.rope,
        rms_norm_eps: 1e-5,
        max_position: 200,
        tie_embeddings: v.tied,
    }
}

/// Reference weights in f64, exactly the values the backend's tensors encode.
struct RefLayer {
    attn_norm: Vec<f64>,
    wq: Vec<f64>,
    wk: Vec<f64>,
    wv: Vec<f64>,
    wo: Vec<f64>,
    bq: Vec<f64>,
    bk: Vec<f64>,
    bv: Vec<f64>,
    ffn_norm: Vec<f64>,
    gate: Vec<f64>,
    up: Vec<f64>,
    down: Vec<f64>,
}

struct RefModel {
    cfg: ModelConfig,
    embd: Vec<f64>,
    head: Vec<f64>,
    out_norm: Vec<f64>,
    layers: Vec<RefLayer>,
}

fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

/// Encodes `vals` (rows of `cols`) in `dtype`; returns the bytes and the values they decode to.
fn encode(vals: &[f32], dtype: DType) -> (Vec<u8>, Vec<f64>) {
    let mut bytes = Vec::new();
    let mut back = Vec::new();
    match dtype {
        DType::F32 => {
            for &v in vals {
                bytes.extend_from_slice(&v.to_le_bytes());
                back.push(v as f64);
            }
        }
        DType::Q8_0 => {
            for b in vals.chunks(32) {
                let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = f16::from_f32(amax / 127.0).to_f32();
                bytes.extend_from_slice(&f16_bytes(d));
                for &v in b {
                    let q = if d == 0.0 {
                        0
                    } else {
                        (v / d).round().clamp(-127.0, 127.0) as i8
                    };
                    bytes.push(q as u8);
                    back.push(q as f64 * d as f64);
                }
            }
        }
        DType::Q4_1 => {
            for b in vals.chunks(32) {
                let min = b.iter().copied().fold(f32::INFINITY, f32::min);
                let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = f16::from_f32((max - min) / 15.0).to_f32();
                let m = f16::from_f32(min).to_f32();
                bytes.extend_from_slice(&f16_bytes(d));
                bytes.extend_from_slice(&f16_bytes(m));
                let q: Vec<u8> = b
                    .iter()
                    .map(|&v| {
                        if d == 0.0 {
                            0
                        } else {
                            ((v - m) / d).round().clamp(0.0, 15.0) as u8
                        }
                    })
                    .collect();
                for j in 0..16 {
                    bytes.push(q[j] | (q[j + 16] << 4));
                }
                back.extend(q.iter().map(|&q| q as f64 * d as f64 + m as f64));
            }
        }
        DType::Q4_0 => {
            for b in vals.chunks(32) {
                let amax = b
                    .iter()
                    .copied()
                    .fold(0f32, |a, v| if v.abs() > a.abs() { v } else { a });
                let d = f16::from_f32(amax / -8.0).to_f32();
                bytes.extend_from_slice(&f16_bytes(d));
                let q: Vec<u8> = b
                    .iter()
                    .map(|&v| {
                        if d == 0.0 {
                            8
                        } else {
                            ((v / d).round() + 8.0).clamp(0.0, 15.0) as u8
                        }
                    })
                    .collect();
                for j in 0..16 {
                    bytes.push(q[j] | (q[j + 16] << 4));
                }
                back.extend(q.iter().map(|&q| (q as f64 - 8.0) * d as f64));
            }
        }
        other => panic!("test encoder lacks {other:?}"),
    }
    (bytes, back)
}

fn tensor(name: &str, shape: Vec<usize>, dtype: DType, bytes: Vec<u8>) -> WeightTensor {
    WeightTensor {
        name: name.into(),
        dtype,
        shape,
        storage: Storage::Owned(Arc::new(bytes)),
    }
}

struct Gen {
    rng: ChaCha8Rng,
}

impl Gen {
    fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| self.rng.gen_range(-1.0..1.0) * scale)
            .collect()
    }

    /// A `[rows, cols]` matrix with entries ~ U(-1,1)/sqrt(cols).
    fn matrix(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        dtype: DType,
    ) -> (WeightTensor, Vec<f64>) {
        let vals = self.values(rows * cols, 1.7 / (cols as f32).sqrt());
        let (bytes, back) = encode(&vals, dtype);
        (tensor(name, vec![rows, cols], dtype, bytes), back)
    }

    fn vector(
        &mut self,
        name: &str,
        n: usize,
        around: f32,
        spread: f32,
    ) -> (WeightTensor, Vec<f64>) {
        let vals: Vec<f32> = self.values(n, spread).iter().map(|v| v + around).collect();
        let (bytes, back) = encode(&vals, DType::F32);
        (tensor(name, vec![n], DType::F32, bytes), back)
    }
}

fn build(v: Variant, seed: u64) -> (ModelConfig, ModelWeights, RefModel) {
    let cfg = config(v);
    let mut g = Gen {
        rng: ChaCha8Rng::seed_from_u64(seed),
    };
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let (qd, kvd, ff) = (cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.intermediate_size);
    let mut layers = Vec::new();
    let mut ref_layers = Vec::new();
    for i in 0..cfg.n_layers {
        let n = |s: &str| format!("blk.{i}.{s}");
        let (attn_norm, r_an) = g.vector(&n("attn_norm"), h, 1.0, 0.2);
        let (wq, r_wq) = g.matrix(&n("attn_q"), qd, h, v.dtype);
        let (wk, r_wk) = g.matrix(&n("attn_k"), kvd, h, v.dtype);
        let (wv, r_wv) = g.matrix(&n("attn_v"), kvd, h, v.dtype);
        let (wo, r_wo) = g.matrix(&n("attn_output"), h, qd, v.dtype);
        let mut bias = |name: &str, len: usize| {
            if v.biases {
                let (t, r) = g.vector(&n(name), len, 0.0, 0.5);
                (Some(t), r)
            } else {
                (None, vec![0.0; len])
            }
        };
        let (bq, r_bq) = bias("attn_q.bias", qd);
        let (bk, r_bk) = bias("attn_k.bias", kvd);
        let (bv, r_bv) = bias("attn_v.bias", kvd);
        let (ffn_norm, r_fn) = g.vector(&n("ffn_norm"), h, 1.0, 0.2);
        let (w_gate, r_g) = g.matrix(&n("ffn_gate"), ff, h, v.dtype);
        let (w_up, r_u) = g.matrix(&n("ffn_up"), ff, h, v.dtype);
        let (w_down, r_d) = g.matrix(&n("ffn_down"), h, ff, v.dtype);
        layers.push(LayerWeights {
            attn_norm,
            wq,
            wk,
            wv,
            wo,
            bq,
            bk,
            bv,
            ffn_norm,
            w_gate,
            w_up,
            w_down,
        });
        ref_layers.push(RefLayer {
            attn_norm: r_an,
            wq: r_wq,
            wk: r_wk,
            wv: r_wv,
            wo: r_wo,
            bq: r_bq,
            bk: r_bk,
            bv: r_bv,
            ffn_norm: r_fn,
            gate: r_g,
            up: r_u,
            down: r_d,
        });
    }
    // Embedding rows scaled up so hidden states are O(1).
    let embd_dtype = if v.dtype == DType::F32 {
        DType::F32
    } else {
        DType::Q8_0
    };
    let vals = g.values(cfg.vocab_size * h, 1.0);
    let (bytes, r_embd) = encode(&vals, embd_dtype);
    let token_embd = tensor("token_embd", vec![cfg.vocab_size, h], embd_dtype, bytes);
    let (output, r_head) = if v.tied {
        (None, r_embd.clone())
    } else {
        let (t, r) = g.matrix("output", cfg.vocab_size, h, v.dtype);
        (Some(t), r)
    };
    let (output_norm, r_on) = g.vector("output_norm", h, 1.0, 0.2);
    let weights = ModelWeights {
        token_embd,
        layers,
        output_norm,
        output,
    };
    let reference = RefModel {
        cfg: cfg.clone(),
        embd: r_embd,
        head: r_head,
        out_norm: r_on,
        layers: ref_layers,
    };
    (cfg, weights, reference)
}

// ---------- the naive reference ----------

fn matvec(w: &[f64], x: &[f64], rows: usize) -> Vec<f64> {
    let cols = x.len();
    (0..rows)
        .map(|r| (0..cols).map(|c| w[r * cols + c] * x[c]).sum())
        .collect()
}

fn rmsnorm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(a, b)| a * s * b).collect()
}

fn rope(x: &mut [f64], pos: usize, hd: usize, theta: f64, style: RopeStyle) {
    for head in x.chunks_mut(hd) {
        for i in 0..hd / 2 {
            let ang = pos as f64 * theta.powf(-2.0 * i as f64 / hd as f64);
            let (a, b) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Neox => (i, i + hd / 2),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * ang.cos() - x1 * ang.sin();
            head[b] = x0 * ang.sin() + x1 * ang.cos();
        }
    }
}

/// Logits after every token of `tokens`, computed position by position from scratch.
fn reference(m: &RefModel, tokens: &[u32]) -> Vec<Vec<f64>> {
    let c = &m.cfg;
    let (h, hd) = (c.hidden_size, c.head_dim);
    let eps = c.rms_norm_eps as f64;
    let group = c.n_heads / c.n_kv_heads;
    let mut keys: Vec<Vec<Vec<f64>>> = vec![Vec::new(); c.n_layers];
    let mut vals: Vec<Vec<Vec<f64>>> = vec![Vec::new(); c.n_layers];
    let mut out = Vec::new();
    for (pos, &t) in tokens.iter().enumerate() {
        let mut x: Vec<f64> = m.embd[t as usize * h..(t as usize + 1) * h].to_vec();
        for (li, l) in m.layers.iter().enumerate() {
            let xn = rmsnorm(&x, &l.attn_norm, eps);
            let add = |v: Vec<f64>, b: &[f64]| -> Vec<f64> {
                v.iter().zip(b).map(|(a, b)| a + b).collect()
            };
            let mut q = add(matvec(&l.wq, &xn, c.n_heads * hd), &l.bq);
            let mut k = add(matvec(&l.wk, &xn, c.n_kv_heads * hd), &l.bk);
            let v = add(matvec(&l.wv, &xn, c.n_kv_heads * hd), &l.bv);
            rope(&mut q, pos, hd, c.rope_theta as f64, c.rope_style);
            rope(&mut k, pos, hd, c.rope_theta as f64, c.rope_style);
            keys[li].push(k);
            vals[li].push(v);
            let mut attn = vec![0.0; c.n_heads * hd];
            for hh in 0..c.n_heads {
                let kv = hh / group;
                let qh = &q[hh * hd..(hh + 1) * hd];
                let scores: Vec<f64> = keys[li]
                    .iter()
                    .map(|k| {
                        qh.iter()
                            .zip(&k[kv * hd..(kv + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for (p, w) in e.iter().enumerate() {
                    for d in 0..hd {
                        attn[hh * hd + d] += w / z * vals[li][p][kv * hd + d];
                    }
                }
            }
            let o = matvec(&l.wo, &attn, h);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let xn = rmsnorm(&x, &l.ffn_norm, eps);
            let g = matvec(&l.gate, &xn, c.intermediate_size);
            let u = matvec(&l.up, &xn, c.intermediate_size);
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = matvec(&l.down, &act, h);
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
        let xn = rmsnorm(&x, &m.out_norm, eps);
        out.push(matvec(&m.head, &xn, c.vocab_size));
    }
    out
}

// ---------- helpers ----------

fn backend(cfg: &ModelConfig, w: &ModelWeights, block_size: usize, threads: usize) -> CpuBackend {
    CpuBackend::new(
        cfg.clone(),
        w,
        CpuBackendOptions {
            num_blocks: 64,
            block_size,
            threads,
        },
    )
    .unwrap()
}

fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.gen_range(0..vocab as u32)).collect()
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

fn rms(b: &[f64]) -> f64 {
    (b.iter().map(|v| v * v).sum::<f64>() / b.len() as f64).sqrt()
}

/// `rel` is relative to the reference logits' RMS. The f32 backends differ from the f64
/// reference mostly through the f16 rounding of K, V, queries and attention weights that
/// the CPU backend shares with llama.cpp (~1e-3 relative).
fn assert_close(got: &[f32], want: &[f64], rel: f64, what: &str) {
    let d = max_abs_diff(got, want);
    let scale = rms(want).max(1e-3);
    assert!(
        d <= rel * scale,
        "{what}: max |diff| {d:.3e} > {rel} * rms {scale:.3e}"
    );
}

/// Runs `seq` through `be` in chunks of the given sizes, returning the logits after each chunk.
fn run_chunks(be: &mut CpuBackend, seq: &[u32], chunks: &[usize], table: &[u32]) -> Vec<Vec<f32>> {
    let mut pos = 0;
    let mut out = Vec::new();
    for &c in chunks {
        let step = SeqStep {
            tokens: &seq[pos..pos + c],
            start_pos: pos,
            block_table: table,
            want_logits: true,
        };
        let l = be.forward(&[step]).unwrap();
        out.push(l.row(0).unwrap().to_vec());
        pos += c;
    }
    out
}

fn step<'a>(tokens: &'a [u32], start_pos: usize, block_table: &'a [u32]) -> SeqStep<'a> {
    SeqStep {
        tokens,
        start_pos,
        block_table,
        want_logits: true,
    }
}

// ---------- tests ----------

#[test]
fn one_shot_prefill_and_decode_match_reference() {
    for (variant, what) in [
        (PLAIN, "llama-like, GQA, tied"),
        (
            Variant {
                rope: RopeStyle::Neox,
                biases: true,
                tied: false,
                dtype: DType::F32,
            },
            "qwen2-like: neox rope, q/k/v biases, untied head",
        ),
    ] {
        let (cfg, w, r) = build(variant, 11);
        let seq = tokens(1, 23, cfg.vocab_size);
        let want = reference(&r, &seq);
        let mut be = backend(&cfg, &w, 4, 2);
        let table = [9, 3, 17, 4, 40, 0, 22];
        // 20-token prefill, then three single-token decode steps.
        let got = run_chunks(&mut be, &seq, &[20, 1, 1, 1], &table);
        for (g, idx) in got.iter().zip([19, 20, 21, 22]) {
            assert_close(g, &want[idx], 3e-3, &format!("{what}, position {idx}"));
        }
    }
}

#[test]
fn chunked_prefill_equals_one_shot() {
    let (cfg, w, r) = build(PLAIN, 5);
    let seq = tokens(2, 30, cfg.vocab_size);
    let want = reference(&r, &seq);
    let table = [5, 1, 12, 7, 30, 2, 8, 9];
    let mut one = backend(&cfg, &w, 4, 1);
    let mut chunked = backend(&cfg, &w, 4, 2);
    let a = run_chunks(&mut one, &seq, &[30], &table);
    let b = run_chunks(&mut chunked, &seq, &[3, 8, 1, 13, 5], &table);
    let (a, b) = (a.last().unwrap(), b.last().unwrap());
    assert_close(a, &want[29], 3e-3, "one shot");
    assert_close(b, &want[29], 3e-3, "chunked");
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(d < 1e-4, "chunked vs one-shot differ by {d}");
}

#[test]
fn batch_of_sequences_at_different_positions() {
    let (cfg, w, r) = build(PLAIN, 6);
    let v = cfg.vocab_size;
    let (s1, s2, s3) = (tokens(10, 12, v), tokens(11, 9, v), tokens(12, 6, v));
    let (w1, w2) = (reference(&r, &s1), reference(&r, &s2));
    let (t1, t2, t3): (&[u32], &[u32], &[u32]) = (&[0, 1, 2], &[10, 3, 11], &[6, 20]);
    let mut be = backend(&cfg, &w, 4, 2);
    // Warm up: seq 1 has 8 tokens cached, seq 2 has 8, seq 3 nothing.
    be.forward(&[
        SeqStep {
            tokens: &s1[..8],
            start_pos: 0,
            block_table: t1,
            want_logits: false,
        },
        SeqStep {
            tokens: &s2[..8],
            start_pos: 0,
            block_table: t2,
            want_logits: false,
        },
    ])
    .unwrap();
    // One call: seq 1 continues with a 4-token chunk, seq 2 decodes one token, seq 3
    // prefills from scratch without wanting logits.
    let l = be
        .forward(&[
            SeqStep {
                tokens: &s1[8..12],
                start_pos: 8,
                block_table: t1,
                want_logits: true,
            },
            SeqStep {
                tokens: &s2[8..9],
                start_pos: 8,
                block_table: t2,
                want_logits: true,
            },
            SeqStep {
                tokens: &s3,
                start_pos: 0,
                block_table: t3,
                want_logits: false,
            },
        ])
        .unwrap();
    assert_eq!(l.rows(), 2);
    assert_close(l.row(0).unwrap(), &w1[11], 3e-3, "seq 1");
    assert_close(l.row(1).unwrap(), &w2[8], 3e-3, "seq 2");
    // Seq 3's cache was written correctly: decode its next token alone.
    let next = [s3[5]];
    let l3 = be
        .forward(&[SeqStep {
            tokens: &next,
            start_pos: 6,
            block_table: t3,
            want_logits: true,
        }])
        .unwrap();
    let mut s3x = s3.clone();
    s3x.push(s3[5]);
    assert_close(l3.row(0).unwrap(), &reference(&r, &s3x)[6], 3e-3, "seq 3");
}

#[test]
fn quantized_weights_track_the_reference() {
    for dtype in [DType::Q4_1, DType::Q4_0, DType::Q8_0] {
        let (cfg, w, r) = build(Variant { dtype, ..PLAIN }, 21);
        let seq = tokens(3, 17, cfg.vocab_size);
        let want = reference(&r, &seq);
        let mut be = backend(&cfg, &w, 16, 2);
        let got = run_chunks(&mut be, &seq, &[16, 1], &[3, 1]);
        // The reference uses the same (dequantized) weights but exact activations; the
        // backend quantizes activations to 8 bits per block of 32, which costs ~1% noise.
        assert_close(&got[0], &want[15], 0.08, &format!("{dtype:?} prefill"));
        assert_close(&got[1], &want[16], 0.08, &format!("{dtype:?} decode"));
    }
}

#[test]
fn exported_blocks_continue_on_another_backend() {
    let (cfg, w, _) = build(PLAIN, 8);
    let seq = tokens(4, 10, cfg.vocab_size);
    let mut a = backend(&cfg, &w, 4, 1);
    let mut b = backend(&cfg, &w, 4, 1);
    run_chunks(&mut a, &seq[..9], &[9], &[4, 5, 6]);
    let bytes = a.export_blocks(&[4, 5, 6]).unwrap();
    assert_eq!(bytes.len(), 3 * a.kv_layout().bytes_per_block());
    b.import_blocks(&[30, 2, 11], &bytes).unwrap();
    let next = [seq[9]];
    let la = a
        .forward(&[SeqStep {
            tokens: &next,
            start_pos: 9,
            block_table: &[4, 5, 6],
            want_logits: true,
        }])
        .unwrap();
    let lb = b
        .forward(&[SeqStep {
            tokens: &next,
            start_pos: 9,
            block_table: &[30, 2, 11],
            want_logits: true,
        }])
        .unwrap();
    assert_eq!(la, lb);
    // Copy-on-write: copying block 30 to 31 and using it gives the same result again.
    b.copy_blocks(&[(30, 31)]).unwrap();
    let lc = b
        .forward(&[SeqStep {
            tokens: &next,
            start_pos: 9,
            block_table: &[31, 2, 11],
            want_logits: true,
        }])
        .unwrap();
    assert_eq!(la, lc);
}

#[test]
fn bad_input_is_rejected_without_panicking() {
    let (cfg, w, _) = build(PLAIN, 9);
    let mut be = backend(&cfg, &w, 4, 1);
    let ok_table = [0, 1, 2];
    let cases: Vec<(Vec<SeqStep<'_>>, &str)> = vec![
        (vec![step(&[1, 2], 0, &[0, 64])], "in range"), // valid: only block 0 needed
        (vec![step(&[1, 2], 3, &[0, 64])], "bad block"),
        (vec![step(&[1; 9], 0, &ok_table[..2])], "short table"),
        (vec![step(&[61], 0, &ok_table)], "bad token"),
        (vec![step(&[], 0, &ok_table)], "empty"),
        (vec![step(&[1], 200, &[0; 60])], "too long"),
        (
            vec![step(&[1], 0, &ok_table), step(&[2], 0, &ok_table)],
            "conflict",
        ),
        (vec![step(&[1], usize::MAX, &ok_table)], "overflow"),
    ];
    for (batch, what) in cases {
        let r = be.forward(&batch);
        match what {
            "in range" => assert!(r.is_ok(), "{what}: {r:?}"),
            "bad block" => assert!(
                matches!(r, Err(BackendError::BadBlockId { block: 64, .. })),
                "{r:?}"
            ),
            "short table" => assert!(
                matches!(r, Err(BackendError::BlockTableTooShort { .. })),
                "{r:?}"
            ),
            "bad token" => assert!(
                matches!(r, Err(BackendError::BadTokenId { token: 61, .. })),
                "{r:?}"
            ),
            "empty" => assert!(
                matches!(r, Err(BackendError::EmptyStep { index: 0 })),
                "{r:?}"
            ),
            "too long" => assert!(
                matches!(r, Err(BackendError::SequenceTooLong { .. })),
                "{r:?}"
            ),
            "conflict" => assert!(
                matches!(r, Err(BackendError::ConflictingWrites { .. })),
                "{r:?}"
            ),
            _ => assert!(r.is_err(), "{what}: {r:?}"),
        }
    }
    assert!(be.forward(&[]).unwrap().data.is_empty());
    // Shape mismatch at construction is an error, not a panic.
    let mut bad = w.clone();
    bad.layers[0].wq.shape = vec![3, 3];
    assert!(matches!(
        CpuBackend::new(cfg.clone(), &bad, CpuBackendOptions::default()),
        Err(BackendError::UnsupportedWeight { .. })
    ));
}

/// A backend that only has `forward`: the trait's default `forward_every` (one call per
/// position of the steps that want every row).
struct ForwardOnly(CpuBackend);

impl Backend for ForwardOnly {
    fn config(&self) -> &ModelConfig {
        self.0.config()
    }
    fn kv_layout(&self) -> turbine_kernels::backend::KvLayout {
        self.0.kv_layout()
    }
    fn forward(
        &mut self,
        batch: &[SeqStep<'_>],
    ) -> Result<turbine_kernels::backend::Logits, BackendError> {
        self.0.forward(batch)
    }
    fn copy_blocks(&mut self, src_dst: &[(u32, u32)]) -> Result<(), BackendError> {
        self.0.copy_blocks(src_dst)
    }
    fn export_blocks(&self, ids: &[u32]) -> Result<Vec<u8>, BackendError> {
        self.0.export_blocks(ids)
    }
    fn import_blocks(&mut self, ids: &[u32], data: &[u8]) -> Result<(), BackendError> {
        self.0.import_blocks(ids, data)
    }
}

#[test]
fn every_position_logits_match_reference_in_one_pass_and_by_default() {
    let (cfg, w, r) = build(PLAIN, 8);
    // A prompt wanting every row (11 tokens after 3 cached) next to a plain decode.
    let seq = tokens(4, 14, cfg.vocab_size);
    let other = tokens(5, 6, cfg.vocab_size);
    let want = reference(&r, &seq);
    let want_other = reference(&r, &other);
    let (table, table_other) = ([3, 9, 1, 12], [20, 21]);
    let mut one = backend(&cfg, &w, 4, 2);
    let mut default = ForwardOnly(backend(&cfg, &w, 4, 1));
    for be in [&mut one as &mut dyn Backend, &mut default] {
        be.forward(&[
            step(&seq[..3], 0, &table),
            step(&other[..5], 0, &table_other),
        ])
        .unwrap();
        let batch = [
            step(&seq[3..], 3, &table),
            step(&other[5..], 5, &table_other),
        ];
        let logits = be.forward_every(&batch, &[true, false]).unwrap();
        assert_eq!(logits.rows(), 11 + 1);
        for (p, want) in want.iter().enumerate().take(14).skip(3) {
            let got = logits.row(p - 3).unwrap();
            assert_close(got, want, 3e-3, &format!("position {p}"));
        }
        assert_close(logits.row(11).unwrap(), &want_other[5], 3e-3, "the decode");
        // Nothing asked: the plain forward.
        let rows = be
            .forward_every(&[step(&seq[..1], 0, &[30])], &[false])
            .unwrap();
        assert_eq!(rows.rows(), 1);
    }
}

/// The backend checked against itself: row `p` of `forward_every` over a whole prompt is
/// the last-position logits of the prefix `..=p` run alone (a fresh sequence each time, in
/// blocks of its own), the teacher-forced identity prompt logprobs rest on. Also with the
/// prompt's start already cached (a later chunk).
#[test]
fn every_position_row_is_the_last_row_of_its_prefix() {
    let (cfg, w, _) = build(PLAIN, 9);
    let seq = tokens(6, 13, cfg.vocab_size);
    let mut be = backend(&cfg, &w, 4, 2);
    let table = [1, 2, 3, 4];
    let all = be.forward_every(&[step(&seq, 0, &table)], &[true]).unwrap();
    assert_eq!(all.rows(), seq.len());
    // A later chunk (positions 5..13 over cached 0..5) in other blocks.
    let later = [40, 41, 42, 43];
    be.forward(&[step(&seq[..5], 0, &later)]).unwrap();
    let chunk = be
        .forward_every(&[step(&seq[5..], 5, &later)], &[true])
        .unwrap();
    for p in 0..seq.len() {
        let alone = [20, 21, 22, 23];
        let last = be.forward(&[step(&seq[..=p], 0, &alone)]).unwrap();
        let want: Vec<f64> = last.row(0).unwrap().iter().map(|&x| x as f64).collect();
        assert_close(all.row(p).unwrap(), &want, 1e-5, &format!("position {p}"));
        if p >= 5 {
            let got = chunk.row(p - 5).unwrap();
            assert_close(got, &want, 1e-5, &format!("chunk, position {p}"));
        }
    }
}
