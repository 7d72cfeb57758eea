"""Llama-family decoders built on the kernel table (`workbench_kernels.table`)."""

from .config import ModelConfig
from .llama import AttentionContext, DecoderModel

__all__ = ["AttentionContext", "DecoderModel", "ModelConfig"]
