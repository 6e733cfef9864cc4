"""Memory soak through the official `openai` client (a benchmark, not run in CI):
`soak.py BASE_URL PID --minutes M --streams C --max-tokens T --csv FILE`.

Keeps C streamed chat requests in flight for M minutes (each a distinct prompt, so the
prefix cache keeps seeing new blocks; greedy), samples the server's RSS (`VmRSS` of PID from
/proc) every 10 s into FILE (`elapsed_s,rss_mib,completed,failed`), then prints a summary
line: RSS at start, max, end, and the least-squares slope over the run (MiB per hour), with
the request counts. Exits 1 if any request failed.
"""
import argparse
import asyncio
import itertools
import sys
import time

try:
    import openai
except ImportError:
    print("the openai package is missing (use $TURBINE_TEST_PYTHON)", file=sys.stderr)
    sys.exit(2)


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


def slope_per_hour(points):
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in points) / n
    my = sum(r for _, r in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    if den == 0:
        return 0.0
    return sum((t - mx) * (r - my) for t, r in points) / den * 3600.0


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base_url")
    ap.add_argument("pid", type=int)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--csv", required=True)
    args = ap.parse_args()
    client = openai.AsyncOpenAI(base_url=f"{args.base_url}/v1", api_key="none", timeout=600,
                                max_retries=4)
    model = (await client.models.list()).data[0].id
    end = time.monotonic() + args.minutes * 60
    counter = itertools.count()
    done = {"ok": 0, "failed": 0}
    errors = []

    async def worker():
        while time.monotonic() < end:
            i = next(counter)
            try:
                stream = await client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user",
                               "content": f"Soak request {i}: tell a short story about "
                                          f"the number {i * 7919 % 100003}."}],
                    max_tokens=args.max_tokens, temperature=0, stream=True)
                finish = None
                async for chunk in stream:
                    for c in chunk.choices:
                        if c.finish_reason:
                            finish = c.finish_reason
                done["ok" if finish else "failed"] += 1
            except Exception as e:  # noqa: BLE001 - counted and reported
                done["failed"] += 1
                errors.append(f"{type(e).__name__}: {e}")

    start = time.monotonic()
    points = []
    with open(args.csv, "w") as out:
        out.write("elapsed_s,rss_mib,completed,failed\n")

        async def sampler():
            while True:
                t = time.monotonic() - start
                r = rss_mib(args.pid)
                points.append((t, r))
                out.write(f"{t:.0f},{r:.1f},{done['ok']},{done['failed']}\n")
                out.flush()
                if time.monotonic() >= end:
                    return
                await asyncio.sleep(10)

        await asyncio.gather(sampler(), *[worker() for _ in range(args.streams)])
        t = time.monotonic() - start
        r = rss_mib(args.pid)
        points.append((t, r))
        out.write(f"{t:.0f},{r:.1f},{done['ok']},{done['failed']}\n")
    rss = [r for _, r in points]
    print(f"soak: {args.minutes} min, {args.streams} streams x {args.max_tokens} tokens; "
          f"requests ok {done['ok']}, failed {done['failed']}; RSS MiB start {rss[0]:.1f}, "
          f"max {max(rss):.1f}, end {rss[-1]:.1f}, slope {slope_per_hour(points):+.1f} MiB/h "
          f"({len(points)} samples)", flush=True)
    for e in errors[:5]:
        print(f"  error: {e}")
    return 0 if done["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
