#!/usr/bin/env python3
"""Decode tokens/s with and without a JSON schema (constrained decoding), one stream at a time.

Usage: bench_structured.py BASE_URL [--rounds 5] [--max-tokens 200]
Each round runs the unconstrained request, then the constrained one (interleaved A/B, so
load from other processes hits both alike). Decode rate = (completion tokens - 1) / (time of
the last chunk - time of the first), i.e. without the prefill. Prints each run and the
medians, and the ratio constrained / unconstrained.
"""

import argparse
import statistics
import time

import openai

SCHEMA = {
    "type": "object",
    "properties": {
        "words": {"type": "array", "minItems": 48, "maxItems": 48,
                  "items": {"type": "string", "maxLength": 10}},
    },
    "required": ["words"],
    "additionalProperties": False,
}


def run(client, model, max_tokens, constrained):
    kw = dict(model=model, temperature=0, max_tokens=max_tokens, stream=True,
              stream_options={"include_usage": True},
              messages=[{"role": "user", "content": "List many English words."}])
    if constrained:
        kw["response_format"] = {"type": "json_schema",
                                 "json_schema": {"name": "words", "schema": SCHEMA}}
    else:
        kw["extra_body"] = {"ignore_eos": True}
    first = last = None
    tokens = 0
    for chunk in client.chat.completions.create(**kw):
        now = time.monotonic()
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or now
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, (tokens - 1) / (last - first)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base_url")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=200)
    a = p.parse_args()
    base = a.base_url.rstrip("/")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    run(client, model, 16, True)  # warm-up (grammar engine, caches)
    free, schema = [], []
    for r in range(a.rounds):
        n0, t0 = run(client, model, a.max_tokens, False)
        n1, t1 = run(client, model, a.max_tokens, True)
        free.append(t0)
        schema.append(t1)
        print(f"round {r}: no schema {n0} tokens {t0:.1f} tok/s; schema {n1} tokens {t1:.1f} tok/s",
              flush=True)
    m0, m1 = statistics.median(free), statistics.median(schema)
    print(f"median: no schema {m0:.1f} tok/s, schema {m1:.1f} tok/s, ratio {m1 / m0:.3f}")


if __name__ == "__main__":
    main()
