//! A SentencePiece-style GGUF vocabulary (`tokenizer.ggml.model = "llama"`) written by the
//! test: BOS by default, space prefix, score-ordered merges, byte fallback, decode.

use turbine_kernels::gguf::writer::build;
use turbine_kernels::gguf::{GgufFile, MetaValue};
use turbine_kernels::tokenizer::{IncrementalDecoder, Tokenizer};

fn tokenizer() -> Tokenizer {
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (t, s) in [
        ("\u{2581}", -1.0),
        ("a", -2.0),
        ("b", -2.0),
        ("\u{2581}a", -3.0),
        ("ab", -1.5),
        ("\u{2581}ab", -4.0),
    ] {
        tokens.push(t.into());
        types.push(1);
        scores.push(s);
    }
    let meta = vec![
        ("tokenizer.ggml.model", MetaValue::Str("llama".into())),
        (
            "tokenizer.ggml.tokens",
            MetaValue::Array(tokens.into_iter().map(MetaValue::Str).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            MetaValue::Array(scores.into_iter().map(MetaValue::F32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", MetaValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", MetaValue::U32(2)),
    ];
    let path = std::env::temp_dir().join(format!("turbine-spm-{}.gguf", std::process::id()));
    std::fs::write(&path, build(&meta, &[])).unwrap();
    let g = GgufFile::open(&path).unwrap();
    std::fs::remove_file(&path).ok();
    Tokenizer::from_gguf(&g).unwrap()
}

#[test]
fn sentencepiece_vocabulary_from_gguf() {
    let tok = tokenizer();
    assert!(
        tok.adds_bos(),
        "SentencePiece vocabularies add BOS by default"
    );
    let ab = tok.token_to_id("\u{2581}ab").unwrap();
    let space = tok.token_to_id("\u{2581}").unwrap();
    let ids = tok.encode("ab ab ✓", true).unwrap();
    let check: Vec<u32> = "✓"
        .bytes()
        .map(|b| tok.token_to_id(&format!("<0x{b:02X}>")).unwrap())
        .collect();
    let mut want = vec![1, ab, ab, space];
    want.extend(check);
    assert_eq!(ids, want);
    assert_eq!(tok.decode(&ids, true).unwrap(), "ab ab ✓");
    // Streaming holds the three byte tokens of ✓ back until the character is whole.
    let mut dec = IncrementalDecoder::new(true);
    let pieces: Vec<String> = ids.iter().map(|&id| dec.push(&tok, id).unwrap()).collect();
    assert_eq!(pieces[pieces.len() - 1], "✓");
    assert_eq!(pieces[pieces.len() - 2], "");
    assert_eq!(pieces.concat(), " ab ab ✓");
}
