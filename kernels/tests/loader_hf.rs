//! Loading an HF-format directory: a made-up 2-layer model written by the test (config.json,
//! model.safetensors with random weights, a minimal tokenizer.json, tokenizer_config.json).

use std::path::{Path, PathBuf};
use turbine_kernels::chat::ChatMessage;
use turbine_kernels::loader::{load_model, LoadError};
use turbine_kernels::model::RopeStyle;
use turbine_kernels::quant::dequantize_tensor;
use turbine_kernels::safetensors;
use turbine_kernels::tensor::DType;
use turbine_kernels::tokenizer::IncrementalDecoder;

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const FFN: usize = 96;
const LAYERS: usize = 2;

/// A fresh directory under the system temp dir, unique to this process and tag.
fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("turbine-hf-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Deterministic pseudo-random f32 bytes.
fn random_f32(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .flat_map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5).to_le_bytes()
        })
        .collect()
}

fn bf16_bytes(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| half::bf16::from_f32(i as f32 * 0.5).to_le_bytes())
        .collect()
}

/// A word-level tokenizer.json: enough for the `tokenizers` crate to load and round-trip.
fn tokenizer_json(vocab: &[&str]) -> String {
    let v: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": v, "unk_token": "<unk>"}
    })
    .to_string()
}

const VOCAB: &[&str] = &["<s>", "</s>", "<unk>", "hello", "world", "caf\u{e9}", "!"];

fn write_model(dir: &Path, tie: bool, bad_shape: bool) {
    let vocab = VOCAB.len() + 1; // one padding row, as HF checkpoints often have
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "intermediate_size": FFN,
        "rms_norm_eps": 1e-5,
        "rope_theta": 50000.0,
        "max_position_embeddings": 512,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
        "bos_token_id": 0,
        "eos_token_id": 1
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json(VOCAB)).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({
            "bos_token": "<s>",
            "eos_token": {"content": "</s>"},
            "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
        })
        .to_string(),
    )
    .unwrap();

    let q = HEADS * HEAD_DIM;
    let kv = KV_HEADS * HEAD_DIM;
    let mut owned: Vec<(String, &str, Vec<usize>, Vec<u8>)> = vec![
        (
            "model.embed_tokens.weight".into(),
            "F32",
            vec![vocab, HIDDEN],
            random_f32(vocab * HIDDEN, 1),
        ),
        (
            "model.norm.weight".into(),
            "BF16",
            vec![HIDDEN],
            bf16_bytes(HIDDEN),
        ),
    ];
    if !tie {
        owned.push((
            "lm_head.weight".into(),
            "F32",
            vec![vocab, HIDDEN],
            random_f32(vocab * HIDDEN, 2),
        ));
    }
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let seed = 10 + l as u64 * 10;
        let k_rows = if bad_shape && l == 1 { kv + 1 } else { kv };
        owned.extend([
            (
                format!("{p}.input_layernorm.weight"),
                "F32",
                vec![HIDDEN],
                random_f32(HIDDEN, seed),
            ),
            (
                format!("{p}.self_attn.q_proj.weight"),
                "F16",
                vec![q, HIDDEN],
                (0..q * HIDDEN)
                    .flat_map(|i| half::f16::from_f32((i % 7) as f32).to_le_bytes())
                    .collect(),
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                "F32",
                vec![k_rows, HIDDEN],
                random_f32(k_rows * HIDDEN, seed + 2),
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                "F32",
                vec![kv, HIDDEN],
                random_f32(kv * HIDDEN, seed + 3),
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                "F32",
                vec![HIDDEN, q],
                random_f32(HIDDEN * q, seed + 4),
            ),
            (
                format!("{p}.post_attention_layernorm.weight"),
                "F32",
                vec![HIDDEN],
                random_f32(HIDDEN, seed + 5),
            ),
            (
                format!("{p}.mlp.gate_proj.weight"),
                "F32",
                vec![FFN, HIDDEN],
                random_f32(FFN * HIDDEN, seed + 6),
            ),
            (
                format!("{p}.mlp.up_proj.weight"),
                "F32",
                vec![FFN, HIDDEN],
                random_f32(FFN * HIDDEN, seed + 7),
            ),
            (
                format!("{p}.mlp.down_proj.weight"),
                "F32",
                vec![HIDDEN, FFN],
                random_f32(HIDDEN * FFN, seed + 8),
            ),
        ]);
    }
    // Split across two shards, as large checkpoints are.
    let (a, b) = owned.split_at(owned.len() / 2);
    for (i, part) in [a, b].into_iter().enumerate() {
        let refs: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = part
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
            .collect();
        safetensors::write(
            &dir.join(format!("model-0000{}-of-00002.safetensors", i + 1)),
            &refs,
        )
        .unwrap();
    }
}

