//! A made-up one-layer Qwen2 GGUF written by the test: architecture mapping (NeoX RoPE, q/k/v
//! biases, untied output), quantized weights, and a byte-level vocabulary.

use std::path::PathBuf;
use turbine_kernels::gguf::writer::{build, TensorSpec};
use turbine_kernels::gguf::MetaValue;
use turbine_kernels::loader::{load_model, LoadError};
use turbine_kernels::model::RopeStyle;
use turbine_kernels::quant::dequantize_tensor;
use turbine_kernels::tensor::DType;
use turbine_kernels::tokenizer::byte_level::encode_bytes;

const H: usize = 64;
const HEADS: usize = 4;
const KV: usize = 2;
const HD: usize = 16;
const FFN: usize = 96;

fn f32s(n: usize, v: f32) -> Vec<u8> {
    (0..n).flat_map(|_| v.to_le_bytes()).collect()
}

fn tokens() -> (Vec<MetaValue>, Vec<MetaValue>) {
    let mut toks: Vec<MetaValue> = (0..=255u8)
        .map(|b| MetaValue::Str(encode_bytes(&[b])))
        .collect();
    let mut types = vec![MetaValue::I32(1); 256];
    toks.push(MetaValue::Str("hi".into()));
    types.push(MetaValue::I32(1));
    toks.push(MetaValue::Str("<|im_end|>".into()));
    types.push(MetaValue::I32(3));
    (toks, types)
}

