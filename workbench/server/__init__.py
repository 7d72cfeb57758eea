"""An OpenAI-compatible HTTP API with Prometheus metrics, on a running engine.

    server = workbench.serve_api(engine, port=8000)     # background, in-process; server.url, server.stop()
    python -m workbench api --port 8000      # foreground, from a terminal

Modules: `protocol` (the wire format and OpenAI's error JSON), `metrics` (the
Prometheus collectors), `app` (the FastAPI routes), `run` (the uvicorn handle and the CLI).
FastAPI, uvicorn and prometheus_client load only when a server starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..engine import Engine
    from .run import ApiServer

__all__ = ["serve"]


def serve(engine: "Engine", port: int = 8000, host: str = "127.0.0.1", api_key: str | None = None,
          **options: Any) -> "ApiServer":
    """Start the API over `engine` in the background; see `workbench.server.run.ApiServer`."""
    from .run import serve as _serve

    return _serve(engine, port=port, host=host, api_key=api_key, **options)
