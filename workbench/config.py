"""EngineConfig: every knob of the engine, its default and its valid range.

Validation lives here so that a bad value is rejected with one clear message
naming the field and its range, whether it comes from the constructor, the
CLI or a live `engine.reconfigure(...)`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

Policy = Literal["continuous", "static", "sequential"]

_DEVICE = re.compile(r"cpu|cuda(:\d{1,3})?")

MAX_DECODE_STEPS = 64
CUDA_DECODE_STEPS = 4  # decode_steps=None on a GPU: hides ~0.4 ms of host work per launch behind 4 graph replays

# Fields that may change while requests are in flight (applied at a step boundary).
LIVE_FIELDS = ("max_batch", "num_blocks", "token_budget", "prefix_caching", "policy", "overlap", "decode_steps")


@dataclass(slots=True)
class EngineConfig:
    """Engine knobs. `num_blocks=None` sizes the KV cache from the device."""

    block_size: int = 16
    num_blocks: int | None = None
    max_batch: int = 32
    token_budget: int = 512
    max_model_len: int | None = None
    prefix_caching: bool = True
    policy: Policy = "continuous"
    device: str | None = None
    dtype: str | None = None
    kernels: Literal["auto", "torch", "triton"] = "auto"
    overlap: bool | None = None
    decode_steps: int | None = None  # decode steps per launch while the batch holds still; None: the device's default
    cuda_graphs: bool = True
    block_weights: bool = True  # CPU fp32: weights that are exactly GGUF Q4_1 / Q8_0 blocks stay blocks for decode
    freeze_gc: bool | None = None
    max_queue: int | None = None
    telemetry_steps: int = 4096
    gpu_memory_fraction: float = 0.85
    seed: int = 0

    def validate(self) -> "EngineConfig":
        _check_int("block_size", self.block_size, 1, 256)
        if self.num_blocks is not None:
            _check_int("num_blocks", self.num_blocks, 1, 10_000_000)
        _check_int("max_batch", self.max_batch, 1, 4096)
        _check_int("token_budget", self.token_budget, 1, 1_000_000)
        if self.max_model_len is not None:
            _check_int("max_model_len", self.max_model_len, 2, 10_000_000)
        _check_choice("policy", self.policy, ("continuous", "static", "sequential"))
        _check_choice("kernels", self.kernels, ("auto", "torch", "triton"))
        _check_choice("dtype", self.dtype, (None, "float32", "bfloat16", "float16"))
        _check_choice("prefix_caching", self.prefix_caching, (True, False))
        _check_choice("overlap", self.overlap, (None, True, False))
        d = self.decode_steps
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_DECODE_STEPS):
            raise ValueError(f"decode_steps must be None (the device's default) or an integer in "
                             f"[1, {MAX_DECODE_STEPS}], got {d!r}")
        _check_choice("cuda_graphs", self.cuda_graphs, (True, False))
        _check_choice("block_weights", self.block_weights, (True, False))
        _check_choice("freeze_gc", self.freeze_gc, (None, True, False))
        if self.max_queue is not None:
            _check_int("max_queue", self.max_queue, 1, 10_000_000)
        _check_int("telemetry_steps", self.telemetry_steps, 16, 10_000_000)
        f = self.gpu_memory_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.05 <= f <= 0.99:
            raise ValueError(f"gpu_memory_fraction must be a number in [0.05, 0.99], got {f!r}")
        _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.device is not None and (not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device)):
            raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        return self

    def replace(self, **changes: Any) -> "EngineConfig":
        """A validated copy with `changes` applied; unknown fields are an error."""
        names = {f.name for f in dataclasses.fields(self)}
        for key in changes:
            if key not in names:
                raise ValueError(f"unknown EngineConfig field {key!r}; fields are {sorted(names)}")
        return dataclasses.replace(self, **changes).validate()


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed or type(value) not in {type(a) for a in allowed}:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
