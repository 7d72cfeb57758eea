"""The weight-streaming GEMM (kernels/triton_gemm.py) against cuBLAS, per layer shape.

    python bench/probes/skinny_gemm_sweep.py [--rows 32 64] [--shapes 8b.qkv 8b.o] [--out DIR]

For each linear layer of the Llama-3-8B and SmolLM2-135M shapes, bf16, times
cuBLAS (`F.linear`) and every tile configuration of the Triton kernel with cold
weights (a rotation of copies larger than the L2 cache), each timed as a CUDA graph of
40 calls so launch cost stays out, and prints GB/s of
weight read and the share of the measured copy bandwidth. One call on the device.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from workbench_kernels.triton_gemm import fits, skinny_linear  # noqa: E402

SHAPES = {  # name: (N, K)
    "8b.qkv": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up": (28672, 4096), "8b.down": (4096, 14336),
    "8b.lm_head": (128256, 4096),
    "135m.qkv": (960, 576), "135m.o": (576, 576), "135m.gate_up": (3072, 576), "135m.down": (576, 1536),
    "135m.lm_head": (49152, 576),
}
CONFIGS = [dict(block_n=bn, block_k=bk, num_stages=st, num_warps=w)
           for bn, bk, st, w in itertools.product((16, 32, 64), (64, 128, 256), (3, 4, 6), (4,))]
CONFIGS += [dict(block_n=32, block_k=bk, num_stages=st, num_warps=w)
            for bk, st, w in itertools.product((128, 256), (4, 6), (2, 8))]


def copy_bandwidth() -> float:
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / time_it(lambda: b.copy_(a), reps=5)


def time_it(fn, reps: int = 40) -> float:
    """Seconds per call, from a CUDA graph of `reps` calls: no Python launch cost in the number."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()  # compile / pick algorithms outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (3 * reps)


def fused_gate_up(copy: float) -> dict:
    """The MLP's first half as the model runs it: cuBLAS gate_up then silu_and_mul, against
    the GEMM with the activation in its epilogue (default tiles)."""
    from workbench_kernels.triton_ops import silu_and_mul

    rows = {}
    for name, M in (("8b.gate_up", 32), ("135m.gate_up", 64)):
        N, K = SHAPES[name]
        copies = max(2, -(-400 * 2**20 // (N * K * 2)))
        weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = silu_and_mul(F.linear(x, weights[0]))
        err = (skinny_linear(x, weights[0], gate_up=True).float() - ref.float()).abs().max().item()
        counter = itertools.count()
        unfused = time_it(lambda: silu_and_mul(F.linear(x, weights[next(counter) % copies])))
        fused = time_it(lambda: skinny_linear(x, weights[next(counter) % copies], gate_up=True))
        rows[name] = {"M": M, "cublas_plus_silu_us": 1e6 * unfused, "fused_us": 1e6 * fused, "max_err": err}
        print(f"{name:14s} M={M:3d}: cuBLAS + silu_and_mul {1e6 * unfused:7.1f} us | fused {1e6 * fused:7.1f} us "
              f"({100 * N * K * 2 / fused / copy:.1f}% of copy) err {err:.1e} x{unfused / fused:.2f}", flush=True)
    return {"fused_gate_up": rows}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=None,
                    help="rows per GEMM (default: 32 for the 8B shapes as workload (c), 64 for 135M as (a))")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    copy = copy_bandwidth()
    print(f"copy bandwidth {copy / 1e9:.0f} GB/s (read + write); {torch.cuda.get_device_name()}; "
          f"torch {torch.__version__}", flush=True)
    results = []
    for name in args.shapes:
        N, K = SHAPES[name]
        nbytes = N * K * 2
        copies = max(2, -(-400 * 2**20 // nbytes))  # > 400 MB of weights: every read comes from HBM
        weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for M in args.rows or [32 if name.startswith("8b") else 64]:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), weights[0].float())
            counter = itertools.count()

            def cublas():
                return F.linear(x, weights[next(counter) % copies])

            t_cublas = time_it(cublas)
            row = {"shape": name, "M": M, "N": N, "K": K, "cublas_us": 1e6 * t_cublas,
                   "cublas_pct_copy": 100 * nbytes / t_cublas / copy, "triton": []}
            for cfg in CONFIGS:
                if not fits(x, weights[0], cfg["block_n"], cfg["block_k"]):
                    continue
                out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
                try:
                    got = skinny_linear(x, weights[0], out=out, **cfg)
                    err = (got.float() - ref).abs().max().item()
                    t = time_it(lambda: skinny_linear(x, weights[next(counter) % copies], out=out, **cfg))
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result too
                    row["triton"].append({**cfg, "error": repr(exc)[:200]})
                    continue
                row["triton"].append({**cfg, "us": 1e6 * t, "pct_copy": 100 * nbytes / t / copy, "max_err": err})
            ok = [c for c in row["triton"] if "us" in c]
            best = min(ok, key=lambda c: c["us"]) if ok else None
            row["best"] = best
            results.append(row)
            if best:
                print(f"{name:14s} M={M:3d}: cuBLAS {row['cublas_us']:7.1f} us {row['cublas_pct_copy']:5.1f}% | "
                      f"triton best {best['us']:7.1f} us {best['pct_copy']:5.1f}% err {best['max_err']:.1e} "
                      f"(bn {best['block_n']} bk {best['block_k']} st {best['num_stages']} w {best['num_warps']}) "
                      f"x{t_cublas * 1e6 / best['us']:.2f}", flush=True)
            else:
                print(f"{name:14s} M={M:3d}: cuBLAS {row['cublas_us']:7.1f} us; no Triton config ran", flush=True)
        del weights
    results.append(fused_gate_up(copy))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "skinny_gemm_sweep.json").write_text(json.dumps({"copy_GBps": copy / 1e9, "rows": results},
                                                                    indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
