//! The real router behind the simulator's seam: `turbine_actors::router::KvRouter` with an
//! events-fed `FlashIndexer`, driven with the calls the router actor makes.

use crate::router::{Choice, PolicyName, SimRouter};
use crate::time::SimTime;
use std::sync::Arc;
use turbine_actors::ids::{RequestId, WorkerId};
use turbine_actors::kv::indexer::FlashIndexer;
use turbine_actors::kv::{BlockHash, BlockSize, KvEvent, KvEventBatch};
use turbine_actors::router::{
    KvRouter, PolicyKind, RouteRequest, RouterConfig, RouterConfigError, RouterIndexMode,
    RouterReplicaId,
};

/// The router configuration a simulated run uses: `policy`, an events-fed index, and
/// `seed` for the policy's generator (random policy, softmax sampling).
pub fn router_config(policy: PolicyName, block_size: BlockSize, seed: u64) -> RouterConfig {
    RouterConfig {
        policy: match policy {
            PolicyName::Kv => PolicyKind::Kv,
            PolicyName::RoundRobin => PolicyKind::RoundRobin,
            PolicyName::Random => PolicyKind::Random,
        },
        seed,
        block_size,
        index: RouterIndexMode::Events,
        ..RouterConfig::default()
    }
}

pub struct RealRouter {
    router: KvRouter,
    index: Arc<FlashIndexer>,
    block_size: BlockSize,
}

impl RealRouter {
    /// `seed` seeds the policy's generator (random policy, softmax sampling).
    pub fn new(
        policy: PolicyName,
        block_size: BlockSize,
        seed: u64,
    ) -> Result<Self, RouterConfigError> {
        let index = Arc::new(FlashIndexer::default());
        let config = router_config(policy, block_size, seed);
        let router = KvRouter::new(RouterReplicaId(0), config, Some(index.clone()))?;
        Ok(RealRouter {
            router,
            index,
            block_size,
        })
    }
}

impl SimRouter for RealRouter {
    fn implementation(&self) -> &'static str {
        "turbine-actors KvRouter + FlashIndexer"
    }

    fn add_worker(&mut self, worker: WorkerId) {
        self.router.add_worker(worker);
    }

    fn remove_worker(&mut self, worker: WorkerId) {
        self.router.remove_worker(worker);
    }

    fn apply_batch(&mut self, _now: SimTime, batch: &KvEventBatch) {
        self.index.apply(batch);
    }

    fn resync(&mut self, now: SimTime, worker: WorkerId, next_seq: u64, hashes: &[BlockHash]) {
        // Resync as the indexer documents it: clear, then a full re-store whose sequence
        // number makes the worker's next batch (`next_seq`) the expected one.
        self.index.clear_worker(worker);
        let Some(seq) = next_seq.checked_sub(1) else {
            return; // nothing published yet, so nothing held; the next batch (seq 0) is accepted
        };
        let stored = KvEvent::BlockStored {
            block_hashes: hashes.to_vec(),
            parent_block_hash: None,
            token_ids: Vec::new(),
            block_size: self.block_size,
            lora_id: None,
        };
        self.index.apply(&KvEventBatch {
            worker,
            seq,
            ts: now.as_secs_f64(),
            events: vec![stored],
        });
    }

    fn route(
        &mut self,
        now: SimTime,
        request: RequestId,
        hashes: &[BlockHash],
        tokens: usize,
    ) -> Option<Choice> {
        let req = RouteRequest {
            id: request,
            hashes: hashes.to_vec(),
            token_count: tokens,
        };
        let routed = self.router.route(now.as_duration(), &req).ok()?;
        Some(Choice {
            worker: routed.decision.worker,
            overlap_blocks: routed.decision.overlap_blocks,
        })
    }

    fn on_finished(&mut self, request: RequestId) {
        self.router.on_request_finished(request);
    }

    fn update_load(&mut self, worker: WorkerId, active_blocks: u64, active_requests: u32) {
        self.router
            .update_load(worker, active_blocks, active_requests);
    }

    fn indexed_workers(&self) -> Vec<(WorkerId, usize)> {
        self.index
            .workers()
            .into_iter()
            .map(|w| (w, self.index.worker_block_count(w)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    fn index_holds(&self, worker: WorkerId, block: BlockHash) -> bool {
        self.index.holders(block).contains(&worker)
    }
}
