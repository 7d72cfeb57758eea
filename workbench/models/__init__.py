"""Llama-family decoders built on `workbench.kernels`."""

from .config import ModelConfig
from .llama import AttentionContext, DecoderModel

__all__ = ["AttentionContext", "DecoderModel", "ModelConfig"]
