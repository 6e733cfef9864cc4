//! Approximate mode: what the router sent where, forgotten after a TTL.

use std::time::Duration;
use turbine_actors::ids::WorkerId;
use turbine_actors::kv::approx::{ApproxConfig, ApproxIndexer};
use turbine_actors::kv::hash::BlockHash;

fn hs(xs: &[u64]) -> Vec<BlockHash> {
    xs.iter().map(|h| BlockHash(*h)).collect()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn remembers_until_ttl_then_forgets() {
    let mut ax = ApproxIndexer::new(&ApproxConfig { ttl_secs: 10.0 });
    ax.record(secs(0), WorkerId(1), &hs(&[1, 2, 3]));
    ax.record(secs(5), WorkerId(2), &hs(&[1, 2]));
    let m = ax.find_matches(secs(9), &hs(&[1, 2, 3]));
    assert_eq!(m.scores, vec![(WorkerId(1), 3), (WorkerId(2), 2)]);
    // At t=10 worker 1's entries expire (even before `expire` runs).
    let m = ax.find_matches(secs(10), &hs(&[1, 2, 3]));
    assert_eq!(m.scores, vec![(WorkerId(2), 2)]);
    ax.expire(secs(10));
    assert_eq!(ax.block_count(), 2);
    ax.expire(secs(15));
    assert_eq!(ax.block_count(), 0);
    assert!(ax.find_matches(secs(15), &hs(&[1])).scores.is_empty());
}

#[test]
fn re_sending_refreshes_the_ttl() {
    let mut ax = ApproxIndexer::new(&ApproxConfig { ttl_secs: 10.0 });
    ax.record(secs(0), WorkerId(1), &hs(&[1, 2]));
    ax.record(secs(8), WorkerId(1), &hs(&[1]));
    ax.expire(secs(12));
    let m = ax.find_matches(secs(12), &hs(&[1, 2]));
    assert_eq!(m.scores, vec![(WorkerId(1), 1)]);
}

#[test]
fn chain_walk_stops_at_first_miss_and_worker_removal() {
    let mut ax = ApproxIndexer::new(&ApproxConfig::default());
    ax.record(secs(0), WorkerId(1), &hs(&[1, 3]));
    ax.record(secs(0), WorkerId(2), &hs(&[1, 2, 3]));
    let m = ax.find_matches(secs(1), &hs(&[1, 2, 3]));
    assert_eq!(m.scores, vec![(WorkerId(1), 1), (WorkerId(2), 3)]);
    ax.remove_worker(WorkerId(2));
    let m = ax.find_matches(secs(1), &hs(&[1, 2, 3]));
    assert_eq!(m.scores, vec![(WorkerId(1), 1)]);
}
