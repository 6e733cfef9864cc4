//! The vision tower on the GPU (`CudaVisionTower`) on the committed tiny Idefics3 fixture
//! (tests/fixtures/tiny-idefics3), against three references:
//! - a host emulation of its arithmetic (`emulate`: bf16 rounding exactly where the device
//!   rounds, f32 elsewhere, the weights read from the checkpoint by name, independently of
//!   the library's loader): the device may differ from it only by summation order, so the
//!   bound is tight and an indexing mistake anywhere fails it;
//! - the CPU tower (f32) and transformers' embeddings: within [`BF16_TOL`], which the
//!   emulation's own distance from them justifies (checked on every machine, no GPU needed);
//! - greedy tokens: the fixture's prompts with CUDA-encoded images give transformers' tokens
//!   (teacher-forced, with the near-tie rule of the text tests).
//!
//! Each `vis_*` kernel is also checked alone against an f64 reference with NaN-poisoned
//! outputs (an unwritten element fails). The GPU tests print SKIP, with the reason, when no
//! CUDA device is usable.

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use turbine_kernels::cpu::linear::floats_of;
use turbine_kernels::cuda::vision::VISION_KERNEL_SPEC;
use turbine_kernels::cuda::{CudaVisionOptions, CudaVisionTower, Gpu};
use turbine_kernels::safetensors::SafetensorsFile;
use turbine_kernels::vision::{pixel_shuffle_rows, VisionConfig, VisionTower};

/// Largest |difference| allowed against the f32 references (the CPU tower, transformers),
/// as a fraction of the largest |value| of the reference. bf16 keeps 8 significant bits
/// (unit roundoff 2^-9 ~ 2e-3); each layer rounds its GEMM inputs (LayerNorm outputs,
/// q/k/v, probabilities, attention output, GELU output) and its weights, and the errors of
/// the fixture's 2 layers and connector add up: the emulation of exactly that arithmetic
/// lands at 4.7e-3 and 7.7e-3 on the fixture's two images (a fifth of this bound or less;
/// `bf16_emulation_is_within_tolerance_of_f32` prints the figures and holds it to half).
const BF16_TOL: f32 = 4e-2;

/// Largest |difference| between the device and the emulation of its arithmetic, as a
/// fraction of the largest |value|: f32 sums in another order (tensor cores, split sums),
/// whose last-bit differences flip a bf16 rounding here and there (one bf16 step is 2^-8
/// relative, diluted as it propagates), and `expf`/`tanhf` against Rust's; well under the
/// bf16 error itself (above), while an index mistake gives differences of the order of the
/// values themselves.
const EMU_TOL: f32 = 5e-3;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-idefics3")
}

use crate::support::cuda_device_present as usable;

fn config_json() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture().join("config.json")).unwrap()).unwrap()
}

fn cpu_tower() -> VisionTower {
    let weights = SafetensorsFile::open(&fixture().join("model.safetensors")).unwrap();
    VisionTower::load(VisionConfig::from_hf(&config_json()).unwrap(), &|n| {
        weights.tensor(n)
    })
    .unwrap()
}

fn gpu_tower(max_tiles_per_pass: usize) -> CudaVisionTower {
    CudaVisionTower::new(
        &cpu_tower(),
        CudaVisionOptions {
            device: 0,
            max_tiles_per_pass,
        },
    )
    .expect("the CUDA tower")
}

/// Per fixture image: its tiles (what the processor made) and transformers' embeddings.
fn reference_images() -> Vec<(Vec<Vec<f32>>, Vec<f32>)> {
    let refs = SafetensorsFile::open(&fixture().join("reference.safetensors")).unwrap();
    (0..2)
        .map(|i| {
            let pixels = refs.tensor(&format!("pixel_values.{i}")).unwrap();
            let tiles = pixels.shape[0];
            let flat = floats_of(&pixels).unwrap();
            let per = flat.len() / tiles;
            let tiles = flat.chunks(per).map(<[f32]>::to_vec).collect();
            let want = floats_of(&refs.tensor(&format!("image_embeds.{i}")).unwrap()).unwrap();
            (tiles, want)
        })
        .collect()
}

/// max |got - want| / max |want|.
fn rel_max_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, f32::max);
    let scale = want.iter().map(|w| w.abs()).fold(0.0f32, f32::max);
    worst / scale.max(1e-12)
}

