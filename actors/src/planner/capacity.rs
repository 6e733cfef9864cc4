//! What one worker can do, read from an engine profile: prefill time and throughput at a
//! prompt length, decode ITL at a batch and context, and the best decode operating point
//! under an ITL target.
//!
//! A measured profile answers from its tables: prefill throughput is interpolated linearly
//! in prompt length, decode ITL bilinearly in (batch, context). Outside the measured range
//! the prefill throughput and the context are held at the nearest measured value (no
//! guessing beyond what was seen), while ITL beyond the largest measured batch is
//! extrapolated linearly from the last two batches, because the scheduler may run larger
//! batches than `turbine profile` measured. A profile without tables (an estimate) answers
//! from its linear `step_time` model, chunking prompts like the scheduler does.

use crate::engine_profile::{Measurements, Profile, StepFeatures};

/// One worker's decode operating point under an ITL target.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodePoint {
    /// Sequences decoded per step.
    pub batch: usize,
    /// The step time at that batch (seconds).
    pub itl_s: f64,
    /// Output tokens per second per worker: `batch / itl_s`.
    pub tokens_per_s: f64,
    /// False when even one sequence per step misses the target (then this is batch 1).
    pub meets_target: bool,
}

/// An engine profile, asked the planner's questions.
#[derive(Clone, Debug)]
pub struct Capacity {
    profile: Profile,
}

impl Capacity {
    pub fn new(profile: Profile) -> Capacity {
        Capacity { profile }
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Prefill throughput (prompt tokens per second) of one worker at prompt length `isl`.
    pub fn prefill_tokens_per_s(&self, isl: f64) -> f64 {
        let isl = isl.max(1.0);
        match &self.profile.measured {
            Some(m) => measured_prefill_tps(m, isl),
            None => isl / self.modelled_prefill_s(isl),
        }
    }

    /// Time to prefill one prompt of `isl` tokens on an idle worker (seconds): the TTFT
    /// with no queueing.
    pub fn prefill_s(&self, isl: f64) -> f64 {
        let isl = isl.max(1.0);
        isl / self.prefill_tokens_per_s(isl)
    }

    /// Step time (seconds) of `batch` decodes at `context` positions each.
    pub fn decode_itl_s(&self, batch: f64, context: f64) -> f64 {
        self.itl_curve(context).at(batch)
    }

    /// ITL as a function of the batch alone, at one context: what the batch search asks
    /// many times, prepared once.
    fn itl_curve(&self, context: f64) -> ItlCurve<'_> {
        let context = context.max(1.0);
        match &self.profile.measured {
            Some(m) => {
                let contexts: Vec<f64> = m.decode_contexts().iter().map(|&c| c as f64).collect();
                let batches = m.decode_batches();
                let itl_ms = batches
                    .iter()
                    .map(|&b| {
                        let ys: Vec<f64> = m
                            .decode_contexts()
                            .iter()
                            .map(|&c| m.itl_ms(b, c).unwrap_or(f64::NAN))
                            .collect();
                        interpolate(&contexts, &ys, context)
                    })
                    .collect();
                ItlCurve::Measured {
                    batches: batches.iter().map(|&b| b as f64).collect(),
                    itl_ms,
                }
            }
            None => ItlCurve::Modelled {
                profile: &self.profile,
                context,
            },
        }
    }

    /// Largest batch a worker can run at `context` positions per sequence: the scheduler's
    /// `max_num_seqs`, and what the KV pool holds.
    pub fn max_batch(&self, context: f64) -> usize {
        let kv_tokens =
            f64::from(self.profile.kv.num_blocks) * f64::from(self.profile.kv.block_size);
        let by_kv = (kv_tokens / context.max(1.0)).floor() as usize;
        self.profile.scheduler.max_num_seqs.min(by_kv).max(1)
    }

    /// The decode batch with the most output tokens/s per worker whose ITL meets
    /// `itl_target_s` at `context` positions per sequence.
    pub fn best_decode(&self, itl_target_s: f64, context: f64) -> DecodePoint {
        let curve = self.itl_curve(context);
        let point = |batch: usize| {
            let itl_s = curve.at(batch as f64);
            DecodePoint {
                batch,
                itl_s,
                tokens_per_s: batch as f64 / itl_s,
                meets_target: itl_s <= itl_target_s,
            }
        };
        let best = (1..=self.max_batch(context))
            .map(point)
            .filter(|p| p.meets_target)
            .max_by(|a, b| a.tokens_per_s.total_cmp(&b.tokens_per_s));
        best.unwrap_or_else(|| DecodePoint {
            meets_target: false,
            ..point(1)
        })
    }

    /// Prefill time of one prompt by the step-time model, in chunks of the scheduler's
    /// token budget (each chunk one step). Closed form, so an absurd `isl` costs no time:
    /// `k` full chunks of `c` tokens cost `k (base + c·per_token) + per_context·c·k(k+1)/2`
    /// (chunk `j` attends to `(j + 1) c` positions), plus the remainder's step.
    fn modelled_prefill_s(&self, isl: f64) -> f64 {
        let cost = &self.profile.step_time;
        let chunk = (self.profile.scheduler.max_num_batched_tokens.max(1)) as f64;
        let full = (isl / chunk).floor();
        let rest = isl - full * chunk;
        let mut us = full * (cost.base_us + cost.per_prefill_token_us * chunk)
            + cost.per_context_token_us * chunk * full * (full + 1.0) / 2.0;
        if rest > 0.0 {
            us += cost.micros(StepFeatures {
                prefill_tokens: rest,
                decode_seqs: 0.0,
                context_tokens: isl,
            });
        }
        us / 1e6
    }
}

