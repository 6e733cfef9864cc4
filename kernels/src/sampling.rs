//! Turning a logits row into a token: greedy, or temperature sampling with top-k, top-p,
//! min-p and a repetition penalty, from a seeded ChaCha RNG (same seed and inputs, same
//! tokens). Stop tokens are the caller's business.
//!
//! Order of the transforms (as llama.cpp and vLLM apply them): repetition penalty on the raw
//! logits; then, unless greedy, temperature, top-k, softmax, top-p, min-p, and a draw.
//! The reported `logprob` (and `top_logprobs`) are log-softmax of the raw logits, i.e. the
//! model's own distribution, as the OpenAI API reports them.

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`;
    /// 1.0 disables.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely one's; 0 disables.
    pub min_p: f32,
    /// CTRL-style penalty (>1 discourages) on tokens present in the history; 1.0 disables.
    pub repetition_penalty: f32,
    /// RNG seed.
    pub seed: u64,
    /// How many most-likely alternatives to report with each token (0 = none).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks the ranges every sampler (host or device) relies on.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let bad = |m: &str| Err(SamplingError::InvalidParams(m.to_string()));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature must be finite and >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition_penalty must be finite and > 0");
        }
        Ok(())
    }

    /// Whether the choice is the argmax (no random draw).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// What to draw from one logits row of a step (see [`crate::backend::Backend::forward_sample`]).
#[derive(Clone, Debug)]
pub struct SampleRow<'a> {
    /// `seed` is this token's own seed (the caller derives it per position).
    pub params: SamplingParams,
    /// Prompt and generated tokens; read only when a repetition penalty is set.
    pub history: &'a [u32],
    /// Added to these tokens' logits before the draw (after the repetition penalty);
    /// `-inf` bans a token. Usually empty.
    pub bias: &'a [(u32, f32)],
    /// Constrained decoding: only tokens whose bit is set may be drawn (bit `t % 32` of
    /// word `t / 32`, see [`crate::grammar`]).
    pub allowed: Option<&'a [u32]>,
    /// Report the chosen token's logprob and `params.top_logprobs` alternatives.
    pub logprobs: bool,
}

/// The host sampler over each row of `logits` (one [`SampleRow`] per row, in order): what
/// every backend does unless it samples on its device.
pub fn sample_rows_on_host(
    logits: &crate::backend::Logits,
    rows: &[SampleRow<'_>],
) -> Vec<Result<SampledToken, SamplingError>> {
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let values = logits.row(i).ok_or(SamplingError::EmptyLogits)?;
            let mut sampler = Sampler::new(row.params.clone())?;
            if !row.logprobs {
                sampler = sampler.without_logprobs();
            }
            sampler.sample_masked(values, row.history, row.bias, row.allowed)
        })
        .collect()
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum SamplingError {
    #[error("invalid sampling parameter: {0}")]
    InvalidParams(String),
    #[error("logits row is empty")]
    EmptyLogits,
    #[error("logits contain no finite value")]
    NoFiniteLogits,
    #[error("the logit bias or the grammar bans every token")]
    AllBanned,
}

/// A chosen token with its log-probability under the model's distribution.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    /// Its log-probability; `None` when the sampler was built [`Sampler::without_logprobs`]
    /// (a log-sum-exp over the vocabulary costs about half a millisecond per token).
    pub logprob: Option<f32>,
    /// The `top_logprobs` most likely tokens (most likely first) with their log-probabilities.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// A per-sequence sampler: parameters plus the RNG stream they seeded.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    logprobs: bool,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler, SamplingError> {
        params.validate()?;
        Ok(Sampler {
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            params,
            logprobs: true,
        })
    }

    /// Skips the log-probabilities (of the chosen token and the top alternatives) when the
    /// caller will not report them. The chosen token is the same.
    pub fn without_logprobs(mut self) -> Self {
        self.logprobs = false;
        self
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits`; `history` (prompt and generated tokens) feeds the
    /// repetition penalty.
    pub fn sample(
        &mut self,
        logits: &[f32],
        history: &[u32],
    ) -> Result<SampledToken, SamplingError> {
        self.sample_biased(logits, history, &[])
    }

    /// [`Sampler::sample`] with `bias` added to the named tokens' logits first (`-inf`
    /// bans). The reported logprobs stay the model's own, as OpenAI reports them.
    pub fn sample_biased(
        &mut self,
        logits: &[f32],
        history: &[u32],
        bias: &[(u32, f32)],
    ) -> Result<SampledToken, SamplingError> {
        self.sample_masked(logits, history, bias, None)
    }

    /// [`Sampler::sample_biased`], drawing only tokens `allowed` sets (a grammar's mask).
    pub fn sample_masked(
        &mut self,
        logits: &[f32],
        history: &[u32],
        bias: &[(u32, f32)],
        allowed: Option<&[u32]>,
    ) -> Result<SampledToken, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        if !logits.iter().any(|v| v.is_finite()) {
            return Err(SamplingError::NoFiniteLogits);
        }
        let p = self.params.clone();
        let mut work = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            let mut seen: Vec<u32> = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = work.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        for &(t, b) in bias {
            if let Some(l) = work.get_mut(t as usize) {
                *l += b;
            }
        }
        if let Some(mask) = allowed {
            for (t, l) in work.iter_mut().enumerate() {
                if mask.get(t / 32).is_none_or(|w| w >> (t % 32) & 1 == 0) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if (!bias.is_empty() || allowed.is_some()) && !work.iter().any(|v| v.is_finite()) {
            return Err(SamplingError::AllBanned);
        }
        let token = if p.is_greedy() {
            argmax(&work)
        } else {
            self.draw(&work)
        };
        if !self.logprobs {
            return Ok(SampledToken {
                token,
                logprob: None,
                top_logprobs: Vec::new(),
            });
        }
        let log_z = log_sum_exp(logits);
        let logprob_of = |t: u32| {
            logits
                .get(t as usize)
                .map_or(f32::NEG_INFINITY, |l| l - log_z)
        };
        let top_logprobs = if p.top_logprobs > 0 {
            top_n(logits, p.top_logprobs)
                .into_iter()
                .map(|t| (t, logprob_of(t)))
                .collect()
        } else {
            Vec::new()
        };
        Ok(SampledToken {
            token,
            logprob: Some(logprob_of(token)),
            top_logprobs,
        })
    }

    fn draw(&mut self, work: &[f32]) -> u32 {
        let p = &self.params;
        let mut cand: Vec<(u32, f32)> = work
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_rank);
            cand.truncate(p.top_k);
        }
        let len = cand.len();
        let max = cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.1));
        let total: f64 = cand.iter().map(|c| ((c.1 - max) as f64).exp()).sum();
        // Candidates are visited most likely first (ties by lower id, for determinism), but
        // only as far as top-p, min-p and the draw need: sorting all 49k logits of a small
        // model's vocabulary cost ~2 ms per token, most of a CPU decode step's sampling.
        let mut ranked = RankedPrefix::new(&mut cand);
        let mut prob = |i: usize| {
            let c = ranked.get(i);
            (c.0, ((c.1 - max) as f64).exp() / total)
        };
        let mut keep = len;
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for i in 0..len {
                acc += prob(i).1;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = prob(0).1 * p.min_p as f64;
            let above = (0..keep).take_while(|&i| prob(i).1 >= floor).count();
            keep = above.max(1);
        }
        let kept_mass: f64 = if keep == len {
            1.0
        } else {
            (0..keep).map(|i| prob(i).1).sum()
        };
        let mut r = self.rng.gen::<f64>() * kept_mass;
        for i in 0..keep {
            let (token, q) = prob(i);
            if r < q {
                return token;
            }
            r -= q;
        }
        prob(keep.saturating_sub(1)).0
    }
}

