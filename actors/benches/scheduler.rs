//! Scheduler overhead per step: the CPU time the worker spends planning and applying a step,
//! which is pure overhead next to the forward pass it plans.
//!
//! `decode_step/256`: 256 sequences decoding (context ~512 tokens, 16-token blocks); one
//! iteration = 32 steps of `schedule` + `on_step_done` with a fixed sampled token (divide
//! the time by 32 for one step; throughput counts sequence-steps).
//! `mixed_run/64req`: 64 requests (256-token prompts from 4 shared 128-token prefixes, 64
//! tokens each) from arrival to completion under a 2048-token budget; reported per request.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;
use turbine_actors::ids::{RequestId, TokenId};
use turbine_actors::kv::hash::BlockSize;
use turbine_actors::protocol::{PreprocessedRequest, SamplingParams, StopConditions};
use turbine_actors::worker::{
    BlockManager, BlockManagerConfig, SampledToken, Scheduler, SchedulerConfig,
};

fn scheduler(num_blocks: u32, max_num_seqs: usize) -> Scheduler {
    Scheduler::new(
        SchedulerConfig {
            max_num_batched_tokens: 2048,
            max_num_seqs,
            max_model_len: 4096,
            enable_chunked_prefill: true,
            contended_prefill_chunk: usize::MAX,
        },
        BlockManager::new(BlockManagerConfig {
            num_blocks,
            block_size: BlockSize::DEFAULT,
            enable_prefix_caching: true,
        }),
    )
    .expect("valid config")
}

fn request(id: u64, prompt: Vec<TokenId>, max_tokens: u32) -> PreprocessedRequest {
    PreprocessedRequest {
        id: RequestId(id),
        token_ids: prompt,
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens,
            stop_token_ids: vec![],
            ignore_eos: true,
        },
        logprobs: None,
        salt: 0,
        generated_before: 0,
        images: Vec::new(),
        embeds: None,
    }
}

/// One step with every sampled token set to `id % 50_000` (no model).
fn step(s: &mut Scheduler, t: u64) -> usize {
    let now = Duration::from_millis(t);
    let plan = s.schedule(now).expect("no step in flight");
    let sampled: Vec<SampledToken> = plan
        .seqs
        .iter()
        .filter(|e| e.want_logits)
        .map(|e| SampledToken::new(e.request, (e.request.0 % 50_000) as TokenId))
        .collect();
    s.on_step_done(&plan, &sampled, now)
        .expect("completes its own step")
        .len()
}

fn decode_step(c: &mut Criterion) {
    let mut s = scheduler(16_384, 256);
    for id in 0..256u64 {
        let prompt = (0..512).map(|i| (id * 1000 + i) as TokenId).collect();
        s.add_request(request(id, prompt, 3000), Duration::ZERO)
            .expect("fits");
    }
    let mut t = 0;
    while s.running().len() < 256 || s.num_waiting() > 0 {
        step(&mut s, t);
        t += 1;
    }
    step(&mut s, t); // every sequence now decodes
    let mut g = c.benchmark_group("decode_step");
    // One iteration = STEPS consecutive decode steps from a clone (the clone is not timed).
    const STEPS: u64 = 32;
    g.throughput(Throughput::Elements(256 * STEPS));
    g.bench_function("256", |b| {
        b.iter_batched_ref(
            || s.clone(),
            |s| {
                for k in 1..=STEPS {
                    black_box(step(s, t + k));
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn mixed_run(c: &mut Criterion) {
    let requests: Vec<PreprocessedRequest> = (0..64u64)
        .map(|id| {
            let family = id % 4;
            let mut p: Vec<TokenId> = (0..128).map(|i| (family * 1000 + i) as TokenId).collect();
            p.extend((0..128).map(|i| (100_000 + id * 1000 + i) as TokenId));
            request(id, p, 64)
        })
        .collect();
    let mut g = c.benchmark_group("mixed_run");
    g.throughput(Throughput::Elements(64));
    g.bench_function("64req", |b| {
        b.iter(|| {
            let mut s = scheduler(1024, 32);
            for r in &requests {
                s.add_request(r.clone(), Duration::ZERO).expect("fits");
            }
            let mut t = 0;
            while !s.is_idle() {
                step(&mut s, t);
                t += 1;
            }
            black_box(t)
        })
    });
    g.finish();
}

criterion_group!(benches, decode_step, mixed_run);
criterion_main!(benches);
