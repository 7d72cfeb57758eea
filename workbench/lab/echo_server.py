"""A trivial OpenAI-shaped streaming endpoint, for measuring the load generator itself.

`POST /v1/completions` answers every request at once with a fixed SSE stream
(`tokens` chunks of one word, a finish chunk, usage, `[DONE]`): no model, so
what limits a run against it is the generator and the HTTP stack. A prompt of
"!400" answers an OpenAI error JSON with status 400, and "!cut" ends the stream
without a finish reason: the generator must count both as errors.

    with EchoServer(tokens=4) as url: ...   # uvicorn on 127.0.0.1, a free port, one named thread
"""


import json  # no `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime
import socket
import threading
import time
from typing import Any


def build_app(tokens: int = 4, delay_s: float = 0.0) -> Any:
    """The ASGI app (FastAPI): fixed chunks, optionally `delay_s` apart."""
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "echo", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        prompt = body.get("prompt")
        if prompt == "!400":
            return JSONResponse({"error": {"message": "prompt must not be '!400'", "type": "invalid_request_error",
                                           "param": "prompt", "code": None}}, status_code=400)
        n = min(int(body.get("max_tokens") or tokens), tokens)
        plen = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())

        async def events():
            for i in range(n):
                if delay_s:
                    await asyncio.sleep(delay_s)
                yield _sse({"id": "cmpl-echo", "object": "text_completion", "model": "echo",
                            "choices": [{"index": 0, "text": f" w{i}", "finish_reason": None}]})
            if prompt == "!cut":
                return
            yield _sse({"id": "cmpl-echo", "object": "text_completion", "model": "echo",
                        "choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
            yield _sse({"id": "cmpl-echo", "object": "text_completion", "model": "echo", "choices": [],
                        "usage": {"prompt_tokens": plen, "completion_tokens": n, "total_tokens": plen + n}})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

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