/// Most likely first; ties by lower token id.
fn by_rank(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// A candidate list sorted by [`by_rank`] lazily: `get(i)` sorts just enough of a prefix
/// (growing geometrically) that position `i` holds the `i`-th most likely candidate.
struct RankedPrefix<'a> {
    cand: &'a mut [(u32, f32)],
    sorted: usize,
}

impl<'a> RankedPrefix<'a> {
    fn new(cand: &'a mut [(u32, f32)]) -> Self {
        RankedPrefix { cand, sorted: 0 }
    }

    /// The `i`-th most likely candidate (`i` must be below the length).
    fn get(&mut self, i: usize) -> (u32, f32) {
        if i >= self.sorted {
            // Everything past `sorted` ranks below everything before it (select_nth
            // partitions), so sorting the next chunk of the rest extends the prefix.
            let want = (i + 1).max(self.sorted * 4).max(64).min(self.cand.len());
            let rest = &mut self.cand[self.sorted..];
            let k = want - self.sorted;
            if k < rest.len() {
                rest.select_nth_unstable_by(k - 1, by_rank);
            }
            rest[..k].sort_by(by_rank);
            self.sorted = want;
        }
        self.cand.get(i).copied().unwrap_or((0, f32::NEG_INFINITY))
    }
}

/// The model's log-probability of `token` under `logits` (log-softmax of the raw row, as
/// a sampled token's is reported) and the `top` most likely tokens with theirs: a prompt
/// token's logprob (`echo` with `logprobs`), where nothing is drawn.
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let log_z = log_sum_exp(logits);
    let of = |t: u32| {
        logits
            .get(t as usize)
            .map_or(f32::NEG_INFINITY, |l| l - log_z)
    };
    let alternatives = if top > 0 {
        top_n(logits, top).into_iter().map(|t| (t, of(t))).collect()
    } else {
        Vec::new()
    };
    (of(token), alternatives)
}

