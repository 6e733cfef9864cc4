"""llama.cpp side of the CPU benchmark (see kernels/benches/cpu_forward.rs): the same
synthetic prompts, 2 threads, through llama-cpp-python. Usage:
    python kernels/benches/llamacpp_bench.py [runs]   (model: $TURBINE_MODEL or the default cache path)
Prefill: wall time of one llm.eval over the prompt. Decode: create_completion(max_tokens=128,
temperature=0, EOS banned) timed by llama.cpp's own eval counters (llama_perf_context)."""
import sys, time, statistics, os
import llama_cpp
from llama_cpp import Llama
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
m = os.environ.get('TURBINE_MODEL') or os.path.expanduser('~/.cache/turbine/models/SmolLM2-135M-Instruct.Q4_1.gguf'); runs=int(sys.argv[1]) if len(sys.argv)>1 else 3
llm = Llama(model_path=m, n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS, n_batch=512, n_ubatch=512, verbose=False, seed=0)
vocab = llm.n_vocab()
def prompt(n): return [ (i*7919+13) % (vocab-100) + 50 for i in range(n)]
def perf():
    p = llama_cpp.llama_perf_context(llm._ctx.ctx); return p
for n in (128, 512):
    wall=[]
    for r in range(runs):
        llm.reset(); llm._ctx.kv_cache_clear() if hasattr(llm._ctx,'kv_cache_clear') else None
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        t0=time.perf_counter(); llm.eval(prompt(n)); dt=time.perf_counter()-t0
        wall.append(n/dt)
    print(f"llama.cpp prefill {n}: median {statistics.median(wall):.1f} tok/s (wall) runs {[round(x,1) for x in wall]}")
rates=[]; wall=[]
for r in range(runs):
    llm.reset()
    if hasattr(llm._ctx,'kv_cache_clear'): llm._ctx.kv_cache_clear()
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    t0=time.perf_counter()
    out = llm.create_completion(prompt=prompt(16), max_tokens=128, temperature=0.0, logit_bias={2: -1e9})
    dt=time.perf_counter()-t0
    p=perf(); rates.append(p.n_eval/(p.t_eval_ms/1000)); wall.append(out['usage']['completion_tokens']/dt)
    ntok=out['usage']['completion_tokens']
print(f"llama.cpp decode batch1 ({ntok} tokens, create_completion temp 0): median {statistics.median(rates):.1f} tok/s (own eval timer) runs {[round(x,1) for x in rates]}; wall incl. prompt+python {statistics.median(wall):.1f}")
