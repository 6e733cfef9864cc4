//! CUDA benchmarks: device-to-device copy bandwidth, cuBLAS bf16 GEMM peak, then decode step
//! time (batch x context) and prefill throughput of a synthetic model (weights generated on
//! the device), against the bandwidth roofline and the measured GEMM peak.
//!
//! `cargo run --release -p turbine-kernels --features cuda --example cuda_bench -- \
//!    [--model synthetic:llama-3-8b] [--quick] [--no-decode] [--compare-prefill] [--compare-graphs]
//!    [--batches 1,8,64] [--ctxs 256,512]`
//!
//! `--no-decode` skips the decode table; `--compare-prefill` times prefill with both
//! tensor-core kernels (64- and 128-row tiles) and the split kernel (up to 4096 tokens);
//! `--compare-graphs` times every decode step also with eager launches (no CUDA graph).
//! Decode steps are `forward_greedy` calls: the device sampler at temperature 0, 4 bytes per
//! row back.
//!
//! Timings: device events for copy/GEMM (median of repeats after warm-up); host wall clock
//! around whole forward calls (they end synchronised), median of repeats after warm-up.

use std::time::Instant;
use turbine_kernels::backend::SeqStep;
use turbine_kernels::cuda::backend::DEFAULT_PREFILL_ATTENTION;
use turbine_kernels::cuda::device::elapsed_ms;
use turbine_kernels::cuda::ops::PrefillAttention;
use turbine_kernels::cuda::{
    device_count, synthetic_config, CudaBackend, CudaBackendOptions, Gpu, KernelSpec,
};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time_events(g: &Gpu, reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut t = vec![];
    for _ in 0..reps {
        let a = g.event().unwrap();
        f();
        let b = g.event().unwrap();
        t.push(elapsed_ms(&a, &b).unwrap() as f64);
    }
    median(t)
}

