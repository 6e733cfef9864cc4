//! The SLA math: how many workers a forecast load needs to meet the TTFT and ITL targets,
//! from what one worker can do ([`Capacity`]).
//!
//! Prefill. Demand is `requests/s × new tokens` per second, where a prompt's new tokens are
//! its ISL less the share the prefix cache serves (`cached`, observed): a cached block is
//! not computed again, and a workload whose prompts share a system prompt or a conversation
//! would otherwise be priced several times over. One worker prefills a prompt's new tokens
//! `n` in `p = n / R(n)` seconds (R: profiled prefill throughput). Prompts queue, so
//! a worker cannot run at 100 %: with Poisson arrivals and a fixed service time (M/D/1) the
//! mean wait at utilisation ρ is `ρ p / (2 (1 − ρ))`, and TTFT = wait + p ≤ target T holds
//! up to `ρ_max = 2 (a − 1) / (1 + 2 (a − 1))` with `a = T / p`. A worker's prefill
//! throughput within the TTFT target is therefore `R × ρ_max`, and
//! `prefill workers = demand / (R × ρ_max)`. When `p > T` no number of workers meets the
//! target (a single prompt is too long for the engine): the need is computed at 100 % and
//! flagged.
//!
//! Decode. Demand is `requests/s × OSL` output tokens per second. A sequence's context
//! averages `ISL + OSL / 2` over its decode; at that context the worker runs the batch with
//! the most tokens/s whose ITL meets the target, and `decode workers = demand / that`.
//!
//! Corrections (observed / expected, from the last interval):
//! - decode: ITL observed over the ITL the profile expects at the observed batch and
//!   context. A worker slower than its profile by a factor f meets the target only at an
//!   ITL the profile calls `target / f`, so the operating point is chosen at that target.
//! - prefill: TTFT observed over the profile's idle TTFT at the observed ISL, applied to
//!   demand only when below 1 (less work than profiled: prefix-cache hits). Above 1 the gap
//!   is mostly queueing, which `ρ_max` already budgets for; scaling up on it as well would
//!   count queueing twice and feed back (more workers, less queueing, fewer workers).
//!
//! Aggregated workers do both: the pool needs the sum of the fractional prefill and decode
//! needs (each worker spends part of its time on each), rounded up once.

use super::capacity::{Capacity, DecodePoint};

/// Forecast load of the next interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Load {
    pub requests_per_s: f64,
    /// Mean input (prompt) length, tokens.
    pub isl: f64,
    /// Mean output length, tokens.
    pub osl: f64,
    /// Share of the prompt tokens the prefix cache serves (0..=1): not prefilled again.
    pub cached: f64,
}

impl Load {
    /// The prompt tokens a request prefills: its ISL less what the prefix cache serves.
    pub fn new_tokens(&self) -> f64 {
        let cached = if self.cached.is_finite() {
            self.cached.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.isl * (1.0 - cached)
    }
}

/// Latency targets (seconds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Targets {
    pub ttft_s: f64,
    pub itl_s: f64,
}

/// Observed / expected latency ratios; 1.0 means the profile is exact.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Corrections {
    pub prefill: f64,
    pub decode: f64,
}

impl Default for Corrections {
    fn default() -> Self {
        Corrections {
            prefill: 1.0,
            decode: 1.0,
        }
    }
}

/// Correction factors are clamped to this range: a ratio outside it says more about a
/// broken measurement than about the engine.
pub const CORRECTION_RANGE: (f64, f64) = (0.1, 10.0);

/// `observed / expected`, clamped to [`CORRECTION_RANGE`]; `None` when either is unusable.
pub fn correction(observed: f64, expected: f64) -> Option<f64> {
    let ok = |v: f64| v.is_finite() && v > 0.0;
    (ok(observed) && ok(expected))
        .then(|| (observed / expected).clamp(CORRECTION_RANGE.0, CORRECTION_RANGE.1))
}

/// What the prefill side needs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefillNeed {
    /// Fractional workers.
    pub workers: f64,
    /// Prompt tokens per second to prefill (net of prefix-cache hits, after correction).
    pub demand_tokens_per_s: f64,
    /// One worker's throughput within the TTFT target.
    pub usable_tokens_per_s: f64,
    /// TTFT of one prompt on an idle worker.
    pub idle_ttft_s: f64,
    /// False when even an idle worker misses the TTFT target at this ISL.
    pub meets_target: bool,
}

