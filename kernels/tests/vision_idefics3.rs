//! The Idefics3 vision tower + connector against transformers, on the committed tiny
//! random-weights fixture (tests/fixtures/tiny-idefics3, made by scripts/make-vlm-fixture.py):
//! the processor's pixel values in, the connector's embeddings out, within f32 tolerance.

use std::path::PathBuf;
use turbine_kernels::cpu::linear::floats_of;
use turbine_kernels::safetensors::SafetensorsFile;
use turbine_kernels::vision::{VisionConfig, VisionTower};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-idefics3")
}

fn tower() -> VisionTower {
    let dir = fixture();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let weights = SafetensorsFile::open(&dir.join("model.safetensors")).unwrap();
    VisionTower::load(VisionConfig::from_hf(&cfg).unwrap(), &|n| weights.tensor(n)).unwrap()
}

#[test]
fn embeddings_match_transformers() {
    let tower = tower();
    let c = tower.config().clone();
    assert_eq!(c.tokens_per_tile(), 4);
    let refs = SafetensorsFile::open(&fixture().join("reference.safetensors")).unwrap();
    for i in 0..2 {
        let pixels = refs.tensor(&format!("pixel_values.{i}")).unwrap();
        let want = refs.tensor(&format!("image_embeds.{i}")).unwrap();
        let tiles = pixels.shape[0];
        assert_eq!(want.shape, vec![tiles, c.tokens_per_tile(), c.text_hidden]);
        let pixels = floats_of(&pixels).unwrap();
        let want = floats_of(&want).unwrap();
        let per_tile = c.tokens_per_tile() * c.text_hidden;
        let (mut worst, mut scale) = (0.0f32, 0.0f32);
        for t in 0..tiles {
            let got = tower
                .encode_tile(&pixels[t * c.tile_len()..(t + 1) * c.tile_len()])
                .unwrap();
            for (g, w) in got.iter().zip(&want[t * per_tile..(t + 1) * per_tile]) {
                worst = worst.max((g - w).abs());
                scale = scale.max(w.abs());
            }
        }
        assert!(
            worst <= 1e-4 * scale.max(1.0),
            "image {i}: max |diff| {worst} (largest value {scale})"
        );
    }
}

#[test]
fn a_tile_of_the_wrong_size_is_refused() {
    let err = tower().encode_tile(&[0.0; 10]).unwrap_err();
    assert!(err.to_string().contains("10 values"), "{err}");
}

fn reference_json() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture().join("reference.json")).unwrap()).unwrap()
}

fn processor_config() -> turbine_kernels::vision::ProcessorConfig {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("processor_config.json")).unwrap())
            .unwrap();
    turbine_kernels::vision::ProcessorConfig::from_hf(&v, None).unwrap()
}

#[test]
fn processor_matches_transformers_pixels_and_prompt() {
    use turbine_kernels::tokenizer::Tokenizer;
    use turbine_kernels::vision::{decode, process, DecodeLimits};
    let refs = SafetensorsFile::open(&fixture().join("reference.safetensors")).unwrap();
    let meta = reference_json();
    let cfg = processor_config();
    let tok = Tokenizer::from_tokenizer_json(&fixture().join("tokenizer.json"), None, &[]).unwrap();
    for (i, name) in ["a", "b"].iter().enumerate() {
        let r = &meta["images"][name];
        let bytes = std::fs::read(fixture().join(r["image"].as_str().unwrap())).unwrap();
        let img = decode(&bytes, &DecodeLimits::default()).unwrap();
        let got = process(&img, &cfg);
        let want_t = refs.tensor(&format!("pixel_values.{i}")).unwrap();
        assert_eq!(got.tiles.len(), want_t.shape[0], "image {name}: tiles");
        let want = floats_of(&want_t).unwrap();
        let flat: Vec<f32> = got.tiles.concat();
        let worst = flat
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "image {name}: max pixel |diff| {worst}");
        let text = r["prompt_text"]
            .as_str()
            .unwrap()
            .replace("<image>", &got.prompt_text(cfg.image_seq_len));
        let ids = tok.encode(&text, false).unwrap();
        let want_ids: Vec<u32> = r["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want_ids, "image {name}: prompt ids");
    }
}

/// The whole model from the HF directory (`load_model`): `VisionModel::encode` (processor,
/// then the tower tile by tile), its prompt text tokenized, the embeddings spliced at the
/// `<image>` tokens of the prompt, then greedy decoding: the
/// same tokens as transformers' `generate` (its smallest top-2 margin is recorded, and
/// large, so "exact" is fair).
#[test]
fn greedy_tokens_match_transformers() {
    use turbine_kernels::backend::{Backend, SeqStep};
    use turbine_kernels::cpu::{CpuBackend, CpuBackendOptions};
    use turbine_kernels::loader::load_model;
    use turbine_kernels::sampling::argmax;
    use turbine_kernels::vision::{decode, DecodeLimits};

    let model = load_model(&fixture()).unwrap();
    let vision = model
        .vision
        .clone()
        .expect("an idefics3 directory has a vision tower");
    assert_eq!(model.config.arch, "llama");
    assert_eq!(model.config.rope_theta, 100_000.0);
    let meta = reference_json();
    let hidden = model.config.hidden_size;
    for name in ["a", "b"] {
        let r = &meta["images"][name];
        let bytes = std::fs::read(fixture().join(r["image"].as_str().unwrap())).unwrap();
        let encoded = vision
            .encode(&decode(&bytes, &DecodeLimits::default()).unwrap())
            .unwrap();
        assert_eq!(encoded.tokens, r["tiles"].as_u64().unwrap() as usize * 4);
        let text = r["prompt_text"]
            .as_str()
            .unwrap()
            .replace("<image>", &encoded.prompt_text);
        let embeds = encoded.embeds;
        let prompt = model.tokenizer.encode(&text, false).unwrap();
        let want_prompt: Vec<u32> = r["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(prompt, want_prompt, "image {name}: prompt ids");
        // Runs of image tokens, each spliced with its share of the embeddings.
        let (splices, used) =
            crate::support::image_splices(&prompt, vision.image_token_id, &embeds, hidden);
        assert_eq!(
            used * hidden,
            embeds.len(),
            "image {name}: one embedding per image token"
        );
        let mut backend = CpuBackend::new(
            model.config.clone(),
            &model.weights,
            CpuBackendOptions::default(),
        )
        .unwrap();
        let table: Vec<u32> = (0..16).collect();
        let logits = backend
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
        let mut tokens = vec![argmax(logits.row(0).unwrap())];
        let want: Vec<u32> = r["greedy_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        while tokens.len() < want.len() {
            let pos = prompt.len() + tokens.len() - 1;
            let last = [*tokens.last().unwrap()];
            let logits = backend
                .forward(&[SeqStep {
                    tokens: &last,
                    start_pos: pos,
                    block_table: &table,
                    want_logits: true,
                }])
                .unwrap();
            tokens.push(argmax(logits.row(0).unwrap()));
        }
        assert_eq!(tokens, want, "image {name}: greedy tokens");
    }
}
