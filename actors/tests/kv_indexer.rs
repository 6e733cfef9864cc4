//! FlashIndexer behaviour: chain walk, removal, gaps, clears, bounded memory, and a
//! property test against a naive reference.

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use turbine_actors::ids::WorkerId;
use turbine_actors::kv::hash::{BlockHash, BlockSize};
use turbine_actors::kv::indexer::{ApplyOutcome, FlashIndexer, IndexerConfig, OverlapScores};
use turbine_actors::kv::{KvEvent, KvEventBatch};

fn stored(hashes: &[u64]) -> KvEvent {
    KvEvent::BlockStored {
        block_hashes: hashes.iter().map(|h| BlockHash(*h)).collect(),
        parent_block_hash: None,
        token_ids: Vec::new(),
        block_size: BlockSize::DEFAULT,
        lora_id: None,
    }
}

fn removed(hashes: &[u64]) -> KvEvent {
    KvEvent::BlockRemoved {
        block_hashes: hashes.iter().map(|h| BlockHash(*h)).collect(),
    }
}

fn batch(worker: u64, seq: u64, events: Vec<KvEvent>) -> KvEventBatch {
    KvEventBatch {
        worker: WorkerId(worker),
        seq,
        ts: 0.0,
        events,
    }
}

fn hs(xs: &[u64]) -> Vec<BlockHash> {
    xs.iter().map(|h| BlockHash(*h)).collect()
}

#[test]
fn chain_walk_counts_leading_blocks_and_stops_at_first_miss() {
    let ix = FlashIndexer::default();
    ix.apply(&batch(1, 0, vec![stored(&[1, 2, 3, 4])]));
    ix.apply(&batch(2, 0, vec![stored(&[1, 2]), stored(&[4])]));
    // Worker 3 holds only later blocks: no leading match.
    ix.apply(&batch(3, 0, vec![stored(&[2, 3])]));
    let m = ix.find_matches(&hs(&[1, 2, 3, 4, 5]));
    assert_eq!(m.get(WorkerId(1)), 4);
    assert_eq!(m.get(WorkerId(2)), 2);
    assert_eq!(m.get(WorkerId(3)), 0);
    assert_eq!(m.matched_blocks, 4);
    assert_eq!(m.scores, vec![(WorkerId(1), 4), (WorkerId(2), 2)]);
    // A miss on the first block means no overlap at all.
    assert_eq!(ix.find_matches(&hs(&[9, 1, 2])), OverlapScores::default());
}

#[test]
fn worker_removal_drops_all_its_blocks() {
    let ix = FlashIndexer::default();
    ix.apply(&batch(1, 0, vec![stored(&[1, 2, 3])]));
    ix.apply(&batch(2, 0, vec![stored(&[1, 2])]));
    ix.remove_worker(WorkerId(1));
    assert_eq!(
        ix.find_matches(&hs(&[1, 2, 3])).scores,
        vec![(WorkerId(2), 2)]
    );
    assert_eq!(ix.block_count(), 2);
    assert_eq!(ix.holders(BlockHash(3)), vec![]);
    assert_eq!(ix.workers(), vec![WorkerId(2)]);
}

#[test]
fn block_removed_and_all_cleared() {
    let ix = FlashIndexer::default();
    ix.apply(&batch(1, 0, vec![stored(&[1, 2, 3])]));
    ix.apply(&batch(1, 1, vec![removed(&[2])]));
    assert_eq!(ix.find_matches(&hs(&[1, 2, 3])).get(WorkerId(1)), 1);
    ix.apply(&batch(1, 2, vec![KvEvent::AllBlocksCleared, stored(&[7])]));
    assert_eq!(ix.worker_block_count(WorkerId(1)), 1);
    assert_eq!(ix.block_count(), 1);
    let m = ix.metrics();
    assert_eq!(m.batches_applied, 3);
    assert_eq!(m.events_applied, 4);
    assert_eq!(m.block_events_applied, 3 + 1 + 1 + 1);
    assert_eq!(m.blocks_indexed, 4);
}

