//! Byte-level BPE as GGUF files describe it (`tokenizer.ggml.model = "gpt2"`): a vocabulary of
//! byte-mapped strings, ranked merges, token types, and a pre-tokenizer chosen by
//! `tokenizer.ggml.pre`. Special (control and user-defined) tokens written in the text are
//! matched verbatim before pre-tokenization.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Mutex;

use super::byte_level;
use super::pretokenize::PreTokenizer;
use super::TokenizerError;

/// ggml's token types (`tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    pub fn from_ggml(v: i64) -> TokenType {
        match v {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

/// Words longer than this are not cached (they are rare and would bloat the cache).
const CACHE_MAX_WORD: usize = 64;
/// The cache is cleared when it reaches this many words, bounding its memory.
const CACHE_MAX_ENTRIES: usize = 1 << 16;

pub struct BpeVocab {
    tokens: Vec<String>,
    types: Vec<TokenType>,
    /// Each token's bytes as decoding emits them.
    bytes: Vec<Vec<u8>>,
    token_to_id: HashMap<String, u32>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Texts matched verbatim before BPE, longest first.
    specials: Vec<(String, u32)>,
    unk: Option<u32>,
    pre: PreTokenizer,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl BpeVocab {
    pub fn new(
        tokens: Vec<String>,
        types: Vec<TokenType>,
        merges: &[String],
        pre_type: &str,
        unk: Option<u32>,
    ) -> Result<BpeVocab, TokenizerError> {
        if tokens.len() > u32::MAX as usize {
            return Err(TokenizerError::Invalid("vocabulary too large".into()));
        }
        let types: Vec<TokenType> = (0..tokens.len())
            .map(|i| types.get(i).copied().unwrap_or(TokenType::Normal))
            .collect();
        let mut token_to_id = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            // The first occurrence wins, as in llama.cpp.
            token_to_id.entry(t.clone()).or_insert(i as u32);
        }
        let bytes = tokens
            .iter()
            .zip(&types)
            .map(|(t, ty)| match ty {
                TokenType::Normal | TokenType::Byte | TokenType::Unused => {
                    byte_level::decode_str(t).unwrap_or_else(|| t.as_bytes().to_vec())
                }
                _ => t.as_bytes().to_vec(),
            })
            .collect();
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            let Some((l, r)) = m.split_once(' ') else {
                return Err(TokenizerError::Invalid(format!(
                    "merge #{rank} {m:?} is not two space-separated tokens"
                )));
            };
            let (Some(&li), Some(&ri), Some(&mi)) = (
                token_to_id.get(l),
                token_to_id.get(r),
                token_to_id.get(&format!("{l}{r}")),
            ) else {
                continue; // a merge whose parts are not tokens can never apply
            };
            merge_map.entry((li, ri)).or_insert((rank as u32, mi));
        }
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, ty))| {
                !t.is_empty()
                    && matches!(
                        ty,
                        TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                    )
            })
            .map(|(i, (t, _))| (t.clone(), i as u32))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Ok(BpeVocab {
            tokens,
            types,
            bytes,
            token_to_id,
            merges: merge_map,
            specials,
            unk,
            pre: PreTokenizer::for_pre_type(pre_type)?,
            cache: Mutex::new(HashMap::new()),
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

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize).map(Vec::as_slice)
    }

    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// Tokens a caller may want hidden from output (control tokens).
    pub fn is_control(&self, id: u32) -> bool {
        self.token_type(id) == Some(TokenType::Control)
    }

    /// Token ids for `text`, special tokens written in it included, without BOS/EOS.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        for frag in self.partition_specials(text) {
            match frag {
                Fragment::Special(id) => out.push(id),
                Fragment::Text(t) => {
                    for word in self.pre.split(t) {
                        self.encode_word_cached(word, out);
                    }
                }
            }
        }
    }

    /// Splits `text` around special tokens, longest special first (as llama.cpp does).
    fn partition_specials<'t>(&self, text: &'t str) -> Vec<Fragment<'t>> {
        let mut frags = vec![Fragment::Text(text)];
        for (special, id) in &self.specials {
            if !text.contains(special.as_str()) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Fragment::Text(t) => {
                        let mut rest = t;
                        while let Some(pos) = rest.find(special.as_str()) {
                            if pos > 0 {
                                next.push(Fragment::Text(&rest[..pos]));
                            }
                            next.push(Fragment::Special(*id));
                            rest = &rest[pos + special.len()..];
                        }
                        if !rest.is_empty() {
                            next.push(Fragment::Text(rest));
                        }
                    }
                    s => next.push(s),
                }
            }
            frags = next;
        }
        frags
    }

    fn encode_word_cached(&self, word: &str, out: &mut Vec<u32>) {
        if word.len() <= CACHE_MAX_WORD {
            if let Ok(cache) = self.cache.lock() {
                if let Some(ids) = cache.get(word) {
                    out.extend_from_slice(ids);
                    return;
                }
            }
        }
        let start = out.len();
        self.encode_word(word, out);
        if word.len() <= CACHE_MAX_WORD {
            if let Ok(mut cache) = self.cache.lock() {
                if cache.len() >= CACHE_MAX_ENTRIES {
                    cache.clear();
                }
                cache.insert(word.to_string(), out[start..].to_vec());
            }
        }
    }

    /// BPE over one pre-tokenized word: repeatedly merge the adjacent pair of lowest rank
    /// (leftmost on ties) until no merge applies.
    fn encode_word(&self, word: &str, out: &mut Vec<u32>) {
        let mapped = byte_level::encode_bytes(word.as_bytes());
        if self.pre.ignore_merges {
            if let Some(id) = self.token_to_id(&mapped) {
                out.push(id);
                return;
            }
        }
        let mut buf = [0u8; 4];
        let mut syms: Vec<Sym> = mapped
            .chars()
            .enumerate()
            .map(|(i, c)| Sym {
                id: self.token_to_id(c.encode_utf8(&mut buf)),
                prev: i.checked_sub(1),
                next: Some(i + 1),
                alive: true,
            })
            .collect();
        if let Some(last) = syms.last_mut() {
            last.next = None;
        }
        let mut heap = BinaryHeap::new();
        for i in 1..syms.len() {
            self.push_pair(&syms, i - 1, i, &mut heap);
        }
        while let Some(Reverse((_, left, right, lid, rid, merged))) = heap.pop() {
            let (l, r) = (&syms[left], &syms[right]);
            let valid = l.alive
                && r.alive
                && l.next == Some(right)
                && l.id == Some(lid)
                && r.id == Some(rid);
            if !valid {
                continue;
            }
            let after = syms[right].next;
            syms[right].alive = false;
            syms[left].id = Some(merged);
            syms[left].next = after;
            if let Some(a) = after {
                syms[a].prev = Some(left);
            }
            if let Some(p) = syms[left].prev {
                self.push_pair(&syms, p, left, &mut heap);
            }
            if let Some(a) = after {
                self.push_pair(&syms, left, a, &mut heap);
            }
        }
        // A character missing from the vocabulary becomes the unknown token, or is dropped.
        out.extend(
            syms.iter()
                .filter(|s| s.alive)
                .filter_map(|s| s.id.or(self.unk)),
        );
    }

    fn push_pair(
        &self,
        syms: &[Sym],
        left: usize,
        right: usize,
        heap: &mut BinaryHeap<Reverse<Pair>>,
    ) {
        if let (Some(l), Some(r)) = (syms[left].id, syms[right].id) {
            if let Some(&(rank, merged)) = self.merges.get(&(l, r)) {
                heap.push(Reverse((rank, left, right, l, r, merged)));
            }
        }
    }
}

