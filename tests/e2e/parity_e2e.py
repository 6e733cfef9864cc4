#!/usr/bin/env python3
"""OpenAI-API parity checks (issue 18) through the official `openai` client, against one
running server: n > 1, logit_bias, echo (with prompt logprobs), token-id and batched prompts, stop_token_ids,
min_tokens, penalties, /tokenize and /detokenize, and human 400s for bad fields.

Usage: parity_e2e.py BASE_URL [--model M]
Prints one line per check; stops at the first failure with exit status 1. Grouped in one
script so that one server start serves every assertion (CI has 2 cores).
"""

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

import openai
from typing import Annotated, List, Literal

from pydantic import BaseModel, Field, ValidationError

SERDE_WORDS = ("variant", "untagged", "invalid type", "expected f64", "expected u64")


class CheckFailed(Exception):
    pass


def expect(condition, message):
    if not condition:
        raise CheckFailed(message)


def post(root, path, body):
    """Raw POST (for the endpoints and bodies the client does not make); (status, json)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(root + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class Parity:
    def __init__(self, client, root, model):
        self.client = client
        self.root = root
        self.model = model
        self.passed = 0

    def check(self, name, fn):
        started = time.monotonic()
        try:
            detail = fn()
        except CheckFailed as err:
            print(f"FAIL  {name}: {err}", flush=True)
            print(f"parity: {self.passed} passed, 1 failed", flush=True)
            sys.exit(1)
        except openai.APIError as err:
            print(f"FAIL  {name}: unexpected {type(err).__name__}: {err}", flush=True)
            print(f"parity: {self.passed} passed, 1 failed", flush=True)
            sys.exit(1)
        self.passed += 1
        took = time.monotonic() - started
        print(f"ok    {name} ({took:.1f}s){': ' + detail if detail else ''}", flush=True)

    # -- helpers ----------------------------------------------------------------------

    def complete(self, prompt, **kw):
        kw.setdefault("temperature", 0)
        kw.setdefault("max_tokens", 12)
        return self.client.completions.create(model=self.model, prompt=prompt, **kw)

    def complete_stream(self, prompt, **kw):
        """Streams a completion; returns ({index: text}, {index: finish_reason}, usage)."""
        kw.setdefault("temperature", 0)
        kw.setdefault("max_tokens", 12)
        stream = self.client.completions.create(model=self.model, prompt=prompt, stream=True,
                                                stream_options={"include_usage": True}, **kw)
        texts, finishes, usage = {}, {}, None
        for chunk in stream:
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + (c.text or "")
                if c.finish_reason is not None:
                    expect(c.index not in finishes, f"choice {c.index} finished twice")
                    finishes[c.index] = c.finish_reason
            if chunk.usage is not None:
                usage = chunk.usage
        return texts, finishes, usage

    def tokenize(self, text, special=False):
        status, body = post(self.root, "/tokenize",
                            {"prompt": text, "add_special_tokens": special})
        expect(status == 200, f"/tokenize {status}: {body}")
        return body["tokens"]

    # -- checks -----------------------------------------------------------------------

    def n_samples(self):
        prompt = "Once upon a time"
        hot = self.complete(prompt, n=3, temperature=1.0, max_tokens=16, seed=11)
        texts = [c.text for c in sorted(hot.choices, key=lambda c: c.index)]
        expect([c.index for c in hot.choices] == [0, 1, 2], f"indices {[c.index for c in hot.choices]}")
        expect(len(set(texts)) == 3, f"temperature 1, n=3 gave {texts}")
        greedy = self.complete(prompt, n=3, max_tokens=16)
        same = [c.text for c in greedy.choices]
        expect(len(same) == 3 and len(set(same)) == 1, f"greedy n=3 gave {same}")
        solo = self.complete(prompt, max_tokens=16)
        expect(greedy.usage.prompt_tokens == solo.usage.prompt_tokens,
               f"n=3 counts the prompt {greedy.usage.prompt_tokens} vs {solo.usage.prompt_tokens}")
        expect(greedy.usage.completion_tokens == 3 * solo.usage.completion_tokens,
               f"completion tokens {greedy.usage.completion_tokens} vs 3 x {solo.usage.completion_tokens}")
        streamed, finishes, usage = self.complete_stream(prompt, n=3, temperature=1.0,
                                                          max_tokens=16, seed=11)
        expect(sorted(streamed) == [0, 1, 2] and sorted(finishes) == [0, 1, 2],
               f"streamed choices {streamed}, finishes {finishes}")
        expect([streamed[i] for i in range(3)] == texts,
               f"seeded stream {streamed} != non-streamed {texts}")
        expect(usage is not None and usage.completion_tokens == hot.usage.completion_tokens,
               f"streamed usage {usage}")
        chat = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": "Name a fruit."}],
            n=3, temperature=0, max_tokens=8)
        answers = [c.message.content for c in chat.choices]
        expect(len(answers) == 3 and len(set(answers)) == 1, f"greedy chat n=3 gave {answers}")
        return f"{texts}"

    def logit_bias(self):
        prompt = "The capital of France is"
        first = self.complete(prompt, max_tokens=1).choices[0].text
        ids = self.tokenize(first)
        expect(len(ids) == 1, f"first token {first!r} tokenizes to {ids}")
        banned = ids[0]
        for stream in (False, True):
            kw = dict(max_tokens=8, logprobs=1, logit_bias={str(banned): -100})
            if stream:
                pieces = []
                for chunk in self.client.completions.create(model=self.model, prompt=prompt,
                                                            temperature=0, stream=True, **kw):
                    for c in chunk.choices:
                        if c.logprobs is not None:
                            pieces.extend(c.logprobs.tokens)
            else:
                pieces = self.complete(prompt, **kw).choices[0].logprobs.tokens
            expect(pieces and first not in pieces,
                   f"stream={stream}: banned {first!r} (id {banned}) still in {pieces}")
        favoured = self.complete(prompt, max_tokens=3, logit_bias={str(banned): 100},
                                 temperature=1.0, seed=3)
        expect(favoured.choices[0].text == first * 3,
               f"bias 100 on {first!r}: got {favoured.choices[0].text!r}")
        return f"banned {first!r} (id {banned})"

    def echo(self):
        prompt = "The capital of France is"
        whole = self.complete(prompt, echo=True)
        plain = self.complete(prompt)
        expect(whole.choices[0].text == prompt + plain.choices[0].text,
               f"echo gave {whole.choices[0].text!r}")
        streamed, _, _ = self.complete_stream(prompt, echo=True)
        expect(streamed[0] == whole.choices[0].text, f"streamed echo {streamed[0]!r}")
        ids = self.tokenize(prompt)
        by_ids = self.complete(ids, echo=True)
        expect(by_ids.choices[0].text.startswith(prompt),
               f"echo of a token-id prompt gave {by_ids.choices[0].text!r}")
        return None

    def echo_logprobs(self):
        prompt = "The capital of France is"
        whole = self.complete(prompt, echo=True, logprobs=2, max_tokens=4)
        c, u = whole.choices[0], whole.usage
        lp = c.logprobs
        expect(c.text.startswith(prompt), f"echo gave {c.text!r}")
        expect(len(lp.tokens) == u.prompt_tokens + u.completion_tokens,
               f"{len(lp.tokens)} logprob tokens for {u.prompt_tokens} + {u.completion_tokens}")
        expect(lp.token_logprobs[0] is None and lp.top_logprobs[0] is None,
               f"the first prompt token has a logprob: {lp.token_logprobs[0]}")
        expect(all(x is not None and x <= 0 for x in lp.token_logprobs[1:]),
               f"token_logprobs {lp.token_logprobs}")
        expect(all(1 <= len(t) <= 2 for t in lp.top_logprobs[1:]), f"top {lp.top_logprobs}")
        expect("".join(lp.tokens).endswith(c.text), f"tokens {lp.tokens} vs text {c.text!r}")
        expect(lp.text_offset == sorted(lp.text_offset), f"text_offset {lp.text_offset}")
        # The generated part is what it is without echo.
        plain = self.complete(prompt, logprobs=2, max_tokens=4).choices[0].logprobs
        got = lp.token_logprobs[u.prompt_tokens:]
        expect(lp.tokens[u.prompt_tokens:] == plain.tokens
               and all(abs(a - b) < 1e-2 for a, b in zip(got, plain.token_logprobs)),
               f"generated logprobs {got} vs {plain.token_logprobs} without echo")
        # A prompt token's logprob is the model's: forcing that token after its prefix
        # (logit_bias +100; logprobs are of the unbiased distribution) reports the same.
        ids = self.tokenize(prompt, special=True)
        expect(len(ids) == u.prompt_tokens, f"/tokenize {ids} vs usage {u}")
        k = 3
        forced = self.complete(ids[:k], max_tokens=1, logprobs=0,
                               logit_bias={str(ids[k]): 100}).choices[0].logprobs
        expect(abs(forced.token_logprobs[0] - lp.token_logprobs[k]) < 1e-2,
               f"prompt token {k}: {lp.token_logprobs[k]} echoed, {forced.token_logprobs[0]} forced")
        streamed, _, _ = self.complete_stream(prompt, echo=True, logprobs=2, max_tokens=4)
        expect(streamed[0] == c.text, f"streamed {streamed[0]!r} vs {c.text!r}")
        two = self.complete(prompt, echo=True, logprobs=1, max_tokens=2, n=2)
        expect(all(x.logprobs.token_logprobs[1] == lp.token_logprobs[1] for x in two.choices),
               f"n=2: {[x.logprobs.token_logprobs[:3] for x in two.choices]}")
        return f"{lp.tokens[1]!r} {lp.token_logprobs[1]:.3f}"

    def teacher_forced(self, ids, generate):
        """Teacher forcing: the logprob the server reports for each token it generated
        (greedy, one decode step each) equals that token's prompt logprob when prompt and
        generated tokens are sent back as the prompt with echo (every position computed,
        past the prefix cache that now holds the prompt's blocks). Returns the largest
        difference."""
        gen = self.complete(ids, max_tokens=generate, logprobs=0,
                            extra_body={"ignore_eos": True})
        glp = gen.choices[0].logprobs
        expect(len(glp.tokens) == generate, f"generated {glp.tokens}")
        # The generated tokens' ids, by tokenizing the text again; the echo below shows
        # the same token strings, so these are the tokens that were generated.
        both = ids + self.tokenize(gen.choices[0].text)
        expect(len(both) == len(ids) + generate,
               f"retokenized {len(both) - len(ids)} tokens for {generate}")
        again = self.complete(both, echo=True, logprobs=0, max_tokens=1)
        alp = again.choices[0].logprobs
        u = again.usage
        expect(u.prompt_tokens == len(both), f"usage {u}")
        cached = getattr(getattr(u, "prompt_tokens_details", None), "cached_tokens", None)
        expect(cached == 0, f"the echoed prompt was read from the prefix cache: {cached} tokens")
        # The blocks were there to take: the same prompt without echo reads them.
        plain = self.complete(both, max_tokens=1).usage.prompt_tokens_details.cached_tokens
        expect(plain >= len(ids) // 16 * 16 - 16,
               f"without echo only {plain} of {len(both)} tokens came from the prefix cache")
        expect(len(alp.token_logprobs) == len(both) + 1 and alp.token_logprobs[0] is None,
               f"{len(alp.token_logprobs)} entries for {len(both)} + 1 tokens")
        echoed = alp.tokens[len(ids):len(both)]
        expect(echoed == glp.tokens, f"echoed {echoed} vs generated {glp.tokens}")
        got = alp.token_logprobs[len(ids):len(both)]
        diffs = [abs(a - b) for a, b in zip(got, glp.token_logprobs)]
        expect(max(diffs) < 1e-3,
               f"prompt vs generated logprobs differ by up to {max(diffs):.2e}: "
               f"{got} vs {glp.token_logprobs}")
        return max(diffs)

    def echo_logprobs_teacher_forced(self):
        short = self.teacher_forced(self.tokenize("The three primary colours are", special=True), 24)
        # A prompt past one step's budget (512 tokens by default) is computed in chunks:
        # 500 prompt + 24 generated tokens put the chunk boundary among the generated ones.
        text = " ".join(f"Item {i} costs {3 * i + 1} dollars." for i in range(120))
        ids = self.tokenize(text, special=True)
        expect(len(ids) > 500, f"{len(ids)} tokens")
        long = self.teacher_forced(ids[:500], 24)
        return f"largest difference {short:.1e} (short prompt), {long:.1e} (524 tokens, chunked)"

    def prompt_forms(self):
        prompt = "The capital of France is"
        text = self.complete(prompt).choices[0].text
        status, body = post(self.root, "/tokenize", {"prompt": prompt})
        expect(status == 200, f"/tokenize: {body}")
        by_ids = self.complete(body["tokens"])
        expect(by_ids.choices[0].text == text,
               f"token ids {body['tokens']} gave {by_ids.choices[0].text!r}, text gave {text!r}")
        expect(by_ids.usage.prompt_tokens == body["count"], f"usage {by_ids.usage}")
        other = "Water boils at"
        solo = self.complete(other).choices[0].text
        batch = self.complete([prompt, other])
        got = {c.index: c.text for c in batch.choices}
        expect(got == {0: text, 1: solo}, f"batch {got}, solo {[text, solo]}")
        lists = self.complete([body["tokens"], self.tokenize(other, special=True)])
        expect({c.index: c.text for c in lists.choices} == {0: text, 1: solo},
               f"batch of token lists: {lists.choices}")
        streamed, finishes, _ = self.complete_stream([prompt, other], n=2)
        expect(streamed == {0: text, 1: text, 2: solo, 3: solo},
               f"streamed batch x n=2: {streamed}")
        return None

    def stop_ids_and_min_tokens(self):
        prompt = "Monday, Tuesday, Wednesday,"
        whole = self.complete(prompt, max_tokens=10, logprobs=1, extra_body={"ignore_eos": True})
        pieces = whole.choices[0].logprobs.tokens
        expect(len(pieces) == 10, f"{pieces}")
        k = next((i for i in range(2, 10) if len(self.tokenize(pieces[i])) == 1), None)
        expect(k is not None, f"no single-token piece in {pieces}")
        stop_id = self.tokenize(pieces[k])[0]
        at = pieces.index(pieces[k])
        cut = self.complete(prompt, max_tokens=10, extra_body={"stop_token_ids": [stop_id]})
        expect(cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens == at + 1,
               f"stop_token_ids [{stop_id}] ({pieces[k]!r}): {cut.usage.completion_tokens} tokens, "
               f"{cut.choices[0].finish_reason}; pieces {pieces}")
        # A question the model answers briefly, then min_tokens past its end.
        short = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": "Hi"}],
            temperature=0, max_tokens=64)
        n = short.usage.completion_tokens
        expect(short.choices[0].finish_reason == "stop" and n < 40,
               f"expected a short answer, got {n} tokens ({short.choices[0].finish_reason})")
        longer = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": "Hi"}],
            temperature=0, max_tokens=64, extra_body={"min_tokens": n + 10})
        expect(longer.usage.completion_tokens >= n + 10,
               f"min_tokens {n + 10}: {longer.usage.completion_tokens} tokens")
        return f"stop id {stop_id} after {at + 1} tokens; min_tokens {n}->{longer.usage.completion_tokens}"

    def penalties(self):
        prompt = "apple apple apple apple apple apple"
        plain = self.complete(prompt, max_tokens=16).choices[0].text
        freq = self.complete(prompt, max_tokens=16, frequency_penalty=2.0).choices[0].text
        pres = self.complete(prompt, max_tokens=16, presence_penalty=2.0).choices[0].text
        expect(freq != plain and pres != plain,
               f"penalties changed nothing: {plain!r} / {freq!r} / {pres!r}")
        expect(freq.count("apple") <= plain.count("apple"), f"{plain!r} vs {freq!r}")
        return f"{plain!r} -> {freq!r}"

    def tokenize_detokenize(self):
        text = "Hello, world! Ünïcödé"
        ids = self.tokenize(text)
        status, body = post(self.root, "/detokenize", {"tokens": ids})
        expect(status == 200 and body["prompt"] == text, f"/detokenize {status}: {body}")
        messages = [{"role": "user", "content": "Hi there"}]
        status, body = post(self.root, "/tokenize", {"messages": messages, "model": self.model})
        expect(status == 200, f"/tokenize messages {status}: {body}")
        chat = self.client.chat.completions.create(model=self.model, messages=messages,
                                                   max_tokens=1, temperature=0)
        expect(body["count"] == chat.usage.prompt_tokens,
               f"/tokenize counts {body['count']}, the chat's usage {chat.usage.prompt_tokens}")
        status, body = post(self.root, "/detokenize", {"tokens": [10 ** 9]})
        expect(status == 400 and "vocabulary" in body["error"]["message"], f"{status}: {body}")
        return f"{len(ids)} tokens"

    def human_errors(self):
        chat = [{"role": "user", "content": "hi"}]
        cases = [
            ("stop: 5", "stop", lambda: self.complete("x", stop=5)),
            ("prompt [1, 'a']", "prompt", lambda: self.complete([1, "a"])),
            ("content null", "messages[0].content", lambda: self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": None}])),
            ("unknown field", "frobnicate", lambda: self.client.chat.completions.create(
                model=self.model, messages=chat, extra_body={"frobnicate": 1})),
            ("refused field", "functions", lambda: self.client.chat.completions.create(
                model=self.model, messages=chat, extra_body={"functions": [{"name": "f"}]})),
            ("token id out of range", None, lambda: self.complete([10 ** 9])),
        ]
        for label, param, call in cases:
            try:
                call()
            except openai.BadRequestError as err:
                body = err.body or {}
                message = body.get("message", "") if isinstance(body, dict) else ""
                expect(message, f"{label}: no message in {err.body}")
                expect(not any(w in message for w in SERDE_WORDS), f"{label}: {message}")
                if param is not None:
                    expect(body.get("param") == param, f"{label}: param {body.get('param')}")
                continue
            raise CheckFailed(f"{label}: accepted")
        # A lone surrogate, as Python's json writes one.
        raw = b'{"prompt": "a\\ud800b", "max_tokens": 1}'
        status, body = post(self.root, "/v1/completions", raw)
        message = body["error"]["message"]
        expect(status == 400 and "surrogate" in message and "hex escape" not in message,
               f"lone surrogate: {status} {message}")
        return None


# Schemas for structured outputs and tool arguments, as pydantic models: pydantic writes the
# JSON schema the server must enforce and validates what comes back, independently of turbine.
class Weather(BaseModel):
    city: str = Field(max_length=24)
    unit: Literal["celsius", "fahrenheit"]


class Order(BaseModel):
    item: Literal["apple", "bread", "milk"]
    quantity: int = Field(ge=1, le=99)
    express: bool


class Tags(BaseModel):
    tags: List[Annotated[str, Field(max_length=16)]] = Field(min_length=1, max_length=3)


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=150)
    address: Weather  # a nested object ($defs / $ref in the schema)


def strict(schema):
    """The schema as OpenAI's strict mode wants it: no properties beyond those listed."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if schema.get("type") == "object":
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def tool(name, model, description):
    return {"type": "function", "function": {"name": name, "description": description,
                                              "parameters": strict(model.model_json_schema()),
                                              "strict": True}}


WEATHER = tool("get_weather", Weather, "Current weather of a city")
ORDER = tool("place_order", Order, "Order groceries")


class Tools:
    """Tool calling and structured outputs (issue 18 items 1 and 2)."""

    def __init__(self, parity):
        self.p = parity
        self.client = parity.client
        self.model = parity.model

    def chat(self, messages, **kw):
        kw.setdefault("temperature", 0)
        kw.setdefault("max_tokens", 96)
        return self.client.chat.completions.create(model=self.model, messages=messages, **kw)

    def stream_tool_calls(self, messages, **kw):
        """Streams and assembles tool calls as a client does: by index, name then arguments."""
        kw.setdefault("temperature", 0)
        kw.setdefault("max_tokens", 96)
        calls, content, finish = {}, "", None
        for chunk in self.client.chat.completions.create(model=self.model, messages=messages,
                                                         stream=True, **kw):
            for c in chunk.choices:
                if c.delta.content:
                    content += c.delta.content
                for d in c.delta.tool_calls or []:
                    call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                    if d.id:
                        call["id"] = d.id
                    if d.function and d.function.name:
                        call["name"] += d.function.name
                    if d.function and d.function.arguments:
                        call["arguments"] += d.function.arguments
                if c.finish_reason is not None:
                    finish = c.finish_reason
        return [calls[i] for i in sorted(calls)], content, finish

    def named_tool_call(self):
        ask = [{"role": "user", "content": "What is the weather in Paris?"}]
        choice = {"type": "function", "function": {"name": "get_weather"}}
        r = self.chat(ask, tools=[WEATHER, ORDER], tool_choice=choice)
        msg = r.choices[0].message
        expect(r.choices[0].finish_reason == "tool_calls", f"finish {r.choices[0].finish_reason}")
        expect(msg.tool_calls and len(msg.tool_calls) == 1, f"tool_calls {msg.tool_calls}, content {msg.content!r}")
        call = msg.tool_calls[0]
        expect(call.type == "function" and call.id, f"call {call}")
        expect(call.function.name == "get_weather", f"name {call.function.name}")
        try:
            args = Weather.model_validate_json(call.function.arguments)
        except ValidationError as err:
            raise CheckFailed(f"arguments {call.function.arguments!r}: {err}")
        calls, content, finish = self.stream_tool_calls(ask, tools=[WEATHER, ORDER],
                                                        tool_choice=choice)
        expect(finish == "tool_calls" and len(calls) == 1, f"streamed {calls} {finish}")
        expect(calls[0]["name"] == "get_weather" and calls[0]["id"], f"streamed {calls}")
        expect(calls[0]["arguments"] == call.function.arguments,
               f"streamed {calls[0]['arguments']!r} vs {call.function.arguments!r}")
        return f"{call.function.name}({args.model_dump_json()})"

    def required_tool_call(self):
        ask = [{"role": "user", "content": "Please order three loaves of bread, express."}]
        r = self.chat(ask, tools=[WEATHER, ORDER], tool_choice="required", temperature=0.7, seed=5)
        calls = r.choices[0].message.tool_calls or []
        expect(len(calls) == 1, f"tool_calls {calls}")
        name, arguments = calls[0].function.name, calls[0].function.arguments
        model = {"get_weather": Weather, "place_order": Order}.get(name)
        expect(model is not None, f"called {name!r}, not a declared tool")
        try:
            model.model_validate_json(arguments)
        except ValidationError as err:
            raise CheckFailed(f"{name} arguments {arguments!r}: {err}")
        return f"{name}({arguments})"

    def tools_in_prompt_and_tool_messages(self):
        ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
        plain = self.chat(ask, max_tokens=1)
        auto = self.chat(ask, tools=[WEATHER], max_tokens=1)
        none = self.chat(ask, tools=[WEATHER], tool_choice="none", max_tokens=1)
        expect(auto.usage.prompt_tokens > plain.usage.prompt_tokens,
               f"tools not rendered: {auto.usage.prompt_tokens} vs {plain.usage.prompt_tokens} prompt tokens")
        expect(none.usage.prompt_tokens == plain.usage.prompt_tokens,
               f"tool_choice none: {none.usage.prompt_tokens} vs {plain.usage.prompt_tokens}")
        history = ask + [
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather",
                             "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": -3}'},
        ]
        answer = self.chat(history, tools=[WEATHER], tool_choice="none", max_tokens=24)
        expect(answer.usage.prompt_tokens > none.usage.prompt_tokens + 10,
               f"the tool turn was not rendered: {answer.usage.prompt_tokens} prompt tokens")
        expect(answer.choices[0].message.content, f"no answer after the tool result: {answer}")
        status, body = post(self.p.root, "/v1/chat/completions",
                            {"model": self.model, "messages": history[:2] +
                             [{"role": "tool", "content": "x"}]})
        expect(status == 400 and body["error"]["param"] == "messages[2].tool_call_id",
               f"tool message without tool_call_id: {status} {body}")
        return f"{plain.usage.prompt_tokens} -> {auto.usage.prompt_tokens} prompt tokens with tools"

    def json_object(self):
        ask = [{"role": "user", "content": "Describe a cat as a JSON object."}]
        r = self.chat(ask, response_format={"type": "json_object"}, max_tokens=64)
        text = r.choices[0].message.content
        try:
            value = json.loads(text)
        except ValueError as err:
            raise CheckFailed(f"not JSON ({err}): {text!r} ({r.choices[0].finish_reason})")
        expect(isinstance(value, dict), f"not an object: {text!r}")
        return text[:60]

    def json_schemas(self):
        cases = [
            (Weather, "What is the weather in Rome? Answer in JSON."),
            (Order, "Order two bottles of milk."),
            (Tags, "Give tags for a photo of a beach."),
            (Person, "Invent a person who lives in Lima."),
        ]
        out = []
        for model, question in cases:
            ask = [{"role": "user", "content": question}]
            parsed = self.client.chat.completions.parse(
                model=self.model, messages=ask, response_format=model, temperature=0,
                max_tokens=128)
            choice = parsed.choices[0]
            expect(choice.message.parsed is not None,
                   f"{model.__name__}: {choice.message.content!r} ({choice.finish_reason})")
            # Streamed: the assembled text validates too.
            text = ""
            schema = {"type": "json_schema", "json_schema": {
                "name": model.__name__, "schema": strict(model.model_json_schema()),
                "strict": True}}
            for chunk in self.client.chat.completions.create(
                    model=self.model, messages=ask, response_format=schema, temperature=0,
                    max_tokens=128, stream=True):
                for c in chunk.choices:
                    text += c.delta.content or ""
            try:
                model.model_validate_json(text)
            except ValidationError as err:
                raise CheckFailed(f"{model.__name__} streamed {text!r}: {err}")
            out.append(choice.message.content)
        return " | ".join(o[:40] for o in out)

    def invalid_schemas(self):
        ask = [{"role": "user", "content": "hi"}]
        bad = [
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
            {"type": "json_schema", "json_schema": {"name": "x"}},
            {"type": "xml"},
        ]
        remote = {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}
        bad.append({"type": "json_schema", "json_schema": {"name": "x", "schema": remote}})
        choice = {"type": "function", "function": {"name": "get_weather"}}
        for forced in ({"response_format": {"type": "json_object"}},
                       {"tools": [WEATHER], "tool_choice": choice}):
            try:
                self.chat(ask, max_tokens=4, extra_body={"ignore_eos": True}, **forced)
            except openai.BadRequestError as err:
                body = err.body if isinstance(err.body, dict) else {}
                expect(body.get("param") == "ignore_eos", f"{forced}: {body}")
                continue
            raise CheckFailed(f"{forced} with ignore_eos was accepted")
        # A forced call's parameters are enforced too: a remote $ref there is a 400.
        far = {"type": "function", "function": {"name": "f", "parameters": {"$ref": "other.json"}}}
        try:
            self.chat(ask, tools=[far], tool_choice="required", max_tokens=4)
        except openai.BadRequestError as err:
            body = err.body if isinstance(err.body, dict) else {}
            expect(body.get("param") == "tools[0].function.parameters"
                   and "other.json" in body.get("message", ""), f"remote $ref in a tool: {body}")
        else:
            raise CheckFailed("a forced tool call with a remote $ref was accepted")
        for fmt in bad:
            try:
                self.chat(ask, response_format=fmt, max_tokens=4)
            except openai.BadRequestError as err:
                body = err.body if isinstance(err.body, dict) else {}
                msg = body.get("message", "")
                expect("response_format" in (body.get("param") or "") + msg, f"{fmt}: {body}")
                expect(not any(w in msg for w in SERDE_WORDS), f"{fmt}: {msg}")
                continue
            raise CheckFailed(f"{fmt} was accepted")
        return None

    def grammar_min_tokens(self):
        """min_tokens under a grammar: stop tokens are held back while the grammar allows
        another token, and the output ends where the grammar is complete."""
        # A number may always grow: min_tokens keeps it going.
        ask = [{"role": "user", "content": "Give me a number between 1 and 10."}]
        number = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}
        plain = self.chat(ask, response_format=number, max_tokens=32)
        m = plain.usage.completion_tokens
        expect(plain.choices[0].finish_reason == "stop" and m < 24,
               f"expected a short number, got {plain.choices[0].message.content!r}")
        held = self.chat(ask, response_format=number, max_tokens=32,
                         extra_body={"min_tokens": m + 4})
        text = held.choices[0].message.content
        try:
            int(text)
        except ValueError:
            raise CheckFailed(f"min_tokens {m + 4} with an integer schema gave {text!r}")
        pieces = len(self.p.tokenize(text))
        expect(pieces >= m + 4, f"min_tokens {m + 4}: {text!r} is {pieces} tokens")
        expect(text.startswith(plain.choices[0].message.content),
               f"{text!r} does not continue {plain.choices[0].message.content!r}")
        # A closed JSON object admits nothing more: the output ends there, short of
        # min_tokens, exactly as without it.
        obj = [{"role": "user", "content": "Describe a cat as a JSON object."}]
        free = self.chat(obj, response_format={"type": "json_object"}, max_tokens=200)
        short = self.chat(obj, response_format={"type": "json_object"}, max_tokens=200,
                          extra_body={"min_tokens": 150})
        c = short.choices[0]
        expect(c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict),
               f"json_object with min_tokens: {c.message.content!r} ({c.finish_reason})")
        expect(c.message.content == free.choices[0].message.content,
               f"{c.message.content!r} vs {free.choices[0].message.content!r} without min_tokens")
        # A forced tool call likewise ends with its closed call.
        choice = {"type": "function", "function": {"name": "get_weather"}}
        call = self.chat([{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                         tool_choice=choice, extra_body={"min_tokens": 120}, max_tokens=160)
        calls = call.choices[0].message.tool_calls or []
        expect(call.choices[0].finish_reason == "tool_calls" and len(calls) == 1,
               f"forced call with min_tokens: {call.choices[0]}")
        try:
            Weather.model_validate_json(calls[0].function.arguments)
        except ValidationError as err:
            raise CheckFailed(f"arguments {calls[0].function.arguments!r}: {err}")
        return (f"integer {plain.choices[0].message.content!r} -> {text!r} (min_tokens {m + 4}); "
                f"object ended after {short.usage.completion_tokens} tokens (min_tokens 150)")


def main():
    parser = argparse.ArgumentParser(description="OpenAI parity checks")
    parser.add_argument("base_url")
    parser.add_argument("--model")
    args = parser.parse_args()
    root = args.base_url.rstrip("/")
    if root.endswith("/v1"):
        root = root[:-3]
    client = openai.OpenAI(base_url=root + "/v1", api_key="unused", max_retries=0, timeout=300)
    model = args.model or client.models.list().data[0].id
    p = Parity(client, root, model)
    p.check("n=3 distinct hot, identical greedy (streaming and not)", p.n_samples)
    p.check("logit_bias -100 bans, +100 forces", p.logit_bias)
    p.check("echo returns the prompt", p.echo)
    p.check("echo with logprobs: the prompt's logprobs", p.echo_logprobs)
    p.check("echo with logprobs: prompt logprobs equal the generated tokens' (teacher forced)",
            p.echo_logprobs_teacher_forced)
    p.check("token-id and batched prompts", p.prompt_forms)
    p.check("stop_token_ids and min_tokens", p.stop_ids_and_min_tokens)
    p.check("presence and frequency penalties", p.penalties)
    p.check("/tokenize and /detokenize", p.tokenize_detokenize)
    p.check("bad fields get human 400s", p.human_errors)
    t = Tools(p)
    p.check("tools rendered, tool_choice none, tool messages", t.tools_in_prompt_and_tool_messages)
    p.check("named tool call: name and schema-valid arguments (streaming and not)",
            t.named_tool_call)
    p.check("tool_choice required", t.required_tool_call)
    p.check("response_format json_object", t.json_object)
    p.check("response_format json_schema: four schemas (streaming and not)", t.json_schemas)
    p.check("invalid schemas, remote $ref, grammar with ignore_eos are 400s",
            t.invalid_schemas)
    p.check("min_tokens with a grammar: held while it may go on, ends when complete",
            t.grammar_min_tokens)
    print(f"parity: {p.passed} passed, 0 failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