#[test]
fn gaps_mark_resync_duplicates_are_ignored_and_clear_worker_resyncs() {
    let ix = FlashIndexer::default();
    assert_eq!(
        ix.apply(&batch(1, 0, vec![stored(&[1])])),
        ApplyOutcome::Applied
    );
    assert_eq!(
        ix.apply(&batch(1, 2, vec![stored(&[2])])),
        ApplyOutcome::AppliedAfterGap {
            expected: 1,
            got: 2
        }
    );
    assert_eq!(ix.workers_needing_resync(), vec![WorkerId(1)]);
    assert_eq!(
        ix.apply(&batch(1, 1, vec![stored(&[3])])),
        ApplyOutcome::Duplicate {
            expected: 3,
            got: 1
        }
    );
    assert_eq!(ix.holders(BlockHash(3)), vec![]);
    // A worker first heard of mid-stream also needs a resync.
    assert!(matches!(
        ix.apply(&batch(2, 5, vec![])),
        ApplyOutcome::AppliedAfterGap { .. }
    ));
    assert_eq!(ix.workers_needing_resync(), vec![WorkerId(1), WorkerId(2)]);
    ix.clear_worker(WorkerId(1));
    assert_eq!(ix.worker_block_count(WorkerId(1)), 0);
    assert_eq!(ix.workers_needing_resync(), vec![WorkerId(2)]);
    // The re-store stream may start at any sequence number.
    assert_eq!(
        ix.apply(&batch(1, 40, vec![stored(&[1, 2])])),
        ApplyOutcome::Applied
    );
    assert_eq!(ix.apply(&batch(1, 41, vec![])), ApplyOutcome::Applied);
    assert_eq!(ix.find_matches(&hs(&[1, 2])).get(WorkerId(1)), 2);
    let m = ix.metrics();
    assert_eq!((m.gaps, m.duplicates), (2, 1));
}

#[test]
fn memory_is_bounded_and_evictions_counted() {
    let ix = FlashIndexer::new(IndexerConfig { max_blocks: 10 });
    for i in 0..20u64 {
        ix.apply(&batch(1, i, vec![stored(&[100 + i])]));
    }
    assert_eq!(ix.block_count(), 10);
    assert_eq!(ix.worker_block_count(WorkerId(1)), 10);
    assert_eq!(ix.metrics().evictions, 10);
    // Oldest went first.
    assert_eq!(ix.holders(BlockHash(100)), vec![]);
    assert_eq!(ix.holders(BlockHash(119)), vec![WorkerId(1)]);
}

/// Eviction goes tail first within a chain (what stays is still a matchable prefix), and the
/// part of a chain that queries matched since the last pass survives it.
#[test]
fn blocks_matched_by_queries_survive_eviction() {
    let ix = FlashIndexer::new(IndexerConfig { max_blocks: 3 });
    ix.apply(&batch(1, 0, vec![stored(&[1, 2, 3])]));
    assert_eq!(ix.find_matches(&hs(&[1, 2])).get(WorkerId(1)), 2);
    ix.apply(&batch(1, 1, vec![stored(&[4])]));
    assert_eq!(ix.holders(BlockHash(1)), vec![WorkerId(1)]);
    assert_eq!(ix.holders(BlockHash(2)), vec![WorkerId(1)]);
    assert_eq!(
        ix.holders(BlockHash(3)),
        vec![],
        "the unmatched tail went first"
    );
    assert_eq!(ix.block_count(), 3);
    // A re-store after eviction indexes the block again; now the untouched chain [4] goes.
    ix.apply(&batch(1, 2, vec![stored(&[3])]));
    assert_eq!(ix.holders(BlockHash(3)), vec![WorkerId(1)]);
    assert_eq!(ix.holders(BlockHash(4)), vec![]);
    assert_eq!(ix.worker_block_count(WorkerId(1)), 3);
    assert_eq!(ix.metrics().evictions, 2);
}

