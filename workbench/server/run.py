"""Running the API server: in the background of a notebook (`ApiServer`) or in a terminal's foreground.

`workbench.serve_api(engine, port=...)` starts uvicorn on one named thread that the returned
`ApiServer` owns; `.stop()` ends the requests it still serves, shuts uvicorn down
and joins the thread. The socket is bound before the thread starts, so `port=0`
gets a free port and `.url` is right at once. uvicorn is told not to touch the
process's logging (a notebook's handlers stay as they are).
"""

from __future__ import annotations

import argparse
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from .app import DEFAULT_MAX_BODY_BYTES, ApiState, ServerOptions, build_app

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5


class ApiServer:
    """A running server over one engine: `.url`, `.stop()`, `.metrics()`; a context manager too."""

    def __init__(self, engine: "Engine", *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 served_model_name: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 log_prompts: bool = False, access_log: bool = False, start_timeout: float = 30.0) -> None:
        import uvicorn

        _warn_if_exposed(host, api_key)
        self.engine = engine
        self.app = build_app(engine, ServerOptions(api_key=api_key, served_model_name=served_model_name,
                                                   max_body_bytes=max_body_bytes, log_prompts=log_prompts))
        self.state: ApiState = self.app.state.api
        self._socket = bind(host, port)
        self.host, self.port = host, self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=access_log, lifespan="off",
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name=f"workbench-api-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + start_timeout
        while not self._server.started:  # bounded: the thread either starts serving or dies
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._socket.close()
                raise RuntimeError(f"the API server did not start on {self.url}")
            time.sleep(0.01)
        log.info("OpenAI-compatible API on %s/v1 (model %r; metrics at %s/metrics)", self.url, self.state.model,
                 self.url)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._server.should_exit

    def metrics(self) -> dict[str, float]:
        """The numbers /metrics shows, as a dict (see `ServerMetrics.snapshot`)."""
        return self.state.metrics.snapshot()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel this server's requests, shut uvicorn down and join its thread (the engine keeps running)."""
        if not self._thread.is_alive():
            return
        for request_id in list(self.state.inflight):
            self.engine.cancel(request_id)
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> "ApiServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ApiServer({self.url}, model={self.state.model!r}, running={self.is_running})"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: the OS picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _warn_if_exposed(host: str, api_key: str | None) -> None:
    if host not in ("127.0.0.1", "::1", "localhost") and not api_key:
        log.warning("the API listens on %s without an API key: anyone who reaches this machine can use the engine "
                    "and change its config (pass --api-key, or bind 127.0.0.1)", host)


def serve(engine: "Engine", port: int = 8000, host: str = "127.0.0.1", api_key: str | None = None,
          **options: Any) -> ApiServer:
    """Start the API in the background over `engine` (what `workbench.serve_api` calls)."""
    return ApiServer(engine, host=host, port=port, api_key=api_key, **options)


# ====================================================================== terminal
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="workbench api", description="serve the engine over an OpenAI-compatible API")
    ap.add_argument("--model", default=None, help="HF folder, hub id or .gguf (default: the embedded SmolLM2-135M)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    ap.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model's name)")
    ap.add_argument("--dashboard-port", type=int, default=None, help="also serve the live dashboard on this port")
    ap.add_argument("--max-waiting", type=int, default=None,
                    help="refuse new requests with 429 while this many wait (the engine's max_queue)")
    ap.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    ap.add_argument("--log-prompts", action="store_true", help="log every prompt (off: prompts never reach logs)")
    ap.add_argument("--no-access-log", dest="access_log", action="store_false", default=True)
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--num-blocks", type=int, default=None)
    ap.add_argument("--token-budget", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--policy", choices=["continuous", "static", "sequential"], default=None)
    ap.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    return ap


def api_main(argv: list[str]) -> int:
    """Entry point of `workbench api`: uvicorn in the foreground (Ctrl-C stops it), the dashboard beside it."""
    import uvicorn

    from ..engine import Engine
    from ..ui.app import engine_config

    args = build_parser().parse_args(argv)
    _warn_if_exposed(args.host, args.api_key)
    config = engine_config(args)
    if args.max_waiting is not None:
        config["max_queue"] = args.max_waiting
    engine = Engine(args.model, **config)
    dashboard = None
    try:
        if args.dashboard_port is not None:
            from ..ui.app import serve as serve_dashboard

            dashboard = serve_dashboard(engine, port=args.dashboard_port, address=args.host, show=False,
                                        threaded=True)
        app = build_app(engine, ServerOptions(api_key=args.api_key, served_model_name=args.served_model_name,
                                              max_body_bytes=args.max_body_bytes, log_prompts=args.log_prompts))
        sock = bind(args.host, args.port)
        log.info("OpenAI-compatible API on http://%s:%d/v1 (model %r)", args.host, sock.getsockname()[1],
                 app.state.api.model)
        uvicorn.Server(uvicorn.Config(app, access_log=args.access_log, lifespan="off",
                                      timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        if dashboard is not None:
            dashboard.stop()
        engine.stop()
    return 0
