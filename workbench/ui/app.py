"""`workbench serve`: the live dashboard (and at /load the tuning lab's Load view) as a Panel app on one engine.

One engine per server; each browser session gets its own `Dashboard` over it
(Bokeh models belong to one document). Resources are served inline by the
server itself, so the page renders with no CDN in reach. `GET /status`
returns the engine's live config and stats as JSON, for scripts and tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger(__name__)


def free_port(address: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench serve", description="serve the live dashboard over one engine")
    p.add_argument("--address", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--model", default=None, help="HF folder, hub id or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--token-budget", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--policy", choices=["continuous", "static", "sequential"], default=None)
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-new-tokens", type=int, default=48, help="default length of dashboard requests")
    p.add_argument("--show", action=argparse.BooleanOptionalAction, default=True,
                   help="open a browser tab (default: yes)")
    return p


def engine_config(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig keywords the flags set (unset flags keep the engine's defaults)."""
    keys = ("max_batch", "num_blocks", "token_budget", "block_size", "policy", "prefix_caching", "device", "dtype")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def status(engine: "Engine") -> dict[str, Any]:
    """What /status answers: the engine's config and stats (public API only)."""
    from ..config import LIVE_FIELDS

    cfg = engine.config
    return {"model": engine.loaded.name, "capacity": engine.capacity,
            "config": {k: getattr(cfg, k) for k in LIVE_FIELDS + ("block_size", "overlap")},
            "stats": engine.stats()}


def serve(engine: "Engine", *, port: int = 0, address: str = "127.0.0.1", show: bool = False,
          start: bool = True, max_new_tokens: int = 48, **kwargs: Any) -> Any:
    """Serve a Dashboard per session over `engine`; blocks while the server runs when `start`."""
    import panel as pn
    from tornado.web import RequestHandler

    from .dashboard import Dashboard

    pn.extension(inline=True)
    pn.config.inline = True

    class StatusHandler(RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "application/json")
            self.write(json.dumps(status(engine), default=str))

    from .load_view import load_view

    port = port or free_port(address)
    log.info("dashboard: http://%s:%d/  (the tuning lab's Load view: /load; status: /status)", address, port)
    apps = {"/": lambda: Dashboard(engine, max_new_tokens=max_new_tokens), "/load": lambda: load_view(engine)}
    return pn.serve(apps, port=port, address=address,
                    websocket_origin=[f"{address}:{port}", f"localhost:{port}"], show=show, start=start,
                    title="cb-workbench dashboard", verbose=False,
                    extra_patterns=[(r"/status", StatusHandler)], **kwargs)


def serve_main(argv: list[str]) -> int:
    """Entry point of `workbench serve`."""
    args = build_parser().parse_args(argv)
    from ..engine import Engine

    engine = Engine(args.model, **engine_config(args))
    try:
        serve(engine, port=args.port, address=args.address, show=args.show, max_new_tokens=args.max_new_tokens)
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()
    return 0
