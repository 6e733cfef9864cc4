#!/usr/bin/env python3
"""Custom stages through the official `openai` client (run by tests/stages_e2e.rs).

Usage: stages_driver.py BASE_URL MODEL SCENARIO
SCENARIO `local`: the cluster runs `key_guard` (keys sk-cap: max_tokens 3; sk-slow: 1
request a minute; sk-open: no limits) then `redact` (every digit run). Checks the guard's
refusals (401, 429) as the client's exceptions, its rewrite (max_tokens capped), the
request id header both ways, and the redaction on plain and streamed output.
SCENARIO `remote`: `redact` runs in its own process; the output is redacted.
Prints one line per check; exit status 1 at the first failure.
"""

import re
import sys

import openai

BASE, MODEL, SCENARIO = sys.argv[1], sys.argv[2], sys.argv[3]
COUNTING = "1, 2, 3, 4, 5,"


def client(key):
    # No retries: a 429 or 500 must reach the test, not be retried away.
    return openai.OpenAI(base_url=BASE, api_key=key, max_retries=0, timeout=60)


def expect(cond, msg):
    if not cond:
        print(f"FAIL  {msg}", flush=True)
        sys.exit(1)


def ok(msg):
    print(f"ok    {msg}", flush=True)


def counted(key):
    """A greedy continuation of a count: digits unless a stage redacted them."""
    r = client(key).completions.create(model=MODEL, prompt=COUNTING, max_tokens=12, temperature=0)
    return r.choices[0].text


def check_redaction(key):
    text = counted(key)
    expect(not re.search(r"\d", text), f"digits reached the client: {text!r}")
    expect("[REDACTED]" in text, f"nothing was redacted: {text!r}")
    ok(f"completion redacted: {text!r}")
    stream = client(key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 10."}],
        max_tokens=24, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    expect(not re.search(r"\d", text), f"digits reached the streaming client: {text!r}")
    ok(f"stream redacted: {text!r}")


def local():
    try:
        client("sk-unknown").completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        expect(False, "an unknown key was served")
    except openai.AuthenticationError as e:
        expect(e.status_code == 401 and e.code == "invalid_api_key", f"{e.status_code} {e.code}")
        expect(e.response.headers.get("x-request-id"), "no x-request-id on a refusal")
        ok(f"unknown key refused: {e.message}")

    raw = client("sk-cap").completions.with_raw_response.create(
        model=MODEL, prompt="The capital of France is", max_tokens=10, temperature=0,
        extra_headers={"x-request-id": "test-req-42"})
    expect(raw.headers.get("x-request-id") == "test-req-42",
           f"the client's request id was not honoured: {raw.headers.get('x-request-id')}")
    r = raw.parse()
    expect(r.usage.completion_tokens == 3,
           f"key_guard did not cap max_tokens 10 at 3: {r.usage.completion_tokens} tokens")
    ok("max_tokens rewritten to the key's cap (3); x-request-id honoured")

    generated = client("sk-open").completions.with_raw_response.create(
        model=MODEL, prompt="Hi", max_tokens=1)
    expect(len(generated.headers.get("x-request-id", "")) == 32, "no fresh x-request-id")
    ok("a fresh x-request-id when the client sent none")

    client("sk-slow").completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    try:
        client("sk-slow").completions.create(model=MODEL, prompt="Hi", max_tokens=1)
        expect(False, "a key over its rate was served")
    except openai.RateLimitError as e:
        expect(e.code == "rate_limit_exceeded", f"code {e.code}")
        expect(e.response.headers.get("retry-after"), "no Retry-After")
        ok(f"rate limit: {e.message} (Retry-After {e.response.headers.get('retry-after')})")

    check_redaction("sk-open")


def remote():
    check_redaction("any")


{"local": local, "remote": remote}[SCENARIO]()
print("stages: all passed", flush=True)
