//! Splitting text into words before BPE, per the pre-tokenizer type a GGUF names in
//! `tokenizer.ggml.pre`. The expressions are llama.cpp's (facts read from its source): they are
//! applied in sequence, each one to every piece the previous one produced, and text an
//! expression does not match stays a piece of its own.

use fancy_regex::Regex;

use super::TokenizerError;

/// GPT-2's word pattern. llama.cpp's copy lacks the trailing `|\s+`; unmatched runs stay
/// pieces anyway, so the results agree.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The expressions for a `tokenizer.ggml.pre` value, plus whether whole words found in the
/// vocabulary skip the merges (llama.cpp's `ignore_merges`).
fn expressions(pre: &str) -> (Vec<&'static str>, bool) {
    match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![r"\p{N}", GPT2], false)
        }
        "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" => {
            (vec![GPT2], false)
        }
        "llama3" | "llama-bpe" | "falcon3" | "pixtral" => (vec![LLAMA3], true),
        "dbrx" | "smaug-bpe" => (vec![LLAMA3], false),
        "qwen2" | "stablelm2" | "hunyuan" | "deepseek-r1-qwen" => (vec![QWEN2], false),
        // llama.cpp's fallback for unknown pre-tokenizers.
        _ => (
            vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            false,
        ),
    }
}

pub struct PreTokenizer {
    regexes: Vec<Regex>,
    pub ignore_merges: bool,
}

impl PreTokenizer {
    pub fn for_pre_type(pre: &str) -> Result<PreTokenizer, TokenizerError> {
        let (exprs, ignore_merges) = expressions(pre);
        let regexes = exprs
            .into_iter()
            .map(|e| {
                Regex::new(e).map_err(|err| TokenizerError::Invalid(format!("regex {e:?}: {err}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(PreTokenizer {
            regexes,
            ignore_merges,
        })
    }

    /// Splits `text` into words (byte ranges are contiguous and cover the whole text).
    pub fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut pieces = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for piece in pieces {
                let mut last = 0;
                for m in re.find_iter(piece) {
                    // A regex runtime error (backtrack limit) leaves the rest as one piece.
                    let Ok(m) = m else { break };
                    if m.start() == m.end() {
                        continue;
                    }
                    if m.start() > last {
                        next.push(&piece[last..m.start()]);
                    }
                    next.push(m.as_str());
                    last = m.end();
                }
                if last < piece.len() {
                    next.push(&piece[last..]);
                }
            }
            pieces = next;
        }
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm_splits_digits_and_words() {
        let p = PreTokenizer::for_pre_type("smollm").unwrap();
        assert_eq!(
            p.split("Hello world 2024, it's  ok\n"),
            vec!["Hello", " world", " ", "2", "0", "2", "4", ",", " it", "'s", " ", " ok", "\n"]
        );
    }

    #[test]
    fn pieces_cover_the_text() {
        let p = PreTokenizer::for_pre_type("qwen2").unwrap();
        let text = "a\t\tb  🦀 x123\r\n";
        assert_eq!(p.split(text).concat(), text);
    }
}
