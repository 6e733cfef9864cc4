//! Stop strings: cut generated text exactly at the first occurrence of any stop string, even
//! when the occurrence straddles several text deltas (tokens).
//!
//! WHY hold back text: a delta ending in `"</"` may be the start of the stop string `"</s>"`,
//! so it cannot be shown to the client until the next delta says whether the match
//! completes. The matcher holds back the shortest tail that could still begin a match and
//! releases it as soon as it no longer can. The held tail is shorter than the longest stop
//! string, so memory stays bounded whatever the output length.
//!
//! "First occurrence" means the smallest start position over all stop strings in the whole
//! text, so a complete match is only acted on when no earlier partial match is still open
//! (with stops `["abcd", "bc"]` and deltas `"abc"`, `"d"` the cut is at 0, not at 1).

/// Result of feeding one delta to a [`StopMatcher`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopStep {
    /// Text that is now safe to show: it cannot be part of a stop string.
    pub text: String,
    /// A stop string matched; no further text will ever be released.
    pub stopped: bool,
}

/// Incremental stop-string matcher over a stream of text deltas. Pure: no I/O, no clock.
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match before any text).
    pub fn new<I, S>(stops: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let stops = stops
            .into_iter()
            .map(Into::into)
            .filter(|s: &String| !s.is_empty())
            .collect();
        StopMatcher {
            stops,
            held: String::new(),
            stopped: false,
        }
    }

    /// True when there is nothing to match, so deltas pass through untouched.
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// True once a stop string has matched.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Text currently held back (it may be the beginning of a stop string).
    pub fn held(&self) -> &str {
        &self.held
    }

    /// Feeds the next delta; returns the text that may be released now.
    pub fn push(&mut self, delta: &str) -> StopStep {
        if self.stopped {
            return StopStep {
                text: String::new(),
                stopped: true,
            };
        }
        let mut buffer = std::mem::take(&mut self.held);
        buffer.push_str(delta);
        let complete = self.earliest_complete_match(&buffer);
        let partial = self.earliest_open_partial_match(&buffer);
        match (complete, partial) {
            (Some(cut), open) if open.is_none_or(|open| cut <= open) => {
                buffer.truncate(cut);
                self.stopped = true;
                StopStep {
                    text: buffer,
                    stopped: true,
                }
            }
            (_, Some(open)) => {
                self.held = buffer.split_off(open);
                StopStep {
                    text: buffer,
                    stopped: false,
                }
            }
            (_, None) => StopStep {
                text: buffer,
                stopped: false,
            },
        }
    }

    /// The text has ended: releases the held tail, cut at a stop string if one is complete.
    pub fn finish(&mut self) -> StopStep {
        if self.stopped {
            return StopStep {
                text: String::new(),
                stopped: true,
            };
        }
        let mut rest = std::mem::take(&mut self.held);
        match self.earliest_complete_match(&rest) {
            Some(cut) => {
                rest.truncate(cut);
                self.stopped = true;
                StopStep {
                    text: rest,
                    stopped: true,
                }
            }
            None => StopStep {
                text: rest,
                stopped: false,
            },
        }
    }

    /// Smallest byte offset where some stop string occurs completely in `text`.
    fn earliest_complete_match(&self, text: &str) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|stop| text.find(stop.as_str()))
            .min()
    }

    /// Smallest char boundary `i` such that `text[i..]` is a proper prefix of some stop
    /// string: a match that may still complete with future text.
    fn earliest_open_partial_match(&self, text: &str) -> Option<usize> {
        let longest = self.stops.iter().map(String::len).max()?;
        let window_start = text.len().saturating_sub(longest.saturating_sub(1));
        text.char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= window_start)
            .find(|&i| {
                let tail = &text.as_bytes()[i..];
                self.stops
                    .iter()
                    .any(|stop| stop.len() > tail.len() && stop.as_bytes().starts_with(tail))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut matcher = StopMatcher::new(stops.iter().copied());
        let mut out = String::new();
        let mut stopped = false;
        for delta in deltas {
            let step = matcher.push(delta);
            out.push_str(&step.text);
            stopped |= step.stopped;
        }
        let step = matcher.finish();
        out.push_str(&step.text);
        (out, stopped || step.stopped)
    }

    #[test]
    fn passes_text_through_without_stops() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".to_string(), false));
    }

    #[test]
    fn cuts_a_stop_string_split_over_deltas() {
        assert_eq!(
            run(&["</s>"], &["hello <", "/", "s> world"]),
            ("hello ".to_string(), true)
        );
    }

    #[test]
    fn releases_a_held_prefix_that_does_not_complete() {
        let mut matcher = StopMatcher::new(["</s>"]);
        assert_eq!(matcher.push("a </").text, "a ");
        assert_eq!(matcher.held(), "</");
        assert_eq!(matcher.push("b>").text, "</b>");
        assert_eq!(matcher.held(), "");
    }

    #[test]
    fn prefers_the_earliest_start_over_an_earlier_completion() {
        assert_eq!(run(&["abcd", "bc"], &["abc", "d"]), (String::new(), true));
        assert_eq!(run(&["abcd", "bc"], &["abc", "x"]), ("a".to_string(), true));
        assert_eq!(run(&["abcd", "bc"], &["abc"]), ("a".to_string(), true));
    }

    #[test]
    fn holds_back_on_char_boundaries_only() {
        assert_eq!(run(&["日本"], &["x日", "本y"]), ("x".to_string(), true));
        assert_eq!(run(&["日本"], &["x日", "y"]), ("x日y".to_string(), false));
    }

    #[test]
    fn ignores_empty_stop_strings() {
        assert_eq!(run(&[""], &["ab"]), ("ab".to_string(), false));
    }
}
