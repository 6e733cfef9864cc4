//! GPT-2's reversible byte <-> printable-character mapping used by byte-level BPE vocabularies:
//! printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100.. in order.

use std::sync::OnceLock;

struct Tables {
    byte_to_char: [char; 256],
    /// Indexed by `char as u32` for chars below 0x180 (every mapped char is).
    char_to_byte: Vec<Option<u8>>,
}

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let mut byte_to_char = ['\0'; 256];
        let mut char_to_byte = vec![None; 0x180];
        let mut extra = 0u32;
        for b in 0..=255u8 {
            let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
            let cp = if printable {
                u32::from(b)
            } else {
                extra += 1;
                0xFF + extra
            };
            let c = char::from_u32(cp).unwrap_or('\0');
            byte_to_char[usize::from(b)] = c;
            char_to_byte[cp as usize] = Some(b);
        }
        Tables {
            byte_to_char,
            char_to_byte,
        }
    })
}

/// Maps raw bytes to the vocabulary's printable characters.
pub fn encode_bytes(bytes: &[u8]) -> String {
    let t = tables();
    bytes
        .iter()
        .map(|&b| t.byte_to_char[usize::from(b)])
        .collect()
}

/// Maps a vocabulary string back to raw bytes; `None` when a character is outside the mapping
/// (the token is not a byte-level token).
pub fn decode_str(s: &str) -> Option<Vec<u8>> {
    let t = tables();
    s.chars()
        .map(|c| t.char_to_byte.get(c as usize).copied().flatten())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        let s = encode_bytes(&all);
        assert_eq!(s.chars().count(), 256);
        assert_eq!(decode_str(&s).unwrap(), all);
        assert_eq!(encode_bytes(b" a\n"), "\u{120}a\u{10A}");
    }
}
