"""cb-workbench: see, teach and tune continuous batching of LLM inference in a notebook.

    import workbench
    engine = workbench.Engine()            # the embedded SmolLM2-135M-Instruct
    out = await engine.generate([{"role": "user", "content": "Hi!"}], max_new_tokens=32)
"""

from .config import EngineConfig
from .engine import Engine, QueueFullError
from .loading import LoadedModel, load
from .request import RequestOutput, SamplingParams, StreamChunk

__all__ = ["Dashboard", "Engine", "EngineConfig", "LoadedModel", "QueueFullError", "RequestOutput",
           "SamplingParams", "StreamChunk", "load", "start"]
__version__ = "0.1.0"


def start(model: object = None, **config: object) -> Engine:
    """Load a model (the embedded one by default) and start an engine on it."""
    return Engine(model, **config)


def __getattr__(name: str) -> object:
    """`workbench.Dashboard`, imported on first use: Panel and Bokeh load only when asked for."""
    if name == "Dashboard":
        from .ui import Dashboard

        return Dashboard
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
