"""Opens N concurrent streamed chat requests through the official `openai` client and waits
for all of them: `concurrent_streams.py BASE_URL N MAX_TOKENS [PROMPT_WORDS]`.

Each request gets a distinct prompt (so the prefix cache cannot share blocks between them)
of about PROMPT_WORDS words. Prints `statuses: {...}` and exits 1 unless every request
finished with a finish_reason. 429s are retried by the client (it honours Retry-After)."""
import asyncio
import collections
import sys

import openai


async def main(base_url, n, max_tokens, words):
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=8, timeout=600)
    model = (await client.models.list()).data[0].id

    async def one(i):
        text = f"Request {i}: " + " ".join(f"w{i}x{j}" for j in range(words))
        try:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": text}],
                max_tokens=max_tokens, temperature=0, stream=True)
            finish = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            return "ok" if finish else "no finish_reason"
        except openai.APIStatusError as e:
            return f"http {e.status_code}"
        except Exception as e:  # noqa: BLE001 - reported, then the run fails
            return type(e).__name__

    statuses = collections.Counter(await asyncio.gather(*[one(i) for i in range(n)]))
    print(f"statuses: {dict(statuses)}", flush=True)
    return 0 if statuses == {"ok": n} else 1


if __name__ == "__main__":
    url, n, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    words = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    sys.exit(asyncio.run(main(url, n, max_tokens, words)))
