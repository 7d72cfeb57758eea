"""The OpenAI-compatible HTTP server, driven by the official `openai` client over loopback.

One engine and one server (127.0.0.1, a free port) serve most tests; tests that
must break an engine (a full queue, a fault) build their own. Oracles: the same
engine's in-process output for the same greedy request, the token counts the
server reports in `usage`, and the engine's own invariants (no KV block leaked,
every request ended). Every wait is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import workbench

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def engine(embedded):
    engine = workbench.Engine(embedded, max_batch=32, num_blocks=256)
    yield engine
    if engine.is_running:
        engine.check_invariants()
        engine.stop()
    assert engine.blocks.num_free == engine.blocks.limit, "KV blocks leaked"


@pytest.fixture(scope="module")
def server(engine):
    server = workbench.serve_api(engine, port=0, max_body_bytes=64 * 1024)
    yield server
    server.stop()
    assert not server._thread.is_alive(), "the server thread outlived stop()"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def wait_idle(engine: workbench.Engine, server=None, timeout: float = 60.0) -> None:
    """Until no request runs or waits and every KV block is free (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        busy = server is not None and (server.state.inflight or server.state._tasks)
        if s["running"] == 0 and s["waiting"] == 0 and s["free_blocks"] == s["num_blocks"] and not busy:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine still busy after {timeout} s: {engine.stats()}")


def error_of(exc: openai.APIStatusError) -> dict:
    """The `error` object of an OpenAI-shaped error response, checked for its four keys."""
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# ================================================================ happy paths
def test_chat_and_completions_match_the_engine_in_process(engine, client):
    """Greedy text over HTTP equals the same engine's in-process text; usage counts the real tokens."""
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    ref = asyncio.run(engine.generate(CHAT, max_new_tokens=8))
    assert chat.object == "chat.completion" and chat.model == MODEL and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == ref.text
    assert chat.choices[0].finish_reason == ref.finish_reason
    assert chat.usage.prompt_tokens == len(engine.tokenize(CHAT)) == len(ref.prompt_token_ids)
    assert chat.usage.completion_tokens == len(ref.token_ids) and chat.usage.total_tokens == (
        chat.usage.prompt_tokens + chat.usage.completion_tokens)

    prompt = "The three primary colours are"
    eos = {"extra_body": {"ignore_eos": True}}
    comp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, **eos)
    ref = asyncio.run(engine.generate(prompt, max_new_tokens=6, ignore_eos=True))
    assert comp.object == "text_completion" and comp.choices[0].text == ref.text
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 6
    assert comp.usage.prompt_tokens == len(engine.tokenize(prompt))
    ids = engine.tokenize(prompt)  # token ids, and a list holding one prompt, are the same request
    for same in (ids, [ids], [prompt]):
        again = client.completions.create(model=MODEL, prompt=same, max_tokens=6, temperature=0, **eos)
        assert again.choices[0].text == ref.text


def test_completions_default_to_16_tokens_and_unknown_fields_are_ignored(client):
    out = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0,
                                    extra_body={"ignore_eos": True, "no_such_field": {"x": 1}, "user": "me"})
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"