fn time_wall(reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..2 {
        f();
    }
    let mut t = vec![];
    for _ in 0..reps {
        let s = Instant::now();
        f();
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    median(t)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = args
        .iter()
        .position(|a| a == "--model")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| "synthetic:llama-3-8b".into());
    let quick = args.iter().any(|a| a == "--quick");
    let no_decode = args.iter().any(|a| a == "--no-decode");
    let compare_prefill = args.iter().any(|a| a == "--compare-prefill");
    let compare_graphs = args.iter().any(|a| a == "--compare-graphs");
    // `--batches 1,8,64` / `--ctxs 256,512`: the decode shapes to time (defaults below).
    let list = |flag: &str| -> Option<Vec<usize>> {
        let i = args.iter().position(|a| a == flag)?;
        let v: Vec<usize> = args
            .get(i + 1)?
            .split(',')
            .filter_map(|x| x.trim().parse().ok())
            .collect();
        (!v.is_empty()).then_some(v)
    };
    let batches = list("--batches");
    let ctx_list = list("--ctxs");
    match device_count() {
        Ok(n) if n > 0 => {}
        r => {
            println!("SKIP: no CUDA device ({r:?})");
            return;
        }
    }
    let config = synthetic_config(&model).expect("unknown synthetic model");
    let g = Gpu::new(
        0,
        KernelSpec {
            head_dim: 128,
            group: 4,
        },
    )
    .unwrap();
    println!(
        "device: {} ({}), memory {:?}",
        g.name,
        g.arch,
        g.mem_info().unwrap()
    );

    // 1. Device-to-device copy bandwidth (bytes read + written).
    let bytes = 2usize << 30;
    let (a, b) = (g.alloc(bytes).unwrap(), g.alloc(bytes).unwrap());
    g.init_uniform_bf16(a.ptr(), bytes / 2, 1, 1.0, 0.0)
        .unwrap();
    let ms = time_events(&g, 10, || g.dtod(a.ptr(), b.ptr(), bytes).unwrap());
    let bw = 2.0 * bytes as f64 / (ms * 1e-3);
    println!(
        "copy d2d: {bytes} B in {ms:.3} ms -> {:.0} GB/s (read+write)",
        bw / 1e9
    );
    drop((a, b));

    // 2. cuBLAS bf16 GEMM peak (random data), 8192^3 and the model's prefill shapes.
    let mut peak = 0.0f64;
    for &(m, n, k) in &[
        (8192usize, 8192usize, 8192usize),
        (4096, 14336 * 2, 4096),
        (4096, 4096, 14336),
        (4096, 6144, 4096),
    ] {
        let x = g.alloc(m * k * 2).unwrap();
        let w = g.alloc(n * k * 2).unwrap();
        let y = g.alloc(m * n * 2).unwrap();
        g.init_uniform_bf16(x.ptr(), m * k, 2, 1.0, 0.0).unwrap();
        g.init_uniform_bf16(w.ptr(), n * k, 3, 0.02, 0.0).unwrap();
        let ms = time_events(&g, 10, || {
            g.gemm_xwt(x.ptr(), k, w.ptr(), y.ptr(), n, m, n, k, false)
                .unwrap()
        });
        let tf = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12;
        peak = peak.max(tf);
        println!("gemm bf16 m={m} n={n} k={k}: {ms:.3} ms -> {tf:.0} TFLOP/s");
    }
    // 2b. The decode step's GEMMs alone at batch 1 (the 8B shapes; separate weights per layer
    // so nothing is served from L2): how close cuBLAS's skinny GEMMs get to the roofline.
    {
        let c = &config;
        let (h, q, kv, f) = (
            c.hidden_size,
            c.n_heads * c.head_dim,
            c.n_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        let shapes = [(q + 2 * kv, h), (h, q), (2 * f, h), (h, f)];
        let mut ws = vec![];
        let mut total = 0usize;
        for l in 0..c.n_layers {
            for &(o, i) in &shapes {
                let w = g.alloc(o * i * 2).unwrap();
                g.init_uniform_bf16(w.ptr(), o * i, 100 + l as u64, 0.02, 0.0)
                    .unwrap();
                total += o * i * 2;
                ws.push((w, o, i));
            }
        }
        let x = g.alloc(f * 2 * 128).unwrap();
        g.init_uniform_bf16(x.ptr(), f * 128, 9, 1.0, 0.0).unwrap();
        let y = g.alloc(2 * f * 2 * 128).unwrap();
        for n in [1usize, 8, 32, 128] {
            let ms = time_events(&g, 10, || {
                for (w, o, i) in &ws {
                    g.gemm_xwt(x.ptr(), *i, w.ptr(), y.ptr(), *o, n, *o, *i, false)
                        .unwrap();
                }
            });
            let roof = total as f64 / bw * 1e3;
            println!("layer GEMMs only, n={n:>3}: {ms:.2} ms for {:.2} GB of weights; roofline {roof:.2} ms -> {:.2}x", total as f64 / 1e9, ms / roof);
        }
    }
    drop(g);

    // 3. Decode steps on the synthetic model.
    let bs = 16;
    let (mut max_b, mut max_ctx) = if quick { (8, 1024) } else { (32, 8192) };
    if let (Some(b), Some(c)) = (&batches, &ctx_list) {
        max_b = b.iter().copied().max().unwrap_or(1);
        max_ctx = c.iter().copied().max().unwrap_or(1);
    }
    let num_blocks = (max_b * max_ctx / bs).max(128 * 1024 / bs) + 64;
    let t0 = Instant::now();
    let mut be = CudaBackend::synthetic(
        config.clone(),
        42,
        CudaBackendOptions {
            device: 0,
            num_blocks,
            block_size: bs,
        },
    )
    .unwrap();
    be.randomize_kv(5).unwrap();
    let wbytes = be.weight_bytes() as f64;
    println!(
        "model {model}: {:.2} GB of bf16 weights, KV pool {num_blocks} blocks, built in {:.1} s",
        wbytes / 1e9,
        t0.elapsed().as_secs_f64()
    );
    let kv_tok = config.kv_bytes_per_token(2) as f64;
    let mut rows = vec![];
    let ctxs: Vec<usize> = if no_decode {
        vec![]
    } else {
        ctx_list.clone().unwrap_or_else(|| vec![1024, 8192])
    };
    let batch_list = batches.clone().unwrap_or_else(|| vec![1, 8, 32, 128]);
    let chosen = batches.is_some() || ctx_list.is_some();
    for &ctx in &ctxs {
        for &batch in &batch_list {
            if batch * ctx / bs + 8 > num_blocks || (quick && !chosen && (ctx > 1024 || batch > 8))
            {
                println!("decode b={batch} ctx={ctx}: skipped (KV pool of {num_blocks} blocks too small)");
                continue;
            }
            let per = ctx.div_ceil(bs);
            let tables: Vec<Vec<u32>> = (0..batch)
                .map(|i| ((i * per) as u32..((i + 1) * per) as u32).collect())
                .collect();
            let toks: Vec<[u32; 1]> = (0..batch).map(|i| [(i * 7919 % 1000) as u32]).collect();
            let steps: Vec<SeqStep> = (0..batch)
                .map(|i| SeqStep {
                    tokens: &toks[i],
                    start_pos: ctx - 1,
                    block_table: &tables[i],
                    want_logits: true,
                })
                .collect();
            for graphs in [true, false] {
                if !graphs && !compare_graphs {
                    continue;
                }
                be.set_graphs(graphs);
                let ms = time_wall(if quick { 5 } else { 10 }, || {
                    be.forward_greedy(&steps).unwrap();
                });
                let roof_bytes = wbytes + batch as f64 * ctx as f64 * kv_tok;
                let roof_ms = roof_bytes / bw * 1e3;
                let how = if graphs { "graph" } else { "eager" };
                println!(
                    "decode ({how}) b={batch:>3} ctx={ctx:>5}: {ms:8.2} ms/step, {:8.0} tok/s; roofline {roof_ms:.2} ms -> {:.2}x roofline",
                    batch as f64 / (ms * 1e-3),
                    ms / roof_ms
                );
                rows.push(format!(
                    "| decode ({how}) | {batch} | {ctx} | {ms:.2} ms | {roof_ms:.2} ms | {:.2}x |",
                    ms / roof_ms
                ));
            }
            be.set_graphs(true);
        }
    }

    // 4. Prefill throughput.
    let params = wbytes / 2.0;
    let lens: &[usize] = if quick { &[1024] } else { &[1024, 4096, 16384] };
    let modes: &[PrefillAttention] = if compare_prefill {
        &[
            PrefillAttention::TensorCore64,
            PrefillAttention::TensorCore128,
            PrefillAttention::Split,
        ]
    } else {
        &[DEFAULT_PREFILL_ATTENTION]
    };
    for &kernel in modes {
        be.set_prefill_attention(kernel);
        for &p in lens {
            if kernel == PrefillAttention::Split && p > 4096 {
                continue;
            }
            let table: Vec<u32> = (0..p.div_ceil(bs) as u32).collect();
            let toks: Vec<u32> = (0..p).map(|i| (i * 31 % 5000) as u32).collect();
            let step = [SeqStep {
                tokens: &toks,
                start_pos: 0,
                block_table: &table,
                want_logits: true,
            }];
            let ms = time_wall(3, || {
                be.forward_greedy(&step).unwrap();
            });
            // Linear layers (2 flops per weight per token, excluding the embedding gather) plus
            // causal attention (QK^T and PV: 2 * 2 * p^2/2 * head_dim per head per layer).
            let lin = 2.0 * (params - (config.vocab_size * config.hidden_size) as f64) * p as f64;
            let att =
                2.0 * (p * p) as f64 * (config.head_dim * config.n_heads * config.n_layers) as f64;
            let tf = (lin + att) / (ms * 1e-3) / 1e12;
            println!(
                "prefill ({kernel:?}) p={p:>5}: {ms:9.1} ms, {:8.0} tok/s, {tf:.0} TFLOP/s = {:.1}% of measured GEMM peak {peak:.0} (attention share of flops {:.0}%)",
                p as f64 / (ms * 1e-3),
                100.0 * tf / peak,
                100.0 * att / (lin + att)
            );
            rows.push(format!(
                "| prefill ({kernel:?}) | 1 | {p} | {ms:.1} ms | {:.0} tok/s | {tf:.0} TFLOP/s | {:.1}% of peak |",
                p as f64 / (ms * 1e-3),
                100.0 * tf / peak
            ));
        }
    }
    println!(
        "\nsummary (bandwidth {:.0} GB/s, GEMM peak {peak:.0} TFLOP/s):",
        bw / 1e9
    );
    for r in rows {
        println!("{r}");
    }
}
