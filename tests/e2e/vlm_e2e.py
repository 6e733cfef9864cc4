#!/usr/bin/env python3
"""Images through the official `openai` client against a server of the tiny Idefics3 fixture
(tests/fixtures/tiny-idefics3): answers equal to transformers' greedy output (serving.json,
from scripts/vlm-serving-reference.py), the prefix cache salted by the image, bad images
refused with a 400 while the server keeps serving.

Usage: vlm_e2e.py BASE_URL FIXTURE_DIR [--quick]
--quick: one request (image a) and its answer only. Prints one line per check; exit status 1
at the first failure.
"""

import base64
import json
import sys
from pathlib import Path

import openai


def main() -> None:
    base, fixture = sys.argv[1].rstrip("/") + "/v1", Path(sys.argv[2])
    ref = json.loads((fixture / "serving.json").read_text())["images"]
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id

    def uri(name: str) -> str:
        data = (fixture / ref[name]["image"]).read_bytes()
        return "data:image/png;base64," + base64.b64encode(data).decode()

    def ask(image_url: str, question: str, stream: bool = False):
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": question},
                ],
            }
        ]
        args = dict(model=model, messages=messages, temperature=0, max_tokens=8)
        if not stream:
            r = client.chat.completions.create(**args)
            return r.choices[0].message.content, r.usage
        text, usage = "", None
        for chunk in client.chat.completions.create(
            **args, stream=True, stream_options={"include_usage": True}
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage
        return text, usage

    def check(ok: bool, what: str) -> None:
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        if not ok:
            sys.exit(1)

    def cached(usage) -> int:
        d = usage.prompt_tokens_details
        return (d.cached_tokens or 0) if d is not None else 0

    qa = ref["a"]["question"]
    text, usage = ask(uri("a"), qa)
    check(text == ref["a"]["text"], f"image a: {text!r} == transformers' {ref['a']['text']!r}")
    if "--quick" in sys.argv:
        return
    check(usage.prompt_tokens == ref["a"]["prompt_tokens"], f"image a: {usage.prompt_tokens} prompt tokens")
    check(cached(usage) == 0, "image a, first time: nothing cached")

    text, usage = ask(uri("b"), qa)
    check(cached(usage) == 0, f"image b with image a's text: nothing of a's KV reused ({cached(usage)} cached)")

    text, usage = ask(uri("a"), qa, stream=True)
    check(text == ref["a"]["text"], f"image a again, streamed: {text!r}")
    check(cached(usage) >= 32, f"image a again: a prefix-cache hit ({cached(usage)} tokens)")

    text, usage = ask(uri("b"), ref["b"]["question"])
    check(text == ref["b"]["text"], f"image b: {text!r} == transformers' {ref['b']['text']!r}")

    for bad, why in [
        ("data:image/png;base64,aGVsbG8gd29ybGQ=", "not an image"),
        ("data:image/png;base64,!!!", "bad base64"),
    ]:
        try:
            ask(bad, qa)
            check(False, f"{why}: refused")
        except openai.BadRequestError as e:
            check("image_url" in str(e), f"{why}: 400 naming the part ({e.message[:80]})")
    text, _ = ask(uri("a"), qa)
    check(text == ref["a"]["text"], "after the bad images: served as before")
    print("vlm e2e: all passed")


if __name__ == "__main__":
    main()
