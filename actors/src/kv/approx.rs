//! Approximate KV index for workers that publish no KV events.
//!
//! The router remembers which blocks it sent to which worker and assumes the worker still
//! holds them for `ttl` afterwards (a worker's prefix cache usually keeps a recent prompt for
//! a while). It answers the same query as [`FlashIndexer`](super::indexer::FlashIndexer):
//! per-worker count of consecutive leading blocks. Pure and single-owner (`&mut self` to
//! write): it lives inside one router; replicas share it through `RouterEvent`s.
//!
//! Time is whatever monotonic `now` the caller passes (a `Duration` since the router
//! started, or the simulator's virtual clock). An entry stored at `now` expires at
//! `now + ttl`; re-sending a block refreshes it.

use super::hash::BlockHash;
use super::indexer::OverlapScores;
use crate::ids::WorkerId;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// Settings of approximate mode.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ApproxConfig {
    /// How long a block sent to a worker is assumed cached there, in seconds.
    pub ttl_secs: f64,
}

impl Default for ApproxConfig {
    fn default() -> Self {
        ApproxConfig { ttl_secs: 120.0 }
    }
}

impl ApproxConfig {
    /// The TTL as a `Duration` (negative or non-finite values clamp to zero).
    pub fn ttl(&self) -> Duration {
        Duration::try_from_secs_f64(self.ttl_secs).unwrap_or(Duration::ZERO)
    }
}

/// Blocks assumed cached per worker, with expiry.
#[derive(Debug, Default)]
pub struct ApproxIndexer {
    ttl: Duration,
    /// Block -> (worker, expires at), sorted by worker.
    blocks: HashMap<BlockHash, Vec<(WorkerId, Duration)>>,
    /// (expires at, worker, block) in insertion order, which is expiry order for a
    /// monotonic `now`. Items made stale by a refresh are skipped when popped.
    expiry: VecDeque<(Duration, WorkerId, BlockHash)>,
}

impl ApproxIndexer {
    pub fn new(config: &ApproxConfig) -> Self {
        ApproxIndexer {
            ttl: config.ttl(),
            ..ApproxIndexer::default()
        }
    }

    /// Remember that `hashes` were sent to `worker` at `now`.
    pub fn record(&mut self, now: Duration, worker: WorkerId, hashes: &[BlockHash]) {
        self.expire(now);
        let expires = now.saturating_add(self.ttl);
        for h in hashes {
            let holders = self.blocks.entry(*h).or_default();
            match holders.binary_search_by_key(&worker, |(w, _)| *w) {
                Ok(i) => {
                    if let Some(slot) = holders.get_mut(i) {
                        slot.1 = expires;
                    }
                }
                Err(i) => holders.insert(i, (worker, expires)),
            }
            self.expiry.push_back((expires, worker, *h));
        }
    }

    /// Drop every entry that expired at or before `now`.
    pub fn expire(&mut self, now: Duration) {
        while let Some(&(at, worker, h)) = self.expiry.front() {
            if at > now {
                break;
            }
            self.expiry.pop_front();
            if let Some(holders) = self.blocks.get_mut(&h) {
                // Only if not refreshed since this item was queued.
                holders.retain(|(w, exp)| !(*w == worker && *exp <= now));
                if holders.is_empty() {
                    self.blocks.remove(&h);
                }
            }
        }
    }

    /// Per-worker leading blocks assumed cached at `now`. Expired entries count as absent
    /// even if `expire` was not called.
    pub fn find_matches(&self, now: Duration, hashes: &[BlockHash]) -> OverlapScores {
        let mut active: Vec<WorkerId> = Vec::new();
        let mut scores = Vec::new();
        let mut depth = 0u32;
        for h in hashes {
            let Some(holders) = self.blocks.get(h) else {
                break;
            };
            let live = holders
                .iter()
                .filter(|(_, exp)| *exp > now)
                .map(|(w, _)| *w);
            if depth == 0 {
                active.extend(live);
            } else {
                let live: Vec<WorkerId> = live.collect();
                active.retain(|w| {
                    let keep = live.binary_search(w).is_ok();
                    if !keep {
                        scores.push((*w, depth));
                    }
                    keep
                });
            }
            if active.is_empty() {
                break;
            }
            depth += 1;
        }
        scores.extend(active.into_iter().map(|w| (w, depth)));
        OverlapScores::from_pairs(scores)
    }

    /// Forget everything sent to `worker`.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        self.blocks.retain(|_, holders| {
            holders.retain(|(w, _)| *w != worker);
            !holders.is_empty()
        });
        self.expiry.retain(|(_, w, _)| *w != worker);
    }

    /// Distinct blocks remembered (expired ones included until `expire` runs).
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }
}
