"""Where the load goes: this engine in-process, or any OpenAI-compatible server by URL.

A target sends one `WorkItem` and fills its `RequestRecord` as the request
streams: first token, every token, end, tokens in and out, finish reason.
`send` is a coroutine and never blocks the event loop: the in-process target
awaits the request handle's async iteration (woken by the engine thread) and
the URL target streams Server-Sent Events over keep-alive connections
(`http11` for plain http, httpx for https). A cancelled `send`
cancels its request (engine.cancel, or the HTTP stream is closed).

`reconfigure` applies a config point live: `engine.reconfigure` on a worker
thread (it waits for the loop's next step boundary, which must not happen on
the caller's event loop), or `POST {url}/v1/engine/config` for a server that
has that route (`workbench.serve_api`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Protocol

from .records import RequestRecord
from .workloads import WorkItem

if TYPE_CHECKING:
    from ..engine import Engine

LIVE_KEYS = ("max_batch", "token_budget", "num_blocks", "prefix_caching", "policy", "decode_steps")


class Target(Protocol):
    name: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, item: WorkItem, record: RequestRecord, t0: float) -> None:
        """Send one request; fill `record` (times in seconds since `t0`, a perf_counter value)."""
        ...

    async def reconfigure(self, **changes: Any) -> dict[str, Any]:
        """Apply live config changes; return the config now in force."""
        ...

    async def config(self) -> dict[str, Any]:
        """The target's current config, as far as it says (empty if unknown)."""
        ...

    def describe(self) -> dict[str, Any]: ...


class EngineTarget:
    """This process's engine, through its public API (submit, cancel, reconfigure)."""

    name = "engine"

    def __init__(self, engine: "Engine", *, ignore_eos: bool = True, temperature: float = 0.0) -> None:
        self.engine = engine
        self.ignore_eos = ignore_eos
        self.temperature = temperature

    async def open(self) -> None:
        if not self.engine.is_running:
            raise RuntimeError("the engine is stopped; call engine.start() first")

    async def close(self) -> None:
        return None

    async def send(self, item: WorkItem, record: RequestRecord, t0: float) -> None:
        try:
            handle = self.engine.submit(item.prompt, max_new_tokens=item.max_new_tokens, ignore_eos=self.ignore_eos,
                                        temperature=self.temperature)
        except (ValueError, RuntimeError) as exc:  # bad prompt, too long, queue full, engine stopped: this
            # request fails (recorded), the load goes on
            record.finish_reason, record.error, record.end = "error", str(exc), time.perf_counter() - t0
            return
        record.request_id = handle.request_id
        try:
            async for _ in handle.chunks():
                pass
        except asyncio.CancelledError:
            self.engine.cancel(handle.request_id)  # posts to the loop's inbox; no waiting here
            record.finish_reason = record.finish_reason or "cancelled"
            record.end = time.perf_counter() - t0
            raise
        out = handle.output
        assert out is not None
        t = out.timings
        record.prompt_tokens = len(out.prompt_token_ids)
        record.output_tokens = len(out.token_ids)
        record.first_token = None if t.first_token is None else t.first_token - t0
        record.token_times = [x - t0 for x in t.tokens]
        record.end = (t.finished if t.finished is not None else time.perf_counter()) - t0
        record.finish_reason, record.error = out.finish_reason, out.error
        record.preemptions, record.cached_tokens = out.num_preemptions, out.num_cached_tokens

    async def reconfigure(self, **changes: Any) -> dict[str, Any]:
        await asyncio.to_thread(self.engine.reconfigure, **changes)
        return await self.config()

    async def config(self) -> dict[str, Any]:
        cfg = self.engine.config
        return {k: getattr(cfg, k) for k in LIVE_KEYS + ("block_size",)}

    def describe(self) -> dict[str, Any]:
        e = self.engine
        return {"kind": "engine", "model": e.loaded.name, "device": e.device.type, "capacity": e.capacity,
                "block_size": e.config.block_size}


