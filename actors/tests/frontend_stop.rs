//! Property tests of the stop-string matcher: whatever way the text is split into deltas,
//! the released text is exactly the text before the first stop occurrence.

use proptest::prelude::*;
use turbine_actors::preprocessor::stop::StopMatcher;

/// Small alphabet (with multi-byte characters) so stop strings actually occur.
fn text_from(alphabet: &'static [&'static str], max_len: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(alphabet), 0..max_len)
        .prop_map(|parts| parts.concat())
}

const ALPHABET: &[&str] = &["a", "b", "c", "é", "日"];

/// The reference answer: cut at the smallest start of any stop string in the whole text.
fn expected(text: &str, stops: &[String]) -> (String, bool) {
    match stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
    {
        Some(cut) => (text[..cut].to_string(), true),
        None => (text.to_string(), false),
    }
}

/// Splits `text` at the given char positions (taken modulo the text's char count).
fn split(text: &str, cuts: &[usize]) -> Vec<String> {
    let boundaries: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
    let mut points: Vec<usize> = cuts
        .iter()
        .filter(|_| !boundaries.is_empty())
        .map(|c| boundaries[c % boundaries.len()])
        .collect();
    points.push(0);
    points.push(text.len());
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|w| text[w[0]..w[1]].to_string())
        .collect()
}

fn run(stops: &[String], deltas: &[String]) -> (String, bool) {
    let mut matcher = StopMatcher::new(stops.iter().cloned());
    let mut out = String::new();
    let mut stopped = false;
    for delta in deltas {
        let step = matcher.push(delta);
        out.push_str(&step.text);
        stopped |= step.stopped;
        // Held text never grows past the longest stop string.
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        assert!(matcher.held().len() < longest.max(1));
    }
    let tail = matcher.finish();
    out.push_str(&tail.text);
    (out, stopped || tail.stopped)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn output_is_text_up_to_the_first_stop(
        text in text_from(ALPHABET, 40),
        stops in prop::collection::vec(text_from(ALPHABET, 4), 0..4),
        cuts in prop::collection::vec(any::<usize>(), 0..20),
    ) {
        let deltas = split(&text, &cuts);
        prop_assert_eq!(deltas.concat(), text.clone());
        prop_assert_eq!(run(&stops, &deltas), expected(&text, &stops));
    }

    #[test]
    fn one_char_at_a_time_equals_one_delta(
        text in text_from(ALPHABET, 40),
        stops in prop::collection::vec(text_from(ALPHABET, 5), 1..4),
    ) {
        let per_char: Vec<String> = text.chars().map(String::from).collect();
        prop_assert_eq!(run(&stops, &per_char), run(&stops, std::slice::from_ref(&text)));
    }

    #[test]
    fn nothing_is_released_after_a_stop(
        text in text_from(ALPHABET, 30),
        stop in text_from(ALPHABET, 3),
        more in text_from(ALPHABET, 10),
    ) {
        let mut matcher = StopMatcher::new([stop.clone()]);
        let first = matcher.push(&text);
        if first.stopped {
            prop_assert!(matcher.is_stopped());
            prop_assert_eq!(matcher.push(&more).text, "");
            prop_assert_eq!(matcher.finish().text, "");
        }
    }
}