/// What the decode side needs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeNeed {
    /// Fractional workers.
    pub workers: f64,
    /// Output tokens per second to generate.
    pub demand_tokens_per_s: f64,
    /// The operating point of one worker (at the corrected ITL target).
    pub point: DecodePoint,
    /// The context the point was chosen at: ISL + OSL / 2.
    pub context: f64,
}

/// Highest prefill utilisation at which M/D/1 queueing keeps mean TTFT within `ttft_s` for
/// a service time of `prefill_s`; 0 when the service time alone exceeds the target.
pub fn max_prefill_utilisation(prefill_s: f64, ttft_s: f64) -> f64 {
    let slack = ttft_s / prefill_s - 1.0;
    if !(slack.is_finite() && slack > 0.0) {
        return 0.0;
    }
    2.0 * slack / (1.0 + 2.0 * slack)
}

pub fn prefill_need(
    cap: &Capacity,
    load: Load,
    targets: Targets,
    corr: Corrections,
) -> PrefillNeed {
    let new_tokens = load.new_tokens();
    let tps = cap.prefill_tokens_per_s(new_tokens);
    let idle_ttft_s = cap.prefill_s(new_tokens);
    let rho = max_prefill_utilisation(idle_ttft_s, targets.ttft_s);
    let meets_target = rho > 0.0;
    let usable = if meets_target { tps * rho } else { tps };
    let demand = load.requests_per_s * new_tokens * corr.prefill.min(1.0);
    PrefillNeed {
        workers: demand / usable,
        demand_tokens_per_s: demand,
        usable_tokens_per_s: usable,
        idle_ttft_s,
        meets_target,
    }
}

pub fn decode_need(cap: &Capacity, load: Load, targets: Targets, corr: Corrections) -> DecodeNeed {
    let context = load.isl + load.osl / 2.0;
    let point = cap.best_decode(targets.itl_s / corr.decode, context);
    let demand = load.requests_per_s * load.osl;
    DecodeNeed {
        workers: demand / point.tokens_per_s,
        demand_tokens_per_s: demand,
        point,
        context,
    }
}

/// Whole workers for a fractional need (a tiny epsilon keeps 2.0000000001 at 2); NaN is
/// no need, an infinite need saturates (the replica limits cap it).
pub fn whole(workers: f64) -> usize {
    if workers.is_nan() || workers <= 0.0 {
        return 0;
    }
    (workers - 1e-9).ceil().max(0.0) as usize
}

#[cfg(test)]
mod tests {
    use super::super::capacity::tests::hand;
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    fn load(requests_per_s: f64, isl: f64, osl: f64) -> Load {
        Load {
            requests_per_s,
            isl,
            osl,
            cached: 0.0,
        }
    }

    fn corr(prefill: f64, decode: f64) -> Corrections {
        Corrections { prefill, decode }
    }

    const TARGETS: Targets = Targets {
        ttft_s: 0.110,
        itl_s: 0.014,
    };

    #[test]
    fn utilisation_cap_follows_m_d_1() {
        // T = 3 p: slack 2, ρ = 4 / 5. T = p: nothing. T = 11 p: 20 / 21.
        assert!(close(max_prefill_utilisation(1.0, 3.0), 0.8));
        assert_eq!(max_prefill_utilisation(1.0, 1.0), 0.0);
        assert!(close(max_prefill_utilisation(1.0, 11.0), 20.0 / 21.0));
        assert_eq!(max_prefill_utilisation(0.0, 1.0), 0.0);
    }

    #[test]
    fn prefill_need_against_the_hand_profile() {
        // ISL 550: R = 15 000 tok/s, p = 36.67 ms, TTFT 110 ms = 3 p → ρ = 0.8 →
        // 12 000 tok/s usable. 60 req/s × 550 = 33 000 tok/s → 2.75 workers → 3.
        let demand = load(60.0, 550.0, 200.0);
        let n = prefill_need(&hand(), demand, TARGETS, Corrections::default());
        assert!(close(n.idle_ttft_s, 550.0 / 15_000.0));
        assert!(close(n.usable_tokens_per_s, 12_000.0));
        assert!(close(n.workers, 2.75) && n.meets_target);
        assert_eq!(whole(n.workers), 3);
    }

