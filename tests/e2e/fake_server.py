#!/usr/bin/env python3
"""A tiny OpenAI-compatible stand-in server (stdlib only) for testing the e2e driver and the
bench without a model.

Its "model" is deterministic: a "token" is a whitespace-separated word; the answer repeats the
prompt's words in order, one token per word, and ends (finish_reason "stop") after as many
tokens as the prompt has words, or at max_tokens ("length"); with ignore_eos it cycles until
max_tokens. Stop strings cut the text. Temperature does not change the output.

`--fault NAME` makes it break one promise on purpose, so tests can check that the e2e driver
notices (see selftest.py); FAULTS below lists them.

Usage: fake_server.py [--port N] [--fault NAME]
(prints "listening on http://127.0.0.1:PORT" when ready)
"""

import argparse
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = {
    "none": "behave",
    "no-usage": "ignore stream_options.include_usage",
    "nondeterministic": "vary greedy answers between requests",
    "ignore-stop": "ignore stop strings",
    "accept-bad": "accept temperature 5",
    "overrun": "emit one token more than max_tokens",
    "batch-drift": "answer differently while other requests are in flight",
}
FAULT = "none"

MODEL = "fake-echo"
CONTEXT = 4096
DEFAULT_MAX_TOKENS = 16
# Seconds between streamed tokens: long enough that concurrent streams really interleave.
TOKEN_DELAY = 0.002

_serial_lock = threading.Lock()
_serial = [0]


def next_id():
    with _serial_lock:
        _serial[0] += 1
        return _serial[0]


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self):
        return {
            "error": {
                "message": self.message,
                "type": "invalid_request_error",
                "param": self.param,
                "code": self.code,
            }
        }


def validate(body, chat):
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != MODEL:
        raise ApiError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "`messages` must be a non-empty list", "messages")
        parts = []
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, str):
                raise ApiError(400, f"`messages[{i}].content` must be a string", f"messages[{i}]")
            parts.append(content)
        prompt = "\n".join(parts)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "`prompt` must be a string", "prompt")
    temperature = body.get("temperature", 1.0)
    if FAULT != "accept-bad" and (
            not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2):
        raise ApiError(400, "`temperature` must be between 0 and 2", "temperature")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, "`max_tokens` must be at least 1", "max_tokens")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if FAULT == "ignore-stop":
        stop = []
    return prompt, max_tokens, stop, bool(body.get("ignore_eos", False))


_in_flight_lock = threading.Lock()
_in_flight = [0]


class InFlight:
    """Counts a request as in flight from arrival until release() (idempotent)."""

    def __init__(self):
        with _in_flight_lock:
            _in_flight[0] += 1
            self.crowded = _in_flight[0] > 1
        self.held = True

    def release(self):
        if self.held:
            self.held = False
            with _in_flight_lock:
                _in_flight[0] -= 1


def generate(prompt, max_tokens, stop, ignore_eos, serial, crowded):
    """Returns (token texts, finish_reason, prompt_tokens)."""
    words = prompt.split() or ["empty"]
    if FAULT == "nondeterministic":
        words = words + [f"r{serial}"]
    if FAULT == "batch-drift" and crowded:
        words = ["crowded"] + words
    natural = len(words)
    count = max_tokens if ignore_eos else min(natural, max_tokens)
    finish = "length" if count == max_tokens else "stop"
    if FAULT == "overrun":
        count = max_tokens + 1
    tokens = [(" " if i else "") + words[i % len(words)] for i in range(count)]
    text = "".join(tokens)
    cuts = [text.find(s) for s in stop if s and s in text]
    if cuts:
        keep, out = min(cuts), []
        for token in tokens:
            if keep <= 0:
                break
            out.append(token[:keep])
            keep -= len(token)
        tokens, finish = out, "stop"
    return tokens, finish, len(words)


def usage(prompt_tokens, completion_tokens):
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        # Without this, Nagle's algorithm holds small SSE writes back ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):  # quiet
        pass

    def send_json(self, status, value):
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            card = {"id": MODEL, "object": "model", "created": 0, "owned_by": "turbine-tests",
                    "max_model_len": CONTEXT}
            self.send_json(200, {"object": "list", "data": [card]})
        elif self.path == "/health":
            self.send_json(200, {"status": "ok"})
        else:
            self.send_json(404, ApiError(404, f"Unknown request URL: {self.path}").body())

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        chat = self.path == "/v1/chat/completions"
        if not chat and self.path != "/v1/completions":
            self.send_json(404, ApiError(404, f"Unknown request URL: {self.path}").body())
            return
        try:
            body = json.loads(raw or b"null")
            prompt, max_tokens, stop, ignore_eos = validate(body, chat)
        except ApiError as err:
            self.send_json(err.status, err.body())
            return
        except ValueError as err:
            self.send_json(400, ApiError(400, f"request body is not valid JSON: {err}").body())
            return
        slot = InFlight()
        try:
            self.answer(body, chat, prompt, max_tokens, stop, ignore_eos, slot)
        finally:
            slot.release()

    def answer(self, body, chat, prompt, max_tokens, stop, ignore_eos, slot):
        serial = next_id()
        tokens, finish, prompt_tokens = generate(prompt, max_tokens, stop, ignore_eos, serial,
                                                 slot.crowded)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{serial}", "created": int(time.time()),
                "model": MODEL}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            include_usage = include_usage and FAULT != "no-usage"
            self.stream(chat, meta, tokens, finish, usage(prompt_tokens, len(tokens)), include_usage,
                        slot)
            return
        text = "".join(tokens)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        slot.release()
        self.send_json(200, dict(meta, object=obj, choices=[choice],
                                 usage=usage(prompt_tokens, len(tokens))))

    def stream(self, chat, meta, tokens, finish, usage_body, include_usage, slot):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def send(payload):
            data = f"data: {payload}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def chunk(text=None, finish_reason=None, role=None):
            if chat:
                delta = {}
                if role:
                    delta["role"] = role
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None,
                          "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None,
                          "finish_reason": finish_reason}
            return json.dumps(dict(meta, object=obj, choices=[choice]))

        try:
            if chat:
                send(chunk("", role="assistant"))
            for token in tokens:
                time.sleep(TOKEN_DELAY)
                send(chunk(token))
            send(chunk(None if chat else "", finish_reason=finish))
            if include_usage:
                send(json.dumps(dict(meta, object=obj, choices=[], usage=usage_body)))
            # Leave the in-flight count before the client can see the end of the answer, so
            # its next request never finds this one still "in flight".
            slot.release()
            send("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: pick a free port")
    parser.add_argument("--fault", choices=sorted(FAULTS), default="none")
    args = parser.parse_args()
    global FAULT
    FAULT = args.fault
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
