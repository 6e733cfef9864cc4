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
    plan_prefill_by(
        cfg,
        block_size,
        prefill,
        now,
        request,
        decode_overlap,
        |p| p.route(now, request).map(|r| r.decision),
    )
}

/// [`plan_prefill`] deciding only: the prefill worker is selected, not recorded as routed
/// (the endpoint picker never learns when the request ends; load reports carry the truth).
pub fn decide_prefill(
    cfg: &DisaggregationConfig,
    block_size: BlockSize,
    prefill: &mut KvRouter,
    now: Duration,
    request: &RouteRequest,
    decode_overlap: u32,
) -> PrefillPlan {
    plan_prefill_by(
        cfg,
        block_size,
        prefill,
        now,
        request,
        decode_overlap,
        |p| p.select(now, request),
    )
}

fn plan_prefill_by(
    cfg: &DisaggregationConfig,
    block_size: BlockSize,
    prefill: &mut KvRouter,
    now: Duration,
    request: &RouteRequest,
    decode_overlap: u32,
    choose: impl FnOnce(&mut KvRouter) -> Result<RouteDecision, crate::router::RouteError>,
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
    match choose(prefill) {
        Ok(chosen) => PrefillPlan {
            decision,
            worker: Some(chosen),
            pool,
        },
        Err(_) => PrefillPlan {
            decision: PrefillDecision::Local(LocalReason::NoPrefillWorker),
            worker: None,
            pool,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{RequestId, WorkerId};
    use crate::kv::hash::hash_blocks;
    use crate::kv::indexer::FlashIndexer;
    use crate::kv::{KvEvent, KvEventBatch};
    use crate::router::{RouterConfig, RouterReplicaId};
    use std::sync::Arc;

    fn request(id: u64, tokens: &[u32]) -> RouteRequest {
        RouteRequest {
            id: RequestId(id),
            hashes: hash_blocks(tokens, BlockSize::DEFAULT, 0),
            token_count: tokens.len(),
            avoid: Vec::new(),
            overrides: Default::default(),
        }
    }

    fn cfg() -> DisaggregationConfig {
        DisaggregationConfig {
            remote_prefill_min_tokens: 256,
            max_prefill_queue: 2,
            ..DisaggregationConfig::default()
        }
    }

    #[test]
    fn long_uncached_prompts_go_to_the_prefill_worker_that_caches_them() {
        let ix = Arc::new(FlashIndexer::default());
        let mut pool = KvRouter::new(
            RouterReplicaId(0),
            RouterConfig::default(),
            Some(ix.clone()),
        )
        .unwrap();
        let now = Duration::ZERO;
        let tokens: Vec<u32> = (0..320).collect(); // 20 blocks
        let req = request(1, &tokens);
        let bs = BlockSize::DEFAULT;

        // No prefill worker: local.
        let plan = plan_prefill(&cfg(), bs, &mut pool, now, &req, 0);
        assert_eq!(
            plan.decision,
            PrefillDecision::Local(LocalReason::NoPrefillWorker)
        );

        pool.add_worker(WorkerId(1));
        pool.add_worker(WorkerId(2));
        // Worker 2 caches the first 12 blocks: the prefill goes there.
        ix.apply(&KvEventBatch {
            worker: WorkerId(2),
            seq: 0,
            ts: 0.0,
            events: vec![KvEvent::BlockStored {
                block_hashes: req.hashes[..12].to_vec(),
                parent_block_hash: None,
                token_ids: tokens[..192].to_vec(),
                block_size: bs,
                lora_id: None,
            }],
        });
        let plan = plan_prefill(&cfg(), bs, &mut pool, now, &req, 0);
        assert_eq!(plan.decision, PrefillDecision::Remote);
        assert_eq!(
            plan.worker.map(|w| (w.worker, w.overlap_blocks)),
            Some((WorkerId(2), 12))
        );

        // The decode worker caches all but 4 blocks (64 tokens): local, short.
        let plan = plan_prefill(&cfg(), bs, &mut pool, now, &request(2, &tokens), 16);
        assert!(matches!(
            plan.decision,
            PrefillDecision::Local(LocalReason::ShortUncached {
                uncached_tokens: 64
            })
        ));

        // The first remote request still counts on the pool; one more fills it to the bound.
        let plan = plan_prefill(&cfg(), bs, &mut pool, now, &request(3, &tokens), 0);
        assert_eq!(plan.decision, PrefillDecision::Remote);
        assert_eq!(plan.pool.queued, 1);
        let plan = plan_prefill(&cfg(), bs, &mut pool, now, &request(4, &tokens), 0);
        assert_eq!(
            plan.decision,
            PrefillDecision::Local(LocalReason::PrefillPoolBusy { queued: 2 })
        );
        // Their prefills end: the pool is free again.
        pool.on_request_finished(RequestId(1));
        pool.on_request_finished(RequestId(3));
        let plan = plan_prefill(&cfg(), bs, &mut pool, now, &request(5, &tokens), 0);
        assert_eq!(
            (plan.decision, plan.pool.queued),
            (PrefillDecision::Remote, 0)
        );
    }
}
