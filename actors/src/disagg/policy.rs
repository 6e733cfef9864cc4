//! Conditional disaggregation: prefill this request on a prefill worker, or let the decode
//! worker prefill it itself?
//!
//! Pure: the router has already picked the decode worker; it passes the prompt's size, how
//! much of it that worker already caches, and how busy the prefill pool is, and gets a
//! decision back. Remote prefill pays a transfer of the KV and a second hop, so it only wins
//! when the *uncached* prompt is long (it would stall the decode worker's batch for a long
//! step) and the prefill pool is not queueing (a queued remote prefill is slower than a
//! local one). This is Dynamo's rule: remote when `uncached >= threshold` and the prefill
//! queue is below a bound.

use serde::{Deserialize, Serialize};

use super::config::{DisaggPolicyKind, DisaggregationConfig};
use crate::kv::BlockSize;

/// A count of KV blocks (not tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Blocks(pub u32);

/// How loaded the prefill pool is, as the router sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefillPoolLoad {
    /// Prefill workers alive (0: there is nowhere to send a prefill).
    pub workers: u32,
    /// Requests waiting in the pool's queues (summed over its workers), not yet running.
    pub queued: u32,
}

/// What the policy looks at for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillInputs {
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Leading blocks of the prompt the chosen decode worker already caches.
    pub cached_on_decode: Blocks,
    pub pool: PrefillPoolLoad,
}

/// The decision, with the reason a prefill stays local (for metrics and traces).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrefillDecision {
    /// Prefill on a prefill worker; the decode worker pulls the KV.
    Remote,
    /// The decode worker prefills itself.
    Local(LocalReason),
}

/// Why a prefill stays on the decode worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalReason {
    /// `policy: never` (or an aggregated cluster).
    Disabled,
    /// No prefill worker is alive.
    NoPrefillWorker,
    /// The part of the prompt the decode worker does not cache is below the threshold.
    ShortUncached { uncached_tokens: u32 },
    /// The prefill pool's queue is at or above its bound.
    PrefillPoolBusy { queued: u32 },
}

impl PrefillDecision {
    pub fn is_remote(&self) -> bool {
        matches!(self, PrefillDecision::Remote)
    }

    /// A short label for a metrics series: `remote`, or `local_<reason>`.
    pub fn label(&self) -> &'static str {
        match self {
            PrefillDecision::Remote => "remote",
            PrefillDecision::Local(LocalReason::Disabled) => "local_disabled",
            PrefillDecision::Local(LocalReason::NoPrefillWorker) => "local_no_prefill_worker",
            PrefillDecision::Local(LocalReason::ShortUncached { .. }) => "local_short",
            PrefillDecision::Local(LocalReason::PrefillPoolBusy { .. }) => "local_busy",
        }
    }
}

/// Decides where `inputs`' prompt is prefilled under `cfg`.
pub fn decide(
    cfg: &DisaggregationConfig,
    block_size: BlockSize,
    inputs: &PrefillInputs,
) -> PrefillDecision {
    if cfg.policy == DisaggPolicyKind::Never {
        return PrefillDecision::Local(LocalReason::Disabled);
    }
    if inputs.pool.workers == 0 {
        return PrefillDecision::Local(LocalReason::NoPrefillWorker);
    }
    if cfg.policy == DisaggPolicyKind::Always {
        return PrefillDecision::Remote;
    }
    let cached_tokens = u64::from(inputs.cached_on_decode.0) * u64::from(block_size.get());
    let uncached = u64::from(inputs.prompt_tokens).saturating_sub(cached_tokens) as u32;
    if uncached < cfg.remote_prefill_min_tokens {
        return PrefillDecision::Local(LocalReason::ShortUncached {
            uncached_tokens: uncached,
        });
    }
    if inputs.pool.queued >= cfg.max_prefill_queue {
        return PrefillDecision::Local(LocalReason::PrefillPoolBusy {
            queued: inputs.pool.queued,
        });
    }
    PrefillDecision::Remote
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DisaggregationConfig {
        DisaggregationConfig {
            policy: DisaggPolicyKind::Conditional,
            ..DisaggregationConfig::default()
        }
    }

    fn inputs(prompt: u32, cached: u32, queued: u32) -> PrefillInputs {
        PrefillInputs {
            prompt_tokens: prompt,
            cached_on_decode: Blocks(cached),
            pool: PrefillPoolLoad { workers: 1, queued },
        }
    }

    const BS: BlockSize = BlockSize::DEFAULT;

    #[test]
    fn long_uncached_prompts_go_remote_at_the_threshold() {
        assert_eq!(cfg().remote_prefill_min_tokens, 512);
        assert_eq!(
            decide(&cfg(), BS, &inputs(512, 0, 0)),
            PrefillDecision::Remote
        );
        assert_eq!(
            decide(&cfg(), BS, &inputs(511, 0, 0)),
            PrefillDecision::Local(LocalReason::ShortUncached {
                uncached_tokens: 511
            })
        );
    }

    #[test]
    fn what_the_decode_worker_caches_does_not_count() {
        // 600 tokens, 10 blocks (160 tokens) cached: 440 uncached stays local.
        let d = decide(&cfg(), BS, &inputs(600, 10, 0));
        assert_eq!(
            d,
            PrefillDecision::Local(LocalReason::ShortUncached {
                uncached_tokens: 440
            })
        );
        assert_eq!(d.label(), "local_short");
        // A cache claim larger than the prompt never underflows.
        assert!(!decide(&cfg(), BS, &inputs(16, 1000, 0)).is_remote());
    }

    #[test]
    fn a_queueing_prefill_pool_keeps_prefill_local() {
        let bound = cfg().max_prefill_queue;
        assert!(decide(&cfg(), BS, &inputs(4096, 0, bound - 1)).is_remote());
        assert_eq!(
            decide(&cfg(), BS, &inputs(4096, 0, bound)),
            PrefillDecision::Local(LocalReason::PrefillPoolBusy { queued: bound })
        );
    }

    #[test]
    fn policy_kinds_and_an_empty_pool() {
        let never = DisaggregationConfig {
            policy: DisaggPolicyKind::Never,
            ..cfg()
        };
        assert_eq!(
            decide(&never, BS, &inputs(9999, 0, 0)),
            PrefillDecision::Local(LocalReason::Disabled)
        );
        let always = DisaggregationConfig {
            policy: DisaggPolicyKind::Always,
            ..cfg()
        };
        assert!(decide(&always, BS, &inputs(1, 0, 100)).is_remote());
        let mut empty = inputs(9999, 0, 0);
        empty.pool.workers = 0;
        assert_eq!(
            decide(&always, BS, &empty),
            PrefillDecision::Local(LocalReason::NoPrefillWorker)
        );
    }

    #[test]
    fn the_threshold_is_configurable() {
        let low = DisaggregationConfig {
            remote_prefill_min_tokens: 64,
            ..cfg()
        };
        assert!(decide(&low, BS, &inputs(64, 0, 0)).is_remote());
        assert!(!decide(&low, BS, &inputs(63, 0, 0)).is_remote());
    }
}