/// (rank, left index, right index, left id, right id, merged id); ordered so the lowest rank,
/// then the leftmost pair, pops first.
type Pair = (u32, usize, usize, u32, u32, u32);

struct Sym {
    id: Option<u32>,
    prev: Option<usize>,
    next: Option<usize>,
    alive: bool,
}

enum Fragment<'t> {
    Text(&'t str),
    Special(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: the 256 byte characters, some merges, one control token.
    fn toy() -> BpeVocab {
        let mut tokens: Vec<String> = (0..=255u8)
            .map(|b| byte_level::encode_bytes(&[b]))
            .collect();
        let mut types = vec![TokenType::Normal; 256];
        for t in ["he", "ll", "hell", "hello", "\u{120}w", "\u{120}wo"] {
            tokens.push(t.to_string());
            types.push(TokenType::Normal);
        }
        tokens.push("<|end|>".into());
        types.push(TokenType::Control);
        let merges: Vec<String> = ["l l", "h e", "he ll", "hell o", "\u{120} w", "\u{120}w o"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        BpeVocab::new(tokens, types, &merges, "gpt2", None).unwrap()
    }

    #[test]
    fn merges_by_rank() {
        let v = toy();
        let mut out = vec![];
        v.encode("hello wow<|end|>", &mut out);
        let id = |s: &str| v.token_to_id(s).unwrap();
        assert_eq!(
            out,
            vec![id("hello"), id("\u{120}wo"), id("w"), id("<|end|>")]
        );
        // cached path gives the same
        let mut again = vec![];
        v.encode("hello wow<|end|>", &mut again);
        assert_eq!(out, again);
    }
}
