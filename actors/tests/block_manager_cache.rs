//! Block manager: allocation, sharing, prefix-cache hits, LRU eviction and KV events.

use turbine_actors::ids::{RequestId, TokenId};
use turbine_actors::kv::events::KvEvent;
use turbine_actors::kv::hash::{hash_blocks, BlockHash, BlockSize};
use turbine_actors::worker::{AllocError, BlockId, BlockManager, BlockManagerConfig, StartKind};

const BS: u32 = 4;

fn manager(num_blocks: u32) -> BlockManager {
    BlockManager::new(BlockManagerConfig {
        num_blocks,
        block_size: BlockSize::new(BS).unwrap(),
        enable_prefix_caching: true,
    })
}

fn tokens(seed: u32, len: usize) -> Vec<TokenId> {
    (0..len as u32).map(|i| seed * 1000 + i).collect()
}

fn hashes(t: &[TokenId]) -> Vec<BlockHash> {
    hash_blocks(t, BlockSize::new(BS).unwrap(), 0)
}

/// Allocates `t` for `id` (with whatever prefix hit there is), marks all of it computed and
/// returns the number of hit tokens.
fn run_prefill(bm: &mut BlockManager, id: u64, t: &[TokenId]) -> usize {
    let h = hashes(t);
    let hit = bm.find_cached_prefix(&h, t.len());
    let hit_tokens = hit.num_tokens();
    bm.allocate_new(RequestId(id), &hit, t.len(), StartKind::Fresh)
        .unwrap();
    bm.commit_computed(RequestId(id), t, &h).unwrap();
    bm.check_invariants().unwrap();
    hit_tokens
}

fn removed(events: &[KvEvent]) -> Vec<BlockHash> {
    events
        .iter()
        .flat_map(|e| match e {
            KvEvent::BlockRemoved { block_hashes } => block_hashes.clone(),
            _ => vec![],
        })
        .collect()
}

fn stored(events: &[KvEvent]) -> Vec<BlockHash> {
    events
        .iter()
        .flat_map(|e| match e {
            KvEvent::BlockStored { block_hashes, .. } => block_hashes.clone(),
            _ => vec![],
        })
        .collect()
}

#[test]
fn fresh_allocation_covers_the_tokens_and_is_counted() {
    let mut bm = manager(8);
    let hit = bm.find_cached_prefix(&[], 10);
    bm.allocate_new(RequestId(1), &hit, 10, StartKind::Fresh)
        .unwrap();
    assert_eq!(bm.block_table(RequestId(1)).unwrap().len(), 3);
    assert_eq!(bm.num_used_blocks(), 3);
    assert_eq!(bm.num_free_blocks(), 5);
    bm.grow(RequestId(1), 12).unwrap();
    assert_eq!(bm.block_table(RequestId(1)).unwrap().len(), 3);
    bm.grow(RequestId(1), 13).unwrap();
    assert_eq!(bm.block_table(RequestId(1)).unwrap().len(), 4);
    bm.check_invariants().unwrap();
    assert!(bm.free(RequestId(1)));
    assert!(!bm.free(RequestId(1)));
    assert_eq!(bm.num_used_blocks(), 0);
    assert_eq!(bm.num_free_blocks(), 8);
    bm.check_invariants().unwrap();
}

#[test]
fn out_of_blocks_changes_nothing() {
    let mut bm = manager(4);
    let hit = bm.find_cached_prefix(&[], 12);
    bm.allocate_new(RequestId(1), &hit, 12, StartKind::Fresh)
        .unwrap();
    let err = bm
        .allocate_new(
            RequestId(2),
            &bm.find_cached_prefix(&[], 8),
            8,
            StartKind::Fresh,
        )
        .unwrap_err();
    assert_eq!(
        err,
        AllocError::OutOfBlocks {
            needed: 2,
            available: 1
        }
    );
    assert!(bm.block_table(RequestId(2)).is_none());
    assert_eq!(
        bm.grow(RequestId(1), 24),
        Err(AllocError::OutOfBlocks {
            needed: 3,
            available: 1
        })
    );
    assert_eq!(bm.block_table(RequestId(1)).unwrap().len(), 3);
    assert_eq!(bm.num_free_blocks(), 1);
    assert_eq!(
        bm.grow(RequestId(9), 4),
        Err(AllocError::UnknownSequence(RequestId(9)))
    );
    bm.check_invariants().unwrap();
}

