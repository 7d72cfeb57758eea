"""A Linear layer whose weight is exactly GGUF blocks (Q4_1 / Q8_0), for decode steps on a CPU.

The embedded model's weights are a Q4_1 GGUF dequantized to fp32. Held as the blocks they
came from (`kernels/cpu_blocks.py`), a decode step's GEMMs read 0.75 bytes a weight instead of 4
and multiply the same fp32 numbers. Steps of many rows (prefill) keep oneDNN's fp32 GEMM on
the packed dense copy, which is faster there. Measured in bench/NOTES.md (CPU entry 16).
"""

from __future__ import annotations

import torch
from torch import nn
from workbench_kernels import cpu_blocks, torch_backend

from .packed_linear import _ROWS_HINT, packing_available


class BlockLinear(nn.Module):
    """y = x W^T + b with W held as blocks and, for many rows, as an fp32 copy packed for oneDNN."""

    def __init__(self, blocks: cpu_blocks.BlockWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = blocks.shape
        self.weight = blocks  # workbench_kernels.torch_backend.linear runs it
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> BlockLinear | None:
        """None unless `weight` is exactly Q4_1 or Q8_0 blocks and the block GEMM runs here."""
        blocks = cpu_blocks.from_dense(weight.detach())
        if blocks is None:
            return None
        if packing_available():
            blocks.dense = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)
        return cls(blocks, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch_backend.linear(x, self.weight, self.bias)

    def unpack(self) -> nn.Linear:
        """The plain nn.Linear again, bit for bit (the blocks rebuild every weight exactly)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self.weight.to_dense(), requires_grad=False)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.weight.format}"
