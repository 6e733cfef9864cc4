//! Constrained decoding: which tokens a grammar allows next, over a model's vocabulary,
//! with llguidance (the Earley-parser and lexer engine vLLM, SGLang and llama.cpp use).
//!
//! [`Grammars`] is built once per vocabulary (a token trie and llguidance's parser
//! factory); [`Grammars::constrain`] compiles one request's grammar (a JSON schema, or a
//! Lark grammar that may embed schemas with `%json`) into a [`Constraint`], which answers
//! the allowed-token bitmask for the next position and advances by each sampled token.
//! When the grammar is complete only end-of-sequence tokens are allowed, so generation
//! ends there.
//!
//! The mask is a bitset of `u32` words (bit `t % 32` of word `t / 32` allows token `t`), the
//! layout [`crate::sampling::SampleRow::allowed`] reads.

use crate::tokenizer::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;

/// A grammar to enforce.
#[derive(Clone, Debug, PartialEq)]
pub enum GrammarSource {
    /// A JSON schema (`{"type": "object"}` for any JSON object).
    JsonSchema(serde_json::Value),
    /// llguidance's Lark dialect.
    Lark(String),
}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum GrammarError {
    #[error("the vocabulary cannot be used for constrained decoding: {0}")]
    Vocabulary(String),
    #[error("{0}")]
    Compile(String),
    #[error("the grammar cannot continue: {0}")]
    Rejected(String),
}

/// The vocabulary side of constrained decoding, shared by every request of one model.
pub struct Grammars {
    factory: ParserFactory,
    stop_ids: Vec<u32>,
    vocab: usize,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab", &self.vocab)
            .finish_non_exhaustive()
    }
}

impl Grammars {
    /// From the model's tokenizer; `stop_ids` end generation (the first is llguidance's
    /// EOS; all of them are allowed wherever EOS is).
    pub fn new(tokenizer: &Tokenizer, stop_ids: &[u32]) -> Result<Grammars, GrammarError> {
        let vocab = tokenizer.vocab_size();
        let eos = stop_ids
            .first()
            .copied()
            .or(tokenizer.eos_id())
            .ok_or_else(|| {
                GrammarError::Vocabulary("the model has no end-of-sequence token".into())
            })?;
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                if tokenizer.is_special(id) {
                    // Special tokens never match grammar text: llguidance's marker byte.
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend(tokenizer.token_text(id).unwrap_or_default().into_bytes());
                    w
                } else {
                    tokenizer.token_to_piece(id).unwrap_or_default()
                }
            })
            .collect();
        let trie = TokTrie::from(&TokRxInfo::new(vocab as u32, eos), &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
        // Errors come back as values; nothing is printed.
        factory.quiet();
        let grammars = Grammars {
            factory,
            stop_ids: stop_ids.to_vec(),
            vocab,
        };
        grammars.warm_up()?;
        Ok(grammars)
    }

    /// Compiles a small grammar of each kind and computes a mask: the engine's first
    /// compilation does one-time work (seconds on a loaded machine) that would otherwise
    /// land on the first constrained request.
    fn warm_up(&self) -> Result<(), GrammarError> {
        let schema = serde_json::json!({"type": "object", "properties": {"a": {"type": "string"}}});
        let lark = format!("start: \"<x>\" obj\nobj: %json {schema}\n");
        for source in [GrammarSource::JsonSchema(schema), GrammarSource::Lark(lark)] {
            self.constrain(&source)?.mask()?;
        }
        Ok(())
    }

    /// Compiles `source` for one request.
    pub fn constrain(&self, source: &GrammarSource) -> Result<Constraint, GrammarError> {
        let grammar = match source {
            GrammarSource::JsonSchema(schema) => TopLevelGrammar::from_json_schema(schema.clone()),
            GrammarSource::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| GrammarError::Compile(e.to_string()))?;
        Ok(Constraint {
            matcher: Matcher::new(Ok(parser)),
            stop_ids: self.stop_ids.clone(),
            words: self.vocab.div_ceil(32),
        })
    }
}

/// One request's grammar state.
pub struct Constraint {
    matcher: Matcher,
    stop_ids: Vec<u32>,
    words: usize,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").finish_non_exhaustive()
    }
}

impl Constraint {
    /// The tokens allowed next, as a bitset over the vocabulary. Every stop token is
    /// allowed where the grammar may end; only they are once it is complete.
    pub fn mask(&mut self) -> Result<Vec<u32>, GrammarError> {
        let vob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| GrammarError::Rejected(e.to_string()))?;
        let mut bits: Vec<u32> = vob.as_slice().to_vec();
        bits.resize(self.words, 0);
        let may_end = self.stop_ids.first().is_some_and(|&e| allowed(&bits, e));
        for &t in &self.stop_ids {
            set(&mut bits, t, may_end);
        }
        Ok(bits)
    }

    /// Advances by the sampled `token`. A stop token ends the constraint.
    pub fn advance(&mut self, token: u32) -> Result<(), GrammarError> {
        if self.stop_ids.contains(&token) {
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError::Rejected(e.to_string()))
    }

    /// Whether the grammar is complete (only a stop token may follow).
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// Whether bit `token` is set in `bits`.
pub fn allowed(bits: &[u32], token: u32) -> bool {
    bits.get(token as usize / 32)
        .is_some_and(|w| w >> (token % 32) & 1 == 1)
}

fn set(bits: &mut [u32], token: u32, on: bool) {
    if let Some(w) = bits.get_mut(token as usize / 32) {
        let bit = 1u32 << (token % 32);
        if on {
            *w |= bit;
        } else {
            *w &= !bit;
        }
    }
}
