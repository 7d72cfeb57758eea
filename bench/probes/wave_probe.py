"""Does the skinny GEMM lose time to partial waves? Read speed against the number of programs.

    python bench/probes/wave_probe.py [--out DIR]

At 32 rows and K = 4096 (Llama-3-8B), times the weight-streaming GEMM (default tiles, CUDA
graph of 40 calls over cold weights, as skinny_gemm_sweep) for N giving whole waves of
programs (a multiple of the SM count) and for the model's own N in between: if partial waves
cost, GB/s dips away from whole waves.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "probes"))

from workbench_kernels.triton_gemm import config_for, skinny_linear  # noqa: E402
from skinny_gemm_sweep import copy_bandwidth, time_it  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy = copy_bandwidth()
    print(f"copy {copy / 1e9:.0f} GB/s; {sms} SMs; {torch.cuda.get_device_name()}", flush=True)
    K, M = 4096, 32
    bn = config_for(4096, K)["block_n"]
    ns = sorted({sms * bn * w for w in (1, 2, 3, 4, 6)} | {4096, 6144, 14336, 28672})
    rows = []
    for gate_up in (False, True):
        for n in ns:
            n_w = 2 * n if gate_up else n
            nbytes = n_w * K * 2
            copies = max(2, -(-400 * 2**20 // nbytes))
            weights = [torch.randn(n_w, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            counter = itertools.count()
            t = time_it(lambda: skinny_linear(x, weights[next(counter) % copies], gate_up=gate_up))
            programs = n // bn
            row = {"gate_up": gate_up, "N": n, "programs": programs, "waves": programs / sms, "us": 1e6 * t,
                   "GBps": nbytes / t / 1e9, "pct_copy": 100 * nbytes / t / copy}
            rows.append(row)
            print(f"gate_up={gate_up!s:5} N={n:6d} programs={programs:5d} ({programs / sms:5.2f} waves) "
                  f"{1e6 * t:7.1f} us {nbytes / t / 1e9:6.0f} GB/s", flush=True)
            del weights
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "wave_probe.json").write_text(json.dumps({"copy_GBps": copy / 1e9, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