class OpenAITarget:
    """Any OpenAI-compatible server: `POST {base_url}/v1/completions` with `stream: true`, read as SSE.

    Plain http goes through the lean keep-alive client of `http11` (about a tenth
    of httpx's CPU per streamed request, so the generator does not limit the
    measurement); https, or `client="httpx"`, through httpx.

    Works with `workbench.serve_api`, vLLM, SGLang and `transformers serve`.
    `ignore_eos` is a vLLM / SGLang extension that makes lengths exact; servers
    that reject unknown fields can be given `ignore_eos=False`. Each SSE chunk
    with text is one token time (a chunk may carry several tokens, as in vLLM's
    benchmark); output tokens come from the final `usage` when the server sends it.
    """

    name = "openai"

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 ignore_eos: bool = True, temperature: float = 0.0, timeout_s: float = 300.0,
                 max_connections: int = 1024, config_path: str = "/v1/engine/config", client: str = "auto") -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.ignore_eos = ignore_eos
        self.temperature = temperature
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.config_path = config_path
        if client not in ("auto", "httpx", "http11"):
            raise ValueError(f"client must be 'auto', 'httpx' or 'http11', got {client!r}")
        if client == "http11" and not self.base_url.startswith("http://"):
            raise ValueError("client='http11' speaks plain http only; use client='httpx' for https")
        # plain http: the lean keep-alive client (httpx costs ms of CPU per streamed request); https: httpx
        plain = self.base_url.startswith("http://")
        self.client_kind = client if client != "auto" else ("http11" if plain else "httpx")
        self._client: Any = None

    async def open(self) -> None:
        if self._client is None and self.client_kind == "http11":
            from .http11 import Client

            self._client = Client(self.base_url, self.headers, self.max_connections)
        elif self._client is None:
            import httpx

            limits = httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections)
            self._client = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, limits=limits,
                                             timeout=httpx.Timeout(self.timeout_s, connect=10.0))
        if self.model is None:
            self.model = await self._first_model()

    @contextlib.asynccontextmanager
    async def _exchange(self, method: str, path: str, body: Any = None) -> AsyncIterator[tuple[int, Any]]:
        """(status, response) of one request through whichever client is open; the response has
        `lines()` (async, streamed) and `read()` (async, the whole body as bytes)."""
        data = b"" if body is None else json.dumps(body).encode()
        if self.client_kind == "http11":
            async with self._client.request(method, path, data) as r:
                yield r.status, r
            return
        async with self._client.stream(method, path, content=data,
                                       headers={"Content-Type": "application/json"}) as r:
            yield r.status_code, _HttpxBody(r)

    async def _json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self._exchange(method, path, body) as (status, r):
            raw = await r.read()
        try:
            return status, json.loads(raw)
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _first_model(self) -> str | None:
        try:
            status, obj = await self._json("GET", "/v1/models")
            data = obj.get("data") if status == 200 and isinstance(obj, dict) else None
            return data[0]["id"] if data else None
        except Exception:  # noqa: BLE001 - the model field is optional for many servers
            return None

    async def send(self, item: WorkItem, record: RequestRecord, t0: float) -> None:
        body: dict[str, Any] = {"prompt": item.prompt, "max_tokens": item.max_new_tokens, "stream": True,
                                "temperature": self.temperature, "stream_options": {"include_usage": True}}
        if self.model is not None:
            body["model"] = self.model
        if self.ignore_eos:
            body["ignore_eos"] = True
        chunks = 0
        clock = time.perf_counter
        try:
            async with self._exchange("POST", "/v1/completions", body) as (status, r):
                if status != 200:
                    text = (await r.read()).decode(errors="replace")
                    record.finish_reason, record.error = "error", f"HTTP {status}: {_error_message(text)}"
                    return
                async for line in r.lines():  # read to the end (no break): the connection is kept alive
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]" or record.error is not None:
                        continue
                    now = clock() - t0
                    obj = json.loads(payload)
                    if obj.get("error"):
                        record.finish_reason, record.error = "error", _error_message(json.dumps(obj))
                        continue
                    if obj.get("id") and not record.request_id:
                        record.request_id = str(obj["id"])
                    usage = obj.get("usage")
                    if usage:
                        record.prompt_tokens = int(usage.get("prompt_tokens") or record.prompt_tokens)
                        record.output_tokens = int(usage.get("completion_tokens") or record.output_tokens)
                    for choice in obj.get("choices") or []:
                        text, reason = choice.get("text"), choice.get("finish_reason")
                        if text or reason is None:
                            if record.first_token is None:
                                record.first_token = now
                            record.token_times.append(now)
                            chunks += 1
                        if reason is not None:
                            record.finish_reason = reason if reason in ("stop", "length") else "error"
                            if record.finish_reason == "error":
                                record.error = f"finish_reason={reason!r}"
        except asyncio.CancelledError:
            record.finish_reason = record.finish_reason or "cancelled"
            raise
        except Exception as exc:  # noqa: BLE001 - a broken connection fails this request, not the load
            record.finish_reason, record.error = "error", f"{type(exc).__name__}: {exc}"
        finally:
            record.end = clock() - t0
            if not record.output_tokens:
                record.output_tokens = chunks
            if not record.prompt_tokens and item.prompt_len is not None:
                record.prompt_tokens = item.prompt_len
        if record.finish_reason is None:
            record.finish_reason, record.error = "error", "the stream ended without a finish_reason"

    async def reconfigure(self, **changes: Any) -> dict[str, Any]:
        status, obj = await self._json("POST", self.config_path, changes)
        if status != 200:
            text = obj if isinstance(obj, str) else json.dumps(obj)
            raise ValueError(f"POST {self.config_path} answered {status}: {_error_message(text)}")
        return await self.config()

    async def config(self) -> dict[str, Any]:
        try:
            status, data = await self._json("GET", self.config_path)
        except Exception:  # noqa: BLE001 - a server without the route (vLLM, SGLang)
            return {}
        if status != 200:
            return {}
        cfg = data.get("config", data) if isinstance(data, dict) else {}
        return {k: cfg[k] for k in LIVE_KEYS + ("block_size",) if k in cfg}

    def describe(self) -> dict[str, Any]:
        return {"kind": "openai", "url": self.base_url, "model": self.model, "client": self.client_kind}


class _HttpxBody:
    """An httpx streaming response with the `lines()` / `read()` shape of `http11.Response`."""

    def __init__(self, response: Any) -> None:
        self._r = response

    def lines(self) -> AsyncIterator[str]:
        return self._r.aiter_lines()

    async def read(self) -> bytes:
        return await self._r.aread()


def _error_message(text: str) -> str:
    """The message of an OpenAI error JSON, or the text itself (shortened)."""
    try:
        obj = json.loads(text)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
    except (json.JSONDecodeError, AttributeError):
        pass
    return text[:300]
