//! Streaming detokenization: text comes out token by token, and never as broken UTF-8. A
//! character whose bytes are spread over several tokens (emoji, CJK with byte-level BPE) is
//! held back until it is complete.

use super::{Tokenizer, TokenizerError};

#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    skip_special: bool,
    /// Byte-exact path: bytes not yet emitted (an incomplete character at the end).
    pending: Vec<u8>,
    /// Re-decoding path (tokenizer.json): every id so far, and the window being decoded.
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new(skip_special: bool) -> IncrementalDecoder {
        IncrementalDecoder {
            skip_special,
            ..Default::default()
        }
    }

    /// Feeds one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        if tok.byte_exact() {
            if !(self.skip_special && tok.is_special(id)) {
                self.pending.extend_from_slice(&tok.token_to_piece(id)?);
            }
            return Ok(take_complete_utf8(&mut self.pending, false));
        }
        self.ids.push(id);
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            if let Some(new) = full.get(prefix.len()..) {
                let new = new.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(new);
            }
        }
        Ok(String::new())
    }

    /// Ends the stream: whatever is held back, with incomplete characters as U+FFFD.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        if tok.byte_exact() {
            return Ok(take_complete_utf8(&mut self.pending, true));
        }
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

/// Removes and returns the longest valid UTF-8 prefix of `buf`; invalid bytes become U+FFFD.
/// An incomplete character at the end stays in `buf` unless `flush`.
fn take_complete_utf8(buf: &mut Vec<u8>, flush: bool) -> String {
    let mut out = String::new();
    let mut start = 0;
    loop {
        match std::str::from_utf8(&buf[start..]) {
            Ok(s) => {
                out.push_str(s);
                start = buf.len();
                break;
            }
            Err(e) => {
                let valid = start + e.valid_up_to();
                out.push_str(&String::from_utf8_lossy(&buf[start..valid]));
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        start = valid + n;
                    }
                    None => {
                        start = valid;
                        if flush {
                            out.push('\u{FFFD}');
                            start = buf.len();
                        }
                        break;
                    }
                }
            }
        }
    }
    buf.drain(..start);
    out
}

#[cfg(test)]
mod tests {
    use super::take_complete_utf8;

    #[test]
    fn holds_back_incomplete_chars() {
        let crab = "🦀".as_bytes();
        let mut buf = vec![b'a', crab[0], crab[1]];
        assert_eq!(take_complete_utf8(&mut buf, false), "a");
        buf.extend_from_slice(&crab[2..]);
        assert_eq!(take_complete_utf8(&mut buf, false), "🦀");
        assert!(buf.is_empty());
    }

    #[test]
    fn invalid_bytes_become_replacement() {
        let mut buf = vec![b'x', 0xFF, b'y', 0xE6];
        assert_eq!(take_complete_utf8(&mut buf, false), "x\u{FFFD}y");
        assert_eq!(buf, vec![0xE6]);
        assert_eq!(take_complete_utf8(&mut buf, true), "\u{FFFD}");
    }
}
