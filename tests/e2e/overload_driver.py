"""Saturates a server through the official `openai` client: `overload_driver.py BASE_URL N MAX_TOKENS`.

Round 1 ("refused"): N concurrent streamed chat requests from a client that does not retry
(`max_retries=0`), so a refusal surfaces as the SDK's own exception. Each request ends as one
of: `ok` (streamed to a finish_reason), `rate_limited` (`openai.RateLimitError`, its 429's
`Retry-After` header recorded), or an error class name (anything else: the test fails on it).

Round 2 ("retried"): the same N requests from a client with the SDK's default behaviour
plus retries (`max_retries=20`): it backs off on each 429 (honouring `Retry-After`) and every
request must end `ok`.

Prints one JSON line per round:
{"round": "refused", "statuses": {"ok": .., "rate_limited": ..}, "retry_after": [..]}
and exits 0 (the test decides what is right).
"""
import asyncio
import collections
import json
import sys

try:
    import openai
except ImportError:
    print("the openai package is missing (use $TURBINE_TEST_PYTHON)", file=sys.stderr)
    sys.exit(2)


async def one(client, model, i, max_tokens, retry_after):
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Count to ten, request {i}."}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        finish = None
        async for chunk in stream:
            for c in chunk.choices:
                if c.finish_reason:
                    finish = c.finish_reason
        return "ok" if finish else "no finish_reason"
    except openai.RateLimitError as e:
        retry_after.append(e.response.headers.get("retry-after"))
        return "rate_limited"
    except Exception as e:  # noqa: BLE001 - reported, the test fails on it
        return f"{type(e).__name__}: {e}"


async def round_of(base_url, n, max_tokens, retries, name):
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", timeout=300,
                                max_retries=retries)
    model = (await client.models.list()).data[0].id
    retry_after = []
    statuses = await asyncio.gather(
        *[one(client, model, i, max_tokens, retry_after) for i in range(n)])
    await client.close()
    print(json.dumps({"round": name, "statuses": dict(collections.Counter(statuses)),
                      "retry_after": retry_after}), flush=True)


async def main(base_url, n, max_tokens):
    await round_of(base_url, n, max_tokens, 0, "refused")
    await round_of(base_url, n, max_tokens, 20, "retried")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
