//! The router seam: what the simulated cluster asks of a router + KV indexer.
//!
//! [`SimRouter`] mirrors the calls the real router actor makes on its pure state (add/remove
//! workers, apply KV event batches, resync one worker, route, finish), so the real
//! `KvRouter` + `FlashIndexer` can sit behind it (see `real_router`, when available), and
//! [`StandInRouter`] is a small self-contained implementation used until then and as a
//! cross-check.

use crate::time::SimTime;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use turbine_actors::ids::{RequestId, WorkerId};
use turbine_actors::kv::{BlockHash, BlockSize, KvEvent, KvEventBatch};

/// Routing policy names (same spelling as the cluster config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PolicyName {
    Kv,
    RoundRobin,
    Random,
}

impl PolicyName {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyName::Kv => "kv",
            PolicyName::RoundRobin => "round_robin",
            PolicyName::Random => "random",
        }
    }
}

/// A routing decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub worker: WorkerId,
    /// Leading prompt blocks the index says the worker holds.
    pub overlap_blocks: u32,
}

/// The router + indexer pure state, as driven by the simulator's router node.
pub trait SimRouter {
    /// Which implementation, for reports ("stand-in" or "turbine-actors KvRouter").
    fn implementation(&self) -> &'static str;
    fn add_worker(&mut self, worker: WorkerId);
    /// The worker left (crash, lease expiry): forget its load and drop all its blocks.
    fn remove_worker(&mut self, worker: WorkerId);
    /// Applies one in-order batch of a member's KV events (gaps are handled by the caller,
    /// which resyncs instead).
    fn apply_batch(&mut self, now: SimTime, batch: &KvEventBatch);
    /// Replaces everything known about `worker`'s blocks by `hashes`, the state after its
    /// batches up to `next_seq - 1` (after a gap, or when it (re)joins).
    fn resync(&mut self, now: SimTime, worker: WorkerId, next_seq: u64, hashes: &[BlockHash]);
    fn route(
        &mut self,
        now: SimTime,
        request: RequestId,
        hashes: &[BlockHash],
        tokens: usize,
    ) -> Option<Choice>;
    fn on_finished(&mut self, request: RequestId);
    /// A worker's load report (KV blocks held by its requests, requests queued or running).
    fn update_load(&mut self, worker: WorkerId, active_blocks: u64, active_requests: u32);
    /// Workers the index knows, with how many blocks it lists for each, sorted by worker.
    fn indexed_workers(&self) -> Vec<(WorkerId, usize)>;
    /// Whether the index lists `worker` as holding `block`.
    fn index_holds(&self, worker: WorkerId, block: BlockHash) -> bool;
}

/// A minimal index: block → holders, and worker → blocks for O(own blocks) removal.
#[derive(Default)]
pub struct StandInIndex {
    /// Looked up only; never iterated for output (entries are sorted before use).
    holders: HashMap<BlockHash, BTreeSet<WorkerId>>,
    by_worker: BTreeMap<WorkerId, BTreeSet<BlockHash>>,
}

impl StandInIndex {
    fn store(&mut self, w: WorkerId, h: BlockHash) {
        self.holders.entry(h).or_default().insert(w);
        self.by_worker.entry(w).or_default().insert(h);
    }

    fn remove(&mut self, w: WorkerId, h: BlockHash) {
        if let Some(set) = self.holders.get_mut(&h) {
            set.remove(&w);
            if set.is_empty() {
                self.holders.remove(&h);
            }
        }
        if let Some(set) = self.by_worker.get_mut(&w) {
            set.remove(&h);
        }
    }

    fn clear(&mut self, w: WorkerId) {
        for h in self.by_worker.remove(&w).unwrap_or_default() {
            if let Some(set) = self.holders.get_mut(&h) {
                set.remove(&w);
                if set.is_empty() {
                    self.holders.remove(&h);
                }
            }
        }
    }

    /// Leading blocks of `hashes` each worker holds, walking the chain until no worker is
    /// left matching.
    fn overlaps(&self, hashes: &[BlockHash]) -> BTreeMap<WorkerId, u32> {
        let mut out: BTreeMap<WorkerId, u32> = BTreeMap::new();
        let mut active: Option<BTreeSet<WorkerId>> = None;
        for h in hashes {
            let Some(holders) = self.holders.get(h) else {
                break;
            };
            let next: BTreeSet<WorkerId> = match &active {
                None => holders.clone(),
                Some(a) => a.intersection(holders).copied().collect(),
            };
            if next.is_empty() {
                break;
            }
            for w in &next {
                *out.entry(*w).or_default() += 1;
            }
            active = Some(next);
        }
        out
    }
}

/// Self-contained router used until the real `KvRouter` is wired in: the same three
/// policies, KV cost = overlap_weight × (request blocks − overlap) + active blocks.
pub struct StandInRouter {
    policy: PolicyName,
    block_size: BlockSize,
    overlap_weight: f64,
    index: StandInIndex,
    /// Active blocks routed to each live worker and not yet finished.
    load: BTreeMap<WorkerId, u64>,
    in_flight: BTreeMap<RequestId, (WorkerId, u64)>,
    next_rr: usize,
    rng: ChaCha8Rng,
}

impl StandInRouter {
    pub fn new(policy: PolicyName, block_size: BlockSize, rng: ChaCha8Rng) -> Self {
        StandInRouter {
            policy,
            block_size,
            overlap_weight: 1.0,
            index: StandInIndex::default(),
            load: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            next_rr: 0,
            rng,
        }
    }
}