#[test]
fn concurrent_readers_and_writers_agree_at_the_end() {
    let ix = std::sync::Arc::new(FlashIndexer::default());
    let chain: Vec<u64> = (1..=64).collect();
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let ix = ix.clone();
            let chain = chain.clone();
            std::thread::spawn(move || {
                for (seq, c) in chain.chunks(8).enumerate() {
                    ix.apply(&batch(w, seq as u64, vec![stored(c)]));
                }
            })
        })
        .collect();
    let reader = {
        let ix = ix.clone();
        let q = hs(&chain);
        std::thread::spawn(move || {
            for _ in 0..200 {
                let m = ix.find_matches(&q);
                assert!(m.matched_blocks <= 64);
            }
        })
    };
    for t in writers {
        t.join().unwrap();
    }
    reader.join().unwrap();
    let m = ix.find_matches(&hs(&chain));
    assert_eq!(m.scores, vec![(WorkerId(0), 64), (WorkerId(1), 64)]);
}

#[derive(Clone, Debug)]
enum Op {
    Store(u64, u8, u8),
    /// A chain piece that does not start at the root (a hole before it, or a re-store).
    StoreFrom(u64, u8, u8, u8),
    Remove(u64, u8, u8),
    Clear(u64),
    RemoveWorker(u64),
}

/// Blocks live on 3 chains of 12; hash = chain * 100 + position.
fn chain_hashes(chain: u8, from: u8, len: u8) -> Vec<u64> {
    (from..from.saturating_add(len).min(12))
        .map(|p| u64::from(chain) * 100 + u64::from(p))
        .collect()
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..4, 0u8..3, 0u8..12).prop_map(|(w, c, l)| Op::Store(w, c, l)),
        3 => (0u64..4, 0u8..3, 0u8..12, 1u8..6).prop_map(|(w, c, f, l)| Op::StoreFrom(w, c, f, l)),
        3 => (0u64..4, 0u8..3, 0u8..12).prop_map(|(w, c, p)| Op::Remove(w, c, p)),
        1 => (0u64..4).prop_map(Op::Clear),
        1 => (0u64..4).prop_map(Op::RemoveWorker),
    ]
}

fn naive(held: &BTreeMap<u64, BTreeSet<u64>>, q: &[u64]) -> OverlapScores {
    let pairs = held
        .iter()
        .map(|(w, set)| {
            let n = q.iter().take_while(|h| set.contains(h)).count() as u32;
            (WorkerId(*w), n)
        })
        .collect();
    OverlapScores::from_pairs(pairs)
}

proptest! {
    #[test]
    fn find_matches_equals_naive_reference(ops in proptest::collection::vec(op(), 1..60)) {
        let ix = FlashIndexer::default();
        let mut held: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        let mut seqs: BTreeMap<u64, u64> = BTreeMap::new();
        for op in ops {
            let (w, events) = match op {
                Op::Store(w, c, l) => {
                    let hs = chain_hashes(c, 0, l + 1);
                    held.entry(w).or_default().extend(&hs);
                    (w, vec![stored(&hs)])
                }
                Op::StoreFrom(w, c, f, l) => {
                    let hs = chain_hashes(c, f, l);
                    held.entry(w).or_default().extend(&hs);
                    (w, vec![stored(&hs)])
                }
                Op::Remove(w, c, p) => {
                    let hs = chain_hashes(c, p, 2);
                    if let Some(s) = held.get_mut(&w) {
                        for h in &hs { s.remove(h); }
                    }
                    (w, vec![removed(&hs)])
                }
                Op::Clear(w) => {
                    held.remove(&w);
                    (w, vec![KvEvent::AllBlocksCleared])
                }
                Op::RemoveWorker(w) => {
                    held.remove(&w);
                    seqs.remove(&w);
                    ix.remove_worker(WorkerId(w));
                    continue;
                }
            };
            let seq = seqs.entry(w).or_insert(0);
            prop_assert_eq!(ix.apply(&batch(w, *seq, events)), ApplyOutcome::Applied);
            *seq += 1;
            for c in 0..3u8 {
                let q = chain_hashes(c, 0, 12);
                prop_assert_eq!(ix.find_matches(&hs(&q)), naive(&held, &q));
            }
        }
        let distinct: BTreeSet<u64> = held.values().flatten().copied().collect();
        prop_assert_eq!(ix.block_count(), distinct.len());
    }
}
