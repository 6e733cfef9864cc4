#!/usr/bin/env python3
"""A short request's time to first token behind a long prompt's prefill (issue #22, fairness).

    bench-prefill-fairness.py [--turbine BIN] [--long-words 2000] [--short-words 100]
                              [--shares "0.5 1"] [--budgets "512"] [--runs 3]

For each `long_prefill_share`, starts `turbine up` (the default model on the CPU, one worker,
the group defaults otherwise) and per run measures, with streamed completions:
  idle:   the short prompt's TTFT alone;
  behind: the same short prompt sent 0.5 s after a long prompt started prefilling.
Prints one line per run and the medians; the ratio behind/idle is the fairness figure
(goal: <= 2). Prompts differ per run so the prefix cache never serves them. Standard library.
"""

import argparse
import http.client
import json
import statistics
import threading
import time
from pathlib import Path

from turbine_server import TurbineServer

ROOT = Path(__file__).resolve().parent.parent


def ttft(port: int, prompt: str, max_tokens: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first = None
    for line in resp:
        if line.startswith(b"data: {") and first is None:
            first = time.perf_counter() - t0
    conn.close()
    return first


COMMON = ("the of and to in is was for on that with as by at from this are be or an which "
          "one all were we when there can more if no out so said what up its about into than "
          "them only other new some could time these two may then do first any my now such").split()


def words(n: int, tag: str) -> str:
    """`n` common words (about a token each) after `tag`, which makes the first block unique."""
    return tag + " " + " ".join(COMMON[i % len(COMMON)] for i in range(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turbine", default=str(ROOT / "target" / "release" / "turbine"))
    ap.add_argument("--long-words", type=int, default=2000)
    ap.add_argument("--short-words", type=int, default=100)
    ap.add_argument("--shares", default="0.5 1")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--budgets", default="512",
                    help="max_num_batched_tokens values to try (the step budget; 512 is the default)")
    a = ap.parse_args()
    table = {}
    for budget, share in [(b, s) for b in a.budgets.split() for s in a.shares.split()]:
        cluster = (lambda port, share=share, budget=budget:
                   f"model: {{path: default}}\nhttp: {{host: 127.0.0.1, port: {port}}}\n"
                   f"workers:\n  - {{role: aggregated, replicas: 1, long_prefill_share: {share}, "
                   f"max_num_batched_tokens: {budget}}}\n")
        with TurbineServer(a.turbine, cluster) as server:
            port = server.port
            ttft(port, words(50, "warm"), 2)
            for r in range(a.runs):
                idle = ttft(port, words(a.short_words, f"s{share}i{r}x{budget}"), 4)
                long_ttft = []
                long = threading.Thread(target=lambda: long_ttft.append(
                    ttft(port, words(a.long_words, f"l{share}r{r}x{budget}"), 4)))
                long.start()
                time.sleep(0.5)
                behind = ttft(port, words(a.short_words, f"s{share}b{r}x{budget}"), 4)
                long.join()
                lt = long_ttft[0] if long_ttft else float("nan")
                print(json.dumps({"max_num_batched_tokens": budget, "long_prefill_share": share,
                                  "run": r, "idle_s": round(idle, 3), "behind_s": round(behind, 3),
                                  "ratio": round(behind / idle, 2), "long_ttft_s": round(lt, 3)}),
                      flush=True)
                table.setdefault((budget, share), []).append((idle, behind, lt))
    print(f"\nshort prompt {a.short_words} words behind a {a.long_words}-word prompt, median of {a.runs}:")
    print("| max_num_batched_tokens | long_prefill_share | idle TTFT s | TTFT behind the long prefill s "
          "| ratio | the long prompt's TTFT s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (budget, share), rows in table.items():
        i = statistics.median(x for x, _, _ in rows)
        b = statistics.median(y for _, y, _ in rows)
        lt = statistics.median(z for _, _, z in rows)
        print(f"| {budget} | {share} | {i:.2f} | {b:.2f} | {b / i:.1f} | {lt:.2f} |")

if __name__ == "__main__":
    main()
