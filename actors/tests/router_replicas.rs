//! KvRouter: events-mode routing end to end, load accounting, and replicas converging
//! through RouterEvents.

use std::sync::Arc;
use std::time::Duration;
use turbine_actors::ids::{RequestId, WorkerId};
use turbine_actors::kv::approx::ApproxConfig;
use turbine_actors::kv::hash::{hash_blocks, BlockSize};
use turbine_actors::kv::indexer::FlashIndexer;
use turbine_actors::kv::{KvEvent, KvEventBatch};
use turbine_actors::router::{
    KvRouter, RouteError, RouteRequest, RouterConfig, RouterEvent, RouterIndexMode,
    RouterReplicaId, WorkerLoad,
};

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| seed * 1_000_003 + i).collect()
}

fn request(id: u64, tokens: &[u32]) -> RouteRequest {
    RouteRequest {
        id: RequestId(id),
        hashes: hash_blocks(tokens, BlockSize::DEFAULT, 0),
        token_count: tokens.len(),
        avoid: Vec::new(),
    }
}

fn at(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn events_mode_routes_to_the_worker_holding_the_prefix_and_tracks_load() {
    let ix = Arc::new(FlashIndexer::default());
    let mut r = KvRouter::new(
        RouterReplicaId(0),
        RouterConfig::default(),
        Some(ix.clone()),
    )
    .unwrap();
    assert_eq!(
        r.route(at(0), &request(1, &prompt(1, 64)))
            .map(|x| x.decision),
        Err(RouteError::NoWorkers)
    );
    for w in 1..=3 {
        r.add_worker(WorkerId(w));
    }
    let tokens = prompt(7, 160); // 10 blocks
    let req = request(1, &tokens);
    ix.apply(&KvEventBatch {
        worker: WorkerId(3),
        seq: 0,
        ts: 0.0,
        events: vec![KvEvent::BlockStored {
            block_hashes: req.hashes[..6].to_vec(),
            parent_block_hash: None,
            token_ids: tokens[..96].to_vec(),
            block_size: BlockSize::DEFAULT,
            lora_id: None,
        }],
    });
    let routed = r.route(at(0), &req).unwrap();
    assert_eq!(routed.decision.worker, WorkerId(3));
    assert_eq!(routed.decision.overlap_blocks, 6);
    let w3 = |r: &KvRouter| {
        r.loads()
            .into_iter()
            .find(|l| l.worker == WorkerId(3))
            .unwrap()
    };
    assert_eq!(w3(&r).active_blocks, 10);
    // The worker's report replaces the estimate; finishing subtracts the request.
    r.update_load(WorkerId(3), 25, 2);
    assert_eq!(w3(&r).active_blocks, 25);
    r.on_request_finished(RequestId(1)).unwrap();
    assert_eq!(
        w3(&r),
        WorkerLoad {
            worker: WorkerId(3),
            active_blocks: 15,
            active_requests: 1
        }
    );
    assert!(r.on_request_finished(RequestId(1)).is_none());
    let m = r.metrics();
    assert_eq!(
        (m.decisions, m.overlap_blocks, m.request_blocks),
        (1, 6, 10)
    );
    assert!((m.hit_rate() - 0.6).abs() < 1e-12);
    assert_eq!(m.no_worker_errors, 1);
    r.remove_worker(WorkerId(3));
    assert_eq!(r.loads().len(), 2);
    assert_eq!(ix.block_count(), 0);
}

fn approx_config() -> RouterConfig {
    RouterConfig {
        index: RouterIndexMode::Approximate(ApproxConfig { ttl_secs: 60.0 }),
        ..RouterConfig::default()
    }
}

#[test]
fn two_replicas_converge_through_router_events() {
    let mut a = KvRouter::new(RouterReplicaId(1), approx_config(), None).unwrap();
    let mut b = KvRouter::new(RouterReplicaId(2), approx_config(), None).unwrap();
    for r in [&mut a, &mut b] {
        for w in 1..=3 {
            r.add_worker(WorkerId(w));
        }
    }
    let mut to_b: Vec<RouterEvent> = Vec::new();
    let mut to_a: Vec<RouterEvent> = Vec::new();
    for i in 0..12u64 {
        let req = request(i, &prompt((i % 4) as u32, 64 + 16 * i as usize));
        if i % 2 == 0 {
            to_b.push(a.route(at(i), &req).unwrap().event);
        } else {
            to_a.push(b.route(at(i), &req).unwrap().event);
        }
    }
    // Finish a few on each side.
    to_b.extend(
        [0u64, 4]
            .iter()
            .filter_map(|r| a.on_request_finished(RequestId(*r))),
    );
    to_a.extend(
        [1u64]
            .iter()
            .filter_map(|r| b.on_request_finished(RequestId(*r))),
    );
    // Events survive the wire.
    let wire = |evs: Vec<RouterEvent>| -> Vec<RouterEvent> {
        evs.iter()
            .map(|e| RouterEvent::from_msgpack(&e.to_msgpack().unwrap()).unwrap())
            .collect()
    };
    let (to_a, to_b) = (wire(to_a), wire(to_b));
    for e in &to_b {
        b.apply_router_event(at(20), e);
        b.apply_router_event(at(20), e); // duplicates are harmless
    }
    for e in &to_a {
        a.apply_router_event(at(20), e);
    }
    // Own events echoed back are ignored.
    for e in &to_b {
        a.apply_router_event(at(20), e);
    }
    assert_eq!(a.loads(), b.loads());
    assert_eq!(a.in_flight_count(), 12 - 3);
    assert_eq!(b.in_flight_count(), 12 - 3);
    // B learned where A sent request 2's prompt: same overlap answer on both.
    let req = request(99, &prompt(2, 96));
    assert_eq!(
        a.find_matches(at(21), &req.hashes),
        b.find_matches(at(21), &req.hashes)
    );
    assert!(b.find_matches(at(21), &req.hashes).matched_blocks > 0);
    // Both then make the same decision for the same request.
    assert_eq!(
        a.select(at(21), &req).unwrap().worker,
        b.select(at(21), &req).unwrap().worker
    );
}