impl SimRouter for StandInRouter {
    fn implementation(&self) -> &'static str {
        "stand-in"
    }

    fn add_worker(&mut self, worker: WorkerId) {
        self.load.entry(worker).or_default();
    }

    fn remove_worker(&mut self, worker: WorkerId) {
        self.load.remove(&worker);
        self.in_flight.retain(|_, (w, _)| *w != worker);
        self.index.clear(worker);
    }

    fn apply_batch(&mut self, _now: SimTime, batch: &KvEventBatch) {
        let worker = batch.worker;
        if !self.load.contains_key(&worker) {
            return; // not (or no longer) a member: its blocks must not enter the index
        }
        for e in &batch.events {
            match e {
                KvEvent::BlockStored { block_hashes, .. } => {
                    for h in block_hashes {
                        self.index.store(worker, *h);
                    }
                }
                KvEvent::BlockRemoved { block_hashes } => {
                    for h in block_hashes {
                        self.index.remove(worker, *h);
                    }
                }
                KvEvent::AllBlocksCleared => self.index.clear(worker),
            }
        }
    }

    fn resync(&mut self, _now: SimTime, worker: WorkerId, _next_seq: u64, hashes: &[BlockHash]) {
        self.index.clear(worker);
        if self.load.contains_key(&worker) {
            for h in hashes {
                self.index.store(worker, *h);
            }
        }
    }

    fn route(
        &mut self,
        _now: SimTime,
        request: RequestId,
        hashes: &[BlockHash],
        tokens: usize,
    ) -> Option<Choice> {
        if self.load.is_empty() {
            return None;
        }
        let workers: Vec<WorkerId> = self.load.keys().copied().collect();
        let overlaps = self.index.overlaps(hashes);
        let request_blocks = self.block_size.blocks_for(tokens).max(hashes.len()) as u64;
        let worker = match self.policy {
            PolicyName::RoundRobin => {
                let w = workers[self.next_rr % workers.len()];
                self.next_rr = self.next_rr.wrapping_add(1);
                w
            }
            PolicyName::Random => workers[self.rng.gen_range(0..workers.len())],
            PolicyName::Kv => {
                let cost = |w: &WorkerId| {
                    let ov = u64::from(overlaps.get(w).copied().unwrap_or(0));
                    let load = self.load.get(w).copied().unwrap_or(0);
                    (
                        self.overlap_weight * request_blocks.saturating_sub(ov) as f64
                            + load as f64,
                        load,
                        *w,
                    )
                };
                let mut best = workers[0];
                let mut best_cost = cost(&best);
                for w in &workers[1..] {
                    let c = cost(w);
                    if c.partial_cmp(&best_cost).is_some_and(|o| o.is_lt()) {
                        best = *w;
                        best_cost = c;
                    }
                }
                best
            }
        };
        *self.load.entry(worker).or_default() += request_blocks;
        self.in_flight.insert(request, (worker, request_blocks));
        Some(Choice {
            worker,
            overlap_blocks: overlaps.get(&worker).copied().unwrap_or(0),
        })
    }

    fn on_finished(&mut self, request: RequestId) {
        if let Some((w, blocks)) = self.in_flight.remove(&request) {
            if let Some(l) = self.load.get_mut(&w) {
                *l = l.saturating_sub(blocks);
            }
        }
    }

    fn update_load(&mut self, _worker: WorkerId, _active_blocks: u64, _active_requests: u32) {
        // The stand-in counts what it routed instead (see `load`).
    }

    fn indexed_workers(&self) -> Vec<(WorkerId, usize)> {
        self.index
            .by_worker
            .iter()
            .filter(|(_, hs)| !hs.is_empty())
            .map(|(w, hs)| (*w, hs.len()))
            .collect()
    }

    fn index_holds(&self, worker: WorkerId, block: BlockHash) -> bool {
        self.index
            .holders
            .get(&block)
            .is_some_and(|s| s.contains(&worker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{SeedSplitter, Stream};

    fn stored(hs: &[u64]) -> KvEvent {
        KvEvent::BlockStored {
            block_hashes: hs.iter().map(|h| BlockHash(*h)).collect(),
            parent_block_hash: None,
            token_ids: vec![],
            block_size: BlockSize::DEFAULT,
            lora_id: None,
        }
    }

    #[test]
    fn kv_policy_prefers_overlap_and_removal_drops_blocks() {
        let mut r = StandInRouter::new(
            PolicyName::Kv,
            BlockSize::DEFAULT,
            SeedSplitter::new(1).stream(Stream::Router),
        );
        r.add_worker(WorkerId(1));
        r.add_worker(WorkerId(2));
        r.apply_batch(
            SimTime::ZERO,
            &KvEventBatch {
                worker: WorkerId(2),
                seq: 0,
                ts: 0.0,
                events: vec![stored(&[10, 11, 12])],
            },
        );
        let hs: Vec<BlockHash> = [10, 11, 12, 13].iter().map(|h| BlockHash(*h)).collect();
        let c = r.route(SimTime::ZERO, RequestId(1), &hs, 64).unwrap();
        assert_eq!(
            c,
            Choice {
                worker: WorkerId(2),
                overlap_blocks: 3
            }
        );
        assert_eq!(r.indexed_workers(), vec![(WorkerId(2), 3)]);
        r.remove_worker(WorkerId(2));
        assert!(r.indexed_workers().is_empty());
        assert_eq!(
            r.route(SimTime::ZERO, RequestId(2), &hs, 64)
                .unwrap()
                .worker,
            WorkerId(1)
        );
    }
}
