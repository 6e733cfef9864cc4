//! Routing policies: cost arithmetic, ties, seeded sampling, baselines, typed errors.

use std::time::Duration;
use turbine_actors::ids::{RequestId, WorkerId};
use turbine_actors::kv::hash::{BlockHash, BlockSize};
use turbine_actors::kv::indexer::OverlapScores;
use turbine_actors::router::{
    KvPolicy, OverrideError, Policy, PolicyKind, RandomPolicy, RoundRobinPolicy, RouteError,
    RouteOverrides, RouteRequest, RouterConfig, RouterConfigError, RouterIndexMode, RoutingPolicy,
    WorkerLoad,
};

const T0: Duration = Duration::ZERO;

fn request(blocks: u64) -> RouteRequest {
    RouteRequest {
        id: RequestId(1),
        hashes: (0..blocks).map(BlockHash).collect(),
        token_count: blocks as usize * 16,
        avoid: Vec::new(),
        overrides: Default::default(),
    }
}

fn load(w: u64, active_blocks: u64) -> WorkerLoad {
    WorkerLoad {
        worker: WorkerId(w),
        active_blocks,
        active_requests: 0,
    }
}

fn overlaps(pairs: &[(u64, u32)]) -> OverlapScores {
    OverlapScores::from_pairs(pairs.iter().map(|(w, s)| (WorkerId(*w), *s)).collect())
}

fn kv(weight: f64) -> KvPolicy {
    KvPolicy::new(weight, 0.0, BlockSize::DEFAULT, 0)
}

#[test]
fn overlap_wins_when_prefill_saving_exceeds_load() {
    // w1: 10 - 8 = 2 prefill + 4 load = 6; w2: 10 + 0 = 10.
    let d = kv(1.0)
        .select(
            T0,
            &request(10),
            &[load(1, 4), load(2, 0)],
            &overlaps(&[(1, 8)]),
        )
        .unwrap();
    assert_eq!(d.worker, WorkerId(1));
    assert_eq!((d.overlap_blocks, d.request_blocks), (8, 10));
    assert_eq!(d.cost, 6.0);
}

#[test]
fn load_wins_when_cached_worker_is_busy() {
    // w1: 2 + 20 = 22; w2: 10.
    let d = kv(1.0)
        .select(
            T0,
            &request(10),
            &[load(1, 20), load(2, 0)],
            &overlaps(&[(1, 8)]),
        )
        .unwrap();
    assert_eq!(d.worker, WorkerId(2));
    assert_eq!(d.overlap_blocks, 0);
    // A heavier overlap weight tips it back: w1 3*2 + 20 = 26 < w2 3*10 = 30.
    let d = kv(3.0)
        .select(
            T0,
            &request(10),
            &[load(1, 20), load(2, 0)],
            &overlaps(&[(1, 8)]),
        )
        .unwrap();
    assert_eq!(d.worker, WorkerId(1));
}

#[test]
fn ties_go_to_lower_load_then_lower_id_whatever_the_input_order() {
    // Equal cost 8: w1 = 8 prefill + 0 load, w2 = 6 prefill + 2 load -> lower load wins.
    let o = overlaps(&[(1, 2), (2, 4)]);
    for workers in [[load(1, 0), load(2, 2)], [load(2, 2), load(1, 0)]] {
        let d = kv(1.0).select(T0, &request(10), &workers, &o).unwrap();
        assert_eq!(d.worker, WorkerId(1));
    }
    // Equal cost and load -> lower id.
    for workers in [[load(7, 3), load(5, 3)], [load(5, 3), load(7, 3)]] {
        let d = kv(1.0)
            .select(T0, &request(4), &workers, &OverlapScores::default())
            .unwrap();
        assert_eq!(d.worker, WorkerId(5));
    }
}

