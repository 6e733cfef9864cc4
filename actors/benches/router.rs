//! Criterion bench of a full router decision (find_matches + KV policy over 1,000 workers)
//! at the goal scale, plus the prompt hashing that precedes it.

mod common;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::time::Duration;
use turbine_actors::ids::{RequestId, WorkerId};
use turbine_actors::kv::hash::{hash_blocks, BlockSize};
use turbine_actors::router::{KvRouter, PolicyKind, RouteRequest, RouterConfig, RouterReplicaId};

fn benches(c: &mut Criterion) {
    let w = common::goal_scale(7);
    let ix = common::ingest(&w, 2);
    let mut g = c.benchmark_group("router");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for (name, policy, temperature) in [
        ("kv_argmin", PolicyKind::Kv, 0.0),
        ("kv_softmax", PolicyKind::Kv, 1.0),
        ("round_robin", PolicyKind::RoundRobin, 0.0),
    ] {
        let config = RouterConfig {
            policy,
            temperature,
            ..RouterConfig::default()
        };
        let Ok(mut router) = KvRouter::new(RouterReplicaId(0), config, Some(ix.clone())) else {
            return;
        };
        for wk in 0..w.workers as u64 {
            router.add_worker(WorkerId(wk));
            router.update_load(WorkerId(wk), (wk * 37) % 4_000, (wk % 64) as u32);
        }
        let requests: Vec<RouteRequest> = w
            .chains
            .iter()
            .enumerate()
            .map(|(i, ch)| RouteRequest {
                id: RequestId(i as u64),
                hashes: ch[..1024].to_vec(),
                token_count: 1024 * 16,
                avoid: Vec::new(),
                overrides: Default::default(),
            })
            .collect();
        let mut i = 0usize;
        g.bench_function(format!("select_1000_workers_1024_blocks_{name}"), |b| {
            b.iter(|| {
                i = (i + 1) % requests.len();
                black_box(router.select(Duration::ZERO, &requests[i]))
            })
        });
    }
    let tokens: Vec<u32> = (0..16_384u32).collect();
    g.bench_function("hash_blocks_16k_tokens", |b| {
        b.iter(|| black_box(hash_blocks(&tokens, BlockSize::DEFAULT, 0)))
    });
    g.finish();
}

criterion_group!(router, benches);
criterion_main!(router);
