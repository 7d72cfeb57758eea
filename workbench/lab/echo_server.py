"""A trivial OpenAI-shaped streaming endpoint, for measuring the load generator itself.

`POST /v1/completions` answers every request at once with a fixed SSE stream
(`tokens` chunks of one word, a finish chunk, usage, `[DONE]`): no model, so
what limits a run against it is the generator and the HTTP stack. A prompt of
"!400" answers an OpenAI error JSON with status 400, and "!cut" ends the stream
without a finish reason: the generator must count both as errors.

    with EchoServer(tokens=4) as url: ...   # uvicorn on 127.0.0.1, a free port, one named thread
"""


from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any


def build_app(tokens: int = 4, delay_s: float = 0.0) -> Any:
    """The ASGI app: fixed chunks, optionally `delay_s` apart. Plain ASGI (no framework), so the endpoint
    costs as little as uvicorn allows: the generator is what a benchmark against it measures."""
    import asyncio

    models = json.dumps({"object": "list", "data": [{"id": "echo", "object": "model"}]}).encode()
    error_400 = json.dumps({"error": {"message": "prompt must not be '!400'", "type": "invalid_request_error",
                                      "param": "prompt", "code": None}}).encode()
    chunks = [_sse({"id": "cmpl-echo", "object": "text_completion", "model": "echo",
                    "choices": [{"index": 0, "text": f" w{i}", "finish_reason": None}]}) for i in range(tokens)]
    finish = _sse({"id": "cmpl-echo", "object": "text_completion", "model": "echo",
                   "choices": [{"index": 0, "text": "", "finish_reason": "length"}]})

    async def reply(send: Any, status: int, body: bytes, kind: bytes = b"application/json") -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"] == "/v1/models":
            await reply(send, 200, models)
            return
        if scope["method"] != "POST" or scope["path"] != "/v1/completions":
            await reply(send, 404, b'{"error": {"message": "not found", "type": "not_found"}}')
            return
        raw, more = b"", True
        while more:
            message = await receive()
            raw += message.get("body", b"")
            more = message.get("more_body", False)
        body = json.loads(raw)
        prompt = body.get("prompt")
        if prompt == "!400":
            await reply(send, 400, error_400)
            return
        n = min(int(body.get("max_tokens") or tokens), tokens)
        plen = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        for i in range(n):
            if delay_s:
                await asyncio.sleep(delay_s)
            await send({"type": "http.response.body", "body": chunks[i], "more_body": True})
        if prompt == "!cut":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        usage = _sse({"id": "cmpl-echo", "object": "text_completion", "model": "echo", "choices": [],
                      "usage": {"prompt_tokens": plen, "completion_tokens": n, "total_tokens": plen + n}})
        await send({"type": "http.response.body", "body": finish + usage + b"data: [DONE]\n\n", "more_body": False})

    return app


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class EchoServer:
    """uvicorn serving `build_app` on 127.0.0.1 in a named thread; `.url`, `.stop()`, a context manager."""

    def __init__(self, tokens: int = 4, delay_s: float = 0.0, start_timeout_s: float = 30.0) -> None:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(2048)
        self._socket = sock
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(build_app(tokens, delay_s), log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # not the main thread
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="lab-echo-server",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the echo server did not start on {self.url}")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> str:
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m workbench.lab.echo_server --port N`: serve in the foreground (another process than the load)."""
    import argparse

    import uvicorn

    p = argparse.ArgumentParser(prog="python -m workbench.lab.echo_server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--delay-s", type=float, default=0.0)
    args = p.parse_args(argv)
    uvicorn.run(build_app(args.tokens, args.delay_s), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, lifespan="off")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
