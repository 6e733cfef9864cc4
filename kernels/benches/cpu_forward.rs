//! CPU backend throughput on a real GGUF model (default: SmolLM2-135M-Instruct Q4_1):
//! prefill tok/s for 128- and 512-token prompts, decode tok/s at batch 1 and batch 8.
//!
//! `cargo bench -p turbine-kernels --bench cpu_forward` (env: TURBINE_MODEL, BENCH_THREADS
//! (default 2), BENCH_RUNS (default 5), BENCH_PREFILL (prompt lengths, default `128,512`),
//! BENCH_DECODE_CTX (contexts for batch-1 decode, default `16,512`), BENCH_CHUNK (prefill
//! tokens per forward call, default 512 = the serving step budget `max_num_batched_tokens`,
//! so a long prompt's figure is its time to first token when served alone)). Prints one line
//! per measurement with the median and all runs. `BENCH_GREEDY=id,id,...` instead greedy-decodes 32 tokens after that prompt and
//! prints them (used to compare with llama.cpp by hand); `BENCH_LOGITS_OUT=file` also writes
//! the prompt's last-token logits there as little-endian f32.

use std::time::Instant;
use turbine_kernels::backend::{Backend, SeqStep};
use turbine_kernels::cpu::{CpuBackend, CpuBackendOptions};
use turbine_kernels::loader::{default_model_path, load_model};
use turbine_kernels::sampling::argmax;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn table(seq: usize, blocks_per_seq: usize) -> Vec<u32> {
    (0..blocks_per_seq as u32)
        .map(|b| seq as u32 * blocks_per_seq as u32 + b)
        .collect()
}

fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + 13) % (vocab - 100) + 50) as u32)
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs bench targets without
    // it, where the timing runs would only cost CI minutes.
    if !std::env::args().any(|a| a == "--bench") {
        println!("cpu_forward: not run as a benchmark (use cargo bench); skipping");
        return;
    }
    let path = std::env::var_os("TURBINE_MODEL")
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(default_model_path);
    let threads = env_usize("BENCH_THREADS", 2);
    let runs = env_usize("BENCH_RUNS", 5);
    let model = load_model(&path).expect("load model");
    let (cfg, w) = (model.config, model.weights);
    let list = |k: &str, d: &str| -> Vec<usize> {
        std::env::var(k)
            .unwrap_or_else(|_| d.to_string())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect()
    };
    let prefills = list("BENCH_PREFILL", "128,512");
    let contexts = list("BENCH_DECODE_CTX", "16,512");
    let chunk = env_usize("BENCH_CHUNK", 512).max(1);
    let longest = prefills.iter().chain(&contexts).max().copied().unwrap_or(0) + 160;
    let blocks_per_seq = longest.max(768).div_ceil(16);
    let opts = CpuBackendOptions {
        num_blocks: blocks_per_seq * 8,
        block_size: 16,
        threads,
    };
    let mut be = CpuBackend::new(cfg.clone(), &w, opts).expect("backend");
    let vocab = cfg.vocab_size;

    if let Ok(ids) = std::env::var("BENCH_GREEDY") {
        let mut seq: Vec<u32> = ids
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        let t = table(0, blocks_per_seq);
        let mut start = 0;
        let mut out = Vec::new();
        for _ in 0..32 {
            let step = SeqStep {
                tokens: &seq[start..],
                start_pos: start,
                block_table: &t,
                want_logits: true,
            };
            let l = be.forward(&[step]).expect("forward");
            if let (Ok(path), 0) = (std::env::var("BENCH_LOGITS_OUT"), start) {
                let bytes: Vec<u8> = l.data.iter().flat_map(|x| x.to_le_bytes()).collect();
                std::fs::write(path, bytes).expect("write logits");
            }
            let next = argmax(l.row(0).expect("row"));
            start = seq.len();
            seq.push(next);
            out.push(next);
        }
        println!("{out:?}");
        return;
    }

    println!(
        "model {}, {threads} threads, {runs} runs each",
        path.display()
    );
    for &n in &prefills {
        let p = prompt(n, vocab);
        let t = table(0, blocks_per_seq);
        let mut rates = Vec::new();
        for _ in 0..runs {
            let t0 = Instant::now();
            prefill(&mut be, &p, &t, chunk);
            rates.push(n as f64 / t0.elapsed().as_secs_f64());
        }
        report(&format!("prefill {n} tokens"), rates);
    }
    for &ctx in &contexts {
        let steps = 64;
        let p = prompt(ctx, vocab);
        let t = table(0, blocks_per_seq);
        let mut rates = Vec::new();
        for _ in 0..runs {
            let mut seq = p.clone();
            seq.push(prefill(&mut be, &p, &t, chunk));
            let t0 = Instant::now();
            for _ in 0..steps {
                let l = be
                    .forward(&[SeqStep {
                        tokens: &seq[seq.len() - 1..],
                        start_pos: seq.len() - 1,
                        block_table: &t,
                        want_logits: true,
                    }])
                    .expect("decode");
                seq.push(argmax(l.row(0).expect("row")));
            }
            rates.push(steps as f64 / t0.elapsed().as_secs_f64());
        }
        report(
            &format!("decode batch 1 at context {ctx} ({steps} steps)"),
            rates,
        );
    }
    for batch in [8usize] {
        let steps = 64;
        let mut rates = Vec::new();
        for _ in 0..runs {
            let prompts: Vec<Vec<u32>> = (0..batch).map(|s| prompt(16 + s, vocab)).collect();
            let tables: Vec<Vec<u32>> = (0..batch).map(|s| table(s, blocks_per_seq)).collect();
            let mut seqs = prompts.clone();
            let pre: Vec<SeqStep> = (0..batch)
                .map(|s| SeqStep {
                    tokens: &prompts[s],
                    start_pos: 0,
                    block_table: &tables[s],
                    want_logits: true,
                })
                .collect();
            let l = be.forward(&pre).expect("prefill");
            for (s, seq) in seqs.iter_mut().enumerate() {
                seq.push(argmax(l.row(s).expect("row")));
            }
            let t0 = Instant::now();
            for _ in 0..steps {
                let step: Vec<SeqStep> = seqs
                    .iter()
                    .zip(&tables)
                    .map(|(seq, t)| SeqStep {
                        tokens: &seq[seq.len() - 1..],
                        start_pos: seq.len() - 1,
                        block_table: t,
                        want_logits: true,
                    })
                    .collect();
                let l = be.forward(&step).expect("decode");
                let next: Vec<u32> = (0..batch).map(|s| argmax(l.row(s).expect("row"))).collect();
                for (seq, n) in seqs.iter_mut().zip(next) {
                    seq.push(n);
                }
            }
            rates.push((batch * steps) as f64 / t0.elapsed().as_secs_f64());
        }
        report(&format!("decode batch {batch} ({steps} steps)"), rates);
    }
}

/// Prefills `p` in forward calls of at most `chunk` tokens; returns the greedy next token.
fn prefill(be: &mut CpuBackend, p: &[u32], t: &[u32], chunk: usize) -> u32 {
    let mut next = 0;
    for start in (0..p.len()).step_by(chunk) {
        let end = (start + chunk).min(p.len());
        let l = be
            .forward(&[SeqStep {
                tokens: &p[start..end],
                start_pos: start,
                block_table: t,
                want_logits: end == p.len(),
            }])
            .expect("prefill");
        if end == p.len() {
            next = argmax(l.row(0).expect("row"));
        }
    }
    next
}

fn report(what: &str, rates: Vec<f64>) {
    let shown: Vec<String> = rates.iter().map(|r| format!("{r:.1}")).collect();
    println!(
        "{what}: median {:.1} tok/s  (runs: {})",
        median(rates),
        shown.join(", ")
    );
}
