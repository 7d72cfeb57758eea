"""Root cause of issue 21's fp32 mismatches: does a row's result depend on the batch around it?

For SmolLM2-135M shapes in fp32 on the GPU, computes the same rows alone and inside larger batches
with (1) cuBLAS (what fp32 linear layers ran before), (2) the batch-invariant GEMM, (3) the attention
kernel with the bf16 heuristics (key splits chosen by batch size and longest context) against the
fp32 invariant launch, and prints how many rows differ and by how much.

    python bench/probes/batch_variance_probe.py
"""

from __future__ import annotations

import torch

from workbench_kernels.triton_attention import _heuristic_config, invariant_config, paged_attention_with
from workbench_kernels.triton_gemm import invariant_linear


def gemm_rows(fn, x, w, sizes=(1, 7, 64, 65, 200)) -> str:
    full = fn(x, w)
    cells = []
    for m in sizes:
        part = fn(x[-m:], w)
        diff = (part - full[-m:]).abs()
        cells.append(f"M={m}: {int((diff > 0).any(-1).sum())}/{m} rows differ (max {diff.max().item():.1e})")
    return "; ".join(cells)


def attention_rows() -> str:
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, bs, kvh, g, d = 150, 16, 3, 3, 64
    lens = torch.randint(200, 900, (n,), generator=gen, device="cuda")
    used = (lens + bs - 1) // bs
    nb = int(used.sum()) + 1
    tables = torch.zeros(n, int(used.max()), dtype=torch.int32, device="cuda")
    start = 0
    for i, u in enumerate(used.tolist()):
        tables[i, :u] = torch.arange(start, start + u, device="cuda")
        start += u
    k = torch.randn(nb, bs, kvh, d, generator=gen, device="cuda")
    v = torch.randn(nb, bs, kvh, d, generator=gen, device="cuda")
    q = torch.randn(n, kvh * g, d, generator=gen, device="cuda")
    cu = torch.arange(n + 1, device="cuda", dtype=torch.int32)
    lines = []
    for name, cfg_of in (("heuristic (bf16 path)", lambda b: _heuristic_config(q[:b], k, lens[:b], 1, int(lens[:b].max()))),
                         ("invariant (fp32 path)", lambda b: invariant_config(kvh * g, kvh, d))):
        full = paged_attention_with(cfg_of(n), q, k, v, cu, lens.int(), tables, 0.125)
        alone = torch.cat([paged_attention_with(cfg_of(1), q[i:i + 1], k, v, cu[:2], lens[i:i + 1].int(),
                                                tables[i:i + 1], 0.125) for i in range(8)])
        diff = (alone - full[:8]).abs()
        lines.append(f"{name}: splits batch {cfg_of(n).num_splits} vs alone {cfg_of(1).num_splits}; "
                     f"{int((diff > 0).flatten(1).any(-1).sum())}/8 requests differ (max {diff.max().item():.1e})")
    return "; ".join(lines)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(300, 576, device="cuda")
    w = torch.randn(1728, 576, device="cuda")
    print("cuBLAS fp32:      ", gemm_rows(lambda a, b: a @ b.T, x, w))
    print("invariant GEMM:   ", gemm_rows(invariant_linear, x, w))
    print("attention:        ", attention_rows())


if __name__ == "__main__":
    main()
