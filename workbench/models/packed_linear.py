"""A Linear layer whose weight is packed once for oneDNN, for skinny GEMMs on a CPU.

A decode step multiplies a few rows (one per request) by every weight matrix, so
on a CPU it is bound by how fast the weights stream from memory. MKL's plain
sgemm re-packs the weight into its own panel layout on every call, which reads
it twice and writes it once; oneDNN can do that packing once, at start-up.
Measured on the 2-core CI machine at batch 8 (bench/NOTES.md, CPU entry 4): the
GEMMs read weights at 13-17 GB/s instead of 8-12, and a decode step's GEMMs take
~40 ms instead of ~57. At batch 1 MKL's GEMV is as fast or faster, so the LM head
keeps its plain copy for single rows (see `DecoderModel.compute_logits`).
"""

from __future__ import annotations

import platform

import torch
from torch import nn

# oneDNN picks its blocked layout for an expected row count; 8 and 64 measured the same.
_ROWS_HINT = 8


def packing_available() -> bool:
    """oneDNN on x86-64 with torch's private packing ops (present in the official CPU builds)."""
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinear(nn.Module):
    """y = x W^T + b with W held only in oneDNN's packed layout (fp32, CPU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # `weight` is the packed tensor itself (`is_mkldnn`): workbench_kernels.torch_backend.linear runs it
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def of(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def unpack(self) -> nn.Linear:
        """The plain nn.Linear again, bit for bit (an identity matrix times W^T is W^T exactly)."""
        eye = torch.eye(self.in_features, dtype=torch.float32)
        weight = torch.ops.mkldnn._linear_pointwise(eye, self.weight, None, "none", [], "").t().contiguous()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"
