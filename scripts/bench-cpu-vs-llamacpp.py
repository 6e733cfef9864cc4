#!/usr/bin/env python3
"""turbine's CPU backend against llama.cpp on the same GGUF, same prompts, same thread count,
measured side by side: every round runs each side once (interleaved), and the table gives the
median over rounds and the ratio turbine / llama.cpp.

    python3 scripts/bench-cpu-vs-llamacpp.py --rounds 5 --threads 1,2 \
        [--turbine BIN] [--baseline OLD_BIN] [--prefill 128,512] [--decode-ctx 16,512]

--turbine: the cpu_forward bench binary (default: built with `cargo bench -p turbine-kernels
--bench cpu_forward --no-run`). --baseline: another cpu_forward binary (an older build) run in
the same rounds, for before/after figures. llama.cpp runs in the venv of
scripts/setup-bench-deps.sh (--python to choose another interpreter).
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

LINE = re.compile(r"^(?:llama\.cpp )?(.+?): median ([0-9.]+) tok/s")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def build_bench():
    out = subprocess.run(
        ["cargo", "bench", "-p", "turbine-kernels", "--bench", "cpu_forward", "--no-run",
         "--message-format", "json"],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout
    import json
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "cpu_forward":
            if msg.get("executable"):
                return msg["executable"]
    sys.exit("could not find the cpu_forward bench binary")


def figures(cmd, env):
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    got = {}
    for line in out.splitlines():
        m = LINE.match(line.strip())
        if m:
            got[m.group(1)] = float(m.group(2))
    return got


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--turbine")
    ap.add_argument("--baseline")
    ap.add_argument("--prefill", default="128,512")
    ap.add_argument("--decode-ctx", default="16,512")
    ap.add_argument("--python", default=os.path.expanduser("~/.cache/turbine/bench-venv/bin/python"))
    a = ap.parse_args()
    turbine = a.turbine or build_bench()
    sides = [("turbine", [turbine, "--bench"])]
    if a.baseline:
        sides.append(("baseline", [a.baseline, "--bench"]))
    sides.append(("llama.cpp", [a.python, os.path.join(ROOT, "kernels/benches/llamacpp_bench.py"), "1"]))
    for threads in a.threads.split(","):
        env = dict(os.environ, BENCH_THREADS=threads, BENCH_RUNS="1", BENCH_PREFILL=a.prefill,
                   BENCH_DECODE_CTX=a.decode_ctx)
        runs = {name: {} for name, _ in sides}
        for r in range(a.rounds):
            load = open("/proc/loadavg").read().split()[0]
            print(f"[{threads} threads] round {r + 1}/{a.rounds} (load {load})", file=sys.stderr, flush=True)
            for name, cmd in sides:
                for what, v in figures(cmd, env).items():
                    runs[name].setdefault(what, []).append(v)
        names = [n for n, _ in sides]
        print(f"\n{threads} thread(s), {a.rounds} interleaved rounds, medians (tok/s):")
        print("| measurement | " + " | ".join(names) + " | turbine / llama.cpp |" +
              (" turbine / baseline |" if a.baseline else ""))
        print("|---" * (len(names) + 2 + (1 if a.baseline else 0)) + "|")
        for what in runs["turbine"]:
            med = {n: statistics.median(runs[n][what]) for n in names if what in runs[n]}
            row = [what] + [f"{med[n]:.1f}" if n in med else "-" for n in names]
            row.append(f"{med['turbine'] / med['llama.cpp']:.2f}x" if "llama.cpp" in med else "-")
            if a.baseline:
                row.append(f"{med['turbine'] / med['baseline']:.2f}x" if "baseline" in med else "-")
            print("| " + " | ".join(row) + " |")
        for n in names:
            for what, v in runs[n].items():
                print(f"  {n} {what}: {', '.join(f'{x:.1f}' for x in v)}")


if __name__ == "__main__":
    main()