fn write(tag: &str, wk_rows: usize, bq_type: u32) -> PathBuf {
    let (toks, types) = tokens();
    let vocab = toks.len();
    let q = HEADS * HD;
    let kv = KV * HD;
    let meta = vec![
        ("general.architecture", MetaValue::Str("qwen2".into())),
        ("general.name", MetaValue::Str("tiny-qwen".into())),
        ("qwen2.embedding_length", MetaValue::U32(H as u32)),
        ("qwen2.block_count", MetaValue::U32(1)),
        ("qwen2.attention.head_count", MetaValue::U32(HEADS as u32)),
        ("qwen2.attention.head_count_kv", MetaValue::U32(KV as u32)),
        ("qwen2.feed_forward_length", MetaValue::U32(FFN as u32)),
        ("qwen2.rope.freq_base", MetaValue::F32(1_000_000.0)),
        ("qwen2.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-6)),
        ("qwen2.context_length", MetaValue::U64(128)),
        ("tokenizer.ggml.model", MetaValue::Str("gpt2".into())),
        ("tokenizer.ggml.pre", MetaValue::Str("qwen2".into())),
        ("tokenizer.ggml.tokens", MetaValue::Array(toks)),
        ("tokenizer.ggml.token_type", MetaValue::Array(types)),
        (
            "tokenizer.ggml.merges",
            MetaValue::Array(vec![MetaValue::Str("h i".into())]),
        ),
        ("tokenizer.ggml.eos_token_id", MetaValue::U32(257)),
        ("tokenizer.ggml.add_bos_token", MetaValue::Bool(false)),
        (
            "tokenizer.chat_template",
            MetaValue::Str("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}".into()),
        ),
    ];
    // Q4_0 rows of d = 1.0 and all nibbles 9 -> every element (9 - 8) * 1.0 = 1.0.
    let q4_0 = |rows: usize, cols: usize| -> Vec<u8> {
        let block: Vec<u8> = half::f16::from_f32(1.0)
            .to_le_bytes()
            .into_iter()
            .chain(std::iter::repeat_n(0x99, 16))
            .collect();
        block.repeat(rows * cols / 32)
    };
    let t = |name: &str, shape: Vec<usize>, type_id: u32, data: Vec<u8>| TensorSpec {
        name: name.into(),
        shape,
        type_id,
        data,
    };
    let tensors = vec![
        t("token_embd.weight", vec![vocab, H], 0, f32s(vocab * H, 0.1)),
        t("output_norm.weight", vec![H], 0, f32s(H, 1.0)),
        t("output.weight", vec![vocab, H], 2, q4_0(vocab, H)),
        t("blk.0.attn_norm.weight", vec![H], 0, f32s(H, 1.0)),
        t("blk.0.attn_q.weight", vec![q, H], 2, q4_0(q, H)),
        t("blk.0.attn_k.weight", vec![wk_rows, H], 2, q4_0(wk_rows, H)),
        t("blk.0.attn_v.weight", vec![kv, H], 2, q4_0(kv, H)),
        t("blk.0.attn_q.bias", vec![q], bq_type, f32s(q, 0.5)),
        t("blk.0.attn_k.bias", vec![kv], 0, f32s(kv, 0.5)),
        t("blk.0.attn_v.bias", vec![kv], 0, f32s(kv, 0.5)),
        t("blk.0.attn_output.weight", vec![H, q], 2, q4_0(H, q)),
        t("blk.0.ffn_norm.weight", vec![H], 0, f32s(H, 1.0)),
        t("blk.0.ffn_gate.weight", vec![FFN, H], 2, q4_0(FFN, H)),
        t("blk.0.ffn_up.weight", vec![FFN, H], 2, q4_0(FFN, H)),
        t("blk.0.ffn_down.weight", vec![H, FFN], 2, q4_0(H, FFN)),
    ];
    let path = std::env::temp_dir().join(format!("turbine-qwen-{}-{tag}.gguf", std::process::id()));
    std::fs::write(&path, build(&meta, &tensors)).unwrap();
    path
}

#[test]
fn qwen2_gguf_maps_to_neox_with_biases() {
    let path = write("ok", KV * HD, 0);
    let m = load_model(&path).expect("tiny qwen2 loads");
    std::fs::remove_file(&path).ok();
    let c = &m.config;
    assert_eq!(m.name, "tiny-qwen");
    assert_eq!(c.arch, "qwen2");
    assert_eq!(c.rope_style, RopeStyle::Neox);
    assert_eq!((c.vocab_size, c.hidden_size, c.n_layers), (258, H, 1));
    assert_eq!(
        (c.n_heads, c.n_kv_heads, c.head_dim, c.intermediate_size),
        (HEADS, KV, HD, FFN)
    );
    assert_eq!(c.rope_theta, 1_000_000.0);
    assert_eq!(c.max_position, 128);
    assert!(!c.tie_embeddings);
    let l = &m.weights.layers[0];
    assert_eq!(
        l.bq.as_ref().map(|b| b.shape.clone()),
        Some(vec![HEADS * HD])
    );
    assert!(l.bk.is_some() && l.bv.is_some());
    assert_eq!(l.wq.dtype, DType::Q4_0);
    assert!(dequantize_tensor(&l.wq).unwrap().iter().all(|&x| x == 1.0));
    let out = m.weights.output.as_ref().expect("untied output");
    assert_eq!(out.shape, vec![258, H]);

    // Tokenizer: the one merge applies, the control token is matched verbatim, and it stops.
    let ids = m.tokenizer.encode("hi<|im_end|>h", true).unwrap();
    assert_eq!(ids, vec![256, 257, u32::from(b'h')]);
    assert_eq!(m.eos_id, Some(257));
    assert!(m.tokenizer.is_stop(257));
    assert_eq!(m.tokenizer.decode(&ids, true).unwrap(), "hih");
}

#[test]
fn wrong_shape_in_gguf_names_the_tensor() {
    let path = write("shape", KV * HD + 32, 0);
    let err = load_model(&path).unwrap_err();
    std::fs::remove_file(&path).ok();
    match err {
        LoadError::Shape {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, "blk.0.attn_k.weight");
            assert_eq!(expected, vec![KV * HD, H]);
            assert_eq!(found, vec![KV * HD + 32, H]);
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn unknown_tensor_type_names_the_tensor() {
    let path = write("dtype", KV * HD, 14);
    let err = load_model(&path).unwrap_err();
    std::fs::remove_file(&path).ok();
    let msg = err.to_string();
    assert!(
        msg.contains("blk.0.attn_q.bias") && msg.contains("14"),
        "{msg}"
    );
}
