//! Constrained decoding over the default model's real vocabulary: a random walk that only
//! ever picks tokens the mask allows must spell text the grammar accepts, and end there.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use turbine_kernels::grammar::{allowed, GrammarSource, Grammars};
use turbine_kernels::loader::default_model_path;
use turbine_kernels::tokenizer::Tokenizer;

fn tokenizer() -> Option<Tokenizer> {
    let path = default_model_path();
    if !path.exists() {
        eprintln!(
            "SKIPPED: model {} absent (run scripts/fetch-model.sh)",
            path.display()
        );
        return None;
    }
    let g = turbine_kernels::gguf::GgufFile::open(&path).unwrap();
    Some(Tokenizer::from_gguf(&g).unwrap())
}

/// Walks the grammar with random allowed tokens; returns the text before the stop token.
fn walk(grammars: &Grammars, tok: &Tokenizer, source: &GrammarSource, seed: u64) -> String {
    let stop = tok.stop_ids().to_vec();
    let mut c = grammars.constrain(source).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids = Vec::new();
    for _ in 0..400 {
        let mask = c.mask().unwrap();
        let choices: Vec<u32> = (0..tok.vocab_size() as u32)
            .filter(|&t| allowed(&mask, t))
            .collect();
        assert!(!choices.is_empty(), "the mask allows nothing after {ids:?}");
        // Prefer ending once allowed, so walks stay short.
        let t = match choices.iter().find(|t| stop.contains(t)) {
            Some(&s) if rng.gen_bool(0.5) => s,
            _ => choices[rng.gen_range(0..choices.len())],
        };
        if stop.contains(&t) {
            return tok.decode(&ids, true).unwrap();
        }
        c.advance(t).unwrap();
        ids.push(t);
    }
    panic!("no end after 400 tokens: {:?}", tok.decode(&ids, true));
}

#[test]
fn random_walks_under_a_schema_spell_valid_json() {
    let Some(tok) = tokenizer() else { return };
    let grammars = Grammars::new(&tok, tok.stop_ids()).unwrap();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "ok": {"type": "boolean"},
        },
        "required": ["unit", "days", "ok"],
        "additionalProperties": false,
        "x-guidance": {"whitespace_flexible": false},
    });
    for seed in 0..8 {
        let text = walk(
            &grammars,
            &tok,
            &GrammarSource::JsonSchema(schema.clone()),
            seed,
        );
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(
            ["celsius", "fahrenheit"].contains(&v["unit"].as_str().unwrap()),
            "{text}"
        );
        assert!((1..=7).contains(&v["days"].as_i64().unwrap()), "{text}");
        assert!(v["ok"].is_boolean(), "{text}");
        assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
    }
}

#[test]
fn a_lark_grammar_with_embedded_json_and_bad_schemas_are_errors() {
    let Some(tok) = tokenizer() else { return };
    let grammars = Grammars::new(&tok, tok.stop_ids()).unwrap();
    let lark = "start: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: %json {\"type\": \"object\", \"properties\": {\"name\": {\"const\": \"f\"}}, \"required\": [\"name\"], \"additionalProperties\": false, \"x-guidance\": {\"whitespace_flexible\": false}}\n";
    let text = walk(&grammars, &tok, &GrammarSource::Lark(lark.into()), 3);
    assert_eq!(text, "<tool_call>\n{\"name\":\"f\"}\n</tool_call>");
    let bad = serde_json::json!({"type": "nonsense"});
    assert!(grammars.constrain(&GrammarSource::JsonSchema(bad)).is_err());
}
