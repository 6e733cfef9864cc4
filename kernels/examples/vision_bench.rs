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

use std::sync::Arc;
use std::time::Instant;
use turbine_kernels::backend::{Backend, SeqStep};
use turbine_kernels::cpu::{CpuBackend, CpuBackendOptions};
use turbine_kernels::loader::{default_model_path, load_model, VisionModel};
use turbine_kernels::tensor::{DType, Storage, WeightTensor};
use turbine_kernels::vision::{process, ProcessorConfig, RgbImage, VisionConfig, VisionTower};

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

fn main() {
    let shape = std::env::var("BENCH_SHAPE").unwrap_or_else(|_| "smolvlm-256m".into());
    let (image_size, scale_factor) = match shape.as_str() {
        "smolvlm-256m" => (512, 4),
        "siglip-base-224" => (224, 2),
        other => panic!("BENCH_SHAPE {other:?}: smolvlm-256m or siglip-base-224"),
    };
    let cfg = VisionConfig {
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
    };
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
        let splitting = match kind {
            "1" => false,
            "split" => true,
            other => panic!("BENCH_IMAGES entry {other:?}: 1 or split"),
        };
        let model = VisionModel {
            tower: tower.clone(),
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
