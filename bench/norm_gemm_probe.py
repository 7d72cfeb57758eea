"""RMSNorm and the residual add inside the weight-streaming GEMM, against separate kernels.

    python bench/norm_gemm_probe.py [--out DIR]

Per layer shape of Llama-3-8B (32 rows, workload (c)) and SmolLM2-135M (64 rows, (a)), bf16,
cold weights, each variant timed as a CUDA graph of 40 calls (skinny_gemm_sweep.time_it):
the plain GEMM, the RMSNorm kernel + GEMM the model ran before, and the GEMM with the norm in
its K walk at several warp counts; for o / down, the GEMM with the residual add in its epilogue.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kernels.triton_gemm import config_for, skinny_linear  # noqa: E402
from kernels.triton_ops import rms_norm  # noqa: E402
from skinny_gemm_sweep import SHAPES, copy_bandwidth, time_it  # noqa: E402

NORMED = {"qkv", "gate_up", "lm_head"}  # the GEMMs that follow an RMSNorm; o and down add to the stream


def probe(name: str, copy: float) -> dict:
    N, K = SHAPES[name]
    M = 32 if name.startswith("8b") else 64
    kind = name.split(".")[1]
    gate_up = kind == "gate_up"
    nbytes = N * K * 2
    copies = max(2, -(-400 * 2**20 // nbytes))
    weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    norm_w = torch.rand(K, device="cuda", dtype=torch.bfloat16) + 0.5
    out = torch.zeros(M, N // (2 if gate_up else 1), device="cuda", dtype=torch.bfloat16)
    counter = itertools.count()
    w = lambda: weights[next(counter) % copies]  # noqa: E731
    row = {"shape": name, "M": M, "N": N, "K": K,
           "plain_us": 1e6 * time_it(lambda: skinny_linear(x, w(), gate_up=gate_up))}
    if kind in NORMED:
        row["rms_norm_then_gemm_us"] = 1e6 * time_it(
            lambda: skinny_linear(rms_norm(x, norm_w, 1e-5)[0], w(), gate_up=gate_up))
        base = config_for(N // (2 if gate_up else 1), K)
        for warps in sorted({base["num_warps"], 4, 8}):
            cfg = {**base, "num_warps": warps}
            row[f"fused_norm_w{warps}_us"] = 1e6 * time_it(
                lambda: skinny_linear(x, w(), gate_up=gate_up, norm_weight=norm_w, eps=1e-5, **cfg))
    else:
        row["accumulate_us"] = 1e6 * time_it(lambda: skinny_linear(x, w(), out=out, accumulate=True))
    print(name, f"M={M}", {k: round(v, 1) for k, v in row.items() if k.endswith("_us")},
          f"plain {100 * nbytes / row['plain_us'] * 1e6 / copy:.0f}% of copy", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    copy = copy_bandwidth()
    print(f"copy {copy / 1e9:.0f} GB/s; {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    rows = [probe(name, copy) for name in args.shapes]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "norm_gemm_probe.json").write_text(json.dumps({"copy_GBps": copy / 1e9, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
