"""Does cutting decode keys into pieces (split-K) pay at a given batch and context?

    python bench/probes/attn_split_probe.py            # split-K: 1, 2, 4, 8 pieces
    python bench/probes/attn_split_probe.py --tiles    # tile / pipeline / warps at the short contexts
    python bench/probes/attn_split_probe.py --tiles-cold   # the same from DRAM, as inside a model's step

Times the Triton decode attention with 1, 2 and 4 pieces, each as a CUDA graph of 20 calls
(launch cost out, L2 warm only within the 20), uniform contexts, bf16, for Llama-3-8B heads
(32 query / 8 KV, head dim 128) at the batch of workload (c) and at small batches. Reports
microseconds per call and the share of the measured copy bandwidth the K/V bytes reach.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: kernel_bench
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kernel_bench import AttentionCase  # noqa: E402
from skinny_gemm_sweep import copy_bandwidth, time_it  # noqa: E402

from workbench_kernels import triton_attention  # noqa: E402


def tiles(gen: torch.Generator, copy: float, sms: int) -> None:
    """Unsplit decode at the contexts the short-context graphs see: which tiles stream best."""
    import itertools

    cases = [("c", dict(num_q_heads=32, num_kv_heads=8, head_dim=128), 32, (256, 480)),
             ("a", dict(num_q_heads=9, num_kv_heads=3, head_dim=64), 64, (192,))]
    for label, heads, batch, contexts in cases:
        for ctx in contexts:
            case = AttentionCase([1] * batch, [ctx] * batch, **heads)
            args = case.build(gen)
            base = triton_attention.choose_config(batch, heads["num_q_heads"], heads["num_kv_heads"],
                                                  heads["head_dim"], torch.bfloat16, 1, 511, sms)
            results = []
            for tile_n, stages, warps in itertools.product((16, 32, 64, 128), (2, 3, 4, 5), (2, 4, 8)):
                cfg = dataclasses.replace(base, tile_n=tile_n, num_stages=stages, num_warps=warps)
                try:
                    t = time_it(lambda c=cfg: triton_attention.paged_attention_with(c, *args[:7]), reps=20)
                except Exception:  # noqa: BLE001 - out of shared memory: not a candidate
                    continue
                results.append((t, tile_n, stages, warps))
            results.sort()
            now = next(r for r in results if r[1:] == (base.tile_n, base.num_stages, base.num_warps))
            best = ", ".join(f"tile {n} stages {s} warps {w}: {1e6 * t:.1f} us" for t, n, s, w in results[:4])
            print(f"{label}: batch {batch} ctx {ctx}: heuristic (tile {base.tile_n} stages {base.num_stages} "
                  f"warps {base.num_warps}) {1e6 * now[0]:.1f} us; best {best}", flush=True)


def tiles_cold(gen: torch.Generator, copy: float, sms: int) -> None:
    """Unsplit decode with every call reading K/V no earlier call left in L2: a step of the model
    streams 30+ layers of weights and caches between two reads of one layer's cache, so the
    L2-warm `--tiles` numbers flatter small caches (SmolLM2's 9 MB a layer fits the 50 MB L2)."""
    import itertools

    cases = [("a", dict(num_q_heads=9, num_kv_heads=3, head_dim=64), 64, (128, 192, 256, 1024)),
             ("c", dict(num_q_heads=32, num_kv_heads=8, head_dim=128), 32, (256, 384, 512, 640))]
    for label, heads, batch, contexts in cases:
        for ctx in contexts:
            one = AttentionCase([1] * batch, [ctx] * batch, **heads)
            copies = max(2, -(-200 * 2**20 // one.bytes()))  # >= 200 MB in rotation: 4x the L2
            argsets = [one.build(gen) for _ in range(copies)]
            base = triton_attention.choose_config(batch, heads["num_q_heads"], heads["num_kv_heads"],
                                                  heads["head_dim"], torch.bfloat16, 1, 511, sms)
            results = []
            for tile_n, stages, warps in itertools.product((32, 64, 128), (2, 3, 4, 5), (2, 4)):
                cfg = dataclasses.replace(base, tile_n=tile_n, num_stages=stages, num_warps=warps)

                def rotation(c=cfg):
                    for args in argsets:
                        triton_attention.paged_attention_with(c, *args[:7])
                try:
                    t = time_it(rotation, reps=4) / copies
                except Exception:  # noqa: BLE001 - out of shared memory: not a candidate
                    continue
                results.append((t, tile_n, stages, warps))
            results.sort()
            now = next((r for r in results if r[1:] == (base.tile_n, base.num_stages, base.num_warps)), None)
            best = ", ".join(f"tile {n} stages {s} warps {w}: {1e6 * t:.1f} us" for t, n, s, w in results[:4])
            gbps = one.bytes() / results[0][0] / 1e9
            print(f"{label}: batch {batch} ctx {ctx} ({copies} caches in rotation): heuristic (tile {base.tile_n} "
                  f"stages {base.num_stages} warps {base.num_warps}) "
                  f"{'n/a' if now is None else f'{1e6 * now[0]:.1f} us'}; best {best} ({gbps:.0f} GB/s)", flush=True)


def main() -> int:
    gen = torch.Generator("cuda").manual_seed(0)
    copy = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"copy {copy / 1e9:.0f} GB/s, {sms} SMs")
    if "--tiles-cold" in sys.argv:
        tiles_cold(gen, copy, sms)
        return 0
    if "--tiles" in sys.argv:
        tiles(gen, copy, sms)
        return 0
    for batch, ctx in [(32, 480), (32, 640), (32, 1024), (32, 2048), (32, 8192), (16, 2048), (8, 8192), (4, 32768)]:
        case = AttentionCase([1] * batch, [ctx] * batch)
        args = case.build(gen)
        heuristic = triton_attention.choose_config(batch, 32, 8, 128, torch.bfloat16, 1, ctx, sms)
        cells = []
        for splits in (1, 2, 4, 8):
            cfg = dataclasses.replace(heuristic, num_splits=splits)
            t = time_it(lambda c=cfg: triton_attention.paged_attention_with(c, *args[:7]), reps=20)
            cells.append(f"{splits}: {1e6 * t:6.1f} us {100 * case.bytes() / t / copy:5.1f}%")
        print(f"batch {batch:3d} ctx {ctx:6d} (heuristic {heuristic.num_splits}): " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