/// ITL (seconds) over the batch size at one context.
enum ItlCurve<'a> {
    /// ITL at each measured batch (interpolated to the context); linear between them,
    /// extrapolated linearly past the largest (never decreasing), held below the smallest.
    Measured { batches: Vec<f64>, itl_ms: Vec<f64> },
    /// The step-time model.
    Modelled { profile: &'a Profile, context: f64 },
}

impl ItlCurve<'_> {
    fn at(&self, batch: f64) -> f64 {
        let batch = batch.max(1.0);
        match self {
            ItlCurve::Measured { batches, itl_ms } => {
                let n = batches.len();
                if n >= 2 && batch > batches[n - 1] {
                    let slope = ((itl_ms[n - 1] - itl_ms[n - 2])
                        / (batches[n - 1] - batches[n - 2]))
                        .max(0.0);
                    return (itl_ms[n - 1] + slope * (batch - batches[n - 1])) / 1e3;
                }
                interpolate(batches, itl_ms, batch) / 1e3
            }
            ItlCurve::Modelled { profile, context } => {
                let f = StepFeatures {
                    prefill_tokens: 0.0,
                    decode_seqs: batch,
                    context_tokens: batch * context,
                };
                profile.step_time.micros(f) / 1e6
            }
        }
    }
}

/// Linear interpolation of `ys` over ascending `xs` at `x`, held at the ends.
fn interpolate(xs: &[f64], ys: &[f64], x: f64) -> f64 {
    let (Some(&first), Some(&last)) = (xs.first(), xs.last()) else {
        return 0.0;
    };
    if x <= first {
        return ys[0];
    }
    if x >= last {
        return ys[ys.len() - 1];
    }
    let i = xs.partition_point(|&v| v <= x).clamp(1, xs.len() - 1);
    let t = (x - xs[i - 1]) / (xs[i] - xs[i - 1]);
    ys[i - 1] + t * (ys[i] - ys[i - 1])
}

fn measured_prefill_tps(m: &Measurements, isl: f64) -> f64 {
    let xs: Vec<f64> = m.prefill.iter().map(|p| p.prompt_tokens as f64).collect();
    let ys: Vec<f64> = m.prefill.iter().map(|p| p.tokens_per_s()).collect();
    interpolate(&xs, &ys, isl)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) use crate::engine_profile::tests::HAND;

    pub fn hand() -> Capacity {
        Capacity::new(Profile::from_yaml(HAND, "hand").unwrap())
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn prefill_throughput_is_interpolated_and_held_at_the_ends() {
        let c = hand();
        assert!(close(c.prefill_tokens_per_s(100.0), 10_000.0));
        assert!(close(c.prefill_tokens_per_s(550.0), 15_000.0));
        assert!(close(c.prefill_tokens_per_s(10.0), 10_000.0));
        assert!(close(c.prefill_tokens_per_s(5_000.0), 20_000.0));
        assert!(close(c.prefill_s(550.0), 550.0 / 15_000.0));
    }

    #[test]
    fn decode_itl_is_bilinear_inside_and_extrapolated_in_batch() {
        let c = hand();
        assert!(close(c.decode_itl_s(1.0, 600.0), 0.0055));
        // batch 4.5 is halfway: context 100 → 7.5 ms, context 1100 → 13 ms; at 600: 10.25.
        assert!(close(c.decode_itl_s(4.5, 600.0), 0.01025));
        // Beyond batch 8 at context 1100: slope (20 − 6) / 7 = 2 ms per sequence.
        assert!(close(c.decode_itl_s(10.0, 1100.0), 0.024));
    }

    #[test]
    fn best_decode_takes_the_largest_batch_within_the_target() {
        let c = hand();
        // Context 1100: ITL(b) = 6 + 2 (b − 1) ms. Target 14 ms → b = 5 (14 ms), 357 tok/s.
        let p = c.best_decode(0.014, 1100.0);
        assert_eq!(p.batch, 5);
        assert!(p.meets_target && close(p.tokens_per_s, 5.0 / 0.014));
        // A loose target is capped by max_num_seqs (8).
        assert_eq!(c.best_decode(1.0, 1100.0).batch, 8);
        // A target below batch 1's ITL: batch 1, flagged.
        let p = c.best_decode(0.001, 1100.0);
        assert_eq!((p.batch, p.meets_target), (1, false));
    }

    #[test]
    fn the_kv_pool_caps_the_batch() {
        // 100 000 KV tokens at 50 000 context: 2 sequences.
        assert_eq!(hand().max_batch(50_000.0), 2);
    }

    #[test]
    fn an_estimated_profile_answers_from_its_step_model() {
        let mut p = Profile::from_yaml(HAND, "hand").unwrap();
        p.measured = None;
        let c = Capacity::new(p);
        // 3000 tokens in chunks of 2048 then 952: (1000 + 20480 + 204.8) + (1000 + 9520 + 300) µs.
        assert!(close(c.prefill_s(3000.0), 0.0325048));
        // batch 4 at context 1000: 1000 + 400 + 400 µs.
        assert!(close(c.decode_itl_s(4.0, 1000.0), 0.0018));
        // Exactly two full chunks: 2 × (1000 + 20480) + 0.1 × 2048 × 3 µs.
        assert!(close(c.prefill_s(4096.0), (2.0 * 21480.0 + 614.4) / 1e6));
        // An absurd prompt length answers at once (closed form, no loop over chunks).
        assert!(c.prefill_tokens_per_s(1e300) >= 0.0);
    }
}
