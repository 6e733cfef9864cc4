//! Cost of sampling one token from a SmolLM2-sized vocabulary (49,152 logits), per request
//! per step: it runs on the executor's thread once per sequence that wants a token, so at
//! batch 32 it is paid 32 times per decode step.
//!
//! `cargo bench -p turbine-kernels --bench sampling`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use turbine_kernels::sampling::{Sampler, SamplingParams};

/// Logits shaped like a language model's: a few likely tokens, a long tail.
fn lm_like_logits(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            // Mostly around -2..2, with a handful of large values.
            let base = (u - 0.5) * 4.0;
            if (s >> 20) % 997 == 0 {
                base + 12.0
            } else {
                base
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let logits = lm_like_logits(49_152, 7);
    let cases = [
        ("greedy", SamplingParams::greedy()),
        (
            "temperature_1",
            SamplingParams {
                temperature: 1.0,
                seed: 1,
                ..SamplingParams::default()
            },
        ),
        (
            "top_p_0.9",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
                seed: 1,
                ..SamplingParams::default()
            },
        ),
        (
            "top_k_40",
            SamplingParams {
                temperature: 0.8,
                top_k: 40,
                seed: 1,
                ..SamplingParams::default()
            },
        ),
        (
            "top_logprobs_5",
            SamplingParams {
                temperature: 1.0,
                top_logprobs: 5,
                seed: 1,
                ..SamplingParams::default()
            },
        ),
    ];
    let mut g = c.benchmark_group("sample_49152");
    for (name, params) in cases {
        let mut s = Sampler::new(params.clone()).expect("valid params");
        g.bench_function(format!("{name}/with_logprobs"), |b| {
            b.iter(|| s.sample(black_box(&logits), &[]).expect("sample"))
        });
        // The serving path when the request asks for no logprobs.
        let mut s = Sampler::new(params)
            .expect("valid params")
            .without_logprobs();
        g.bench_function(format!("{name}/token_only"), |b| {
            b.iter(|| s.sample(black_box(&logits), &[]).expect("sample"))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
