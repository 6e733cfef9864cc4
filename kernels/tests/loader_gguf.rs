//! Loading the default model (SmolLM2-135M-Instruct, Q4_1 GGUF): configuration, weight
//! shapes, tokenizer ids, and the chat template against llama.cpp's reference rendering.

use std::path::PathBuf;
use turbine_kernels::chat::ChatMessage;
use turbine_kernels::loader::{default_model_path, load_model, LoadedModel};
use turbine_kernels::model::RopeStyle;
use turbine_kernels::quant::dequantize_tensor_row;
use turbine_kernels::tensor::{DType, Storage};

fn model() -> Option<LoadedModel> {
    let path = default_model_path();
    if !path.exists() {
        eprintln!(
            "SKIPPED: model {} absent (run scripts/fetch-model.sh)",
            path.display()
        );
        return None;
    }
    Some(load_model(&path).expect("default model loads"))
}

#[test]
fn config_matches_the_metadata() {
    let Some(m) = model() else { return };
    let c = &m.config;
    assert_eq!(c.arch, "llama");
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim
        ),
        (49152, 576, 30, 9, 3, 64)
    );
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rope_style, RopeStyle::Interleaved);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert_eq!(c.max_position, 8192);
    assert!(
        c.tie_embeddings,
        "SmolLM2 ties the output head to the embedding"
    );
    assert!(m.weights.output.is_none());
    assert_eq!((m.bos_id, m.eos_id), (Some(1), Some(2)));
    assert!(m.stop_ids.contains(&2));
}

#[test]
fn weights_are_mapped_with_checked_shapes() {
    let Some(m) = model() else { return };
    let w = &m.weights;
    assert_eq!(w.layers.len(), 30);
    assert_eq!(w.token_embd.shape, vec![49152, 576]);
    let l = &w.layers[7];
    assert_eq!(l.wq.shape, vec![576, 576]);
    assert_eq!(l.wk.shape, vec![192, 576]);
    assert_eq!(l.w_down.shape, vec![576, 1536]);
    assert_eq!(l.attn_norm.dtype, DType::F32);
    assert!(matches!(l.wq.storage, Storage::Mapped { .. }));
    assert_eq!(
        l.wq.bytes().len(),
        l.wq.dtype.bytes_for(l.wq.numel()).unwrap()
    );
    // Dequantized rows are finite, with some spread.
    let mut row = vec![0.0f32; 576];
    dequantize_tensor_row(&w.token_embd, 504, &mut row).unwrap();
    assert!(row.iter().all(|x| x.is_finite()));
    assert!(row.iter().any(|&x| x != row[0]));
    let mut norm = vec![0.0f32; 576];
    dequantize_tensor_row(&w.output_norm, 0, &mut norm).unwrap();
    assert!(norm.iter().all(|x| x.is_finite()));
}

#[test]
fn chat_template_renders_like_the_reference() {
    let Some(m) = model() else { return };
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/llamacpp_reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let want = fx["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "chat")
        .unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string();
    let got = m
        .render_chat(&[ChatMessage::new("user", "What is the capital of France?")])
        .expect("model has a template")
        .expect("template renders");
    assert_eq!(got, want);
}
