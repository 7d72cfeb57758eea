"""Bandwidth of the decode GEMMs of the Llama-3-8B shape at batch 32 (workload c), per BLAS backend.

    python bench/probes/gemm_probe.py

A decode step of an 8B model is weight reads: each GEMM [M=32, K] x [K, N] should
move K*N*2 bytes at copy speed. This prints, per projection, the time and the
achieved GB/s for torch's default BLAS and for cuBLASLt, so the engine can use
the faster one (see bench/NOTES.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "lm_head": (4096, 128256)}


def time_ms(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    x_big = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y_big = torch.empty_like(x_big)
    copy = time_ms(lambda: y_big.copy_(x_big), 20)
    bw = 2 * 2**30 / (copy / 1e3) / 1e9
    print(f"copy bandwidth {bw:.0f} GB/s (read + write)")
    del x_big, y_big
    for m in (32, 64):
        for backend in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(backend)
            total_ms, total_bytes = 0.0, 0
            parts = []
            for name, (k, n) in SHAPES.items():
                w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
                x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
                ms = time_ms(lambda: F.linear(x, w))
                nbytes = w.numel() * 2
                layers = 1 if name == "lm_head" else 32
                total_ms += ms * layers
                total_bytes += nbytes * layers
                parts.append(f"{name} {ms * 1e3:.0f} us {nbytes / ms / 1e6:.0f} GB/s")
                del w, x
            print(f"M={m} {backend:9s}: " + ", ".join(parts) +
                  f" | all weights {total_ms:.2f} ms = {100 * total_bytes / total_ms / 1e6 / bw:.1f}% of copy")
    torch.backends.cuda.preferred_blas_library("cublas")


if __name__ == "__main__":
    main()