/// Index of the largest finite logit (lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, &l) in logits.iter().enumerate() {
        if l > best.1 {
            best = (i as u32, l);
        }
    }
    best.0
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| ((l - max) as f64).exp())
        .sum();
    max + s.ln() as f32
}

fn top_n(logits: &[f32], n: usize) -> Vec<u32> {
    // Same ranking as the draw, and the same partial sort: only the first `n` are ordered.
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let n = n.min(cand.len());
    let mut ranked = RankedPrefix::new(&mut cand);
    (0..n).map(|i| ranked.get(i).0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![0.5, 2.0, -1.0, 1.9, 0.0, 1.0]
    }

    fn run(params: SamplingParams, steps: usize, l: &[f32]) -> Vec<u32> {
        let mut s = Sampler::new(params).unwrap();
        (0..steps)
            .map(|_| s.sample(l, &[]).unwrap().token)
            .collect()
    }

    #[test]
    fn greedy_picks_argmax_with_its_logprob() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        let out = s.sample(&logits(), &[]).unwrap();
        assert_eq!(out.token, 1);
        let z: f32 = logits().iter().map(|l| l.exp()).sum::<f32>().ln();
        assert!((out.logprob.unwrap() - (2.0 - z)).abs() < 1e-5);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let p = SamplingParams {
            top_k: 1,
            temperature: 1.5,
            seed: 9,
            ..Default::default()
        };
        assert_eq!(run(p, 20, &logits()), vec![1; 20]);
    }

    #[test]
    fn tiny_top_p_equals_greedy() {
        let p = SamplingParams {
            top_p: 1e-6,
            seed: 4,
            ..Default::default()
        };
        assert_eq!(run(p, 20, &logits()), vec![1; 20]);
    }

    #[test]
    fn min_p_one_equals_greedy() {
        let p = SamplingParams {
            min_p: 1.0,
            seed: 5,
            ..Default::default()
        };
        assert_eq!(run(p, 20, &logits()), vec![1; 20]);
    }

    #[test]
    fn top_k_restricts_the_support() {
        let p = SamplingParams {
            top_k: 2,
            temperature: 5.0,
            seed: 1,
            ..Default::default()
        };
        let out = run(p, 200, &logits());
        assert!(out.iter().all(|&t| t == 1 || t == 3));
        assert!(out.contains(&1) && out.contains(&3));
    }

    #[test]
    fn same_seed_same_sequence_different_seeds_differ() {
        let flat = vec![0.0f32; 1000];
        let p = |seed| SamplingParams {
            seed,
            ..Default::default()
        };
        assert_eq!(run(p(42), 50, &flat), run(p(42), 50, &flat));
        assert_ne!(run(p(42), 50, &flat), run(p(43), 50, &flat));
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let l = vec![1.0f32, 0.0];
        let count = |temperature| {
            let p = SamplingParams {
                temperature,
                seed: 3,
                ..Default::default()
            };
            run(p, 2000, &l).iter().filter(|&&t| t == 0).count()
        };
        // p(0) is 0.73 at T=1, ~1.0 at T=0.1, ~0.52 at T=10.
        let (cold, warm, hot) = (count(0.1), count(1.0), count(10.0));
        assert!(cold > 1980, "{cold}");
        assert!((1300..1600).contains(&warm), "{warm}");
        assert!((900..1200).contains(&hot), "{hot}");
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        })
        .unwrap();
        // 2.0 / 2 = 1.0 < 1.9: token 3 wins once token 1 has been seen.
        assert_eq!(s.sample(&logits(), &[1]).unwrap().token, 3);
        assert_eq!(s.sample(&logits(), &[]).unwrap().token, 1);
        // Negative logits are multiplied, so they get less likely too.
        let neg = vec![-1.0f32, -1.5];
        assert_eq!(s.sample(&neg, &[0]).unwrap().token, 1);
    }

    #[test]
    fn bias_bans_and_favours_tokens_but_logprobs_stay_the_models() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        let out = s
            .sample_biased(&logits(), &[], &[(1, f32::NEG_INFINITY)])
            .unwrap();
        assert_eq!(out.token, 3);
        let out = s.sample_biased(&logits(), &[], &[(2, 10.0)]).unwrap();
        assert_eq!(out.token, 2);
        let z: f32 = logits().iter().map(|l| l.exp()).sum::<f32>().ln();
        assert!((out.logprob.unwrap() - (-1.0 - z)).abs() < 1e-5);
        let all: Vec<(u32, f32)> = (0..6).map(|t| (t, f32::NEG_INFINITY)).collect();
        assert_eq!(
            s.sample_biased(&logits(), &[], &all),
            Err(SamplingError::AllBanned)
        );
        // Sampled, a banned token never comes.
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            seed: 2,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..200 {
            let t = s
                .sample_biased(&logits(), &[], &[(1, f32::NEG_INFINITY)])
                .unwrap()
                .token;
            assert_ne!(t, 1);
        }
    }

    #[test]
    fn a_mask_limits_the_draw_to_its_tokens() {
        // Tokens 0 and 4 only.
        let mask = [0b10001u32];
        let mut s = Sampler::new(SamplingParams {
            temperature: 3.0,
            seed: 8,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..100 {
            let t = s
                .sample_masked(&logits(), &[], &[], Some(&mask))
                .unwrap()
                .token;
            assert!(t == 0 || t == 4, "{t}");
        }
        let mut g = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(
            g.sample_masked(&logits(), &[], &[], Some(&mask))
                .unwrap()
                .token,
            0
        );
        assert_eq!(
            g.sample_masked(&logits(), &[], &[], Some(&[0])),
            Err(SamplingError::AllBanned)
        );
    }

    #[test]
    fn top_logprobs_are_sorted_and_normalised() {
        let mut s = Sampler::new(SamplingParams {
            top_logprobs: 3,
            ..SamplingParams::greedy()
        })
        .unwrap();
        let out = s.sample(&logits(), &[]).unwrap();
        let ids: Vec<u32> = out.top_logprobs.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 5]);
        assert_eq!(Some(out.top_logprobs[0].1), out.logprob);
        let total: f32 = logits()
            .iter()
            .enumerate()
            .map(|(i, _)| {
                let z: f32 = logits().iter().map(|l| l.exp()).sum::<f32>().ln();
                (logits()[i] - z).exp()
            })
            .sum();
        assert!((total - 1.0).abs() < 1e-5);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(Sampler::new(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        })
        .is_err());
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[], &[]), Err(SamplingError::EmptyLogits));
        assert_eq!(
            s.sample(&[f32::NAN, f32::NEG_INFINITY], &[]),
            Err(SamplingError::NoFiniteLogits)
        );
    }

    /// The draw as first written: sort every candidate, then top-k, softmax, top-p, min-p.
    fn reference_draw(p: &SamplingParams, work: &[f32], u: f64) -> u32 {
        let mut cand: Vec<(u32, f32)> = work
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        cand.sort_by(by_rank);
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    acc += q;
                    acc >= p.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p as f64;
            let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = u * total;
        for (i, &q) in probs.iter().enumerate() {
            if r < q {
                return cand[i].0;
            }
            r -= q;
        }
        cand[probs.len() - 1].0
    }

    #[test]
    fn lazy_ranking_draws_what_a_full_sort_draws() {
        let mut seed = 11u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut mismatches = 0;
        for case in 0..400 {
            let n = [5, 70, 300, 5000][case % 4];
            let spread = [0.5, 3.0, 12.0][case % 3];
            let logits: Vec<f32> = (0..n)
                .map(|i| {
                    if i % 97 == 5 {
                        f32::NEG_INFINITY
                    } else {
                        ((next() - 0.5) * spread) as f32
                    }
                })
                .collect();
            let params = SamplingParams {
                temperature: [1.0, 0.7, 1.5][case % 3],
                top_k: [0, 1, 40, 1000][(case / 3) % 4],
                top_p: [1.0, 0.9, 0.5][(case / 5) % 3],
                min_p: [0.0, 0.05][(case / 7) % 2],
                seed: case as u64,
                ..SamplingParams::default()
            };
            let mut s = Sampler::new(params.clone()).unwrap().without_logprobs();
            let got = s.sample(&logits, &[]).unwrap().token;
            // The sampler's first uniform draw, from the same seeded stream.
            let u = ChaCha8Rng::seed_from_u64(params.seed).gen::<f64>();
            let want = if params.top_k == 1 {
                argmax(&logits)
            } else {
                reference_draw(&params, &logits, u)
            };
            if got != want {
                mismatches += 1;
            }
        }
        // Only the order of one floating-point sum differs, so a flip would need the draw
        // to land within ~1e-15 of a boundary: none in these 400 cases.
        assert_eq!(mismatches, 0);
    }
}
