#!/usr/bin/env python3
"""Image requests through the official `openai` client, for tests/epd_e2e.rs.

Usage:
  epd_driver.py BASE_URL FIXTURE_DIR ask NAME...   one chat request per NAME, in order
  epd_driver.py BASE_URL FIXTURE_DIR bad           bad images: 400s, then a good request

NAME is `a` or `b` (the fixture's images with their questions, from serving.json) or `gN`
(a 32x32 PNG made here from the number N, asked image a's question), with `:stream` to
stream the answer. `ask` prints one JSON line per request: {"name", "text",
"prompt_tokens", "cached_tokens"}. `bad` prints one line per check and exits 1 at the first
failure. Every request has a client timeout, so the driver never hangs.
"""

import base64
import json
import struct
import sys
import zlib
from pathlib import Path

import openai


def png(seed: int, side: int = 32) -> bytes:
    """A small RGB PNG whose pixels depend on `seed` (no imaging library needed)."""
    rows = []
    for y in range(side):
        row = bytearray([0])  # filter: none
        for x in range(side):
            row += bytes(((x * 7 + seed * 31) % 256, (y * 5 + seed * 17) % 256, (x * y + seed) % 256))
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


def uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def main() -> None:
    base, fixture, mode = sys.argv[1].rstrip("/") + "/v1", Path(sys.argv[2]), sys.argv[3]
    ref = json.loads((fixture / "serving.json").read_text())["images"]
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id

    def image(name: str) -> tuple[str, str]:
        if name in ref:
            return uri((fixture / ref[name]["image"]).read_bytes()), ref[name]["question"]
        if name.startswith("g"):
            return uri(png(int(name[1:]))), ref["a"]["question"]
        raise SystemExit(f"unknown image name {name!r}")

    def ask(image_url: str, question: str, stream: bool):
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

    def cached(usage) -> int:
        d = usage.prompt_tokens_details
        return (d.cached_tokens or 0) if d is not None else 0

    if mode == "ask":
        for spec in sys.argv[4:]:
            name, _, how = spec.partition(":")
            url, question = image(name)
            text, usage = ask(url, question, how == "stream")
            print(
                json.dumps(
                    {
                        "name": spec,
                        "text": text,
                        "prompt_tokens": usage.prompt_tokens,
                        "cached_tokens": cached(usage),
                    }
                ),
                flush=True,
            )
        return

    if mode != "bad":
        raise SystemExit(f"unknown mode {mode!r}")

    def check(ok: bool, what: str) -> None:
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        if not ok:
            sys.exit(1)

    good = png(1)
    truncated = good[: len(good) // 2]
    for bad, why, names in [
        ("data:image/png;base64,aGVsbG8gd29ybGQ=", "not an image", "not a recognised image"),
        ("data:image/png;base64,!!!", "bad base64", "base64"),
        (uri(truncated), "a truncated PNG", "corrupt"),
        ("data:image/gif;base64,R0lGODlhAQABAAAAACw=", "an unsupported type", "image/gif"),
    ]:
        try:
            ask(bad, ref["a"]["question"], False)
            check(False, f"{why}: refused")
        except openai.BadRequestError as e:
            msg = str(e)
            check(
                "image_url" in msg and names in msg,
                f"{why}: 400 naming the part and the problem ({e.message[:100]})",
            )
    url, question = image("a")
    text, _ = ask(url, question, False)
    check(text == ref["a"]["text"], f"after the bad images: served as before ({text!r})")
    print("epd bad images: all passed")


if __name__ == "__main__":
    main()
