#!/usr/bin/env python3
"""End-to-end checks of an OpenAI-compatible server through the official `openai` client.

Usage: openai_e2e.py [BASE_URL] [--model M] [--concurrency N]
BASE_URL defaults to $TURBINE_E2E_BASE_URL, then http://127.0.0.1:8000 ("/v1" is appended
when missing). Prints one line per check; stops at the first failure with exit status 1.
The last line is "e2e: N passed, M failed".
"""

import argparse
import concurrent.futures
import os
import sys
import threading
import time

try:
    import openai
except ImportError:  # pragma: no cover - environment problem, not a test failure
    print("FAIL setup: the `openai` package is not installed "
          "(run scripts/setup-test-deps.sh and use $TURBINE_TEST_PYTHON)", file=sys.stderr)
    sys.exit(2)


class CheckFailed(Exception):
    pass


def expect(condition, message):
    if not condition:
        raise CheckFailed(message)


class Driver:
    def __init__(self, client, model, concurrency):
        self.client = client
        self.model = model
        self.concurrency = concurrency
        self.passed = 0

    def check(self, name, fn):
        started = time.monotonic()
        try:
            detail = fn()
        except CheckFailed as err:
            self.fail(name, str(err))
        except openai.APIError as err:
            self.fail(name, f"unexpected {type(err).__name__}: {err}")
        self.passed += 1
        took = time.monotonic() - started
        print(f"ok    {name} ({took:.1f}s){': ' + detail if detail else ''}", flush=True)

    def fail(self, name, message):
        print(f"FAIL  {name}: {message}", flush=True)
        print(f"e2e: {self.passed} passed, 1 failed", flush=True)
        sys.exit(1)

    # -- helpers --------------------------------------------------------------------------

    def chat(self, content, **kwargs):
        kwargs.setdefault("temperature", 0)
        return self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": content}], **kwargs)

    def chat_stream(self, content, **kwargs):
        """Returns (text, finish_reasons, usage, chunk count) of a streamed chat request."""
        kwargs.setdefault("temperature", 0)
        stream = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": content}], stream=True,
            stream_options={"include_usage": True}, **kwargs)
        return collect(stream, lambda choice: choice.delta.content)

    # -- checks ---------------------------------------------------------------------------

    def models_list(self):
        models = self.client.models.list().data
        expect(models, "GET /v1/models listed no model")
        ids = [m.id for m in models]
        expect(all(isinstance(i, str) and i for i in ids), f"bad model ids: {ids}")
        if self.model is None:
            self.model = ids[0]
        expect(self.model in ids, f"model {self.model!r} not among {ids}")
        return f"using {self.model!r}"

    def chat_non_streaming(self):
        max_tokens = 16
        response = self.chat("Say hello in one short sentence.", max_tokens=max_tokens)
        expect(response.object == "chat.completion", f"object is {response.object!r}")
        expect(len(response.choices) == 1, f"{len(response.choices)} choices")
        choice = response.choices[0]
        expect(choice.message.role == "assistant", f"role {choice.message.role!r}")
        text = choice.message.content
        expect(isinstance(text, str) and text.strip(), f"empty content {text!r}")
        expect(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason!r}")
        check_usage(response.usage, max_tokens)
        if choice.finish_reason == "length":
            expect(response.usage.completion_tokens == max_tokens,
                   f"finish_reason length but {response.usage.completion_tokens} tokens")
        return repr(text[:40])

    def chat_streaming(self):
        max_tokens = 16
        prompt = "Name three colours."
        text, finishes, usage, chunks = self.chat_stream(prompt, max_tokens=max_tokens)
        expect(text.strip(), f"streamed text is empty after {chunks} chunks")
        expect(len(finishes) == 1 and finishes[0] in ("stop", "length"),
               f"finish_reasons {finishes}")
        expect(usage is not None, "no usage chunk despite stream_options.include_usage")
        check_usage(usage, max_tokens)
        whole = self.chat(prompt, max_tokens=max_tokens)
        expect(whole.choices[0].message.content == text,
               f"greedy streamed text {text!r} != non-streamed {whole.choices[0].message.content!r}")
        expect(whole.usage.completion_tokens == usage.completion_tokens,
               f"usage differs: streamed {usage.completion_tokens}, "
               f"non-streamed {whole.usage.completion_tokens}")
        return f"{chunks} chunks, {usage.completion_tokens} tokens"

    def completions(self):
        max_tokens = 12
        prompt = "The capital of France is"
        whole = self.client.completions.create(model=self.model, prompt=prompt,
                                               max_tokens=max_tokens, temperature=0)
        expect(whole.object == "text_completion", f"object is {whole.object!r}")
        text = whole.choices[0].text
        expect(isinstance(text, str) and text, f"empty text {text!r}")
        expect(whole.choices[0].finish_reason in ("stop", "length"),
               f"finish_reason {whole.choices[0].finish_reason!r}")
        check_usage(whole.usage, max_tokens)
        stream = self.client.completions.create(
            model=self.model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        streamed, finishes, usage, chunks = collect(stream, lambda choice: choice.text)
        expect(streamed == text, f"greedy streamed {streamed!r} != non-streamed {text!r}")
        expect(len(finishes) == 1, f"finish_reasons {finishes}")
        expect(usage is not None, "no usage chunk despite stream_options.include_usage")
        expect(usage.completion_tokens == whole.usage.completion_tokens,
               f"usage differs: {usage.completion_tokens} vs {whole.usage.completion_tokens}")
        return f"{text[:40]!r}, {chunks} chunks"

    def greedy_determinism(self):
        prompt = "Write one sentence about the sea."
        first = self.chat(prompt, max_tokens=24).choices[0].message.content
        second = self.chat(prompt, max_tokens=24).choices[0].message.content
        expect(first == second, f"temperature 0 gave {first!r} then {second!r}")
        return None

    def max_tokens(self):
        for limit in (1, 3, 7):
            response = self.chat("Tell me a long story about a dragon.", max_tokens=limit)
            used = response.usage.completion_tokens
            expect(used <= limit, f"max_tokens {limit} but {used} completion tokens")
            response = self.chat("Tell me a long story about a dragon.", max_tokens=limit,
                                 extra_body={"ignore_eos": True})
            used = response.usage.completion_tokens
            reason = response.choices[0].finish_reason
            expect(used == limit and reason == "length",
                   f"ignore_eos, max_tokens {limit}: {used} tokens, finish_reason {reason!r}")
        return None

    def stop_string(self):
        prompt = "List the days of the week, separated by commas."
        options = dict(max_tokens=24, extra_body={"ignore_eos": True})
        text = self.chat(prompt, **options).choices[0].message.content
        stop = pick_stop(text)
        expect(stop is not None, f"answer too short to pick a stop string from: {text!r}")
        expected = text[:text.find(stop)]
        response = self.chat(prompt, stop=[stop], **options)
        got = response.choices[0].message.content
        expect(got == expected, f"stop {stop!r}: got {got!r}, expected {expected!r}")
        expect(response.choices[0].finish_reason == "stop",
               f"finish_reason {response.choices[0].finish_reason!r}")
        streamed, finishes, _, _ = self.chat_stream(prompt, stop=[stop], **options)
        expect(streamed == expected, f"stop {stop!r} streamed: got {streamed!r}, expected {expected!r}")
        expect(finishes == ["stop"], f"streamed finish_reasons {finishes}")
        return f"stop {stop!r} cut {text!r} to {expected!r}"

    def bad_requests(self):
        cases = [
            ("empty messages", lambda: self.client.chat.completions.create(
                model=self.model, messages=[])),
            ("temperature 5", lambda: self.chat("hi", temperature=5)),
        ]
        for label, call in cases:
            try:
                call()
            except openai.BadRequestError as err:
                expect(err.status_code == 400, f"{label}: status {err.status_code}")
                expect(isinstance(err.message, str) and err.message.strip(),
                       f"{label}: no error message")
                continue
            raise CheckFailed(f"{label}: the server accepted it")
        return None

    def concurrent_streams(self):
        n = self.concurrency
        prompts = [f"Count from {i} to {i + 5} in words." for i in range(n)]
        options = dict(max_tokens=16)
        alone = [self.chat_stream(p, **options)[0] for p in prompts]
        barrier = threading.Barrier(n)

        def together(prompt):
            barrier.wait(timeout=60)
            return self.chat_stream(prompt, **options)[0]

        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            results = list(pool.map(together, prompts))
        for i, (solo, batched) in enumerate(zip(alone, results)):
            expect(solo.strip(), f"request {i} produced no text")
            expect(solo == batched, f"request {i}: alone {solo!r}, with {n - 1} others {batched!r}")
        return f"{n} streams match their solo answers"


def collect(stream, text_of):
    """Concatenates a stream's text; returns (text, finish_reasons, usage, chunk count)."""
    parts, finishes, usage, count = [], [], None, 0
    for chunk in stream:
        count += 1
        for choice in chunk.choices:
            piece = text_of(choice)
            if piece:
                parts.append(piece)
            if choice.finish_reason is not None:
                finishes.append(choice.finish_reason)
        if chunk.usage is not None:
            expect(usage is None, "more than one usage chunk")
            expect(not chunk.choices, "the usage chunk carries choices")
            usage = chunk.usage
    return "".join(parts), finishes, usage, count


def check_usage(usage, max_tokens):
    expect(usage is not None, "no usage")
    expect(usage.prompt_tokens > 0, f"prompt_tokens {usage.prompt_tokens}")
    expect(0 < usage.completion_tokens <= max_tokens,
           f"completion_tokens {usage.completion_tokens} (max_tokens {max_tokens})")
    expect(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
           f"total_tokens {usage.total_tokens} != {usage.prompt_tokens} + {usage.completion_tokens}")


def pick_stop(text):
    """A short substring from the middle of `text` whose first occurrence is not at 0."""
    for length in (3, 2, 1):
        for start in range(len(text) // 2, len(text) - length + 1):
            stop = text[start:start + length]
            if stop.strip() and text.find(stop) > 0:
                return stop
    return None


def main():
    parser = argparse.ArgumentParser(description="OpenAI-client end-to-end checks")
    parser.add_argument("base_url", nargs="?",
                        default=os.environ.get("TURBINE_E2E_BASE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--model", default=os.environ.get("TURBINE_E2E_MODEL"))
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    args = parser.parse_args()
    base_url = args.base_url.rstrip("/")
    if not base_url.endswith("/v1"):
        base_url += "/v1"
    client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "unused"),
                           max_retries=0, timeout=args.timeout)
    print(f"e2e against {base_url} (openai {openai.__version__})", flush=True)
    driver = Driver(client, args.model, args.concurrency)
    driver.check("models.list", driver.models_list)
    driver.check("chat non-streaming", driver.chat_non_streaming)
    driver.check("chat streaming + include_usage", driver.chat_streaming)
    driver.check("completions streaming and not", driver.completions)
    driver.check("greedy determinism", driver.greedy_determinism)
    driver.check("max_tokens respected", driver.max_tokens)
    driver.check("stop string", driver.stop_string)
    driver.check("bad requests raise BadRequestError", driver.bad_requests)
    driver.check(f"{args.concurrency} concurrent greedy streams", driver.concurrent_streams)
    print(f"e2e: {driver.passed} passed, 0 failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
