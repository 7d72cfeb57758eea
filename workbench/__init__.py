"""cb-workbench: see, teach and tune continuous batching of LLM inference in a notebook.

    import workbench
    engine = workbench.Engine()            # the embedded SmolLM2-135M-Instruct
    out = await engine.generate([{"role": "user", "content": "Hi!"}], max_new_tokens=32)
"""

import os
import sys

if "torch" not in sys.modules:
    # The notebook's (or script's) thread and the engine's loop thread each get an OpenMP worker
    # team, so the process holds more OpenMP threads than cores, and libgomp then cuts its spin-wait
    # from 300,000 to 100 spins: workers fall asleep between the GEMMs of a step and every GEMM pays
    # a wake-up (CPU steps ~30 % slower, bench/NOTES.md). Ask for libgomp's usual spin unless the
    # user chose one; libgomp reads it once, when torch loads it, hence before the first torch import.
    os.environ.setdefault("GOMP_SPINCOUNT", "300000")

from .config import EngineConfig  # noqa: E402
from .engine import Engine, QueueFullError  # noqa: E402
from .loading import LoadedModel, load  # noqa: E402
from .request import RequestOutput, SamplingParams, StreamChunk  # noqa: E402

__all__ = ["Dashboard", "Engine", "EngineConfig", "LoadedModel", "QueueFullError", "RequestOutput",
           "SamplingParams", "StreamChunk", "load", "serve_api", "start"]
__version__ = "0.1.0"


def start(model: object = None, **config: object) -> Engine:
    """Load a model (the embedded one by default) and start an engine on it."""
    return Engine(model, **config)


def serve_api(engine: Engine, port: int = 8000, host: str = "127.0.0.1", api_key: str | None = None,
              **options: object) -> object:
    """Serve `engine` over an OpenAI-compatible HTTP API (+ /metrics) in the background.

    Returns the server's handle: `.url`, `.stop()`, `.metrics()`; a context manager too. `port=0`
    picks a free port. Options: served_model_name, max_body_bytes, log_prompts, access_log
    (docs/http.md). The server is built on the engine's public API, so it lives above it: FastAPI
    and uvicorn load only when a server starts."""
    from .server import serve

    return serve(engine, port=port, host=host, api_key=api_key, **options)


def __getattr__(name: str) -> object:
    """`workbench.Dashboard`, imported on first use: Panel and Bokeh load only when asked for."""
    if name == "Dashboard":
        from .ui import Dashboard

        return Dashboard
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