    #[test]
    fn prefill_correction_only_lowers_demand() {
        let demand = load(60.0, 550.0, 200.0);
        let cached = corr(0.5, 1.0);
        let n = prefill_need(&hand(), demand, TARGETS, cached);
        assert!(close(n.workers, 1.375));
        let queued = corr(3.0, 1.0);
        assert!(close(
            prefill_need(&hand(), demand, TARGETS, queued).workers,
            2.75
        ));
    }

    #[test]
    fn prefix_cache_hits_are_not_prefilled_again() {
        // ISL 1000, 45 % served from the cache: 550 new tokens per prompt, the hand case
        // above (R(550) = 15 000 tok/s, p = 36.67 ms, ρ = 0.8): 60 × 550 = 33 000 tok/s
        // over 12 000 → 2.75 workers, where pricing all 1000 tokens (R = 20 000, p = 50 ms,
        // a = 2.2, ρ = 0.7059) asks 60 000 / 14 118 = 4.25.
        let mut demand = load(60.0, 1000.0, 200.0);
        let all = prefill_need(&hand(), demand, TARGETS, Corrections::default());
        assert!(close(all.workers, 60_000.0 / (20_000.0 * 2.4 / 3.4)));
        demand.cached = 0.45;
        let net = prefill_need(&hand(), demand, TARGETS, Corrections::default());
        assert!(close(net.idle_ttft_s, 550.0 / 15_000.0));
        assert!(close(net.demand_tokens_per_s, 33_000.0));
        assert!(close(net.workers, 2.75));
        // The decode side still attends to the whole prompt: context 1000 + 100.
        assert_eq!(
            decode_need(&hand(), demand, TARGETS, Corrections::default()).context,
            1100.0
        );
        // A share outside 0..=1 (or NaN) is clamped (or none): never a negative demand.
        for (share, workers) in [(1.5, 0.0), (-1.0, all.workers), (f64::NAN, all.workers)] {
            demand.cached = share;
            let n = prefill_need(&hand(), demand, TARGETS, Corrections::default());
            assert!(close(n.workers, workers), "{share}: {}", n.workers);
        }
    }

    #[test]
    fn a_prompt_longer_than_the_target_allows_is_flagged() {
        // ISL 1000 prefills in 50 ms; a 40 ms target cannot be met at any scale.
        let demand = load(10.0, 1000.0, 10.0);
        let t = Targets {
            ttft_s: 0.040,
            itl_s: 1.0,
        };
        let n = prefill_need(&hand(), demand, t, Corrections::default());
        assert!(!n.meets_target);
        assert!(close(n.workers, 0.5)); // 10 000 tok/s over 20 000 at 100 %
    }

    #[test]
    fn decode_need_against_the_hand_profile() {
        // Context 1000 + 200 / 2 = 1100: ITL(b) = 6 + 2 (b − 1) ms; 14 ms → b = 5,
        // 357.14 tok/s. 20 req/s × 200 = 4 000 tok/s → 11.2 workers → 12.
        let demand = load(20.0, 1000.0, 200.0);
        let n = decode_need(&hand(), demand, TARGETS, Corrections::default());
        assert_eq!(n.context, 1100.0);
        assert_eq!(n.point.batch, 5);
        assert!(close(n.workers, 4000.0 * 0.014 / 5.0));
        assert_eq!(whole(n.workers), 12);
    }

    #[test]
    fn a_slow_engine_tightens_the_itl_target() {
        // Observed ITL twice the profile's: choose the point at 7 ms → batch 1 (6 ms),
        // 166.7 tok/s → 24 workers.
        let demand = load(20.0, 1000.0, 200.0);
        let slow = corr(1.0, 2.0);
        let n = decode_need(&hand(), demand, TARGETS, slow);
        assert_eq!(n.point.batch, 1);
        assert_eq!(whole(n.workers), 24);
    }

    #[test]
    fn corrections_are_clamped_and_need_usable_inputs() {
        assert_eq!(correction(2.0, 1.0), Some(2.0));
        assert_eq!(correction(1e9, 1.0), Some(10.0));
        assert_eq!(correction(0.0, 1.0), None);
        assert_eq!(correction(1.0, f64::NAN), None);
    }

    #[test]
    fn whole_rounds_up_and_never_panics() {
        assert_eq!(whole(2.0), 2);
        assert_eq!(whole(2.0 + 1e-12), 2);
        assert_eq!(whole(2.01), 3);
        assert_eq!(whole(0.0), 0);
        assert_eq!(whole(f64::NAN), 0);
        assert_eq!(whole(f64::INFINITY), usize::MAX);
    }
}
