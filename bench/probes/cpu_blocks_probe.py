"""Probe: the block GEMM over 4-bit blocks (the embedded GGUF's Q4_1 layout, kernels/cpu_blocks.c),
fp32 arithmetic on the exact dequantized values, against oneDNN's packed fp32 GEMM. CPU only.

    gcc -O3 -march=native -fopenmp -shared -fPIC kernels/cpu_blocks.c -o /tmp/cpu_blocks.so
    python bench/probes/cpu_blocks_probe.py /tmp/cpu_blocks.so [ROWS,ROWS,...]

(The first, AVX2-only version measured in bench/NOTES.md entry 15 is bench/cpu_blocks_probe.c at 0d1be21.)

Each shape rotates 30 weight copies (cold caches, as in a decode step). bench/NOTES.md, CPU entry 15.
"""

import ctypes
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from workbench.models.packed_linear import PackedLinear  # noqa: E402

lib = ctypes.CDLL(sys.argv[1])
P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
lib.q4_1_gemm.argtypes = [P, L, I, I, P, P, I, P, L]


def make_q4(N: int, K: int):
    q = torch.randint(0, 16, (N, K), dtype=torch.int32)
    d = (torch.rand(N, K // 32) * 0.01).half().float()
    m = (-torch.rand(N, K // 32) * 0.05).half().float()
    W = torch.addcmul(m.repeat_interleave(32, 1), d.repeat_interleave(32, 1), q.float())
    qg = q.view(N, K // 32, 32).to(torch.uint8)
    return W, (qg[..., :16] | (qg[..., 16:] << 4)).reshape(N, K // 2).contiguous(), torch.stack([d, m], -1).contiguous()


def q4(x, qs, dm, N):
    M, K = x.shape
    y = torch.empty(M, N)
    lib.q4_1_gemm(x.data_ptr(), K, M, K, qs.data_ptr(), dm.data_ptr(), N, y.data_ptr(), N)
    return y


def best_us(fn, copies: int, reps: int = 5) -> float:
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(copies):
            fn(i)
        best = min(best, (time.perf_counter() - t) / copies)
    return 1e6 * best


torch.manual_seed(0)
for N, K in [(960, 576), (576, 576), (3072, 576), (576, 1536)]:
    data = [make_q4(N, K) for _ in range(30)]
    packed = [PackedLinear(W) for W, _, _ in data]
    for M in (1, 8) if len(sys.argv) < 3 else map(int, sys.argv[2].split(",")):
        x = torch.randn(M, K)
        err = (q4(x, data[0][1], data[0][2], N).double() - x.double() @ data[0][0].double().t()).abs().max().item()
        t_q4 = best_us(lambda i: q4(x, data[i][1], data[i][2], N), len(data))
        t_dnn = best_us(lambda i: packed[i](x), len(data))
        print(f"N={N} K={K} M={M}: max err {err:.1e}, q4 {t_q4:.0f} us, oneDNN fp32 {t_dnn:.0f} us")
