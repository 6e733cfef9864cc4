"""llama.cpp side of the CPU benchmark (see kernels/benches/cpu_forward.rs): the same
synthetic prompts and measurements through llama-cpp-python. Usage:
    python kernels/benches/llamacpp_bench.py [runs]
Env (as cpu_forward): TURBINE_MODEL (default: the cache path), BENCH_THREADS (default 2),
BENCH_PREFILL (prompt lengths, default 128,512), BENCH_DECODE_CTX (contexts for batch-1
decode, default 16,512). Prefill: wall time of one llm.eval over the prompt (llama.cpp splits
it in batches of n_batch = 512 tokens, as turbine's step budget does). Decode: 64 greedy
tokens after a prompt of the context's length (create_completion, temperature 0, EOS banned),
timed by llama.cpp's own eval counters (llama_perf_context), so prompt time is excluded.
Install: scripts/setup-bench-deps.sh."""
import os
import statistics
import sys
import time

import llama_cpp
from llama_cpp import Llama


def env_list(key, default):
    return [int(x) for x in os.environ.get(key, default).split(",") if x.strip()]


THREADS = int(os.environ.get("BENCH_THREADS", "2"))
PREFILL = env_list("BENCH_PREFILL", "128,512")
CONTEXTS = env_list("BENCH_DECODE_CTX", "16,512")
model = os.environ.get("TURBINE_MODEL") or os.path.expanduser(
    "~/.cache/turbine/models/SmolLM2-135M-Instruct.Q4_1.gguf"
)
runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
n_ctx = max(2048, max(PREFILL + CONTEXTS) + 256)
llm = Llama(
    model_path=model,
    n_ctx=n_ctx,
    n_threads=THREADS,
    n_threads_batch=THREADS,
    n_batch=512,
    n_ubatch=512,
    verbose=False,
    seed=0,
)
vocab = llm.n_vocab()


def prompt(n):
    return [(i * 7919 + 13) % (vocab - 100) + 50 for i in range(n)]


def reset():
    llm.reset()
    if hasattr(llm._ctx, "kv_cache_clear"):
        llm._ctx.kv_cache_clear()
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)


def report(what, rates):
    shown = ", ".join(f"{r:.1f}" for r in rates)
    print(f"llama.cpp {what}: median {statistics.median(rates):.1f} tok/s  (runs: {shown})", flush=True)


print(f"llama.cpp {llama_cpp.__version__}, model {model}, {THREADS} threads, {runs} runs each")
for n in PREFILL:
    rates = []
    for _ in range(runs):
        reset()
        t0 = time.perf_counter()
        llm.eval(prompt(n))
        rates.append(n / (time.perf_counter() - t0))
    report(f"prefill {n} tokens", rates)
for ctx in CONTEXTS:
    rates = []
    for _ in range(runs):
        reset()
        llm.create_completion(prompt=prompt(ctx), max_tokens=64, temperature=0.0, logit_bias={2: -1e9})
        p = llama_cpp.llama_perf_context(llm._ctx.ctx)
        rates.append(p.n_eval / (p.t_eval_ms / 1000))
    report(f"decode batch 1 at context {ctx} (64 steps)", rates)
