//! Text <-> token ids. Two sources behind one [`Tokenizer`]: a GGUF's own vocabulary
//! (byte-level BPE implemented here, matching llama.cpp's tokenization) or an HF
//! `tokenizer.json` (through the `tokenizers` crate).

pub mod bpe;
pub mod byte_level;
mod incremental;
pub mod pretokenize;

pub use incremental::IncrementalDecoder;

use crate::gguf::{GgufFile, MetaValue};
use bpe::{BpeVocab, TokenType};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("unsupported tokenizer model {0:?} (supported: \"gpt2\" byte-level BPE)")]
    Unsupported(String),
    #[error("invalid tokenizer: {0}")]
    Invalid(String),
    #[error("tokenizer metadata: {0}")]
    Metadata(#[from] crate::gguf::GgufError),
    #[error("tokenizer.json: {0}")]
    Hf(String),
    #[error("token id {0} is outside the vocabulary")]
    UnknownId(u32),
}

enum Backend {
    Gguf(Box<BpeVocab>),
    Hf(Box<tokenizers::Tokenizer>),
}

/// A tokenizer plus the special ids generation needs.
pub struct Tokenizer {
    backend: Backend,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    /// Every id that ends generation (EOS, end-of-turn, ...), sorted, deduplicated.
    stop_ids: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field(
                "backend",
                &match self.backend {
                    Backend::Gguf(_) => "gguf",
                    Backend::Hf(_) => "tokenizer.json",
                },
            )
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("stop_ids", &self.stop_ids)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

/// Control-token texts that end a turn in common chat formats; llama.cpp treats them as
/// end-of-generation too.
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
];

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::Unsupported(model.to_string()));
        }
        let tokens = strings(
            g.get_array("tokenizer.ggml.tokens")?,
            "tokenizer.ggml.tokens",
        )?;
        let types = match g.get("tokenizer.ggml.token_type") {
            Some(MetaValue::Array(a)) => a
                .iter()
                .map(|v| TokenType::from_ggml(v.as_i64().unwrap_or(1)))
                .collect(),
            _ => Vec::new(),
        };
        let merges = match g.get("tokenizer.ggml.merges") {
            Some(MetaValue::Array(a)) => strings(a, "tokenizer.ggml.merges")?,
            _ => Vec::new(),
        };
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(MetaValue::as_str)
            .unwrap_or("default");
        let id_key = |k: &str| -> Option<u32> {
            g.get(k)
                .and_then(MetaValue::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| (v as usize) < tokens.len())
        };
        let bos_id = id_key("tokenizer.ggml.bos_token_id");
        let eos_id = id_key("tokenizer.ggml.eos_token_id");
        let unk = id_key("tokenizer.ggml.unknown_token_id");
        let mut stop_ids: Vec<u32> = [
            eos_id,
            id_key("tokenizer.ggml.eot_token_id"),
            id_key("tokenizer.ggml.eom_token_id"),
        ]
        .into_iter()
        .flatten()
        .collect();
        let flag =
            |k: &str, default: bool| g.get(k).and_then(MetaValue::as_bool).unwrap_or(default);
        let add_bos = flag("tokenizer.ggml.add_bos_token", false);
        let add_eos = flag("tokenizer.ggml.add_eos_token", false);
        let vocab = BpeVocab::new(tokens, types, &merges, pre, unk)?;
        for text in END_OF_TURN_TEXTS {
            if let Some(id) = vocab.token_to_id(text) {
                if vocab.is_control(id) {
                    stop_ids.push(id);
                }
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Tokenizer {
            backend: Backend::Gguf(Box::new(vocab)),
            bos_id,
            eos_id,
            stop_ids,
            add_bos,
            add_eos: add_eos && eos_id.is_some(),
        })
    }

    /// Loads an HF `tokenizer.json`. BOS/EOS come from the caller (they live in
    /// `config.json`/`tokenizer_config.json`); BOS/EOS insertion follows the file's own
    /// post-processor.
    pub fn from_tokenizer_json(
        path: &Path,
        bos_id: Option<u32>,
        eos_ids: &[u32],
    ) -> Result<Tokenizer, TokenizerError> {
        let tok = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Hf(format!("{}: {e}", path.display())))?;
        let mut stop_ids = eos_ids.to_vec();
        for text in END_OF_TURN_TEXTS {
            if let Some(id) = tok.token_to_id(text) {
                let special = tok
                    .get_added_tokens_decoder()
                    .get(&id)
                    .is_some_and(|t| t.special);
                if special {
                    stop_ids.push(id);
                }
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Tokenizer {
            backend: Backend::Hf(Box::new(tok)),
            bos_id,
            eos_id: eos_ids.first().copied(),
            stop_ids,
            add_bos: false,
            add_eos: false,
        })
    }

    /// Token ids for `text`. Special tokens written in the text (e.g. `<|im_start|>`) become
    /// their single ids. With `add_special`, BOS/EOS are added as the model asks (for GGUF:
    /// `tokenizer.ggml.add_bos_token`/`add_eos_token`; for tokenizer.json: its post-processor).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        match &self.backend {
            Backend::Gguf(v) => {
                let mut out = Vec::with_capacity(text.len() / 3 + 2);
                if add_special && self.add_bos {
                    if let Some(b) = self.bos_id {
                        out.push(b);
                    }
                }
                v.encode(text, &mut out);
                if add_special && self.add_eos {
                    if let Some(e) = self.eos_id {
                        out.push(e);
                    }
                }
                Ok(out)
            }
            Backend::Hf(t) => t
                .encode_fast(text, add_special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Hf(e.to_string())),
        }
    }

    /// Text for `ids`; invalid UTF-8 (a multi-byte character cut off) becomes U+FFFD. With
    /// `skip_special`, control tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        match &self.backend {
            Backend::Gguf(v) => {
                let mut bytes = Vec::with_capacity(ids.len() * 4);
                for &id in ids {
                    if skip_special && v.is_control(id) {
                        continue;
                    }
                    bytes
                        .extend_from_slice(v.token_bytes(id).ok_or(TokenizerError::UnknownId(id))?);
                }
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Backend::Hf(t) => t
                .decode(ids, skip_special)
                .map_err(|e| TokenizerError::Hf(e.to_string())),
        }
    }

    /// The raw bytes one token stands for (special tokens: their text). For tokenizer.json
    /// vocabularies this is the token decoded alone, which may not be byte-exact for a token
    /// holding part of a character.
    pub fn token_to_piece(&self, id: u32) -> Result<Vec<u8>, TokenizerError> {
        match &self.backend {
            Backend::Gguf(v) => v
                .token_bytes(id)
                .map(<[u8]>::to_vec)
                .ok_or(TokenizerError::UnknownId(id)),
            Backend::Hf(t) => {
                if id as usize >= t.get_vocab_size(true) {
                    return Err(TokenizerError::UnknownId(id));
                }
                t.decode(&[id], false)
                    .map(String::into_bytes)
                    .map_err(|e| TokenizerError::Hf(e.to_string()))
            }
        }
    }

    /// The vocabulary's string for a token (e.g. `"<|im_start|>"`, or `"Ġthe"`).
    pub fn token_text(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::Gguf(v) => v.token_text(id).map(str::to_string),
            Backend::Hf(t) => t.id_to_token(id),
        }
    }

    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        match &self.backend {
            Backend::Gguf(v) => v.token_to_id(text),
            Backend::Hf(t) => t.token_to_id(text),
        }
    }

    /// Whether decoding with `skip_special` hides this token.
    pub fn is_special(&self, id: u32) -> bool {
        match &self.backend {
            Backend::Gguf(v) => v.is_control(id),
            Backend::Hf(t) => t
                .get_added_tokens_decoder()
                .get(&id)
                .is_some_and(|a| a.special),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Gguf(v) => v.len(),
            Backend::Hf(t) => t.get_vocab_size(true),
        }
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Ids that end generation: EOS plus end-of-turn tokens.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.binary_search(&id).is_ok()
    }

    /// Whether `encode(.., add_special = true)` prepends BOS (GGUF vocabularies).
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether decoding is byte-exact per token (GGUF), which lets the incremental decoder
    /// work on bytes rather than re-decoding.
    fn byte_exact(&self) -> bool {
        matches!(self.backend, Backend::Gguf(_))
    }
}

fn strings(a: &[MetaValue], key: &str) -> Result<Vec<String>, TokenizerError> {
    a.iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| TokenizerError::Invalid(format!("{key} holds a non-string")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    /// Tokenizers and loaded models are shared across threads (actors hold them in an `Arc`).
    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<super::Tokenizer>();
        assert_send_sync::<crate::loader::LoadedModel>();
        assert_send_sync::<crate::chat::ChatTemplate>();
    }
}
