"""Shared fixtures: the embedded model, its transformers twin, and leak-checked engines."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("transformers").setLevel(logging.ERROR)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct, fp32 on CPU (shared: engines never change its weights)."""
    import workbench

    return workbench.load()


@pytest.fixture(scope="session")
def hf_model(embedded):
    """The same weights in transformers, the oracle."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded.path, dtype=torch.float32)
    return model.eval()


@pytest.fixture
def make_engine(embedded):
    """Build engines on the embedded model; after the test, every block must be free and every request ended."""
    import workbench

    engines: list[workbench.Engine] = []

    def build(**config):
        engine = workbench.Engine(embedded, **config)
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        if engine.is_running:
            engine.check_invariants()
            engine.stop()
        assert not engine.outputs.live, f"requests never ended: {list(engine.outputs.live)}"
        assert not engine.scheduler.has_work(), "scheduler still holds requests"
        assert engine.blocks.num_free == engine.blocks.limit, (
            f"KV blocks leaked: {engine.blocks.limit - engine.blocks.num_free} still owned")
        engine.blocks.check([])
