//! Our GGUF tokenizer against llama.cpp's: token ids for every prompt in the reference fixture
//! (tests/fixtures/llamacpp_reference.json, made by scripts/make-llamacpp-reference.py).

use std::path::PathBuf;
use turbine_kernels::gguf::GgufFile;
use turbine_kernels::loader::default_model_path;
use turbine_kernels::tokenizer::{IncrementalDecoder, Tokenizer};

fn fixture() -> serde_json::Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llamacpp_reference.json");
    let text = std::fs::read_to_string(&path).expect("fixture present");
    serde_json::from_str(&text).expect("fixture is JSON")
}

fn tokenizer() -> Option<Tokenizer> {
    let path = default_model_path();
    if !path.exists() {
        eprintln!(
            "SKIPPED: model {} absent (run scripts/fetch-model.sh)",
            path.display()
        );
        return None;
    }
    let gguf = GgufFile::open(&path).expect("model opens");
    Some(Tokenizer::from_gguf(&gguf).expect("tokenizer from GGUF"))
}

#[test]
fn prompt_ids_equal_llamacpp() {
    let fx = fixture();
    let Some(tok) = tokenizer() else { return };
    let version = fx["llama_cpp_version"].as_str().unwrap();
    let prompts = fx["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 5);
    for p in prompts {
        let name = p["name"].as_str().unwrap();
        let text = p["text"].as_str().unwrap();
        let add_bos = p["add_bos"].as_bool().unwrap();
        assert_eq!(
            add_bos,
            tok.adds_bos(),
            "{name}: add_bos differs from the model's"
        );
        let want: Vec<u32> = p["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, true).unwrap();
        assert_eq!(
            got, want,
            "prompt {name:?}: our ids differ from llama-cpp-python {version}"
        );
        // and decoding gives the text back
        assert_eq!(tok.decode(&got, false).unwrap(), text, "{name}: round trip");
    }
    eprintln!(
        "{} prompts tokenized exactly as llama-cpp-python {version}",
        prompts.len()
    );
}

#[test]
fn streaming_decode_of_greedy_output_never_breaks_utf8() {
    let fx = fixture();
    let Some(tok) = tokenizer() else { return };
    for p in fx["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = p["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .chain(p["greedy_ids"].as_array().unwrap())
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let mut dec = IncrementalDecoder::new(false);
        let mut streamed = String::new();
        for &id in &ids {
            let piece = dec.push(&tok, id).unwrap();
            assert!(
                !piece.contains('\u{FFFD}'),
                "broken UTF-8 streamed: {piece:?}"
            );
            streamed.push_str(&piece);
        }
        streamed.push_str(&dec.finish(&tok).unwrap());
        assert_eq!(streamed, tok.decode(&ids, false).unwrap());
    }
}
