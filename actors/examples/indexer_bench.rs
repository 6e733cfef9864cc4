//! Goal measurements for the KV indexer and router that criterion (means only) cannot give:
//! block-event ingestion rate with N threads, and p50/p99 latency of `find_matches` and of a
//! full router decision, at 1,000 workers and ~1M distinct blocks.
//!
//! `cargo run --release -p turbine-actors --example indexer_bench [threads] [runs]`

#[path = "../benches/common/mod.rs"]
mod common;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};
use turbine_actors::ids::{RequestId, WorkerId};
use turbine_actors::router::{KvRouter, RouteRequest, RouterConfig, RouterReplicaId};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let runs: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let t = Instant::now();
    // INDEXER_BENCH_SMALL=1: a cache-resident index (~20k blocks), to separate compute from
    // memory latency.
    let w = if std::env::var_os("INDEXER_BENCH_SMALL").is_some() {
        common::build(1_000, 10, 2_048, 4, 7)
    } else {
        common::goal_scale(7)
    };
    println!(
        "workload: {} workers, {} chains x {} blocks, {} block events in {} batches (built in {:.1?})",
        w.workers,
        w.chains.len(),
        w.chains[0].len(),
        w.block_events,
        w.batches.iter().map(Vec::len).sum::<usize>(),
        t.elapsed()
    );

    let mut rates = Vec::new();
    let mut ix = None;
    for run in 0..runs {
        drop(ix.take());
        let t = Instant::now();
        let built = common::ingest(&w, threads);
        let secs = t.elapsed().as_secs_f64();
        let rate = w.block_events as f64 / secs;
        println!(
            "ingest run {run}: {threads} threads, {:.3}s, {:.2} M block events/s, {} distinct blocks",
            secs,
            rate / 1e6,
            built.block_count()
        );
        rates.push(rate);
        ix = Some(built);
    }
    println!(
        "INGEST median {:.2} M block events/s ({threads} threads)",
        median(rates) / 1e6
    );
    let Some(ix) = ix else { return };

    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for blocks in [256usize, 1024, 2048] {
        let queries = 20_000;
        let mut lat = Vec::with_capacity(queries);
        let mut matched = 0u64;
        let mut holders = 0usize;
        for _ in 0..queries {
            let c = rng.gen_range(0..w.chains.len());
            let q = &w.chains[c][..blocks];
            let t = Instant::now();
            let m = ix.find_matches(q);
            lat.push(t.elapsed());
            matched += u64::from(m.matched_blocks);
            holders += m.scores.len();
        }
        lat.sort();
        println!(
            "FIND_MATCHES {blocks} blocks: p50 {:.2?} p99 {:.2?} max {:.2?} (mean matched {:.0} blocks, {:.1} workers with overlap)",
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            lat[lat.len() - 1],
            matched as f64 / queries as f64,
            holders as f64 / queries as f64
        );
    }

    // The same 1,024-block query again and again: its 64 KB of entries stay in cache, so
    // this separates the walk's compute from memory latency.
    let mut lat = Vec::with_capacity(20_000);
    let q = &w.chains[0][..1024];
    for _ in 0..20_000 {
        let t = Instant::now();
        std::hint::black_box(ix.find_matches(q));
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "FIND_MATCHES 1024 blocks, one chain repeated (cache-warm): p50 {:.2?} p99 {:.2?}",
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );

    let mut router = match KvRouter::new(
        RouterReplicaId(0),
        RouterConfig::default(),
        Some(ix.clone()),
    ) {
        Ok(r) => r,
        Err(e) => panic!("config: {e}"),
    };
    for wk in 0..w.workers as u64 {
        router.add_worker(WorkerId(wk));
        router.update_load(WorkerId(wk), rng.gen_range(0..4_000), rng.gen_range(0..64));
    }
    let mut lat = Vec::new();
    for i in 0..10_000u64 {
        let c = rng.gen_range(0..w.chains.len());
        let req = RouteRequest {
            id: RequestId(i),
            hashes: w.chains[c][..1024].to_vec(),
            token_count: 1024 * 16 + 5,
            avoid: Vec::new(),
            overrides: Default::default(),
        };
        let t = Instant::now();
        let d = router.select(Duration::ZERO, &req);
        lat.push(t.elapsed());
        assert!(d.is_ok());
    }
    lat.sort();
    println!(
        "ROUTER select (1,000 workers, 1,024-block prompt): p50 {:.2?} p99 {:.2?}",
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );
}
