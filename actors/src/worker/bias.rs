//! The additive logit bias of one sampling step, from a request's settings and what it
//! generated so far: OpenAI's `logit_bias`, `presence_penalty` and `frequency_penalty`, and
//! vLLM's `min_tokens` (stop tokens banned until then).
//!
//! WHY one list: the sampler (host or device) applies a single sparse list of (token,
//! bias) before the draw, so each setting costs only the tokens it touches, and a request
//! without any of them pays nothing (an empty list).

use super::scheduler::SamplingContext;
use std::collections::HashMap;

/// A bias at or below this bans the token (OpenAI: -100 "should result in a ban").
pub const BAN_AT: f32 = -100.0;

/// Whether `min_tokens` still keeps `ctx`'s request from stopping.
pub fn min_tokens_pending(ctx: &SamplingContext<'_>) -> bool {
    (ctx.generated().len() as u64) < u64::from(ctx.params.min_tokens)
}

/// The (token, bias) pairs for the next draw of `ctx`'s request, each token once. With
/// `grammar` (a constrained request) `min_tokens` is left to the grammar's mask
/// (`constrained::hold_back`), which may end the output early; a ban here could leave no
/// token to draw.
pub fn step_bias(ctx: &SamplingContext<'_>, grammar: bool) -> Vec<(u32, f32)> {
    let p = ctx.params;
    let banning = !grammar && min_tokens_pending(ctx);
    let penalised = p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
    if p.logit_bias.is_empty() && !banning && !penalised {
        return Vec::new();
    }
    let mut bias: HashMap<u32, f32> = HashMap::new();
    for &(token, b) in &p.logit_bias {
        *bias.entry(token).or_insert(0.0) += b;
    }
    if penalised {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in ctx.generated() {
            *counts.entry(t).or_insert(0) += 1;
        }
        for (t, c) in counts {
            *bias.entry(t).or_insert(0.0) -= p.presence_penalty + p.frequency_penalty * c as f32;
        }
    }
    if banning {
        for &t in ctx.stop_token_ids {
            bias.insert(t, f32::NEG_INFINITY);
        }
    }
    let mut out: Vec<(u32, f32)> = bias
        .into_iter()
        .map(|(t, b)| (t, if b <= BAN_AT { f32::NEG_INFINITY } else { b }))
        .collect();
    // A stable order: the same request draws the same tokens on any worker.
    out.sort_unstable_by_key(|&(t, _)| t);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::SamplingParams;

    fn ctx<'a>(
        params: &'a SamplingParams,
        tokens: &'a [u32],
        stop: &'a [u32],
    ) -> SamplingContext<'a> {
        SamplingContext {
            params,
            logprobs: None,
            tokens,
            prompt_len: 2,
            generated_before: 0,
            stop_token_ids: stop,
        }
    }

    #[test]
    fn nothing_set_costs_nothing() {
        let p = SamplingParams::default();
        assert!(step_bias(&ctx(&p, &[1, 2, 3], &[0]), false).is_empty());
    }

    #[test]
    fn penalties_count_generated_tokens_only() {
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::default()
        };
        // Prompt [7, 8]; generated 8, 8, 9.
        let b = step_bias(&ctx(&p, &[7, 8, 8, 8, 9], &[0]), false);
        assert_eq!(b, vec![(8, -1.0), (9, -0.75)]);
    }

    #[test]
    fn minus_100_bans_and_min_tokens_bans_stop_ids_until_reached() {
        let p = SamplingParams {
            logit_bias: vec![(5, -100.0), (6, 3.0)],
            min_tokens: 2,
            ..SamplingParams::default()
        };
        let b = step_bias(&ctx(&p, &[1, 2, 3], &[0]), false);
        assert_eq!(
            b,
            vec![(0, f32::NEG_INFINITY), (5, f32::NEG_INFINITY), (6, 3.0)]
        );
        assert!(min_tokens_pending(&ctx(&p, &[1, 2, 3], &[0])));
        // Under a grammar the mask holds the stop tokens back instead.
        let b = step_bias(&ctx(&p, &[1, 2, 3], &[0]), true);
        assert_eq!(b, vec![(5, f32::NEG_INFINITY), (6, 3.0)]);
        let b = step_bias(&ctx(&p, &[1, 2, 3, 4], &[0]), false);
        assert_eq!(b, vec![(5, f32::NEG_INFINITY), (6, 3.0)]);
        assert!(!min_tokens_pending(&ctx(&p, &[1, 2, 3, 4], &[0])));
    }
}
