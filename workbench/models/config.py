"""ModelConfig: the few shape facts our decoder needs, read from a transformers config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(slots=True, frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        arch = hf.model_type
        if arch not in SUPPORTED:
            raise ValueError(f"model_type must be one of {SUPPORTED}, got {arch!r}")
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        theta = rope.pop("rope_theta", None) or getattr(hf, "rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        return cls(
            arch=arch, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
            num_heads=heads, num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim, rms_norm_eps=hf.rms_norm_eps, rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else tuple(sorted(rope.items())),
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            qk_norm=arch == "qwen3",
            sliding_window=_sliding_window(hf),
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def inv_freq(self) -> torch.Tensor:
        """Rotary inverse frequencies, with Llama-3 or linear scaling when configured."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if self.rope_scaling is None:
            return inv
        scaling = dict(self.rope_scaling)
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            return inv / scaling["factor"]
        if kind == "llama3":
            return _llama3_inv_freq(inv, scaling)
        raise NotImplementedError(f"rope scaling {kind!r} is not supported (default, linear, llama3 are)")


def _sliding_window(hf: Any) -> int | None:
    """Mistral-style local attention; we serve contexts up to the window, where it changes nothing."""
    window = getattr(hf, "sliding_window", None)
    if hf.model_type == "mistral" or getattr(hf, "use_sliding_window", False):
        return window
    return None


def _llama3_inv_freq(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama-3.1 frequency scaling: long wavelengths slowed by `factor`, a smooth ramp between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)
