//! Prompts for load generation.
//!
//! WHY synthetic and varied: a server with prefix caching would serve identical prompts from
//! cache and report flattering TTFTs. Each request gets its own word sequence (from a seeded
//! generator, so a run is reproducible with `--seed`); `shared_prefix` words at the start are
//! the same for every request, to measure caching on purpose.

/// Common English words; most are one token in Llama-family vocabularies, so the word count
/// approximates the prompt's token count (the server's `usage.prompt_tokens` is reported too).
const WORDS: [&str; 64] = [
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "are", "with", "they", "be", "at",
    "one", "have", "this", "from", "by", "hot", "word", "but", "what", "some", "we", "can", "out",
    "other", "were", "all", "there", "when", "up", "use", "your", "how", "said", "an", "each",
    "she", "which", "do", "their", "time", "if", "will", "way", "about", "many", "then", "them",
    "write", "would", "like", "so", "these", "her", "long", "make", "thing", "see", "him", "two",
    "has",
];

/// Where request prompts come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromptSource {
    /// The same text for every request.
    Fixed(String),
    /// `words` words per prompt; the first `shared_prefix` are common to all requests.
    Synthetic {
        words: usize,
        shared_prefix: usize,
        seed: u64,
    },
}

impl PromptSource {
    /// The prompt of request number `index` (unique across the whole run).
    pub fn prompt(&self, index: u64) -> String {
        match self {
            PromptSource::Fixed(text) => text.clone(),
            PromptSource::Synthetic {
                words,
                shared_prefix,
                seed,
            } => {
                let shared = (*shared_prefix).min(*words);
                let mut prefix_rng = SplitMix64::new(*seed);
                let mut own_rng = SplitMix64::new(
                    seed.wrapping_add(1)
                        .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                );
                let mut out: Vec<&str> = Vec::with_capacity(*words);
                out.extend((0..shared).map(|_| prefix_rng.word()));
                out.extend((shared..*words).map(|_| own_rng.word()));
                out.join(" ")
            }
        }
    }
}

/// A tiny seeded generator (SplitMix64); good enough to pick words, no dependency needed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn word(&mut self) -> &'static str {
        WORDS[(self.next() % WORDS.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_prompts_have_the_length_and_differ_per_request() {
        let source = PromptSource::Synthetic {
            words: 50,
            shared_prefix: 0,
            seed: 7,
        };
        let a = source.prompt(0);
        let b = source.prompt(1);
        assert_eq!(a.split(' ').count(), 50);
        assert_ne!(a, b);
        assert_ne!(a.split(' ').next(), None);
        assert_eq!(a, source.prompt(0), "same seed and index, same prompt");
        let other_seed = PromptSource::Synthetic {
            words: 50,
            shared_prefix: 0,
            seed: 8,
        };
        assert_ne!(a, other_seed.prompt(0));
    }

    #[test]
    fn shared_prefix_is_common_and_the_rest_is_not() {
        let source = PromptSource::Synthetic {
            words: 40,
            shared_prefix: 30,
            seed: 3,
        };
        let a: Vec<String> = source.prompt(5).split(' ').map(String::from).collect();
        let b: Vec<String> = source.prompt(6).split(' ').map(String::from).collect();
        assert_eq!(a.len(), 40);
        assert_eq!(a[..30], b[..30]);
        assert_ne!(a[30..], b[30..]);
        let all_shared = PromptSource::Synthetic {
            words: 10,
            shared_prefix: 99,
            seed: 3,
        };
        assert_eq!(all_shared.prompt(1), all_shared.prompt(2));
    }

    #[test]
    fn fixed_prompt_is_returned_as_is() {
        let source = PromptSource::Fixed("hello there".into());
        assert_eq!(source.prompt(9), "hello there");
    }
}