#[test]
fn loads_config_weights_tokenizer_and_template() {
    let dir = temp_dir("ok");
    write_model(&dir, false, false);
    let m = load_model(&dir).expect("HF directory loads");
    let c = &m.config;
    assert_eq!(c.arch, "llama");
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.intermediate_size
        ),
        (
            VOCAB.len() + 1,
            HIDDEN,
            LAYERS,
            HEADS,
            KV_HEADS,
            HEAD_DIM,
            FFN
        )
    );
    assert_eq!(c.rope_style, RopeStyle::Neox, "HF weights are unpermuted");
    assert_eq!(c.rope_theta, 50000.0);
    assert_eq!(c.max_position, 512);
    assert!(!c.tie_embeddings);
    let w = &m.weights;
    assert_eq!(w.layers.len(), LAYERS);
    assert_eq!(w.layers[1].wk.shape, vec![KV_HEADS * HEAD_DIM, HIDDEN]);
    assert_eq!(w.layers[0].wq.dtype, DType::F16);
    assert_eq!(w.output_norm.dtype, DType::BF16);
    assert!(w.output.is_some());
    // Data comes through the map unchanged.
    let q = dequantize_tensor(&w.layers[0].wq).unwrap();
    assert_eq!(&q[..8], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]);
    let norm = dequantize_tensor(&w.output_norm).unwrap();
    assert_eq!(norm[3], 1.5);

    assert_eq!((m.bos_id, m.eos_id), (Some(0), Some(1)));
    assert!(m.stop_ids.contains(&1));
    let ids = m.tokenizer.encode("hello world !", false).unwrap();
    assert_eq!(ids, vec![3, 4, 6]);
    assert_eq!(m.tokenizer.decode(&[3, 4, 1], true).unwrap(), "hello world");
    let mut dec = IncrementalDecoder::new(true);
    let mut streamed = String::new();
    for id in [3, 5, 4] {
        streamed.push_str(&dec.push(&m.tokenizer, id).unwrap());
    }
    streamed.push_str(&dec.finish(&m.tokenizer).unwrap());
    assert_eq!(streamed, m.tokenizer.decode(&[3, 5, 4], true).unwrap());

    let chat = m
        .render_chat(&[ChatMessage::new("user", "  hi ")])
        .unwrap()
        .unwrap();
    assert_eq!(chat, "<s>user: hi\nassistant:");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn tied_embeddings_have_no_output_head() {
    let dir = temp_dir("tied");
    write_model(&dir, true, false);
    let m = load_model(&dir).unwrap();
    assert!(m.config.tie_embeddings);
    assert!(m.weights.output.is_none());
    assert_eq!(m.weights.lm_head().shape, vec![VOCAB.len() + 1, HIDDEN]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn shape_mismatch_names_the_weight() {
    let dir = temp_dir("bad");
    write_model(&dir, false, true);
    let err = load_model(&dir).unwrap_err();
    std::fs::remove_dir_all(&dir).ok();
    match &err {
        LoadError::Shape {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, "model.layers.1.self_attn.k_proj.weight");
            assert_eq!(expected, &vec![KV_HEADS * HEAD_DIM, HIDDEN]);
            assert_eq!(found, &vec![KV_HEADS * HEAD_DIM + 1, HIDDEN]);
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains("k_proj"));
}

#[test]
fn missing_weight_and_missing_config_are_errors() {
    let dir = temp_dir("missing");
    write_model(&dir, false, false);
    // Drop the second shard: half the weights disappear.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_model(&dir).unwrap_err();
    assert!(matches!(err, LoadError::MissingTensor { .. }), "{err}");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load_model(&dir).unwrap_err();
    assert!(matches!(err, LoadError::Io { .. }), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
