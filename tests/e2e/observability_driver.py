#!/usr/bin/env python3
"""Two requests through the official `openai` client (run by tests/otel_e2e.rs).

Usage: observability_driver.py BASE_URL MODEL CLIENT_REQUEST_ID [TRACEPARENT]
1. A streamed chat completion sending `x-request-id: CLIENT_REQUEST_ID` (and the W3C
   `traceparent` header when given); checks the response echoes the id.
2. A plain completion sending neither header; checks the response carries a fresh id.
Prints `stream ID` and `plain ID` (the ids the server answered with), then
`observability: all passed`; exit status 1 at the first failure.
"""

import sys

import openai

BASE, MODEL, CLIENT_ID = sys.argv[1], sys.argv[2], sys.argv[3]
TRACEPARENT = sys.argv[4] if len(sys.argv) > 4 else None


def fail(msg):
    print(f"FAIL  {msg}", flush=True)
    sys.exit(1)


client = openai.OpenAI(base_url=BASE, api_key="unused", max_retries=0, timeout=120)

headers = {"x-request-id": CLIENT_ID}
if TRACEPARENT:
    headers["traceparent"] = TRACEPARENT
raw = client.chat.completions.with_raw_response.create(
    model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=6, temperature=0, stream=True, extra_headers=headers)
streamed_id = raw.headers.get("x-request-id")
text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
if streamed_id != CLIENT_ID:
    fail(f"the client's request id was not echoed: {streamed_id!r}")
if not text:
    fail("the stream carried no text")
print(f"stream {streamed_id}", flush=True)

raw = client.completions.with_raw_response.create(
    model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
plain_id = raw.headers.get("x-request-id") or ""
if not raw.parse().choices[0].text:
    fail("the completion carried no text")
if len(plain_id) != 32:
    fail(f"no fresh request id on the plain completion: {plain_id!r}")
print(f"plain {plain_id}", flush=True)
print("observability: all passed", flush=True)