#[test]
fn softmax_sampling_is_reproducible_from_the_seed() {
    let workers: Vec<WorkerLoad> = (1..=4).map(|w| load(w, w * 3)).collect();
    let o = overlaps(&[(2, 5), (3, 1)]);
    let run = |seed: u64| -> Vec<WorkerId> {
        let mut p = KvPolicy::new(1.0, 5.0, BlockSize::DEFAULT, seed);
        (0..64)
            .map(|_| p.select(T0, &request(10), &workers, &o).unwrap().worker)
            .collect()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
    // Every worker gets picked sometimes at this temperature...
    let picks = run(42);
    for w in 1..=4 {
        assert!(picks.contains(&WorkerId(w)), "worker {w} never sampled");
    }
    // ...and a near-zero temperature always picks the cheapest (w2: 5 + 6 = 11).
    let mut cold = KvPolicy::new(1.0, 1e-9, BlockSize::DEFAULT, 1);
    for _ in 0..32 {
        assert_eq!(
            cold.select(T0, &request(10), &workers, &o).unwrap().worker,
            WorkerId(2)
        );
    }
}

#[test]
fn no_workers_is_a_typed_error_for_every_policy() {
    let r = request(3);
    let none = OverlapScores::default();
    let mut policies: Vec<Box<dyn RoutingPolicy>> = vec![
        Box::new(kv(1.0)),
        Box::new(KvPolicy::new(1.0, 2.0, BlockSize::DEFAULT, 0)),
        Box::new(RoundRobinPolicy::new(1.0, BlockSize::DEFAULT)),
        Box::new(RandomPolicy::new(0, 1.0, BlockSize::DEFAULT)),
    ];
    for p in policies.iter_mut() {
        assert_eq!(p.select(T0, &r, &[], &none), Err(RouteError::NoWorkers));
    }
}

#[test]
fn round_robin_cycles_in_id_order_and_random_is_seeded() {
    let workers = [load(3, 0), load(1, 0), load(2, 0)];
    let none = OverlapScores::default();
    let mut rr = RoundRobinPolicy::new(1.0, BlockSize::DEFAULT);
    let picks: Vec<u64> = (0..6)
        .map(|_| {
            rr.select(T0, &request(1), &workers, &none)
                .unwrap()
                .worker
                .0
        })
        .collect();
    assert_eq!(picks, vec![1, 2, 3, 1, 2, 3]);
    let run = |seed| -> Vec<WorkerId> {
        let mut p = RandomPolicy::new(seed, 1.0, BlockSize::DEFAULT);
        (0..32)
            .map(|_| p.select(T0, &request(1), &workers, &none).unwrap().worker)
            .collect()
    };
    assert_eq!(run(9), run(9));
    assert!((1..=3).all(|w| run(9).contains(&WorkerId(w))));
}

#[test]
fn partial_trailing_block_counts_as_prefill_work() {
    let r = RouteRequest {
        id: RequestId(1),
        hashes: vec![BlockHash(1)],
        token_count: 20,
        avoid: Vec::new(),
        overrides: Default::default(),
    };
    assert_eq!(r.blocks(BlockSize::DEFAULT), 2);
}

#[test]
fn config_parses_with_defaults_and_validates() {
    let c: RouterConfig = serde_json::from_str(
        r#"{"policy":"round_robin","overlap_weight":2.5,"seed":7,
            "index":{"mode":"approximate","ttl_secs":30}}"#,
    )
    .unwrap();
    assert_eq!(c.policy, PolicyKind::RoundRobin);
    assert_eq!(c.overlap_weight, 2.5);
    assert_eq!(c.temperature, 0.0);
    assert_eq!(c.block_size, BlockSize::DEFAULT);
    assert!(matches!(c.index, RouterIndexMode::Approximate(ref a) if a.ttl_secs == 30.0));
    assert!(matches!(Policy::from_config(&c), Policy::RoundRobin(_)));
    assert_eq!(
        serde_json::from_str::<RouterConfig>("{}").unwrap(),
        RouterConfig::default()
    );
    assert!(serde_json::from_str::<RouterConfig>(r#"{"polcy":"kv"}"#).is_err());
    let bad = RouterConfig {
        temperature: -1.0,
        ..RouterConfig::default()
    };
    assert_eq!(bad.validate(), Err(RouterConfigError::Temperature(-1.0)));
}

#[test]
fn per_request_overrides_replace_the_configured_weight_and_temperature() {
    let workers = [load(1, 4), load(2, 0)];
    let cached = overlaps(&[(1, 8)]);
    let with = |overlap_weight, temperature| RouteRequest {
        overrides: RouteOverrides {
            overlap_weight,
            temperature,
        },
        ..request(10)
    };
    // Configured weight 1: w1 costs 2 + 4 = 6, w2 costs 10; w1 wins.
    let mut p = kv(1.0);
    assert_eq!(
        p.select(T0, &with(None, None), &workers, &cached)
            .unwrap()
            .worker,
        WorkerId(1)
    );
    // Weight 0 for this request only: load alone decides (w1 4, w2 0).
    let d = p
        .select(T0, &with(Some(0.0), None), &workers, &cached)
        .unwrap();
    assert_eq!((d.worker, d.cost), (WorkerId(2), 0.0));
    // The next request without an override is back to the configured weight.
    assert_eq!(
        p.select(T0, &with(None, None), &workers, &cached)
            .unwrap()
            .worker,
        WorkerId(1)
    );
    // A high weight makes the cached worker win even when it is far busier.
    let busy = [load(1, 30), load(2, 0)];
    assert_eq!(
        p.select(T0, &with(None, None), &busy, &cached)
            .unwrap()
            .worker,
        WorkerId(2)
    );
    assert_eq!(
        p.select(T0, &with(Some(5.0), None), &busy, &cached)
            .unwrap()
            .worker,
        WorkerId(1)
    );
    // Temperature 0 configured, a large one for this request: both workers get picked,
    // and the same seed gives the same sequence.
    let picks = |seed| {
        let mut p = KvPolicy::new(1.0, 0.0, BlockSize::DEFAULT, seed);
        (0..64)
            .map(|_| {
                p.select(T0, &with(None, Some(1e6)), &workers, &cached)
                    .unwrap()
                    .worker
            })
            .collect::<Vec<_>>()
    };
    let a = picks(3);
    assert!(
        a.contains(&WorkerId(1)) && a.contains(&WorkerId(2)),
        "{a:?}"
    );
    assert_eq!(a, picks(3));
    // A configured temperature is turned off by an override of 0.
    let mut hot = KvPolicy::new(1.0, 1e6, BlockSize::DEFAULT, 3);
    for _ in 0..32 {
        let d = hot
            .select(T0, &with(None, Some(0.0)), &workers, &cached)
            .unwrap();
        assert_eq!(d.worker, WorkerId(1));
    }
    // Out of range is a typed error at validation, and the policy never uses it.
    let bad = RouteOverrides {
        overlap_weight: Some(-1.0),
        temperature: None,
    };
    assert_eq!(bad.validate(), Err(OverrideError::OverlapWeight(-1.0)));
    let nan = RouteOverrides {
        overlap_weight: None,
        temperature: Some(f64::NAN),
    };
    assert!(matches!(nan.validate(), Err(OverrideError::Temperature(_))));
    assert_eq!(
        p.select(T0, &with(Some(-1.0), None), &workers, &cached)
            .unwrap()
            .worker,
        WorkerId(1)
    );
    // The baselines report their choice's cost with the request's weight.
    let mut rr = RoundRobinPolicy::new(1.0, BlockSize::DEFAULT);
    let d = rr
        .select(T0, &with(Some(0.0), None), &workers, &cached)
        .unwrap();
    assert_eq!((d.worker, d.cost), (WorkerId(1), 4.0));
}

#[test]
fn overrides_travel_in_the_route_request_to_a_remote_router() {
    let req = RouteRequest {
        overrides: RouteOverrides {
            overlap_weight: Some(0.5),
            temperature: Some(2.0),
        },
        ..request(3)
    };
    let bytes = rmp_serde::to_vec(&req).unwrap();
    let back: RouteRequest = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(back, req);
}
