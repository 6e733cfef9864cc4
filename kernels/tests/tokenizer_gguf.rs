//! The GGUF tokenizer beyond the fixture: random text against the `tokenizers` crate running
//! the same vocabulary and merges (an independent BPE implementation), decode round trips, and
//! streaming of characters split across tokens.

use proptest::prelude::*;
use std::sync::OnceLock;
use turbine_kernels::gguf::{GgufFile, MetaValue};
use turbine_kernels::loader::default_model_path;
use turbine_kernels::tokenizer::{IncrementalDecoder, Tokenizer};

struct Pair {
    ours: Tokenizer,
    hf: Tokenizer,
}

/// Our tokenizer from the default model, and an HF tokenizer.json built from the same GGUF
/// vocabulary (SmolLM2's pre-tokenizer: individual digits, then GPT-2 byte-level).
fn pair() -> Option<&'static Pair> {
    static P: OnceLock<Option<Pair>> = OnceLock::new();
    P.get_or_init(|| {
        let path = default_model_path();
        if !path.exists() {
            eprintln!("SKIPPED: model {} absent (run scripts/fetch-model.sh)", path.display());
            return None;
        }
        let g = GgufFile::open(&path).unwrap();
        let ours = Tokenizer::from_gguf(&g).unwrap();
        let strs = |k: &str| -> Vec<String> {
            g.get_array(k)
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        let tokens = strs("tokenizer.ggml.tokens");
        let types: Vec<i64> = g
            .get_array("tokenizer.ggml.token_type")
            .unwrap()
            .iter()
            .map(|v| MetaValue::as_i64(v).unwrap())
            .collect();
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), serde_json::json!(i)))
            .collect();
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| types[*i] == 3)
            .map(|(i, t)| serde_json::json!({"id": i, "content": t, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": strs("tokenizer.ggml.merges")}
        });
        let file = std::env::temp_dir().join(format!("turbine-tok-{}.json", std::process::id()));
        std::fs::write(&file, json.to_string()).unwrap();
        let hf = Tokenizer::from_tokenizer_json(&file, Some(1), &[2]).unwrap();
        std::fs::remove_file(&file).ok();
        Some(Pair { ours, hf })
    })
    .as_ref()
}

/// Text mixing scripts, digits, whitespace runs, punctuation, emoji and special tokens.
fn text_strategy() -> impl Strategy<Value = String> {
    let pieces = prop_oneof![
        "[a-zA-Z]{1,8}",
        "[0-9]{1,6}",
        "[ \t\n]{1,4}",
        "[.,;:!?'\"()\\[\\]{}<>/\\\\@#$%^&*_=+-]{1,3}",
        "(Café|naïve|東京|日本語|русский|العربية|Ελληνικά|🦀|🚀|👍🏽|😀😀)",
        "('s|'t|'re|'ll| don't| it's)",
        "(<\\|im_start\\|>|<\\|im_end\\|>|<\\|endoftext\\|>)",
    ];
    proptest::collection::vec(pieces, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn ids_agree_with_the_tokenizers_crate(text in text_strategy()) {
        let Some(p) = pair() else { return Ok(()) };
        let ours = p.ours.encode(&text, false).unwrap();
        let hf = p.hf.encode(&text, false).unwrap();
        prop_assert_eq!(ours, hf, "text {:?}", text);
    }

    #[test]
    fn decode_inverts_encode(text in text_strategy()) {
        let Some(p) = pair() else { return Ok(()) };
        let ids = p.ours.encode(&text, false).unwrap();
        prop_assert_eq!(p.ours.decode(&ids, false).unwrap(), text);
    }

    #[test]
    fn streaming_equals_whole_decode(text in text_strategy()) {
        let Some(p) = pair() else { return Ok(()) };
        for tok in [&p.ours, &p.hf] {
            let ids = tok.encode(&text, false).unwrap();
            let mut dec = IncrementalDecoder::new(false);
            let mut streamed = String::new();
            for &id in &ids {
                let piece = dec.push(tok, id).unwrap();
                let broken = piece.contains(char::REPLACEMENT_CHARACTER);
                prop_assert!(!broken, "broken UTF-8 streamed");
                streamed.push_str(&piece);
            }
            streamed.push_str(&dec.finish(tok).unwrap());
            prop_assert_eq!(streamed, tok.decode(&ids, false).unwrap());
        }
    }
}

#[test]
fn multibyte_characters_are_held_back_until_complete() {
    let Some(p) = pair() else { return };
    let tok = &p.ours;
    let text = "🦀 東京 👍🏽";
    let ids = tok.encode(text, false).unwrap();
    // Some emoji byte sequences are split over several tokens...
    let partial = ids
        .iter()
        .filter(|&&id| std::str::from_utf8(&tok.token_to_piece(id).unwrap()).is_err())
        .count();
    assert!(partial > 0, "expected byte-fragment tokens in {ids:?}");
    // ...and streaming never shows a fragment: every emitted piece is whole characters.
    let mut dec = IncrementalDecoder::new(false);
    let mut pieces = Vec::new();
    for &id in &ids {
        pieces.push(dec.push(tok, id).unwrap());
    }
    pieces.push(dec.finish(tok).unwrap());
    assert!(
        pieces.iter().any(String::is_empty),
        "some tokens must be held back"
    );
    assert_eq!(pieces.concat(), text);
}

#[test]
fn special_tokens_decode_and_skip() {
    let Some(p) = pair() else { return };
    let tok = &p.ours;
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        "<|im_start|>user\nhi<|im_end|>"
    );
    assert!(tok.is_stop(2));
    assert_eq!(tok.token_to_piece(1).unwrap(), b"<|im_start|>");
    assert!(tok.decode(&[1_000_000], false).is_err());
}
