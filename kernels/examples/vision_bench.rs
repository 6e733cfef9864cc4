//! Encoder throughput on the CPU: images per second through what an `encoder` worker runs
//! for each image (`VisionModel::encode`: the Idefics3 processor, then the SigLIP tower and
//! the pixel-shuffle connector tile by tile), with synthetic weights in real shapes.
//!
//! Shapes (`BENCH_SHAPE`):
//! - `smolvlm-256m` (default): SmolVLM-256M-Instruct's tower, SigLIP-base patch 16 on
//!   512-pixel tiles (hidden 768, MLP 3072, 12 layers, 12 heads; 1024 patches a tile), pixel
//!   shuffle 4 into 64 tokens of width 576;
//! - `siglip-base-224`: SigLIP-base patch 16 on 224-pixel tiles (196 patches), shuffle 2
//!   into 49 tokens of width 576.
//!
//! Images (`BENCH_IMAGES`, comma-separated, default `1`): `1` is a square photo with image
//! splitting off (one tile); `split` is the same 512x512 photo through SmolVLM's own
//! processor settings (longest edge 2048, 512-pixel tiles: 4x4 tiles plus the global view).
//!
//! Build with the workspace's features (the artifacts the tests use; kernels is optimised
//! in the dev profile) and run the binary:
//!
//! ```text
//! cargo build --workspace --features turbine/cuda --example vision_bench
//! BENCH_RUNS=3 target/debug/examples/vision_bench
//! ```
//!
//! Threads: rayon's (RAYON_NUM_THREADS; default one per core). Prints, per image kind, the
//! median seconds per image over BENCH_RUNS runs (after one warm-up), images/s and tiles/s.
//!
//! Anchor, in the same run and on the same threads (so a loaded machine weighs on both
//! alike): the CPU backend's prefill of a 512-token prompt on the default text model
//! (SmolLM2-135M-Instruct Q4_1, the text model of the fixture's shape), when it is there
//! (`BENCH_ANCHOR=0` skips it).
//!
//! `--device cuda` (or `cuda:N`; a build with the `cuda` feature): the CUDA tower
//! (`CudaVisionTower`, the same synthetic weights uploaded as bf16) for both shapes (or
//! `BENCH_SHAPE`'s), batches of `BENCH_TILES` tiles per call (comma-separated, default `1,8`):
//! median wall time of `encode_tiles` (pixels up, tower, embeddings down: each call ends
//! synchronised) over `BENCH_RUNS` runs (default 10) after 3 warm-up calls, and tiles/s
//! (images/s of one-tile images); then whole images through `VisionModel::encode` on the GPU
//! (the processor on the host) for `BENCH_IMAGES`. Anchor: the CUDA backend's prefill of 512
//! tokens on synthetic SmolLM2-135M weights on the same GPU, median of the same runs.
//!
//! ```text
//! cargo build --release -p turbine-kernels --features cuda --example vision_bench
//! target/release/examples/vision_bench --device cuda
//! ```

use std::sync::Arc;
use std::time::Instant;
use turbine_kernels::backend::{Backend, SeqStep};
use turbine_kernels::cpu::{CpuBackend, CpuBackendOptions};
use turbine_kernels::loader::{default_model_path, load_model, VisionModel};
use turbine_kernels::tensor::{DType, Storage, WeightTensor};
use turbine_kernels::vision::{
    process, ImageEncoder, ProcessorConfig, RgbImage, VisionConfig, VisionTower,
};

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Small deterministic values (a weight's scale does not change the arithmetic's cost).
fn tensor(name: &str, shape: &[usize], seed: u64) -> WeightTensor {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut bytes = Vec::with_capacity(n * 4);
    for _ in 0..n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let x = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    WeightTensor {
        name: name.to_string(),
        dtype: DType::F32,
        shape: shape.to_vec(),
        storage: Storage::Owned(Arc::new(bytes)),
    }
}

