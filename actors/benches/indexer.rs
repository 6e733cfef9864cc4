//! Criterion benches of the FlashIndexer at the goal scale (1,000 workers, ~1M blocks):
//! ingestion of all block events, and `find_matches` for 256/1,024/2,048-block prompts.
//! Means only; p50/p99 come from `examples/indexer_bench.rs`.

mod common;

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::time::Duration;

fn benches(c: &mut Criterion) {
    let w = common::goal_scale(7);
    let mut g = c.benchmark_group("indexer_ingest");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(w.block_events as u64));
    for threads in [1usize, 2] {
        g.bench_function(format!("all_block_events_{threads}_threads"), |b| {
            b.iter_batched(
                || (),
                |_| common::ingest(&w, threads),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();

    let ix = common::ingest(&w, 2);
    let mut g = c.benchmark_group("indexer_find_matches");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for blocks in [256usize, 1024, 2048] {
        let mut i = 0usize;
        g.bench_function(format!("prompt_{blocks}_blocks"), |b| {
            b.iter(|| {
                i = (i + 1) % w.chains.len();
                black_box(ix.find_matches(&w.chains[i][..blocks]))
            })
        });
    }
    g.finish();
}

criterion_group!(indexer, benches);
criterion_main!(indexer);
