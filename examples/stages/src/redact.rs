//! `redact`: replaces listed words, and runs of digits, in the text the client receives.
//!
//! ```yaml
//! stages:
//!   - name: redact
//!     config:
//!       words: [password, secret]   # whole words, any case
//!       min_digits: 4               # runs of 4+ digits (card, phone numbers); absent: none
//!       replacement: "[REDACTED]"
//! ```
//!
//! The model's text arrives a token at a time, so a word can be split over several pieces
//! (" pass", "word"). The filter holds back a trailing run of letters and digits until the
//! next piece shows where it ends, and releases what it still holds when the stream ends:
//! the client sees the words one piece late, and never a listed word.

use async_trait::async_trait;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::sync::Arc;
use turbine_actors::stages::{parse_config, Stage, StageError, StageRequest, StreamFilter};

/// The registered name.
pub const NAME: &str = "redact";

/// The stage's `config:` block.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedactConfig {
    /// Words to replace, matched whole and case-insensitively.
    pub words: Vec<String>,
    /// Replace every run of at least this many digits; absent: digits are left alone.
    pub min_digits: Option<usize>,
    /// What a redacted word becomes.
    pub replacement: String,
}

impl Default for RedactConfig {
    fn default() -> Self {
        RedactConfig {
            words: Vec::new(),
            min_digits: None,
            replacement: "[REDACTED]".to_string(),
        }
    }
}

/// What to redact, shared by every stream's filter.
#[derive(Debug)]
pub struct Rules {
    words: BTreeSet<String>,
    min_digits: Option<usize>,
    replacement: String,
}

impl Rules {
    pub fn new(config: RedactConfig) -> Result<Rules, String> {
        if config.min_digits == Some(0) {
            return Err("min_digits: must be at least 1".into());
        }
        let mut words = BTreeSet::new();
        for (i, w) in config.words.iter().enumerate() {
            if w.is_empty() || !w.chars().all(char::is_alphanumeric) {
                return Err(format!(
                    "words[{i}]: `{w}` is not one word (letters and digits only)"
                ));
            }
            words.insert(w.to_lowercase());
        }
        Ok(Rules {
            words,
            min_digits: config.min_digits,
            replacement: config.replacement,
        })
    }

    fn redacts(&self, word: &str) -> bool {
        let digits = self
            .min_digits
            .is_some_and(|min| word.len() >= min && word.bytes().all(|b| b.is_ascii_digit()));
        digits || self.words.contains(&word.to_lowercase())
    }
}

/// One output stream's filter: the text not yet passed on.
pub struct Redactor {
    rules: Arc<Rules>,
    held: String,
}

impl Redactor {
    pub fn new(rules: Arc<Rules>) -> Redactor {
        Redactor {
            rules,
            held: String::new(),
        }
    }

    /// Passes on `held` up to `end`, each complete word redacted if it must be.
    fn release(&mut self, end: usize) -> String {
        let text: String = self.held.drain(..end).collect();
        let mut out = String::with_capacity(text.len());
        let mut word = String::new();
        for c in text.chars() {
            if c.is_alphanumeric() {
                word.push(c);
                continue;
            }
            self.flush_word(&mut word, &mut out);
            out.push(c);
        }
        self.flush_word(&mut word, &mut out);
        out
    }

    fn flush_word(&self, word: &mut String, out: &mut String) {
        if word.is_empty() {
            return;
        }
        if self.rules.redacts(word) {
            out.push_str(&self.rules.replacement);
        } else {
            out.push_str(word);
        }
        word.clear();
    }
}

impl StreamFilter for Redactor {
    fn on_text(&mut self, text: &str) -> String {
        self.held.push_str(text);
        // Everything before the trailing run of letters and digits is complete.
        let end = self
            .held
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_alphanumeric())
            .last()
            .map_or(self.held.len(), |(i, _)| i);
        self.release(end)
    }

    fn on_end(&mut self) -> String {
        let end = self.held.len();
        self.release(end)
    }
}

/// The stage: the rules, and a fresh [`Redactor`] per output stream.
pub struct Redact {
    rules: Arc<Rules>,
}

/// The factory `turbine` registers.
pub fn build(config: &serde_yaml::Value) -> Result<Box<dyn Stage>, String> {
    let config: RedactConfig = parse_config(config)?;
    Ok(Box::new(Redact {
        rules: Arc::new(Rules::new(config)?),
    }))
}

#[async_trait]
impl Stage for Redact {
    async fn on_request(&mut self, _request: &mut StageRequest) -> Result<(), StageError> {
        Ok(())
    }

    fn on_stream(&mut self, _request: &StageRequest) -> Option<Box<dyn StreamFilter>> {
        Some(Box::new(Redactor::new(self.rules.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor(words: &[&str], min_digits: Option<usize>) -> Redactor {
        let rules = Rules::new(RedactConfig {
            words: words.iter().map(|w| w.to_string()).collect(),
            min_digits,
            replacement: "#".into(),
        })
        .unwrap();
        Redactor::new(Arc::new(rules))
    }

    fn run(r: &mut Redactor, pieces: &[&str]) -> String {
        let mut out: String = pieces.iter().map(|p| r.on_text(p)).collect();
        out.push_str(&r.on_end());
        out
    }

    #[test]
    fn words_split_over_pieces_are_still_redacted() {
        let mut r = redactor(&["password"], None);
        assert_eq!(
            run(&mut r, &["my", " pass", "word", " is", " PassWord!"]),
            "my # is #!"
        );
    }

    #[test]
    fn only_whole_words_match() {
        let mut r = redactor(&["pass"], None);
        assert_eq!(run(&mut r, &["passport", " pass", "."]), "passport #.");
    }

    #[test]
    fn digit_runs_from_the_minimum_length() {
        let mut r = redactor(&[], Some(3));
        assert_eq!(
            run(&mut r, &["call 55", "5-12", "34 or 7"]),
            "call #-# or 7"
        );
    }

    #[test]
    fn nothing_is_lost_or_reordered() {
        let mut r = redactor(&["x"], None);
        let pieces = ["Hé", "llo", ", wör", "ld", " ", "🙂", "ok"];
        assert_eq!(run(&mut r, &pieces), pieces.concat());
    }

    #[test]
    fn held_text_waits_for_the_end_of_its_word() {
        let mut r = redactor(&["secret"], None);
        assert_eq!(r.on_text("the sec"), "the ");
        assert_eq!(r.on_text("ret"), "");
        assert_eq!(r.on_text(" is"), "# ");
        assert_eq!(r.on_end(), "is");
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(Rules::new(RedactConfig {
            words: vec!["two words".into()],
            ..RedactConfig::default()
        })
        .unwrap_err()
        .contains("words[0]"));
        assert!(Rules::new(RedactConfig {
            min_digits: Some(0),
            ..RedactConfig::default()
        })
        .is_err());
    }
}
