//! SentencePiece-style vocabularies as GGUF files describe them (`tokenizer.ggml.model =
//! "llama"`: Llama 2, Mistral, TinyLlama ...): spaces become U+2581, adjacent symbols merge
//! greedily by the merged token's score (highest first, leftmost on ties), and characters
//! missing from the vocabulary fall back to `<0xXX>` byte tokens. Follows llama.cpp's
//! behaviour, including the space prefix before text that starts the input or follows a
//! special token.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::bpe::{partition_specials, special_tokens, Fragment, TokenType};
use super::TokenizerError;

const SPACE: char = '\u{2581}';

pub struct SpmVocab {
    tokens: Vec<String>,
    types: Vec<TokenType>,
    scores: Vec<f32>,
    bytes: Vec<Vec<u8>>,
    token_to_id: HashMap<String, u32>,
    byte_tokens: [Option<u32>; 256],
    specials: Vec<(String, u32)>,
    unk: Option<u32>,
    pub add_space_prefix: bool,
}

/// Parses `<0xAB>`.
fn byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

impl SpmVocab {
    pub fn new(
        tokens: Vec<String>,
        types: Vec<TokenType>,
        scores: Vec<f32>,
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Result<SpmVocab, TokenizerError> {
        if tokens.len() > u32::MAX as usize {
            return Err(TokenizerError::Invalid("vocabulary too large".into()));
        }
        let types: Vec<TokenType> = (0..tokens.len())
            .map(|i| types.get(i).copied().unwrap_or(TokenType::Normal))
            .collect();
        let scores: Vec<f32> = (0..tokens.len())
            .map(|i| scores.get(i).copied().unwrap_or(0.0))
            .collect();
        let mut token_to_id = HashMap::with_capacity(tokens.len());
        let mut byte_tokens = [None; 256];
        for (i, t) in tokens.iter().enumerate() {
            token_to_id.entry(t.clone()).or_insert(i as u32);
            if types[i] == TokenType::Byte {
                if let Some(b) = byte_token(t) {
                    byte_tokens[usize::from(b)].get_or_insert(i as u32);
                }
            }
        }
        let bytes = tokens
            .iter()
            .zip(&types)
            .map(|(t, ty)| match ty {
                TokenType::Byte => byte_token(t)
                    .map(|b| vec![b])
                    .unwrap_or_else(|| t.as_bytes().to_vec()),
                TokenType::Normal | TokenType::Unused | TokenType::UserDefined => {
                    t.replace(SPACE, " ").into_bytes()
                }
                _ => t.as_bytes().to_vec(),
            })
            .collect();
        let specials = special_tokens(&tokens, &types);
        Ok(SpmVocab {
            tokens,
            types,
            scores,
            bytes,
            token_to_id,
            byte_tokens,
            specials,
            unk,
            add_space_prefix,
        })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize).map(Vec::as_slice)
    }

    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    pub fn is_control(&self, id: u32) -> bool {
        self.types.get(id as usize) == Some(&TokenType::Control)
    }

    /// Token ids for `text`, special tokens written in it included, without BOS/EOS.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut prev_special = true;
        for frag in partition_specials(&self.specials, text) {
            match frag {
                Fragment::Special(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(SPACE);
                    }
                    s.extend(t.chars().map(|c| if c == ' ' { SPACE } else { c }));
                    self.encode_piece(&s, out);
                    prev_special = false;
                }
            }
        }
    }

    fn encode_piece(&self, text: &str, out: &mut Vec<u32>) {
        // Symbols are byte ranges of `text`, linked as a list; merged ones grow to the right.
        let mut syms: Vec<(usize, usize, Option<usize>, Option<usize>)> = Vec::new(); // start, len, prev, next
        for (i, (pos, c)) in text.char_indices().enumerate() {
            syms.push((pos, c.len_utf8(), i.checked_sub(1), Some(i + 1)));
        }
        if let Some(last) = syms.last_mut() {
            last.3 = None;
        }
        let mut heap = BinaryHeap::new();
        for i in 1..syms.len() {
            self.push_bigram(text, &syms, i - 1, i, &mut heap);
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (syms[b.left], syms[b.right]);
            if l.1 == 0 || r.1 == 0 || l.1 + r.1 != b.size || l.3 != Some(b.right) {
                continue;
            }
            syms[b.left].1 += r.1;
            syms[b.right].1 = 0;
            syms[b.left].3 = r.3;
            if let Some(n) = r.3 {
                syms[n].2 = Some(b.left);
            }
            if let Some(p) = syms[b.left].2 {
                self.push_bigram(text, &syms, p, b.left, &mut heap);
            }
            if let Some(n) = syms[b.left].3 {
                self.push_bigram(text, &syms, b.left, n, &mut heap);
            }
        }
        for &(start, len, _, _) in syms.iter().filter(|s| s.1 > 0) {
            let piece = &text[start..start + len];
            if let Some(id) = self.token_to_id(piece) {
                out.push(id);
                continue;
            }
            // Only single characters can be missing (merges only form vocabulary tokens).
            for b in piece.bytes() {
                if let Some(id) = self.byte_tokens[usize::from(b)].or(self.unk) {
                    out.push(id);
                }
            }
        }
    }

    fn push_bigram(
        &self,
        text: &str,
        syms: &[(usize, usize, Option<usize>, Option<usize>)],
        left: usize,
        right: usize,
        heap: &mut BinaryHeap<Bigram>,
    ) {
        let (start, l_len) = (syms[left].0, syms[left].1);
        let size = l_len + syms[right].1;
        let Some(merged) = text.get(start..start + size) else {
            return;
        };
        if let Some(id) = self.token_to_id(merged) {
            heap.push(Bigram {
                score: self.scores[id as usize],
                left,
                right,
                size,
            });
        }
    }
}

/// A candidate merge; the heap pops the highest score, then the leftmost.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> SpmVocab {
        let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut types = vec![TokenType::Unknown, TokenType::Control, TokenType::Control];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TokenType::Byte);
            scores.push(0.0);
        }
        for (t, s) in [
            ("\u{2581}", -1.0),
            ("h", -2.0),
            ("e", -2.0),
            ("l", -2.0),
            ("o", -2.0),
            ("\u{2581}h", -3.0),
            ("ll", -1.5),
            ("\u{2581}he", -4.0),
            ("\u{2581}hell", -5.0),
            ("\u{2581}hello", -6.0),
        ] {
            tokens.push(t.to_string());
            types.push(TokenType::Normal);
            scores.push(s);
        }
        SpmVocab::new(tokens, types, scores, Some(0), true).unwrap()
    }

    #[test]
    fn merges_by_score_with_space_prefix_and_byte_fallback() {
        let v = toy();
        let mut out = vec![];
        v.encode("hello é</s>hello", &mut out);
        let id = |s: &str| v.token_to_id(s).unwrap();
        let e_acute = "é".as_bytes();
        assert_eq!(
            out,
            vec![
                id("\u{2581}hello"),
                id("\u{2581}"),
                id(&format!("<0x{:02X}>", e_acute[0])),
                id(&format!("<0x{:02X}>", e_acute[1])),
                2,
                id("\u{2581}hello"),
            ]
        );
        let bytes: Vec<u8> = out
            .iter()
            .flat_map(|&i| v.token_bytes(i).unwrap().to_vec())
            .collect();
        assert_eq!(bytes, " hello é</s> hello".as_bytes());
    }
}