fn tower(cfg: VisionConfig) -> VisionTower {
    let (h, ffn, c, p) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_channels,
        cfg.patch_size,
    );
    let s2 = cfg.scale_factor * cfg.scale_factor;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        (
            "vision_model.embeddings.patch_embedding.weight".into(),
            vec![h, c, p, p],
        ),
        (
            "vision_model.embeddings.patch_embedding.bias".into(),
            vec![h],
        ),
        (
            "vision_model.embeddings.position_embedding.weight".into(),
            vec![cfg.num_patches(), h],
        ),
        ("vision_model.post_layernorm.weight".into(), vec![h]),
        ("vision_model.post_layernorm.bias".into(), vec![h]),
        (
            "connector.modality_projection.proj.weight".into(),
            vec![cfg.text_hidden, h * s2],
        ),
    ];
    for i in 0..cfg.n_layers {
        let l = format!("vision_model.encoder.layers.{i}");
        for n in ["layer_norm1", "layer_norm2"] {
            shapes.push((format!("{l}.{n}.weight"), vec![h]));
            shapes.push((format!("{l}.{n}.bias"), vec![h]));
        }
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            shapes.push((format!("{l}.self_attn.{n}.weight"), vec![h, h]));
            shapes.push((format!("{l}.self_attn.{n}.bias"), vec![h]));
        }
        shapes.push((format!("{l}.mlp.fc1.weight"), vec![ffn, h]));
        shapes.push((format!("{l}.mlp.fc1.bias"), vec![ffn]));
        shapes.push((format!("{l}.mlp.fc2.weight"), vec![h, ffn]));
        shapes.push((format!("{l}.mlp.fc2.bias"), vec![h]));
    }
    let tensors: std::collections::HashMap<String, WeightTensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| (name.clone(), tensor(name, shape, i as u64 + 1)))
        .collect();
    VisionTower::load(cfg, &|name| tensors.get(name).cloned()).expect("the synthetic tower")
}

/// SmolVLM's processor settings (processor_config.json of SmolVLM-256M-Instruct), with the
/// given tile side, image splitting on or off.
fn processor(tile: usize, splitting: bool, seq_len: usize) -> ProcessorConfig {
    let v = serde_json::json!({
        "image_processor": {
            "do_image_splitting": splitting,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "max_image_size": {"longest_edge": tile},
            "resample": 1,
            "rescale_factor": 1.0 / 255.0,
            "size": {"longest_edge": if splitting { 4 * tile } else { tile }},
        },
        "image_seq_len": seq_len,
    });
    ProcessorConfig::from_hf(&v, None).expect("processor settings")
}

/// A 512x512 photo-like image (smooth gradients and some texture).
fn photo(side: u32) -> RgbImage {
    let mut pixels = Vec::with_capacity((side * side * 3) as usize);
    for y in 0..side {
        for x in 0..side {
            let t = ((x * 31 + y * 17) % 23) as u8;
            pixels.extend_from_slice(&[
                (x * 255 / side) as u8 ^ t,
                (y * 255 / side) as u8,
                ((x + y) * 127 / side) as u8 ^ (t << 2),
            ]);
        }
    }
    RgbImage {
        width: side,
        height: side,
        pixels,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rounded(v: &[f64]) -> Vec<f64> {
    v.iter().map(|s| (s * 1000.0).round() / 1000.0).collect()
}

/// Median seconds of a 512-token prefill on the default text model, if it is there.
fn anchor(runs: usize) -> Option<(String, Vec<f64>)> {
    let path = default_model_path();
    if !path.exists() || std::env::var("BENCH_ANCHOR").is_ok_and(|v| v == "0") {
        return None;
    }
    let model = load_model(&path).expect("the default model");
    let threads = rayon::current_num_threads();
    let mut be = CpuBackend::new(
        model.config.clone(),
        &model.weights,
        CpuBackendOptions {
            num_blocks: 64,
            block_size: 16,
            threads,
        },
    )
    .expect("backend");
    let vocab = model.config.vocab_size;
    let prompt: Vec<u32> = (0..512)
        .map(|i| ((i * 7919 + 13) % (vocab - 100) + 50) as u32)
        .collect();
    let table: Vec<u32> = (0..32).collect();
    let mut secs = Vec::new();
    for run in 0..=runs {
        let t0 = Instant::now();
        be.forward(&[SeqStep {
            tokens: &prompt,
            start_pos: 0,
            block_table: &table,
            want_logits: true,
        }])
        .expect("prefill");
        if run > 0 {
            secs.push(t0.elapsed().as_secs_f64());
        }
    }
    Some((model.name, secs))
}

/// The tower's shape for a `BENCH_SHAPE` name: SigLIP-base patch 16 at 512 px with
/// SmolVLM-256M's shuffle and text width, or at 224 px.
fn shape_config(shape: &str) -> VisionConfig {
    let (image_size, scale_factor) = match shape {
        "smolvlm-256m" => (512, 4),
        "siglip-base-224" => (224, 2),
        other => panic!("BENCH_SHAPE {other:?}: smolvlm-256m or siglip-base-224"),
    };
    VisionConfig {
        hidden_size: 768,
        intermediate_size: 3072,
        n_layers: 12,
        n_heads: 12,
        num_channels: 3,
        image_size,
        patch_size: 16,
        layer_norm_eps: 1e-6,
        scale_factor,
        text_hidden: 576,
    }
}

/// The `--device` argument: `None` for the CPU, `Some(N)` for `cuda` / `cuda:N`.
fn device_arg() -> Option<usize> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut value = None;
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix("--device=") {
            value = Some(v.to_string());
        } else if a == "--device" {
            value = args.get(i + 1).cloned();
        }
    }
    match value.as_deref() {
        None | Some("cpu") => None,
        Some("cuda") => Some(0),
        Some(v) => match v.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Some(n),
            None => panic!("--device {v:?}: cpu, cuda or cuda:N"),
        },
    }
}

