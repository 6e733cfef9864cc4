"""Concurrent greedy streams through the official `openai` client, for fault tests.

Usage: streams_driver.py BASE_URL --streams N --max-tokens M

Opens N streaming chat completions at once (prompt i asks about topic i, temperature 0),
prints `STREAMING` once every stream has received a token (the moment a test injects its
fault), then one JSON line per request when all are done:
{"i": ..., "ok": bool, "text": ..., "finish": ..., "prompt_tokens": ..., "completion_tokens": ...,
 "error": ..., "gap_s": longest wait between two chunks, "times": wall-clock time of each
 content chunk}
and exits 0 (the test decides what is right).
"""
import argparse
import json
import sys
import threading
import time

try:
    import openai
except ImportError:
    print("the openai package is missing (use $TURBINE_TEST_PYTHON)", file=sys.stderr)
    sys.exit(2)

TOPICS = ["the sea", "mountains", "a cat", "winter", "bread", "the moon", "a river",
          "music", "a city", "trains", "books", "rain", "a garden", "the sun", "coffee",
          "a forest", "snow", "a bridge", "stars", "the wind"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base_url")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url + "/v1", api_key="none", timeout=300,
                           max_retries=0)
    model = client.models.list().data[0].id
    results = [None] * args.streams
    started = threading.Barrier(args.streams + 1)

    def arrive(timeout=None):
        try:
            started.wait(timeout=timeout)
        except threading.BrokenBarrierError:
            pass  # a stream failed before its first token: the main thread says so

    def run(i):
        topic = TOPICS[i % len(TOPICS)]
        text, finish, usage, err = "", None, None, None
        first, gap, last = True, 0.0, None
        times = []
        try:
            stream = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"Write a few sentences about {topic}."}],
                max_tokens=args.max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                now = time.monotonic()
                if last is not None:
                    gap = max(gap, now - last)
                last = now
                if chunk.usage is not None:
                    usage = chunk.usage
                for c in chunk.choices:
                    if c.delta and c.delta.content:
                        text += c.delta.content
                        times.append(time.time())
                        if first:
                            first = False
                            arrive()
                    if c.finish_reason:
                        finish = c.finish_reason
        except Exception as e:  # the test reports it
            err = f"{type(e).__name__}: {e}"
        if first:
            started.abort()
        results[i] = {
            "i": i,
            "ok": err is None and finish is not None,
            "text": text,
            "finish": finish,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "error": err,
            "gap_s": round(gap, 3),
            "times": times,
        }

    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.streams)]
    for t in threads:
        t.start()
    try:
        started.wait(timeout=240)
        print("STREAMING", flush=True)
    except threading.BrokenBarrierError:
        print("NOT-ALL-STREAMING", flush=True)
    for t in threads:
        t.join()
    for r in results:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
