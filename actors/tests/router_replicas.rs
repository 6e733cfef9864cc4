//! KvRouter: events-mode routing end to end, load accounting, and replicas converging
//! through RouterEvents.

use std::sync::Arc;
use std::time::Duration;
use turbine_actors::ids::{RequestId, WorkerId};
use turbine_actors::kv::approx::ApproxConfig;
use turbine_actors::kv::hash::{hash_blocks, BlockSize};
use turbine_actors::kv::indexer::FlashIndexer;
use turbine_actors::kv::{KvEvent, KvEventBatch};
use turbine_actors::router::replica_sync::start_replica_sync;
use turbine_actors::router::service::RouterCore;
use turbine_actors::router::{
    KvRouter, RouteError, RouteRequest, RouterConfig, RouterEvent, RouterIndexMode,
    RouterReplicaId, WorkerLoad,
};
use turbine_runtime::discovery::{Discovery, EmbeddedDiscovery, EmbeddedRegistry};
use turbine_runtime::{MetricsRegistry, Node, NodeConfig, RuntimeMetrics, TokioClock};

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| seed * 1_000_003 + i).collect()
}

fn request(id: u64, tokens: &[u32]) -> RouteRequest {
    RouteRequest {
        id: RequestId(id),
        hashes: hash_blocks(tokens, BlockSize::DEFAULT, 0),
        token_count: tokens.len(),
        avoid: Vec::new(),
        overrides: Default::default(),
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

#[test]
fn approximate_mode_forgets_a_prefix_after_its_ttl_and_a_reroute_renews_it() {
    let mut r = KvRouter::new(RouterReplicaId(1), approx_config(), None).unwrap();
    for w in 1..=3 {
        r.add_worker(WorkerId(w));
    }
    let family = prompt(5, 160); // 10 blocks
    let first = r.route(at(0), &request(1, &family)).unwrap().decision;
    assert_eq!(first.overlap_blocks, 0);
    let holder = first.worker;
    r.on_request_finished(RequestId(1)).unwrap();
    // A longer prompt of the same family, within the TTL: routed to the holder, 10 cached.
    let longer = prompt(5, 256);
    let again = r.select(at(59), &request(2, &longer)).unwrap();
    assert_eq!((again.worker, again.overlap_blocks), (holder, 10));
    let scores = r.find_matches(at(59), &request(2, &longer).hashes);
    assert_eq!(scores.get(holder), 10);
    // At the TTL (stored at 0, ttl 60) it counts as absent, before any cleanup ran.
    assert_eq!(
        r.find_matches(at(60), &request(2, &longer).hashes)
            .get(holder),
        0
    );
    assert_eq!(r.index_size(), 10, "not yet pruned from memory");
    r.expire(at(60));
    assert_eq!(r.index_size(), 0, "pruned once expired");

    // Renewal: route at 0, again at 50 (same worker: it holds it), and the prefix lives
    // until 110, not 60.
    let first = r.route(at(100), &request(3, &family)).unwrap().decision;
    r.on_request_finished(RequestId(3)).unwrap();
    let renew = r.route(at(150), &request(4, &family)).unwrap().decision;
    r.on_request_finished(RequestId(4)).unwrap();
    assert_eq!((renew.worker, renew.overlap_blocks), (first.worker, 10));
    let h = request(5, &family).hashes;
    assert_eq!(r.find_matches(at(200), &h).get(first.worker), 10);
    r.expire(at(200));
    assert_eq!(
        r.index_size(),
        10,
        "the renewed entries outlive the first expiry"
    );
    assert_eq!(r.find_matches(at(210), &h).get(first.worker), 0);
    r.expire(at(210));
    assert_eq!(r.index_size(), 0);
}

#[test]
fn approximate_mode_prunes_as_it_routes_so_memory_follows_the_ttl_window() {
    let mut r = KvRouter::new(
        RouterReplicaId(1),
        RouterConfig {
            index: RouterIndexMode::Approximate(ApproxConfig { ttl_secs: 10.0 }),
            ..RouterConfig::default()
        },
        None,
    )
    .unwrap();
    r.add_worker(WorkerId(1));
    r.add_worker(WorkerId(2));
    // One new 4-block prompt per second for 100 s, never expired by hand: routing itself
    // prunes, so at most ~ttl seconds of prompts stay in memory.
    let mut most = 0;
    for i in 0..100u64 {
        let req = request(i, &prompt(1000 + i as u32, 64));
        r.route(at(i), &req).unwrap();
        r.on_request_finished(RequestId(i)).unwrap();
        most = most.max(r.index_size());
    }
    assert!(
        most <= 11 * 4,
        "held {most} blocks for a 10 s window of 4-block prompts"
    );
    assert!(r.index_size() >= 9 * 4);
}

#[test]
fn a_replica_learns_approximate_entries_from_a_peer_and_they_expire_there_too() {
    let mut a = KvRouter::new(RouterReplicaId(1), approx_config(), None).unwrap();
    let mut b = KvRouter::new(RouterReplicaId(2), approx_config(), None).unwrap();
    for r in [&mut a, &mut b] {
        r.add_worker(WorkerId(1));
        r.add_worker(WorkerId(2));
    }
    let req = request(1, &prompt(9, 128));
    let routed = a.route(at(0), &req).unwrap();
    b.apply_router_event(at(0), &routed.event);
    let w = routed.decision.worker;
    assert_eq!(b.find_matches(at(30), &req.hashes).get(w), 8);
    assert_eq!(b.find_matches(at(60), &req.hashes).get(w), 0);
    b.expire(at(60));
    assert_eq!(b.index_size(), 0);
}

#[test]
fn busy_workers_are_skipped_and_all_busy_is_a_typed_answer_with_the_hold_time() {
    let config = RouterConfig {
        busy_threshold: Some(2),
        queue_timeout_ms: 750,
        ..RouterConfig::default()
    };
    let mut r = KvRouter::new(RouterReplicaId(0), config, None).unwrap();
    r.add_worker(WorkerId(1));
    r.add_worker(WorkerId(2));
    // Equal costs alternate by load; a worker with 2 requests is left out.
    let tokens = prompt(3, 320);
    let mut workers = Vec::new();
    for i in 0..4 {
        workers.push(
            r.route(at(0), &request(i, &tokens))
                .unwrap()
                .decision
                .worker,
        );
    }
    workers.sort();
    assert_eq!(
        workers,
        [WorkerId(1), WorkerId(1), WorkerId(2), WorkerId(2)]
    );
    assert_eq!(
        r.route(at(0), &request(9, &tokens)).map(|x| x.decision),
        Err(RouteError::AllBusy { hold_ms: 750 })
    );
    assert_eq!(r.metrics().all_busy, 1);
    // A load report counts too: worker 2 says it runs 1 (its two acknowledged, one done).
    r.update_load(WorkerId(2), 20, 1);
    assert_eq!(
        r.route(at(0), &request(10, &tokens))
            .unwrap()
            .decision
            .worker,
        WorkerId(2)
    );
    // With no workers at all it is still NoWorkers (nothing to wait for).
    let mut empty = KvRouter::new(
        RouterReplicaId(0),
        RouterConfig {
            busy_threshold: Some(2),
            ..RouterConfig::default()
        },
        None,
    )
    .unwrap();
    assert_eq!(
        empty.route(at(0), &request(1, &tokens)).map(|x| x.decision),
        Err(RouteError::NoWorkers)
    );
    assert!(KvRouter::new(
        RouterReplicaId(0),
        RouterConfig {
            busy_threshold: Some(0),
            ..RouterConfig::default()
        },
        None
    )
    .is_err());
}

#[test]
fn replicas_key_requests_by_who_routed_them_and_forget_a_lost_peers_requests() {
    let mut a = KvRouter::new(RouterReplicaId(1), RouterConfig::default(), None).unwrap();
    let mut b = KvRouter::new(RouterReplicaId(2), RouterConfig::default(), None).unwrap();
    for r in [&mut a, &mut b] {
        r.add_worker(WorkerId(1));
        r.add_worker(WorkerId(2));
    }
    // Both frontends number their requests from the same id: no collision. B sees A's
    // request in flight before any load report, so it balances against it.
    let from_a = a.route(at(0), &request(7, &prompt(1, 64))).unwrap();
    assert!(b.apply_router_event(at(0), &from_a.event));
    let from_b = b.route(at(0), &request(7, &prompt(2, 64))).unwrap();
    assert_ne!(from_b.decision.worker, from_a.decision.worker);
    assert!(a.apply_router_event(at(0), &from_b.event));
    assert!(!a.apply_router_event(at(0), &from_a.event), "own echo");
    assert_eq!((a.in_flight_count(), b.in_flight_count()), (2, 2));
    assert_eq!(a.loads(), b.loads());
    // One on each worker, in both views.
    assert_eq!(
        b.in_flight_by_worker(),
        vec![(WorkerId(1), 1), (WorkerId(2), 1)]
    );
    // A's finish is A's request 7, not B's.
    let done = a.on_request_finished(RequestId(7)).unwrap();
    b.apply_router_event(at(1), &done);
    assert_eq!((a.in_flight_count(), b.in_flight_count()), (1, 1));
    let w_b = from_b.decision.worker;
    assert_eq!(
        a.in_flight_by_worker().into_iter().find(|(w, _)| *w == w_b),
        Some((w_b, 1))
    );
    // B's events are lost (a gap): A drops B's requests; its own are kept.
    let mine = a.route(at(2), &request(8, &prompt(3, 32))).unwrap();
    assert_eq!(a.forget_replica(RouterReplicaId(2)), 1);
    assert_eq!(a.in_flight_count(), 1);
    assert_eq!(a.forget_replica(RouterReplicaId(1)), 0, "never its own");
    assert!(a.on_request_finished(RequestId(8)).is_some());
    let w = mine.decision.worker;
    assert_eq!(
        a.loads()
            .iter()
            .find(|l| l.worker == w)
            .unwrap()
            .active_requests,
        0
    );
    // A finish for a request it forgot is harmless.
    let late = b.on_request_finished(RequestId(7)).unwrap();
    a.apply_router_event(at(3), &late);
    assert_eq!(a.in_flight_count(), 0);
    assert!(a
        .loads()
        .iter()
        .all(|l| l.active_requests == 0 && l.active_blocks == 0));
}

/// Polls `check` every 20 ms until it holds, failing with `what` after 20 s.
async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} (waited 20 s)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two router replicas on a real event plane: each a [`RouterCore`] with
/// `start_replica_sync` (its own ZeroMQ PUB socket on 127.0.0.1, registered with one embedded
/// registry, subscribed to the other). A worker found unreachable at A is left out at B, a
/// worker found stalled at B is left out at A, and neither mark comes back: a replica applies
/// a peer's mark as its own but never publishes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_and_stall_marks_reach_the_peer_replica_over_zeromq_and_are_not_echoed() {
    let clock = TokioClock::shared();
    let node = Node::in_memory(
        NodeConfig {
            name: "replica-marks".into(),
            ..NodeConfig::default()
        },
        clock.clone(),
        MetricsRegistry::new(),
    );
    let registry = EmbeddedRegistry::serve(&node, "registry", Duration::from_millis(100))
        .await
        .unwrap();
    let discovery: Arc<dyn Discovery> = Arc::new(EmbeddedDiscovery::new(
        registry.addr().clone(),
        clock.clone(),
    ));
    let metrics = RuntimeMetrics::new(&MetricsRegistry::new());
    let workers = [WorkerId(1), WorkerId(2), WorkerId(3)];
    let replica = |id: u64| {
        let index = Arc::new(FlashIndexer::default());
        let router = KvRouter::new(
            RouterReplicaId(id),
            RouterConfig::default(),
            Some(index.clone()),
        )
        .unwrap();
        let core = RouterCore::new(router, index, clock.clone());
        for w in workers {
            core.add_worker(w);
        }
        core
    };
    let (a, b) = (replica(1), replica(2));
    let mut syncs = Vec::new();
    for core in [&a, &b] {
        syncs.push(
            start_replica_sync(
                core.clone(),
                "tcp://127.0.0.1:0",
                discovery.clone(),
                Duration::from_secs(5),
                metrics.clone(),
            )
            .await
            .unwrap(),
        );
    }
    until("the replicas never followed each other", || {
        a.replica_stats().peers == 1 && b.replica_stats().peers == 1
    })
    .await;
    // PUB/SUB drops what is published before a subscription reaches the publisher: route
    // and finish warm-up requests on each side until the other has applied some.
    let mut next_id = 1_000u64;
    for (from, to) in [(&a, &b), (&b, &a)] {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while to.replica_stats().events_applied == 0 {
            assert!(std::time::Instant::now() < deadline, "no events arrived");
            next_id += 1;
            let warm = request(next_id, &prompt(99, 32));
            from.route(&warm).unwrap();
            from.finished(warm.id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    until("warm-up requests stayed in flight", || {
        a.in_flight_by_worker().iter().all(|(_, n)| *n == 0)
            && b.in_flight_by_worker().iter().all(|(_, n)| *n == 0)
    })
    .await;
    // Whatever was in the pipes has arrived once both views are empty and stay so.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (a0, b0) = (
        a.replica_stats().events_applied,
        b.replica_stats().events_applied,
    );

    // Worker 1 holds the prompt's prefix in B's index: B routes the prompt there while
    // worker 1 is fine.
    let tokens = prompt(5, 160);
    let probe = |id: u64| request(id, &tokens);
    b.apply_kv(&KvEventBatch {
        worker: WorkerId(1),
        seq: 0,
        ts: 0.0,
        events: vec![KvEvent::BlockStored {
            block_hashes: probe(0).hashes[..8].to_vec(),
            parent_block_hash: None,
            token_ids: tokens[..128].to_vec(),
            block_size: BlockSize::DEFAULT,
            lora_id: None,
        }],
    });
    let now = b.now();
    assert_eq!(
        b.lock()
            .find_matches(now, &probe(0).hashes)
            .get(WorkerId(1)),
        8
    );
    assert_eq!(b.route(&probe(0)).unwrap().worker, WorkerId(1));
    b.finished(RequestId(0));

    // 1. A finds worker 1 unreachable (A's own mark, published): B leaves it out too.
    a.unreachable(WorkerId(1));
    assert_eq!(a.routable(), (3, 2));
    until("B never applied A's quarantine mark", || {
        b.routable() == (3, 2)
    })
    .await;
    let routed = b.route(&probe(1)).unwrap();
    assert_ne!(
        routed.worker,
        WorkerId(1),
        "B routes around the worker A quarantined, although it holds the prefix"
    );
    b.finished(RequestId(1));

    // 2. B finds worker 2 stalled (no load report from it ever): A leaves it out too.
    assert!(b.check_stalled(WorkerId(2), Duration::from_secs(1), false));
    assert_eq!(b.routable(), (3, 1));
    // (Counted without worker 1, whose quarantine at A lasts only UNREACHABLE_QUARANTINE.)
    until("A never applied B's stall mark", || {
        a.routable_besides(&[WorkerId(1)]) == 1
    })
    .await;
    let mut avoiding_1 = probe(2);
    avoiding_1.avoid = vec![WorkerId(1)];
    let routed = a.route(&avoiding_1).unwrap();
    assert_eq!(
        routed.worker,
        WorkerId(3),
        "A routes around the worker B found stalled"
    );
    a.finished(RequestId(2));

    // 3. No echo. Since the counts were taken, B published Routed, Finished (probe 0),
    //    Routed, Finished (probe 1, after it had applied A's mark) and Stalled; A published
    //    Unreachable, Routed and Finished (probe 2, after it had applied B's mark). A mark
    //    re-published by the peer would have gone out before that peer's next own event;
    //    once each side has applied the other's events, the counts must be exactly these.
    until("B's events never all reached A", || {
        a.replica_stats().events_applied >= a0 + 5
    })
    .await;
    until("A's events never all reached B", || {
        b.in_flight_by_worker().iter().all(|(_, n)| *n == 0)
            && b.replica_stats().events_applied >= b0 + 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        a.replica_stats().events_applied - a0,
        5,
        "A applied B's two Routed, two Finished and one Stalled, and no Unreachable echoed back"
    );
    assert_eq!(
        b.replica_stats().events_applied - b0,
        3,
        "B applied A's Unreachable, Routed and Finished, and no Stalled echoed back"
    );
    for s in syncs {
        s.stop().await;
    }
}
