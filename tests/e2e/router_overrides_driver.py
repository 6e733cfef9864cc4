"""Per-request router overrides through the official `openai` client (`extra_headers`).

Usage: router_overrides_driver.py BASE_URL MODEL   (BASE_URL like http://127.0.0.1:8000)

Against `turbine up` with two workers (w0, w1) and the KV router (overlap_weight 1,
temperature 0, seed 0). Which worker served a request is read from the frontend's
/metrics (`turbine_router_decisions_total{worker}`).

1. A prompt family's first request is sent while a stream holds w0, so its prefix is cached
   on w1 (its home). Without headers every follow-up goes home.
2. `x-turbine-overlap-weight: 0` makes the router weigh load only: with both workers idle the
   tie goes to w0, away from the cache.
3. `x-turbine-router-temperature: 1000000` samples workers almost uniformly: follow-ups of
   another family whose home is w1 land on w0 too.
4. A malformed or out-of-range header value is an OpenAI-style 400 naming the header, on
   /v1/completions and /v1/chat/completions alike.

Prints "router overrides: all passed" on success; exits non-zero on the first failure.
"""

import re
import sys
import time
import urllib.request

import openai

BASE, MODEL = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=120)

WEIGHT = "x-turbine-overlap-weight"
TEMPERATURE = "x-turbine-router-temperature"


def metrics():
    with urllib.request.urlopen(BASE + "/metrics", timeout=30) as r:
        return r.read().decode()


def per_worker(name):
    out = {}
    for m in re.finditer(r'^%s\{worker="([^"]+)"\} (\S+)$' % re.escape(name), metrics(), re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def routed(send):
    """Runs `send` and returns the one worker whose decision count grew."""
    before = per_worker("turbine_router_decisions_total")
    send()
    after = per_worker("turbine_router_decisions_total")
    grew = [w for w, n in after.items() if n > before.get(w, 0.0)]
    assert len(grew) == 1, f"one request, one decision: {before} -> {after}"
    return grew[0]


def complete(prompt, headers=None):
    return client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=2,
        temperature=0,
        extra_body={"ignore_eos": True},
        extra_headers=headers or {},
    )


def family(topic):
    return "".join(f"Note {i} about the {topic}: step {i} is checked and logged. " for i in range(18))


def idle():
    """Waits (bounded) until no worker runs anything, so the next choice sees equal loads."""
    deadline = time.time() + 30
    while time.time() < deadline:
        running = per_worker("turbine_requests_running")
        if running and all(v == 0 for v in running.values()):
            return
        time.sleep(0.1)
    raise AssertionError(f"workers never went idle: {running}")


# 1. Homes on w1: a stream holds w0 while each family's first request is routed.
weight_family, temp_family = family("lighthouse"), family("greenhouse")
held = client.completions.create(
    model=MODEL,
    prompt="Count slowly from one to two hundred.",
    max_tokens=400,
    temperature=0,
    stream=True,
    extra_body={"ignore_eos": True},
)
chunks = iter(held)
next(chunks)  # routed and decoding
busy = [w for w, n in per_worker("turbine_requests_running").items() if n > 0]
assert busy == ["w0"], f"the held stream runs on w0 (ties go to the lower id): {busy}"
homes = [routed(lambda f=f: complete(f + "Question 0?")) for f in (weight_family, temp_family)]
assert homes == ["w1", "w1"], f"with w0 busy both families start on w1: {homes}"
held.close()  # cancels the stream
idle()

for f in (weight_family, temp_family):
    for q in range(1, 3):
        to = routed(lambda: complete(f + f"Question {q}?"))
        assert to == "w1", f"without headers a follow-up goes to its cached prefix: {to}"
print("defaults: follow-ups go home")

# 2. Overlap weight 0: load only; both idle, so the tie goes to w0.
idle()
to = routed(lambda: complete(weight_family + "Question 9?", {WEIGHT: "0"}))
assert to == "w0", f"{WEIGHT}: 0 ignores the cache: went to {to}"
print("overlap weight 0: routed by load, away from the cache")

# 3. A hot temperature spreads the other family's follow-ups over both workers.
seen = set()
for q in range(10, 22):
    idle()
    seen.add(routed(lambda: complete(temp_family + f"Question {q}?", {TEMPERATURE: "1000000"})))
assert seen == {"w0", "w1"}, f"{TEMPERATURE}: 1e6 samples both workers: {seen}"
print("temperature 1e6: both workers sampled")

# 4. Bad values: a 400 in OpenAI's shape, naming the header.
bad = [
    (WEIGHT, "abc"),
    (WEIGHT, "-1"),
    (WEIGHT, "inf"),
    (TEMPERATURE, "NaN"),
    (TEMPERATURE, "-0.5"),
]
for header, value in bad:
    for endpoint in ("completions", "chat"):
        try:
            if endpoint == "completions":
                complete("Hello", {header: value})
            else:
                client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "Hello"}],
                    max_tokens=2,
                    extra_headers={header: value},
                )
        except openai.BadRequestError as e:
            assert e.status_code == 400, e
            err = e.body if isinstance(e.body, dict) else {}
            err = err.get("error", err)
            assert err.get("type") == "invalid_request_error", e.body
            assert header in err.get("message", ""), e.body
            assert value in err.get("message", ""), e.body
        else:
            raise AssertionError(f"{header}: {value!r} on {endpoint} was accepted")
print("bad header values: 400 invalid_request_error naming the header")

# The server still serves.
complete("Still there?")
print("router overrides: all passed")