fn round_bf16(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

/// The tower's weights read straight from the checkpoint (f32), matrices `[out, in]`.
struct EmuWeights {
    cfg: VisionConfig,
    patch_w: Vec<f32>,
    patch_b: Vec<f32>,
    pos: Vec<f32>,
    layers: Vec<EmuLayer>,
    post: (Vec<f32>, Vec<f32>),
    proj: Vec<f32>,
}

struct EmuLayer {
    ln1: (Vec<f32>, Vec<f32>),
    q: (Vec<f32>, Vec<f32>),
    k: (Vec<f32>, Vec<f32>),
    v: (Vec<f32>, Vec<f32>),
    o: (Vec<f32>, Vec<f32>),
    ln2: (Vec<f32>, Vec<f32>),
    fc1: (Vec<f32>, Vec<f32>),
    fc2: (Vec<f32>, Vec<f32>),
}

fn emu_weights() -> EmuWeights {
    let st = SafetensorsFile::open(&fixture().join("model.safetensors")).unwrap();
    let get = |name: &str| -> Vec<f32> {
        let t = ["model.", ""]
            .iter()
            .find_map(|p| st.tensor(&format!("{p}{name}")))
            .unwrap_or_else(|| panic!("{name} missing"));
        floats_of(&t).unwrap()
    };
    // Weights are rounded to bf16 as the device stores them; norms and biases stay f32.
    let mat = |name: &str| -> Vec<f32> { get(name).into_iter().map(round_bf16).collect() };
    let pair = |name: &str| (mat(&format!("{name}.weight")), get(&format!("{name}.bias")));
    let norm = |name: &str| (get(&format!("{name}.weight")), get(&format!("{name}.bias")));
    let cfg = VisionConfig::from_hf(&config_json()).unwrap();
    let vm = "vision_model";
    let layers = (0..cfg.n_layers)
        .map(|i| {
            let l = format!("{vm}.encoder.layers.{i}");
            EmuLayer {
                ln1: norm(&format!("{l}.layer_norm1")),
                q: pair(&format!("{l}.self_attn.q_proj")),
                k: pair(&format!("{l}.self_attn.k_proj")),
                v: pair(&format!("{l}.self_attn.v_proj")),
                o: pair(&format!("{l}.self_attn.out_proj")),
                ln2: norm(&format!("{l}.layer_norm2")),
                fc1: pair(&format!("{l}.mlp.fc1")),
                fc2: pair(&format!("{l}.mlp.fc2")),
            }
        })
        .collect();
    EmuWeights {
        patch_w: mat(&format!("{vm}.embeddings.patch_embedding.weight")),
        patch_b: get(&format!("{vm}.embeddings.patch_embedding.bias")),
        pos: get(&format!("{vm}.embeddings.position_embedding.weight")),
        layers,
        post: norm(&format!("{vm}.post_layernorm")),
        proj: mat("connector.modality_projection.proj.weight"),
        cfg,
    }
}

/// `x [rows, inp] · w [out, inp]^T` with f32 sums (+ bias if given), f32 out.
fn matmul(x: &[f32], w: &[f32], bias: Option<&[f32]>, rows: usize, out: usize) -> Vec<f32> {
    let inp = x.len() / rows;
    let mut y = vec![0.0f32; rows * out];
    for r in 0..rows {
        for o in 0..out {
            let dot: f32 = (0..inp).map(|k| x[r * inp + k] * w[o * inp + k]).sum();
            y[r * out + o] = dot + bias.map_or(0.0, |b| b[o]);
        }
    }
    y
}

/// LayerNorm of each row, bf16 out (the device's `vis_add_layernorm`).
fn layer_norm(x: &[f32], (w, b): &(Vec<f32>, Vec<f32>), eps: f32) -> Vec<f32> {
    let h = w.len();
    x.chunks(h)
        .flat_map(|row| {
            let mean = row.iter().sum::<f32>() / h as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
            let inv = 1.0 / (var + eps).sqrt();
            row.iter()
                .zip(w.iter().zip(b))
                .map(move |(v, (w, b))| round_bf16((v - mean) * inv * w + b))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn gelu_tanh(v: f32) -> f32 {
    0.5 * v * (1.0 + (0.797_884_6 * (v + 0.044_715 * v * v * v)).tanh())
}

/// The device's arithmetic for one tile on the host: see the module doc.
fn emulate(w: &EmuWeights, tile: &[f32]) -> Vec<f32> {
    let c = &w.cfg;
    let (h, n, p, side) = (
        c.hidden_size,
        c.num_patches(),
        c.patch_size,
        c.patches_per_side(),
    );
    let (heads, img) = (c.n_heads, c.image_size);
    let hd = h / heads;
    // im2col, rounded to bf16 (`vis_im2col`).
    let mut patches = Vec::with_capacity(n * c.num_channels * p * p);
    for cell in 0..n {
        let (py, px) = (cell / side, cell % side);
        for ch in 0..c.num_channels {
            for y in 0..p {
                for x in 0..p {
                    patches.push(round_bf16(tile[(ch * img + py * p + y) * img + px * p + x]));
                }
            }
        }
    }
    let mut x = matmul(&patches, &w.patch_w, Some(&w.patch_b), n, h);
    for (i, v) in x.iter_mut().enumerate() {
        *v += w.pos[i];
    }
    for l in &w.layers {
        let xn = layer_norm(&x, &l.ln1, c.layer_norm_eps);
        let q: Vec<f32> = matmul(&xn, &l.q.0, Some(&l.q.1), n, h)
            .into_iter()
            .map(round_bf16)
            .collect();
        let k: Vec<f32> = matmul(&xn, &l.k.0, Some(&l.k.1), n, h)
            .into_iter()
            .map(round_bf16)
            .collect();
        let v: Vec<f32> = matmul(&xn, &l.v.0, Some(&l.v.1), n, h)
            .into_iter()
            .map(round_bf16)
            .collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let mut attn = vec![0.0f32; n * h];
        for head in 0..heads {
            let off = head * hd;
            for i in 0..n {
                let scores: Vec<f32> = (0..n)
                    .map(|j| {
                        scale
                            * (0..hd)
                                .map(|d| q[i * h + off + d] * k[j * h + off + d])
                                .sum::<f32>()
                    })
                    .collect();
                let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = scores.iter().map(|s| (s - m).exp()).sum();
                let probs: Vec<f32> = scores
                    .iter()
                    .map(|s| round_bf16((s - m).exp() / sum))
                    .collect();
                for d in 0..hd {
                    let o: f32 = (0..n).map(|j| probs[j] * v[j * h + off + d]).sum();
                    attn[i * h + off + d] = round_bf16(o);
                }
            }
        }
        let o = matmul(&attn, &l.o.0, Some(&l.o.1), n, h);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let xn = layer_norm(&x, &l.ln2, c.layer_norm_eps);
        let ffn = l.fc1.1.len();
        let mid: Vec<f32> = matmul(&xn, &l.fc1.0, Some(&l.fc1.1), n, ffn)
            .into_iter()
            .map(|v| round_bf16(gelu_tanh(v)))
            .collect();
        let f = matmul(&mid, &l.fc2.0, Some(&l.fc2.1), n, h);
        x.iter_mut().zip(&f).for_each(|(a, b)| *a += b);
    }
    let xn = layer_norm(&x, &w.post, c.layer_norm_eps);
    let shuffled: Vec<f32> = pixel_shuffle_rows(1, side, c.scale_factor)
        .into_iter()
        .flat_map(|r| xn[r * h..(r + 1) * h].to_vec())
        .collect();
    matmul(&shuffled, &w.proj, None, c.tokens_per_tile(), c.text_hidden)
}

fn emulate_tiles(w: &EmuWeights, tiles: &[Vec<f32>]) -> Vec<f32> {
    tiles.iter().flat_map(|t| emulate(w, t)).collect()
}

/// No GPU needed: the emulated bf16 arithmetic is within [`BF16_TOL`] of the CPU tower and
/// of transformers (so the bound the device is held to is one bf16 itself meets), and
/// clearly different from them (the rounding is really emulated).
#[test]
fn bf16_emulation_is_within_tolerance_of_f32() {
    let w = emu_weights();
    let cpu = cpu_tower();
    for (i, (tiles, want)) in reference_images().iter().enumerate() {
        let emu = emulate_tiles(&w, tiles);
        let host = cpu.encode_tiles(tiles).unwrap();
        let (vs_cpu, vs_hf) = (rel_max_err(&emu, &host), rel_max_err(&emu, want));
        println!(
            "image {i}: bf16 emulation vs CPU tower {vs_cpu:.2e}, vs transformers {vs_hf:.2e}"
        );
        assert!(
            vs_cpu <= BF16_TOL / 2.0 && vs_hf <= BF16_TOL / 2.0,
            "image {i}"
        );
        assert!(vs_cpu > 1e-5, "image {i}: no bf16 rounding seen");
    }
}

#[test]
fn cuda_tower_matches_emulation_cpu_and_transformers() {
    if !usable() {
        return;
    }
    let w = emu_weights();
    let cpu = cpu_tower();
    let gpu = gpu_tower(16);
    for (i, (tiles, want)) in reference_images().iter().enumerate() {
        // All of an image's tiles in one call (one pass).
        let got = gpu.encode_tiles(tiles).unwrap();
        let host = cpu.encode_tiles(tiles).unwrap();
        let emu = emulate_tiles(&w, tiles);
        assert!(
            got.iter().all(|v| v.is_finite()),
            "image {i}: non-finite output"
        );
        let (e_emu, e_cpu, e_hf) = (
            rel_max_err(&got, &emu),
            rel_max_err(&got, &host),
            rel_max_err(&got, want),
        );
        println!(
            "image {i}, {} tiles: cuda vs emulation {e_emu:.2e}, vs CPU tower {e_cpu:.2e}, vs transformers {e_hf:.2e}",
            tiles.len()
        );
        assert!(e_emu <= EMU_TOL, "image {i}: cuda vs emulation {e_emu}");
        assert!(e_cpu <= BF16_TOL, "image {i}: cuda vs CPU tower {e_cpu}");
        assert!(e_hf <= BF16_TOL, "image {i}: cuda vs transformers {e_hf}");
    }
}

/// Passes of 2 tiles (5 tiles: two full passes and one of 1, scratch reused) give what one
/// pass of all 5 gives, and a pass of 1 tile what the first tile of the batch gives.
#[test]
fn passes_of_any_size_give_the_same_embeddings() {
    if !usable() {
        return;
    }
    let (tiles, _) = reference_images().remove(0);
    assert!(tiles.len() >= 5);
    let one_pass = gpu_tower(16).encode_tiles(&tiles).unwrap();
    let small = gpu_tower(2);
    let passes = small.encode_tiles(&tiles).unwrap();
    let e = rel_max_err(&passes, &one_pass);
    println!("5 tiles in passes of 2 vs one pass: {e:.2e}");
    assert!(e <= EMU_TOL, "passes of 2 vs one pass: {e}");
    let first = small.encode_tiles(&tiles[..1]).unwrap();
    let e1 = rel_max_err(&first, &one_pass[..first.len()]);
    assert!(
        e1 <= EMU_TOL,
        "a pass of one tile vs the batch's first: {e1}"
    );
    assert!(small.encode_tiles(&[]).unwrap().is_empty());
}

#[test]
fn a_tile_of_the_wrong_size_is_refused_on_the_gpu() {
    if !usable() {
        return;
    }
    let err = gpu_tower(4).encode_tiles(&[vec![0.0; 10]]).unwrap_err();
    assert!(err.to_string().contains("10 values"), "{err}");
}

/// The fixture's prompts with CUDA-encoded images (`VisionModel::on_cuda`, then `encode`)
/// spliced in, on the CPU backend: teacher-forced on transformers' greedy tokens, every step's
/// choice is transformers' token, except where the CPU-encoded run's top two logits are
/// closer than twice the two runs' largest logit difference (a near tie bf16 may flip).
#[test]
fn greedy_tokens_with_cuda_embeddings_match_transformers() {
    use turbine_kernels::backend::{Backend, SeqStep};
    use turbine_kernels::cpu::{CpuBackend, CpuBackendOptions};
    use turbine_kernels::loader::load_model;
    use turbine_kernels::sampling::argmax;
    use turbine_kernels::vision::{decode, DecodeLimits};
    if !usable() {
        return;
    }
    let model = load_model(&fixture()).unwrap();
    let cpu_vision = model.vision.clone().unwrap();
    let gpu_vision = cpu_vision.on_cuda(0).unwrap();
    assert_eq!(gpu_vision.tower.device(), "cuda:0");
    assert_eq!(cpu_vision.tower.device(), "cpu");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("reference.json")).unwrap()).unwrap();
    let hidden = model.config.hidden_size;
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for name in ["a", "b"] {
        let r = &meta["images"][name];
        let bytes = std::fs::read(fixture().join(r["image"].as_str().unwrap())).unwrap();
        let image = decode(&bytes, &DecodeLimits::default()).unwrap();
        let on_cpu = cpu_vision.encode(&image).unwrap();
        let on_gpu = gpu_vision.encode(&image).unwrap();
        assert_eq!(on_gpu.tokens, on_cpu.tokens);
        assert_eq!(on_gpu.prompt_text, on_cpu.prompt_text);
        let text = r["prompt_text"]
            .as_str()
            .unwrap()
            .replace("<image>", &on_gpu.prompt_text);
        let prompt = model.tokenizer.encode(&text, false).unwrap();
        assert_eq!(prompt, ids(&r["prompt_ids"]), "image {name}: prompt ids");
        let want = ids(&r["greedy_tokens"]);
        // Teacher-forced logits of every generated position with `embeds` spliced at the
        // image tokens (each run of them takes the next rows).
        let logits_with = |embeds: &[f32]| -> Vec<Vec<f32>> {
            let (splices, used) =
                crate::support::image_splices(&prompt, cpu_vision.image_token_id, embeds, hidden);
            assert_eq!(used * hidden, embeds.len(), "one embedding per image token");
            let mut backend = CpuBackend::new(
                model.config.clone(),
                &model.weights,
                CpuBackendOptions::default(),
            )
            .unwrap();
            let table: Vec<u32> = (0..16).collect();
            let first = backend
                .forward_spliced(
                    &[SeqStep {
                        tokens: &prompt,
                        start_pos: 0,
                        block_table: &table,
                        want_logits: true,
                    }],
                    &splices,
                )
                .unwrap();
            let mut out = vec![first.row(0).unwrap().to_vec()];
            for (s, tok) in want.iter().enumerate().take(want.len() - 1) {
                let step = backend
                    .forward(&[SeqStep {
                        tokens: std::slice::from_ref(tok),
                        start_pos: prompt.len() + s,
                        block_table: &table,
                        want_logits: true,
                    }])
                    .unwrap();
                out.push(step.row(0).unwrap().to_vec());
            }
            out
        };
        let cpu_logits = logits_with(&on_cpu.embeds);
        let gpu_logits = logits_with(&on_gpu.embeds);
        let mut agree = 0;
        for (s, (c, g)) in cpu_logits.iter().zip(&gpu_logits).enumerate() {
            assert_eq!(argmax(c), want[s], "image {name} step {s}: the CPU run");
            let got = argmax(g);
            if got == want[s] {
                agree += 1;
                continue;
            }
            let max_diff = c
                .iter()
                .zip(g)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let gap = c[want[s] as usize] - c[got as usize];
            println!("image {name} step {s}: cuda chose {got}, transformers {}; gap {gap:.4}, max |diff| {max_diff:.4}", want[s]);
            assert!(
                gap <= 2.0 * max_diff,
                "image {name} step {s}: a clear choice differs"
            );
        }
        println!(
            "image {name}: {agree}/{} greedy choices equal with CUDA-encoded embeddings",
            want.len()
        );
    }
}

// ---- Each kernel alone (f64 references, NaN-poisoned outputs).

fn gpu() -> Option<Gpu> {
    usable().then(|| Gpu::new(0, VISION_KERNEL_SPEC).expect("open device"))
}

fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
}

fn down_bf16(g: &Gpu, b: &turbine_kernels::cuda::DBuf, n: usize) -> Vec<f32> {
    let mut raw = vec![0u16; n];
    g.dtoh(b, 0, &mut raw).unwrap();
    raw.into_iter()
        .map(|u| bf16::from_bits(u).to_f32())
        .collect()
}

fn down_f32(g: &Gpu, b: &turbine_kernels::cuda::DBuf, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    g.dtoh(b, 0, &mut v).unwrap();
    v
}

/// A poisoned (NaN) device buffer of `bytes`.
fn poisoned(g: &Gpu, bytes: usize) -> turbine_kernels::cuda::DBuf {
    let b = g.alloc(bytes).unwrap();
    g.fill(b.ptr(), 0xff, bytes).unwrap();
    b
}

/// |got - want| <= tol * max(1, |want|) everywhere (bf16 outputs: tol ~ 2^-8).
fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= tol * w.abs().max(1.0),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

#[test]
fn im2col_and_embed_add_kernels() {
    let Some(g) = gpu() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (tiles, ch, image, patch) = (3usize, 3usize, 12usize, 4usize);
    let side = image / patch;
    let cpp = ch * patch * patch;
    let rows = tiles * side * side;
    let px = rand_vec(&mut rng, tiles * ch * image * image, 1.0);
    let px_d = g.upload(&px).unwrap();
    let patches = poisoned(&g, rows * cpp * 2);
    g.vis_im2col(px_d.ptr(), patches.ptr(), tiles, ch, image, patch)
        .unwrap();
    let got = down_bf16(&g, &patches, rows * cpp);
    let mut want = Vec::new();
    for t in 0..tiles {
        for cell in 0..side * side {
            let (py, pxx) = (cell / side, cell % side);
            for c in 0..ch {
                for y in 0..patch {
                    for x in 0..patch {
                        let v =
                            px[((t * ch + c) * image + py * patch + y) * image + pxx * patch + x];
                        want.push(round_bf16(v) as f64);
                    }
                }
            }
        }
    }
    assert_close("im2col", &got, &want, 0.0);

    let (h, n) = (40usize, side * side);
    let x0 = rand_vec(&mut rng, rows * h, 1.0);
    let bias = rand_vec(&mut rng, h, 1.0);
    let pos = rand_vec(&mut rng, n * h, 1.0);
    let x = g.upload(&x0).unwrap();
    let (b_d, pos_d) = (g.upload(&bias).unwrap(), g.upload(&pos).unwrap());
    g.vis_embed_add(x.ptr(), b_d.ptr(), pos_d.ptr(), rows, h, n)
        .unwrap();
    let got = down_f32(&g, &x, rows * h);
    let want: Vec<f64> = (0..rows * h)
        .map(|i| x0[i] as f64 + bias[i % h] as f64 + pos[((i / h) % n) * h + i % h] as f64)
        .collect();
    assert_close("embed_add", &got, &want, 1e-6);
}

#[test]
fn add_layernorm_bias_act_and_softmax_kernels() {
    let Some(g) = gpu() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for (rows, h) in [(5usize, 40usize), (3, 768), (2, 1100)] {
        let x0 = rand_vec(&mut rng, rows * h, 2.0);
        let add = rand_vec(&mut rng, rows * h, 1.0);
        let add_b = rand_vec(&mut rng, h, 1.0);
        let w = rand_vec(&mut rng, h, 1.5);
        let b = rand_vec(&mut rng, h, 0.5);
        for with_add in [false, true] {
            let x = g.upload(&x0).unwrap();
            let (a_d, ab_d) = (g.upload(&add).unwrap(), g.upload(&add_b).unwrap());
            let (w_d, b_d) = (g.upload(&w).unwrap(), g.upload(&b).unwrap());
            let out = poisoned(&g, rows * h * 2);
            let (ap, abp) = if with_add {
                (a_d.ptr(), ab_d.ptr())
            } else {
                (0, 0)
            };
            g.vis_add_layernorm(
                x.ptr(),
                ap,
                abp,
                w_d.ptr(),
                b_d.ptr(),
                out.ptr(),
                rows,
                h,
                1e-6,
            )
            .unwrap();
            let got_x = down_f32(&g, &x, rows * h);
            let got = down_bf16(&g, &out, rows * h);
            let mut want_x = Vec::new();
            let mut want = Vec::new();
            for r in 0..rows {
                let row: Vec<f64> = (0..h)
                    .map(|c| {
                        let i = r * h + c;
                        x0[i] as f64
                            + if with_add {
                                add[i] as f64 + add_b[c] as f64
                            } else {
                                0.0
                            }
                    })
                    .collect();
                let mean = row.iter().sum::<f64>() / h as f64;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / h as f64;
                let inv = 1.0 / (var + 1e-6).sqrt();
                for c in 0..h {
                    want.push((row[c] - mean) * inv * w[c] as f64 + b[c] as f64);
                }
                want_x.extend(row);
            }
            assert_close("add_layernorm x", &got_x, &want_x, 1e-6);
            assert_close("add_layernorm out", &got, &want, 8e-3);
        }
    }

    let (rows, cols) = (7usize, 300usize);
    let y = rand_vec(&mut rng, rows * cols, 4.0);
    let bias = rand_vec(&mut rng, cols, 1.0);
    let (y_d, b_d) = (g.upload(&y).unwrap(), g.upload(&bias).unwrap());
    for gelu in [false, true] {
        let out = poisoned(&g, rows * cols * 2);
        g.vis_bias_act(y_d.ptr(), b_d.ptr(), out.ptr(), rows, cols, gelu)
            .unwrap();
        let got = down_bf16(&g, &out, rows * cols);
        let want: Vec<f64> = (0..rows * cols)
            .map(|i| {
                let v = y[i] as f64 + bias[i % cols] as f64;
                if gelu {
                    let c = (2.0 / std::f64::consts::PI).sqrt();
                    0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
                } else {
                    v
                }
            })
            .collect();
        assert_close("bias_act", &got, &want, 8e-3);
    }

    for (rows, cols) in [(6usize, 16usize), (4, 1024), (3, 1000)] {
        let s = rand_vec(&mut rng, rows * cols, 8.0);
        let s_d = g.upload(&s).unwrap();
        let p = poisoned(&g, rows * cols * 2);
        g.vis_softmax_rows(s_d.ptr(), p.ptr(), rows, cols).unwrap();
        let got = down_bf16(&g, &p, rows * cols);
        let mut want = Vec::new();
        for r in 0..rows {
            let row = &s[r * cols..(r + 1) * cols];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            want.extend(row.iter().map(|&v| (v as f64 - m).exp() / z));
        }
        // Probabilities are at most 1: an absolute bound of a bf16 step at 1.
        assert_close("softmax", &got, &want, 4e-3);
    }
}

/// `vis_attention` (two strided-batched GEMMs around the softmax) for one tile against f64
/// attention on the same bf16 inputs, on a tile inside a larger buffer (offset rows), so a
/// wrong leading dimension or stride shows.
#[test]
fn attention_of_one_tile() {
    let Some(g) = gpu() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (n, heads, hd) in [(16usize, 2usize, 16usize), (196, 12, 64), (64, 3, 72)] {
        let h = heads * hd;
        let rows = 2 * n; // two tiles; the second is checked
        let qkv: Vec<f32> = rand_vec(&mut rng, rows * 3 * h, 1.0)
            .into_iter()
            .map(round_bf16)
            .collect();
        let qkv_d = g.upload(&bf16_bits(&qkv)).unwrap();
        let out = poisoned(&g, rows * h * 2);
        let scores = poisoned(&g, heads * n * n * 4);
        let probs = poisoned(&g, heads * n * n * 2);
        g.vis_attention(
            qkv_d.ptr() + (n * 3 * h * 2) as u64,
            out.ptr() + (n * h * 2) as u64,
            scores.ptr(),
            probs.ptr(),
            n,
            heads,
            hd,
        )
        .unwrap();
        let got = down_bf16(&g, &out, rows * h);
        assert!(
            got[..n * h].iter().all(|v| v.is_nan()),
            "the first tile's rows were written"
        );
        let at = |r: usize, c: usize| qkv[(n + r) * 3 * h + c] as f64;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut want = vec![0.0f64; n * h];
        for head in 0..heads {
            for i in 0..n {
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        scale
                            * (0..hd)
                                .map(|d| at(i, head * hd + d) * at(j, h + head * hd + d))
                                .sum::<f64>()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                for d in 0..hd {
                    want[i * h + head * hd + d] = (0..n)
                        .map(|j| (s[j] - m).exp() / z * at(j, 2 * h + head * hd + d))
                        .sum();
                }
            }
        }
        // bf16 probabilities and output: a few bf16 steps of the output's scale (|v| < 1).
        assert_close(
            &format!("attention n {n} heads {heads} hd {hd}"),
            &got[n * h..],
            &want,
            2e-2,
        );
    }
}