@pytest.mark.parametrize("chat", [True, False])
def test_streams_add_up_to_the_whole_answer_with_usage(client, chat):
    kw = dict(model=MODEL, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    create = client.chat.completions.create if chat else client.completions.create
    source = {"messages": CHAT} if chat else {"prompt": "A short list of fruits:"}
    whole = create(**source, **kw)
    chunks = list(create(**source, stream=True, stream_options={"include_usage": True}, **kw))
    text_of = (lambda c: c.choices[0].delta.content or "") if chat else (lambda c: c.choices[0].text)
    with_choices = [c for c in chunks if c.choices]
    assert "".join(text_of(c) for c in with_choices) == (whole.choices[0].message.content if chat
                                                          else whole.choices[0].text)
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    if chat:
        assert with_choices[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    last = chunks[-1]  # include_usage: a last chunk without choices carries the usage; the others carry null
    assert last.choices == [] and last.usage.completion_tokens == 10 == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(create(**source, stream=True, **kw))  # without include_usage: no usage chunk at all
    assert all(c.usage is None and c.choices for c in plain)


def test_raw_sse_ends_with_done(server):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_stop_strings_cut_the_text_and_finish_with_stop(client):
    kw = dict(model=MODEL, prompt="Count: one, two, three, four, five,", temperature=0, extra_body={"ignore_eos": True})
    free = client.completions.create(max_tokens=24, **kw).choices[0].text
    words = free.split()
    assert len(words) >= 3, free
    stop = words[2]  # a word the free text reaches after some tokens
    cut = free[: free.index(stop)]
    for stops in (stop, [stop, "\u2603 never"]):
        out = client.completions.create(max_tokens=24, stop=stops, **kw)
        assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(max_tokens=24, stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_the_same_seed_gives_the_same_sampled_text(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=16, temperature=1.0, top_p=0.95,
              extra_body={"top_k": 50, "ignore_eos": True})
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        seed=1234, stream=True, **kw))
    assert a == b == streamed and a
    others = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds never changed the sampled text: is the seed used at all?"


def test_models_health_and_version(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert error_of(e.value)["param"] == "model"
    assert httpx.get(server.url + "/health").status_code == 200
    version = httpx.get(server.url + "/version").json()
    assert version["version"] == workbench.__version__
    missing = httpx.get(server.url + "/v1/nothing-here")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


# ================================================================ errors
BAD_FIELDS = [  # (extra request fields, the param the 400 names, its code)
    ({"temperature": -1}, "temperature", None),
    ({"top_p": 2}, "top_p", None),
    ({"top_k": -3}, "top_k", None),
    ({"max_tokens": 0}, "max_tokens", None),
    ({"max_tokens": 10**6}, "max_tokens", "context_length_exceeded"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", None),
    ({"stop": ["ok", ""]}, "stop", None),
    ({"n": 2}, "n", "unsupported_parameter"),
    ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
    ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
]


@pytest.mark.parametrize("fields,param,code", BAD_FIELDS, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD_FIELDS)])
def test_bad_fields_are_400_naming_the_field(engine, client, fields, param, code):
    """The message is the engine's own (field, allowed range, the value sent), under the HTTP field's name."""
    before = engine.stats()["step"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, extra_body=fields)
    err = error_of(e.value)
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["code"] == code, err
    assert err["message"].startswith(param) and "max_new_tokens" not in err["message"], err
    value = next(iter(fields.values()))
    if code is None:  # a range error shows the value it refused
        assert str(value) in err["message"] or repr(value[-1]) in err["message"], err
    assert engine.stats()["step"] == before and engine.stats()["waiting"] == 0  # nothing reached the engine


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, n=1, logprobs=False,
                                         presence_penalty=0.0, frequency_penalty=0, tool_choice="none")
    assert out.usage.completion_tokens >= 1


def test_completions_refuse_echo_best_of_and_batches(client):
    for fields, param in (({"echo": True}, "echo"), ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, **fields)
        assert error_of(e.value)["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=["Hi", "Hello"], max_tokens=2)
    assert error_of(e.value)["param"] == "prompt"


def test_a_prompt_longer_than_the_context_is_400(engine, client):
    too_long = [198] * engine.max_model_len
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=too_long, max_tokens=1)
    err = error_of(e.value)
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    assert str(engine.max_model_len - 1) in err["message"]
    long_chat = [{"role": "user", "content": "word " * engine.max_model_len}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=long_chat, max_tokens=1)
    assert error_of(e.value)["param"] == "messages"


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2)
    err = error_of(e.value)
    assert err["param"] == "model" and err["code"] == "model_not_found" and "gpt-4o" in err["message"]


