//! Where a request's prefill runs, decided next to the router: after the decode worker is
//! picked (KV overlap + decode load), [`plan_prefill`] applies the conditional policy with
//! that worker's overlap and the prefill pool's load and, if remote, picks the prefill
//! worker with the same KV-aware policy over the prefill pool (prefill workers' KV events
//! are in the same index, so a repeated prefix goes where it is cached).
//!
//! Pure: a [`KvRouter`] for the prefill pool, `now` and the request in; a plan out.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use super::config::DisaggregationConfig;
use super::policy::{decide, Blocks, LocalReason, PrefillDecision, PrefillInputs, PrefillPoolLoad};
use crate::kv::BlockSize;
use crate::router::policy::{RouteDecision, RouteRequest};
use crate::router::KvRouter;

/// The router's answer to a disaggregated route request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DisaggRoute {
    /// The decode worker (or the aggregated worker that prefills itself).
    pub decode: RouteDecision,
    pub prefill: PrefillPlan,
}

/// Where the prefill runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrefillPlan {
    pub decision: PrefillDecision,
    /// The prefill worker, when `decision` is remote.
    pub worker: Option<RouteDecision>,
    /// The prefill pool as the policy saw it.
    pub pool: PrefillPoolLoad,
}

/// The prefill pool's load: workers routable now, and requests in flight on them (routed
/// and not yet answered, plus what their last load reports counted).
pub fn pool_load(prefill: &KvRouter, now: Duration) -> PrefillPoolLoad {
    let loads = prefill.loads();
    PrefillPoolLoad {
        workers: loads
            .iter()
            .filter(|l| !prefill.is_suspended(now, l.worker))
            .count() as u32,
        queued: loads.iter().map(|l| l.active_requests).sum(),
    }
}

/// Decides local or remote prefill for `request`, whose decode worker holds
/// `decode_overlap` of its blocks; a remote plan names the prefill worker and counts the
/// request towards its load (until [`KvRouter::on_request_finished`]).
pub fn plan_prefill(
    cfg: &DisaggregationConfig,
    block_size: BlockSize,
    prefill: &mut KvRouter,
    now: Duration,
    request: &RouteRequest,
    decode_overlap: u32,
) -> PrefillPlan {
    let pool = pool_load(prefill, now);
    let inputs = PrefillInputs {
        prompt_tokens: u32::try_from(request.token_count).unwrap_or(u32::MAX),
        cached_on_decode: Blocks(decode_overlap),
        pool,
    };
    let decision = decide(cfg, block_size, &inputs);
    if !decision.is_remote() {
        return PrefillPlan {
            decision,
            worker: None,
            pool,
        };
    }
    match prefill.route(now, request) {
        Ok(routed) => PrefillPlan {
            decision,
            worker: Some(routed.decision),
            pool,
        },
        Err(_) => PrefillPlan {
            decision: PrefillDecision::Local(LocalReason::NoPrefillWorker),
            worker: None,
            pool,
        },
    }
}