#[test]
fn computed_full_blocks_are_stored_as_one_chained_event() {
    let mut bm = manager(8);
    let t = tokens(1, 10); // 2 full blocks + 2 tokens
    run_prefill(&mut bm, 1, &t);
    let events = bm.drain_events();
    let h = hashes(&t);
    assert_eq!(
        events,
        vec![KvEvent::BlockStored {
            block_hashes: h.clone(),
            parent_block_hash: None,
            token_ids: t[..8].to_vec(),
            block_size: BlockSize::new(BS).unwrap(),
            lora_id: None,
        }]
    );
    assert!(bm.drain_events().is_empty(), "drain empties the queue");
    // Decode fills the third block: one more event whose parent is the second block.
    let mut longer = t.clone();
    longer.extend([7, 7]);
    bm.commit_computed(RequestId(1), &longer, &hashes(&longer))
        .unwrap();
    let events = bm.drain_events();
    assert_eq!(
        events,
        vec![KvEvent::BlockStored {
            block_hashes: vec![hashes(&longer)[2]],
            parent_block_hash: Some(h[1]),
            token_ids: longer[8..12].to_vec(),
            block_size: BlockSize::new(BS).unwrap(),
            lora_id: None,
        }]
    );
    assert_eq!(bm.stats().cached, 3);
}

#[test]
fn shared_prefix_is_reused_and_ref_counted() {
    let mut bm = manager(16);
    let a = tokens(1, 12);
    run_prefill(&mut bm, 1, &a);
    let mut b = a[..8].to_vec();
    b.extend(tokens(2, 6));
    let hit = run_prefill(&mut bm, 2, &b);
    assert_eq!(hit, 8);
    let ta = bm.block_table(RequestId(1)).unwrap().to_vec();
    let tb = bm.block_table(RequestId(2)).unwrap().to_vec();
    assert_eq!(ta[..2], tb[..2], "the first two physical blocks are shared");
    assert_ne!(ta[2], tb[2]);
    assert_eq!(bm.num_used_blocks(), 3 + 2);
    // Freeing A keeps the shared blocks in use by B.
    bm.free(RequestId(1));
    bm.check_invariants().unwrap();
    assert_eq!(
        bm.num_used_blocks(),
        4,
        "B's two shared and two private blocks"
    );
    assert_eq!(bm.stats().evictable, 1, "only A's private third block");
    let st = bm.stats();
    assert_eq!(st.prefix_query_tokens, 12 + 14);
    assert_eq!(st.prefix_hit_tokens, 8);
}

#[test]
fn the_last_prompt_token_is_never_served_from_cache() {
    let mut bm = manager(16);
    let a = tokens(1, 8); // exactly two full blocks
    run_prefill(&mut bm, 1, &a);
    bm.free(RequestId(1));
    let hit = bm.find_cached_prefix(&hashes(&a), a.len());
    assert_eq!(hit.num_tokens(), 4, "capped at (8 - 1) / 4 blocks");
    let mut longer = a.clone();
    longer.push(5);
    let hit = bm.find_cached_prefix(&hashes(&longer), longer.len());
    assert_eq!(hit.num_tokens(), 8);
}