/// Whether a `BENCH_IMAGES` entry asks for image splitting (`split`) or one tile (`1`).
fn image_splitting(kind: &str) -> bool {
    match kind {
        "1" => false,
        "split" => true,
        other => panic!("BENCH_IMAGES entry {other:?}: 1 or split"),
    }
}

fn main() {
    if let Some(ordinal) = device_arg() {
        cuda::main(ordinal);
        return;
    }
    let shape = std::env::var("BENCH_SHAPE").unwrap_or_else(|_| "smolvlm-256m".into());
    let cfg = shape_config(&shape);
    let image_size = cfg.image_size;
    let seq_len = cfg.tokens_per_tile();
    let runs = env_usize("BENCH_RUNS", 3);
    let kinds = std::env::var("BENCH_IMAGES").unwrap_or_else(|_| "1".into());
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
    let tower = Arc::new(tower(cfg));
    println!(
        "vision_bench: {shape} (synthetic weights), {} patches and {seq_len} tokens a tile, \
         {runs} runs after a warm-up, rayon threads {threads}",
        tower.config().num_patches()
    );
    let image = photo(512);
    for kind in kinds.split(',') {
        let splitting = image_splitting(kind);
        let model = VisionModel {
            tower: ImageEncoder::from(tower.clone()),
            processor: processor(image_size, splitting, seq_len),
            image_token_id: 0,
        };
        let tiles = process(&image, &model.processor).tiles.len();
        let mut secs = Vec::with_capacity(runs);
        for run in 0..=runs {
            let t0 = Instant::now();
            let out = model.encode(&image).expect("encode");
            let dt = t0.elapsed().as_secs_f64();
            assert_eq!(out.tokens, tiles * seq_len);
            if run > 0 {
                secs.push(dt);
            }
        }
        let m = median(secs.clone());
        println!(
            "image 512x512, {kind}: {tiles} tile(s), median {m:.3} s/image \
             ({:.3} images/s, {:.3} tiles/s); runs {:?}",
            1.0 / m,
            tiles as f64 / m,
            rounded(&secs)
        );
    }
    if let Some((name, secs)) = anchor(runs) {
        let m = median(secs.clone());
        println!(
            "anchor: {name}, prefill of 512 tokens on the CPU backend ({} threads): median \
             {m:.3} s ({:.1} tok/s); runs {:?}",
            rayon::current_num_threads(),
            512.0 / m,
            rounded(&secs)
        );
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    pub fn main(_ordinal: usize) {
        panic!("--device cuda needs a build with the cuda feature (--features turbine/cuda)");
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use turbine_kernels::cuda::{
        device_count, synthetic_config, CudaBackend, CudaBackendOptions, CudaVisionOptions,
        CudaVisionTower,
    };

    /// `count` tiles of deterministic values in [-1, 1) (normalised pixels).
    fn tiles(cfg: &VisionConfig, count: usize) -> Vec<Vec<f32>> {
        (0..count)
            .map(|t| {
                (0..cfg.tile_len())
                    .map(|i| (((i * 7 + t * 13) % 251) as f32 / 125.5) - 1.0)
                    .collect()
            })
            .collect()
    }

    /// Median seconds of `f` over `runs` calls after `warm` calls.
    fn timed(warm: usize, runs: usize, mut f: impl FnMut()) -> (f64, Vec<f64>) {
        for _ in 0..warm {
            f();
        }
        let secs: Vec<f64> = (0..runs)
            .map(|_| {
                let t0 = Instant::now();
                f();
                t0.elapsed().as_secs_f64()
            })
            .collect();
        (median(secs.clone()), secs)
    }

    fn ms(v: &[f64]) -> Vec<f64> {
        v.iter().map(|s| (s * 1e5).round() / 100.0).collect()
    }

    pub fn main(ordinal: usize) {
        match device_count() {
            Ok(n) if n > ordinal => {}
            Ok(n) => panic!("no CUDA device {ordinal} ({n} present)"),
            Err(e) => panic!("CUDA is not usable: {e}"),
        }
        let runs = env_usize("BENCH_RUNS", 10).max(1);
        let shapes =
            std::env::var("BENCH_SHAPE").unwrap_or_else(|_| "siglip-base-224,smolvlm-256m".into());
        let batches: Vec<usize> = std::env::var("BENCH_TILES")
            .unwrap_or_else(|_| "1,8".into())
            .split(',')
            .map(|b| b.trim().parse().expect("BENCH_TILES: tile counts"))
            .collect();
        let kinds = std::env::var("BENCH_IMAGES").unwrap_or_else(|_| "1,split".into());
        let largest = batches.iter().copied().max().unwrap_or(1).max(17);
        for shape in shapes.split(',') {
            let cfg = shape_config(shape);
            let cpu = Arc::new(tower(cfg.clone()));
            let gpu = Arc::new(
                CudaVisionTower::new(
                    &cpu,
                    CudaVisionOptions {
                        device: ordinal,
                        max_tiles_per_pass: largest,
                    },
                )
                .expect("the CUDA tower"),
            );
            println!(
                "vision_bench --device cuda:{ordinal} ({}): {shape} (synthetic weights, bf16), {} \
                 patches and {} tokens a tile, median of {runs} runs after 3 warm-ups",
                gpu.device_name(),
                cfg.num_patches(),
                cfg.tokens_per_tile()
            );
            for &b in &batches {
                let input = tiles(&cfg, b);
                let want = b * cfg.tokens_per_tile() * cfg.text_hidden;
                let (m, secs) = timed(3, runs, || {
                    let out = gpu.encode_tiles(&input).expect("encode");
                    assert_eq!(out.len(), want);
                });
                println!(
                    "  {b} tile(s) a call: median {:.3} ms ({:.1} tiles/s); runs (ms) {:?}",
                    m * 1e3,
                    b as f64 / m,
                    ms(&secs)
                );
            }
            for kind in kinds.split(',') {
                let splitting = crate::image_splitting(kind);
                let model = VisionModel {
                    tower: ImageEncoder::Cuda(gpu.clone()),
                    processor: processor(cfg.image_size, splitting, cfg.tokens_per_tile()),
                    image_token_id: 0,
                };
                let image = photo(512);
                let n_tiles = process(&image, &model.processor).tiles.len();
                let (m, secs) = timed(3, runs, || {
                    let out = model.encode(&image).expect("encode");
                    assert_eq!(out.tokens, n_tiles * cfg.tokens_per_tile());
                });
                println!(
                    "  image 512x512, {kind}: {n_tiles} tile(s), processor on the host: median \
                     {:.3} ms ({:.1} images/s); runs (ms) {:?}",
                    m * 1e3,
                    1.0 / m,
                    ms(&secs)
                );
            }
        }
        let config = synthetic_config("smollm2-135m").expect("the anchor's shape");
        let vocab = config.vocab_size;
        let mut be = CudaBackend::synthetic(
            config,
            7,
            CudaBackendOptions {
                device: ordinal,
                num_blocks: 64,
                block_size: 16,
            },
        )
        .expect("the anchor backend");
        let prompt: Vec<u32> = (0..512)
            .map(|i| ((i * 7919 + 13) % (vocab - 100) + 50) as u32)
            .collect();
        let table: Vec<u32> = (0..32).collect();
        let (m, secs) = timed(3, runs, || {
            be.forward_greedy(&[SeqStep {
                tokens: &prompt,
                start_pos: 0,
                block_table: &table,
                want_logits: true,
            }])
            .expect("prefill");
        });
        println!(
            "anchor: CUDA backend, synthetic smollm2-135m, prefill of 512 tokens: median {:.3} \
             ms ({:.0} tok/s); runs (ms) {:?}",
            m * 1e3,
            512.0 / m,
            ms(&secs)
        );
    }
}