@pytest.mark.parametrize("body,param", [
    (b'{"model": "x", "messages": [', None),
    (b"[1, 2, 3]", None),
    (b"", None),
    (json.dumps({"messages": "hi"}).encode(), "messages"),
    (json.dumps({"messages": CHAT, "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"messages": CHAT, "max_tokens": 1.5}).encode(), "max_tokens"),
    (json.dumps({"messages": CHAT, "max_tokens": True}).encode(), "max_tokens"),
    (json.dumps({"messages": CHAT, "stop": 5}).encode(), "stop"),
    (json.dumps({"messages": CHAT, "ignore_eos": "yes"}).encode(), "ignore_eos"),
    (json.dumps({"messages": CHAT, "stream_options": {"include_usage": "yes"}}).encode(),
     "stream_options.include_usage"),
    (json.dumps({"messages": [{"role": "user"}]}).encode(), "messages[0].content"),
    (json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(), "messages[0].role"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
     "messages[0].content[0]"),
    (json.dumps({"max_tokens": 3}).encode(), "messages"),
])
def test_malformed_json_and_wrong_types_are_400(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=TIMEOUT,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err


def test_text_parts_and_a_missing_content_type_are_read_as_json(server):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text",
                                                                                          "text": "hi."}]}],
            "max_tokens": 2}
    r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(body), timeout=TIMEOUT,
                   headers={"content-type": "application/x-www-form-urlencoded"})  # what `curl -d` sends
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_a_body_over_the_limit_is_413_declared_or_chunked(server):
    big = json.dumps({"model": MODEL, "prompt": "x" * (65 * 1024)}).encode()
    r = httpx.post(server.url + "/v1/completions", content=big, timeout=TIMEOUT)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no content-length: the server counts what arrives
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    r = httpx.post(server.url + "/v1/completions", content=chunked(), timeout=TIMEOUT)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_api_key_is_required_on_v1_routes_when_set(engine):
    with workbench.serve_api(engine, port=0, api_key="s3cret") as keyed:
        for key, status in (("wrong", 401), ("s3cret-and-more", 401), ("s3cret", 200)):
            c = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT)
            if status == 401:
                with pytest.raises(openai.AuthenticationError) as e:
                    c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
                assert error_of(e.value)["code"] == "invalid_api_key"
            else:
                assert c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2).choices
        assert httpx.post(keyed.url + "/v1/completions", json={"prompt": "x"}).status_code == 401  # no header
        assert httpx.post(keyed.url + "/v1/engine/config", json={"max_batch": 4}).status_code == 401
        assert httpx.post(keyed.url + "/v1/engine/config", json={}, headers={"Authorization": "Bearer s3cret"}
                          ).status_code == 200
        for open_route in ("/health", "/version", "/metrics"):  # as in vLLM: probes and scrapes need no key
            assert httpx.get(keyed.url + open_route).status_code == 200


