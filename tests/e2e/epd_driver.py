#!/usr/bin/env python3
"""Image requests through the official `openai` client, for tests/epd_e2e.rs.

Usage:
  epd_driver.py BASE_URL FIXTURE_DIR ask NAME...   one chat request per NAME, in order
  epd_driver.py BASE_URL FIXTURE_DIR bad           bad images: 400s, then a good request
  epd_driver.py BASE_URL FIXTURE_DIR urls          image URLs served by a local HTTP server
                                                   started here (the server under test must
                                                   allow 127.0.0.1 only, fetch_timeout_ms
                                                   1000, max_image_bytes 16384, 2 redirects)
  epd_driver.py BASE_URL FIXTURE_DIR urls-off      an image URL refused (remote_urls off)

NAME is `a` or `b` (the fixture's images with their questions, from serving.json) or `gN`
(a 32x32 PNG made here from the number N, asked image a's question), with `:stream` to
stream the answer. `ask` prints one JSON line per request: {"name", "text",
"prompt_tokens", "cached_tokens"}. `bad` prints one line per check and exits 1 at the first
failure. Every request has a client timeout, so the driver never hangs.
"""

import base64
import http.server
import json
import ssl
import struct
import sys
import threading
import time
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

    def check(ok: bool, what: str) -> None:
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        if not ok:
            sys.exit(1)

    def refused(url: str, why: str, says: str) -> None:
        try:
            ask(url, ref["a"]["question"], False)
            check(False, f"{why}: refused")
        except openai.BadRequestError as e:
            msg = str(e)
            check("image_url" in msg and says in msg, f"{why}: 400 saying {says!r} ({e.message[:120]})")

    if mode == "urls-off":
        refused("http://127.0.0.1:9/a.png", "an image URL with remote_urls off", "remote_urls")
        print("epd urls-off: all passed")
        return
    if mode == "urls":
        urls(fixture, ref, ask, cached, check, refused)
        return
    if mode != "bad":
        raise SystemExit(f"unknown mode {mode!r}")

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


def urls(fixture, ref, ask, cached, check, refused) -> None:
    """Image URLs against a local HTTP server (no internet)."""
    a_png = (fixture / ref["a"]["image"]).read_bytes()

    class Images(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def send(self, status: int, body: bytes, headers=(), length=True):
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            if length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = self.path
            if path == "/a.png":
                self.send(200, a_png, [("Content-Type", "image/png")])
            elif path == "/redirect":
                self.send(302, b"", [("Location", "/a.png")])
            elif path.startswith("/loop"):
                self.send(302, b"", [("Location", path + "x")])
            elif path == "/big.png":
                self.send(200, b"\0" * 40000)
            elif path == "/big-unsized.png":
                # No length: the body runs to the connection's end (HTTP/1.0).
                self.send(200, b"\0" * 40000, length=False)
            elif path == "/slow.png":
                time.sleep(3)
                self.send(200, a_png)
            elif path == "/text":
                self.send(200, b"hello, not an image", [("Content-Type", "text/plain")])
            else:
                self.send(404, b"no such image")

    def start(cert=None):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
        server.daemon_threads = True
        server.handle_error = lambda *args: None  # a client that hung up early is expected
        if cert is not None:
            tls = Path(__file__).parent / "tls"
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls / f"{cert}.pem", tls / f"{cert}.key")
            server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, server.server_address[1]

    server, port = start()
    # https: a certificate from the test CA the frontend trusts (SSL_CERT_FILE), and one
    # nobody signed.
    tls_server, tls_port = start("server")
    untrusted_server, untrusted_port = start("untrusted")
    base = f"http://127.0.0.1:{port}"
    question = ref["a"]["question"]

    text, usage = ask(f"{base}/a.png", question, False)
    check(text == ref["a"]["text"], f"image a by URL: {text!r} == transformers' {ref['a']['text']!r}")
    check(
        cached(usage) >= 32,
        f"image a by URL after image a inline: the same content hash, a prefix-cache hit ({cached(usage)})",
    )
    text, _ = ask(f"https://127.0.0.1:{tls_port}/a.png", question, False)
    check(text == ref["a"]["text"], "image a by https URL (a certificate the server trusts)")
    refused(
        f"https://127.0.0.1:{untrusted_port}/a.png",
        "https to a server whose certificate nobody signed",
        "certificate",
    )
    text, _ = ask(f"{base}/redirect", question, True)
    check(text == ref["a"]["text"], "image a through a redirect")
    refused(f"{base}/loop", "a redirect loop", "redirects more than 2 times")
    refused(f"{base}/big.png", "an image over max_image_bytes", "over the limit of 16384 bytes")
    refused(f"{base}/big-unsized.png", "an image over the limit without a length", "over the limit")
    refused(f"{base}/slow.png", "a server slower than fetch_timeout_ms", "took over 1000 ms")
    refused(f"{base}/missing.png", "a 404", "404 Not Found")
    refused(f"{base}/text", "not an image", "not a recognised image")
    refused(f"http://localhost:{port}/a.png", "a host not allowed", "allowed_hosts")
    refused(f"https://127.0.0.1:{port}/a.png", "https to a plain-HTTP server", "https://127.0.0.1")
    refused("ftp://127.0.0.1/a.png", "another scheme", "or an http(s) URL")
    text, _ = ask(f"{base}/a.png", question, False)
    check(text == ref["a"]["text"], "after the failed fetches: served as before")
    for s in (server, tls_server, untrusted_server):
        s.shutdown()
    print("epd urls: all passed")


if __name__ == "__main__":
    main()