#[test]
fn freed_cached_blocks_are_evicted_least_recently_released_first_tail_first() {
    let mut bm = manager(6);
    let a = tokens(1, 8);
    let b = tokens(2, 8);
    run_prefill(&mut bm, 1, &a);
    run_prefill(&mut bm, 2, &b);
    bm.free(RequestId(1)); // released first: A's tail, then A's head
    bm.free(RequestId(2));
    bm.drain_events();
    assert_eq!(bm.stats().evictable, 4);
    assert_eq!(bm.stats().free_uncached, 2);
    // Two fresh blocks come from the free list: nothing is evicted.
    let c = tokens(3, 8);
    bm.allocate_new(
        RequestId(3),
        &bm.find_cached_prefix(&hashes(&c), 8),
        8,
        StartKind::Fresh,
    )
    .unwrap();
    assert!(removed(&bm.drain_events()).is_empty());
    // Three more evict A's tail, A's head, then B's tail.
    bm.grow(RequestId(3), 20).unwrap();
    let (ha, hb) = (hashes(&a), hashes(&b));
    assert_eq!(removed(&bm.drain_events()), vec![ha[1], ha[0], hb[1]]);
    assert!(bm.is_cached(hb[0]) && !bm.is_cached(ha[0]));
    assert_eq!(bm.stats().evictions, 3);
    bm.check_invariants().unwrap();
}

#[test]
fn a_hit_refreshes_recency() {
    let mut bm = manager(4);
    let a = tokens(1, 4);
    let b = tokens(2, 4);
    run_prefill(&mut bm, 1, &a);
    run_prefill(&mut bm, 2, &b);
    bm.free(RequestId(1));
    bm.free(RequestId(2)); // A older than B
                           // Touch A again (a hit), then release it: now B is the least recently used.
    let mut a2 = a.clone();
    a2.push(9);
    assert_eq!(run_prefill(&mut bm, 3, &a2), 4);
    bm.free(RequestId(3));
    bm.drain_events();
    let fresh = tokens(4, 12);
    bm.allocate_new(
        RequestId(4),
        &bm.find_cached_prefix(&[], 12),
        12,
        StartKind::Fresh,
    )
    .unwrap();
    let _ = fresh;
    assert_eq!(removed(&bm.drain_events()), vec![hashes(&b)[0]]);
    assert!(bm.is_cached(hashes(&a)[0]));
}

#[test]
fn a_hit_on_evictable_blocks_accounts_for_them() {
    // 3 blocks: A's two cached blocks are evictable; B reuses one of them and needs two
    // fresh blocks: only the free one and A's other block can provide them.
    let mut bm = manager(3);
    let a = tokens(1, 8);
    run_prefill(&mut bm, 1, &a);
    bm.free(RequestId(1));
    let mut b = a[..4].to_vec();
    b.extend(tokens(2, 8));
    let h = hashes(&b);
    let hit = bm.find_cached_prefix(&h, b.len());
    assert_eq!(hit.num_tokens(), 4);
    bm.allocate_new(RequestId(2), &hit, b.len(), StartKind::Fresh)
        .unwrap();
    bm.check_invariants().unwrap();
    assert_eq!(bm.num_free_blocks(), 0);
    // And one too many is refused without touching the cache.
    bm.free(RequestId(2));
    let mut c = a[..4].to_vec();
    c.extend(tokens(3, 12));
    let hit = bm.find_cached_prefix(&hashes(&c), c.len());
    assert_eq!(hit.num_tokens(), 4);
    let err = bm
        .allocate_new(RequestId(3), &hit, c.len(), StartKind::Fresh)
        .unwrap_err();
    assert_eq!(
        err,
        AllocError::OutOfBlocks {
            needed: 3,
            available: 2
        }
    );
    assert!(bm.is_cached(hashes(&a)[0]));
    bm.check_invariants().unwrap();
}