def test_a_full_queue_is_429_with_retry_after(embedded):
    engine = workbench.Engine(embedded, max_batch=1, num_blocks=64, max_queue=1)
    server = workbench.serve_api(engine, port=0)
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
    kw = dict(model=MODEL, messages=CHAT, max_tokens=200, stream=True, extra_body={"ignore_eos": True})
    try:
        running = c.chat.completions.create(**kw)
        first = iter(running)
        for _ in range(50):  # the role chunk, then the first token: by then the request is running
            chunk = next(first)
            if chunk.choices[0].delta.content:
                break
        waiting = c.chat.completions.create(**kw)  # accepted (200) and queued: the queue is now full
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(**kw)
        assert e.value.response.headers["retry-after"] == "1"
        err = error_of(e.value)
        assert err["code"] == "queue_full" and "max_queue=1" in err["message"]
        running.close()
        waiting.close()  # both clients leave: their requests are cancelled
        wait_idle(engine, server)
        engine.check_invariants()
    finally:
        server.stop()
        engine.stop()
    assert engine.blocks.num_free == engine.blocks.limit


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop re-raises, by design
def test_engine_faults_are_500_and_a_dead_engine_turns_health_503(embedded, monkeypatch):
    engine = workbench.Engine(embedded, max_batch=4, num_blocks=64)
    server = workbench.serve_api(engine, port=0)
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
    kw = dict(model=MODEL, messages=CHAT, max_tokens=200, extra_body={"ignore_eos": True})
    try:
        # 1) a step fails (contained): the request in it is a 500, the engine keeps serving
        model, forward = engine.runner.model, engine.runner.model.forward

        def failing(*args, **kwargs):
            raise RuntimeError("injected kernel fault")

        monkeypatch.setattr(model, "forward", failing)
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(**kw)
        err = error_of(e.value)
        assert err["type"] == "server_error" and "injected kernel fault" in err["message"]
        monkeypatch.setattr(model, "forward", forward)
        assert httpx.get(server.url + "/health").status_code == 200
        assert c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2).choices

        # 2) the loop dies with a stream open and a plain request waiting: both end with 500s, no hang
        stream = c.chat.completions.create(stream=True, **kw)
        chunks = iter(stream)
        next(chunks)
        results: list = []
        plain = threading.Thread(target=lambda: results.append(_status_of(lambda: c.chat.completions.create(**kw))))
        plain.start()
        deadline = time.monotonic() + 30
        while engine.stats()["running"] + engine.stats()["waiting"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)

        def sticky_fault(*args, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(engine.core, "step", sticky_fault)
        with pytest.raises(openai.APIError) as e:
            for _ in range(1000):
                next(chunks)
        assert "illegal memory access" in str(e.value.body or e.value.message)
        plain.join(TIMEOUT)
        assert results == [500]
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(**kw)
        assert e.value.status_code == 503
        assert engine.blocks.num_free == engine.blocks.limit
    finally:
        monkeypatch.undo()
        server.stop()
        engine.stop()


def _status_of(call) -> int:
    try:
        call()
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code


# ================================================================ metrics
def scrape(server) -> dict[str, float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser: {name{labels}: value}."""
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k != "model_name"}
            key = s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
            out[key] = s.value
    return out


def test_metrics_counters_move_by_exactly_what_was_served(engine, server, client):
    wait_idle(engine, server)
    before = scrape(server)
    names = ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
             "request_queue_time_seconds", "step_duration_seconds"]
    for name in names:
        assert f"workbench:{name}_count" in before and f'workbench:{name}_bucket{{le="+Inf"}}' in before
    for name in ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "num_preemptions_total", "prefix_cache_hits_total", "prefix_cache_queries_total",
                 "prompt_tokens_total", "generation_tokens_total"]:
        assert f"workbench:{name}" in before, name

    a = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=7, temperature=0,
                                       extra_body={"ignore_eos": True})
    streamed = list(client.completions.create(model=MODEL, prompt="Tell me about tea.", max_tokens=5, temperature=0,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    b = streamed[-1].usage
    after = scrape(server)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    served = [a.usage, b]
    assert delta["workbench:generation_tokens_total"] == sum(u.completion_tokens for u in served) == 12
    assert delta["workbench:prompt_tokens_total"] == sum(u.prompt_tokens for u in served)
    assert delta["workbench:prefix_cache_queries_total"] == sum(u.prompt_tokens for u in served)
    assert 0 <= delta["workbench:prefix_cache_hits_total"] <= delta["workbench:prefix_cache_queries_total"]
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta[f"workbench:{name}_count"] == 2
    assert delta["workbench:inter_token_latency_seconds_count"] == (7 - 1) + (5 - 1)
    assert delta['workbench:request_success_total{finished_reason="length"}'] == 2
    assert delta["workbench:step_duration_seconds_count"] >= 7  # one step per decode token at least
    assert delta["workbench:e2e_request_latency_seconds_sum"] >= delta["workbench:time_to_first_token_seconds_sum"] > 0
    assert after["workbench:num_requests_running"] == 0 and after["workbench:kv_cache_usage_perc"] == 0
    assert after["workbench:engine_running"] == 1
    # one source: the in-process dict holds the very numbers /metrics shows
    snapshot = server.metrics()
    for key in ("workbench:generation_tokens_total", "workbench:prompt_tokens_total",
                "workbench:time_to_first_token_seconds_sum", "workbench:inter_token_latency_seconds_count"):
        assert snapshot[key] == after[key], key


# ================================================================ load, disconnects, live config
def test_64_concurrent_streams_all_complete(engine, server):
    async def run() -> list[tuple[str, str, int, str]]:
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)

        async def one(i: int) -> tuple[str, str, int, str]:
            text, ident, reason, usage = "", "", None, None
            stream = await c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Say the number {i}."}], max_tokens=4,
                temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            async for chunk in stream:
                ident = chunk.id
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    reason = chunk.choices[0].finish_reason or reason
                usage = chunk.usage or usage
            return ident, text, usage.completion_tokens, reason

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), 300)
        finally:
            await c.close()

    results = asyncio.run(run())
    assert len(results) == 64 and len({r[0] for r in results}) == 64
    assert all(tokens == 4 and reason == "length" for _, _, tokens, reason in results), results
    alone = asyncio.run(engine.generate([{"role": "user", "content": "Say the number 7."}], max_new_tokens=4,
                                        ignore_eos=True))
    assert results[7][1] == alone.text  # batching with 63 others changed nothing
    wait_idle(engine, server)
    engine.check_invariants()


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(engine, server):
    wait_idle(engine, server)
    before = scrape(server).get('workbench:request_success_total{finished_reason="cancelled"}', 0.0)
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 500, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # role chunk + a few tokens (and blank separators)
        assert any('"content"' in line for line in got)
        assert engine.stats()["running"] == 1 and engine.stats()["free_blocks"] < engine.stats()["num_blocks"]
    # the connection closed mid-stream: the request is cancelled and every block comes back
    wait_idle(engine, server, timeout=30)
    engine.check_invariants()
    after = scrape(server)['workbench:request_success_total{finished_reason="cancelled"}']
    assert after == before + 1

    # a non-streaming client that gives up (read timeout) cancels its request too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body | {"stream": False}, timeout=1.0)
    wait_idle(engine, server, timeout=30)
    engine.check_invariants()
    assert scrape(server)['workbench:request_success_total{finished_reason="cancelled"}'] == before + 2


def test_live_reconfigure_through_the_route_while_streams_run(engine, server):
    wait_idle(engine, server)
    url = server.url + "/v1/engine/config"
    original = httpx.get(url).json()["config"]

    async def run() -> tuple[list[int], dict]:
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
        first = asyncio.Event()

        async def one(i: int) -> int:
            stream = await c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Tell a story about {i} cats."}], max_tokens=24,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            usage = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first.set()
                usage = chunk.usage or usage
            return usage.completion_tokens

        tasks = [asyncio.ensure_future(one(i)) for i in range(6)]
        await asyncio.wait_for(first.wait(), 120)
        async with httpx.AsyncClient(timeout=TIMEOUT) as h:
            response = await h.post(url, json={"max_batch": 2, "token_budget": 64})
            bad = [await h.post(url, json=b) for b in ({"max_batch": 0}, {"block_size": 8}, {"policy": "fastest"})]
        tokens = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        await c.close()
        return tokens, {"ok": response, "bad": bad}

    try:
        tokens, responses = asyncio.run(run())
        assert responses["ok"].status_code == 200
        assert responses["ok"].json()["config"]["max_batch"] == 2 and engine.config.max_batch == 2
        assert engine.config.token_budget == 64
        assert [r.status_code for r in responses["bad"]] == [400, 400, 400]
        assert [r.json()["error"]["param"] for r in responses["bad"]] == ["max_batch", "block_size", "policy"]
        assert tokens == [24] * 6  # every stream finished, none lost to the change
        changed = [e.step for e in engine.telemetry.events() if e.kind == "reconfigured"][-1]
        later = [s for s in engine.telemetry.steps() if s.step > changed + 1]
        assert later and all(s.num_running <= 2 and s.num_tokens <= 64 for s in later)
    finally:
        restore = {k: original[k] for k in ("max_batch", "token_budget")}
        assert httpx.post(url, json=restore).json()["config"]["max_batch"] == original["max_batch"]
    wait_idle(engine, server)
    engine.check_invariants()


# ================================================================ the handle, logs, the CLI
def test_serve_api_owns_one_named_thread_and_stop_ends_it(engine):
    before = {t.name for t in threading.enumerate()}
    server = workbench.serve_api(engine, port=0)
    mine = [t for t in threading.enumerate() if t.name not in before]
    assert [t.name for t in mine] == [f"workbench-api-{server.port}"]
    assert server.url == f"http://127.0.0.1:{server.port}" and server.is_running
    server.stop()
    assert not mine[0].is_alive() and not server.is_running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    server.stop()  # twice is fine


def test_logs_never_hold_prompts_unless_asked(engine, caplog):
    secret = "zebra-quartz-7731"
    messages = [{"role": "user", "content": f"Repeat {secret}."}]
    with caplog.at_level(logging.DEBUG):
        for log_prompts in (False, True):
            caplog.clear()
            with workbench.serve_api(engine, port=0, log_prompts=log_prompts, access_log=True) as s:
                c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
                c.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
            logged = "\n".join(r.getMessage() for r in caplog.records)
            assert (secret in logged) == log_prompts, logged


def test_binding_beyond_loopback_without_a_key_warns(caplog):
    from workbench.server.run import _warn_if_exposed

    with caplog.at_level(logging.WARNING):
        _warn_if_exposed("127.0.0.1", None)
        _warn_if_exposed("0.0.0.0", "key")
        assert not caplog.records
        _warn_if_exposed("0.0.0.0", None)
    assert "without an API key" in caplog.records[0].getMessage()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_api_serves_in_the_foreground_with_the_dashboard_on_the_same_engine(tmp_path):
    port, dash = free_port(), free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log_file = tmp_path / "api.log"
    with open(log_file, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "workbench", "api", "--port", str(port), "--max-batch", "4",
                                 "--num-blocks", "64", "--dashboard-port", str(dash)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[1])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        assert proc.poll() is None, log_file.read_text()
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
        out = c.completions.create(model=MODEL, prompt="Hello", max_tokens=3, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 3
        status = {}
        while time.monotonic() < deadline and not status:  # the dashboard's /status reads the same engine
            try:
                status = httpx.get(f"http://127.0.0.1:{dash}/status", timeout=5).json()
            except (httpx.TransportError, ValueError):
                time.sleep(0.5)
        assert status["config"]["max_batch"] == 4 and status["stats"]["step"] >= 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log_file.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
