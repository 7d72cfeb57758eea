"""cb-workbench: see, teach and tune continuous batching of LLM inference in a notebook.

    import workbench
    engine = workbench.Engine()            # the embedded SmolLM2-135M-Instruct
    out = await engine.generate([{"role": "user", "content": "Hi!"}], max_new_tokens=32)
"""

from .config import EngineConfig
from .engine import Engine, QueueFullError
from .loading import LoadedModel, load
from .request import RequestOutput, SamplingParams, StreamChunk

__all__ = ["Engine", "EngineConfig", "LoadedModel", "QueueFullError", "RequestOutput", "SamplingParams",
           "StreamChunk", "load", "start"]
__version__ = "0.1.0"


def start(model: object = None, **config: object) -> Engine:
    """Load a model (the embedded one by default) and start an engine on it."""
    return Engine(model, **config)