#[test]
fn a_stale_hit_is_refused() {
    let mut bm = manager(2);
    let a = tokens(1, 5);
    run_prefill(&mut bm, 1, &a);
    bm.free(RequestId(1));
    let hit = bm.find_cached_prefix(&hashes(&a), a.len());
    assert_eq!(hit.num_tokens(), 4);
    // Someone else takes the whole pool, evicting the hit block.
    bm.allocate_new(
        RequestId(2),
        &bm.find_cached_prefix(&[], 8),
        8,
        StartKind::Fresh,
    )
    .unwrap();
    assert_eq!(
        bm.allocate_new(RequestId(3), &hit, 5, StartKind::Fresh),
        Err(AllocError::StalePrefix)
    );
    bm.check_invariants().unwrap();
}

#[test]
fn a_duplicate_computation_is_not_cached_twice() {
    let mut bm = manager(8);
    let a = tokens(1, 8);
    // Both start before either has computed anything: no hit for either.
    let h = hashes(&a);
    for id in [1, 2] {
        let hit = bm.find_cached_prefix(&h, a.len());
        assert_eq!(hit.num_tokens(), 0);
        bm.allocate_new(RequestId(id), &hit, a.len(), StartKind::Fresh)
            .unwrap();
    }
    bm.commit_computed(RequestId(1), &a, &h).unwrap();
    bm.commit_computed(RequestId(2), &a, &h).unwrap();
    assert_eq!(stored(&bm.drain_events()), h, "stored once");
    bm.check_invariants().unwrap();
    bm.free(RequestId(2));
    let st = bm.stats();
    assert_eq!(
        (st.evictable, st.free_uncached),
        (0, 6),
        "duplicates go to the free list"
    );
    bm.free(RequestId(1));
    assert_eq!(bm.stats().evictable, 2);
    bm.check_invariants().unwrap();
}

#[test]
fn partial_commits_only_register_full_blocks() {
    let mut bm = manager(8);
    let a = tokens(1, 10);
    let h = hashes(&a);
    bm.allocate_new(
        RequestId(1),
        &bm.find_cached_prefix(&h, 10),
        6,
        StartKind::Fresh,
    )
    .unwrap();
    bm.commit_computed(RequestId(1), &a[..6], &h).unwrap();
    assert_eq!(stored(&bm.drain_events()), vec![h[0]]);
    bm.grow(RequestId(1), 10).unwrap();
    bm.commit_computed(RequestId(1), &a[..10], &h).unwrap();
    let events = bm.drain_events();
    assert_eq!(stored(&events), vec![h[1]]);
    match &events[0] {
        KvEvent::BlockStored {
            parent_block_hash,
            token_ids,
            ..
        } => {
            assert_eq!(*parent_block_hash, Some(h[0]));
            assert_eq!(token_ids.as_slice(), &a[4..8]);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn without_prefix_caching_nothing_is_cached_or_published() {
    let mut bm = BlockManager::new(BlockManagerConfig {
        num_blocks: 8,
        block_size: BlockSize::new(BS).unwrap(),
        enable_prefix_caching: false,
    });
    let a = tokens(1, 9);
    run_prefill(&mut bm, 1, &a);
    bm.free(RequestId(1));
    assert!(bm.drain_events().is_empty());
    assert_eq!(bm.find_cached_prefix(&hashes(&a), 9).num_tokens(), 0);
    assert_eq!(bm.stats().cached, 0);
    assert_eq!(bm.num_free_blocks(), 8);
    bm.check_invariants().unwrap();
}

#[test]
fn evict_all_cached_empties_the_cache() {
    let mut bm = manager(8);
    let a = tokens(1, 9);
    run_prefill(&mut bm, 1, &a);
    bm.free(RequestId(1));
    bm.drain_events();
    assert_eq!(bm.evict_all_cached(), 2);
    let h = hashes(&a);
    assert_eq!(removed(&bm.drain_events()), vec![h[1], h[0]]);
    assert_eq!(bm.stats().free_uncached, 8);
    bm.check_invariants().unwrap();
    assert_eq!(BlockId(3).to_string(), "b3");
}
