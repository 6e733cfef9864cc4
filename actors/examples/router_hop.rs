//! What the router's request-plane hop costs a frontend in its own process: routing
//! decisions per second through the local `Addr<RouterService>` (the dispatcher's path:
//! `call(Route)` then `cast(Finished)`) against the same calls on `RouterCore` directly.
//!
//! 16 workers, each holding a 64-block prefix of its own in the KV index; every request is
//! 64 blocks, half of them a worker's prefix. Each variant runs `decisions` requests, one
//! at a time, on a current-thread tokio runtime, `runs` times; the median is printed.
//!
//! `cargo run --release -p turbine-actors --example router_hop [decisions] [runs]`

use std::sync::Arc;
use std::time::Instant;
use turbine_actors::ids::{RequestId, WorkerId};
use turbine_actors::kv::indexer::FlashIndexer;
use turbine_actors::kv::{hash_blocks, BlockSize, KvEvent, KvEventBatch};
use turbine_actors::router::service::{RouterCore, RouterReply, RouterRequest};
use turbine_actors::router::{KvRouter, RouteRequest, RouterConfig, RouterReplicaId};
use turbine_runtime::{MetricsRegistry, Node, NodeConfig, TokioClock};

const WORKERS: u64 = 16;
const BLOCKS: usize = 64;

fn tokens(family: u64, n: usize) -> Vec<u32> {
    (0..n as u32 * 16)
        .map(|i| (family as u32).wrapping_mul(7919).wrapping_add(i) % 30_000)
        .collect()
}

fn core() -> Arc<RouterCore> {
    let index = Arc::new(FlashIndexer::default());
    let router = KvRouter::new(
        RouterReplicaId(0),
        RouterConfig::default(),
        Some(index.clone()),
    )
    .expect("default config");
    let core = RouterCore::new(router, index, TokioClock::shared());
    let bs = BlockSize::DEFAULT;
    for w in 0..WORKERS {
        core.add_worker(WorkerId(w));
        let t = tokens(w, BLOCKS);
        core.apply_kv(&KvEventBatch {
            worker: WorkerId(w),
            seq: 0,
            ts: 0.0,
            events: vec![KvEvent::BlockStored {
                block_hashes: hash_blocks(&t, bs, 0),
                parent_block_hash: None,
                token_ids: t,
                block_size: bs,
                lora_id: None,
            }],
        });
    }
    core
}

fn request(i: u64) -> RouteRequest {
    // Half a worker's prefix, then a suffix of its own.
    let mut t = tokens(i % WORKERS, BLOCKS / 2);
    t.extend(tokens(1_000 + i, BLOCKS / 2));
    RouteRequest {
        id: RequestId(i),
        hashes: hash_blocks(&t, BlockSize::DEFAULT, 0),
        token_count: t.len(),
        avoid: Vec::new(),
        overrides: Default::default(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let decisions: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let runs: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let requests: Vec<RouteRequest> = (0..decisions).map(request).collect();
    let (mut direct, mut via_addr) = (Vec::new(), Vec::new());
    rt.block_on(async {
        let node = Node::in_memory(
            NodeConfig {
                name: "bench".into(),
                ..NodeConfig::default()
            },
            TokioClock::shared(),
            MetricsRegistry::new(),
        );
        for run in 0..runs {
            let core = core();
            let t = Instant::now();
            for r in &requests {
                let d = core.route(r).expect("a worker");
                std::hint::black_box(d.worker);
                core.finished(r.id);
            }
            direct.push(decisions as f64 / t.elapsed().as_secs_f64());

            let core = self::core();
            let addr = core
                .serve(&node, &format!("router-{run}"))
                .await
                .expect("serve");
            let t = Instant::now();
            for r in &requests {
                match addr.call(RouterRequest::Route(r.clone())).await {
                    Ok(RouterReply::Routed(Ok(d))) => {
                        std::hint::black_box(d.worker);
                    }
                    other => panic!("unexpected reply {other:?}"),
                }
                addr.cast(RouterRequest::Finished(r.id));
            }
            via_addr.push(decisions as f64 / t.elapsed().as_secs_f64());
            // A call after the casts is served after them: then every Finished is applied.
            let _ = addr.call(RouterRequest::Metrics).await;
            assert_eq!(
                core.lock().in_flight_count(),
                0,
                "every Finished was applied"
            );
        }
    });
    let (d, a) = (median(direct.clone()), median(via_addr.clone()));
    println!("{decisions} decisions x {runs} runs, {WORKERS} workers, {BLOCKS}-block requests");
    println!(
        "direct RouterCore:        runs {direct:.0?} /s, median {d:.0} /s ({:.2} us each)",
        1e6 / d
    );
    println!(
        "local Addr<RouterService>: runs {via_addr:.0?} /s, median {a:.0} /s ({:.2} us each)",
        1e6 / a
    );
    println!(
        "hop: +{:.2} us per decision ({:.2}x the direct call's time)",
        1e6 / a - 1e6 / d,
        d / a
    );
}
