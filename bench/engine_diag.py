"""Which engine setting makes two fp32 runs give different greedy / seeded tokens (GPU only).

tests/test_gpu.py asserts that graphs == eager and overlap == sync, token for token. When one of
those fails, this runs the same workload under each combination of the switches below, twice
where it matters, and prints which runs agree, so one device call says whether the cause is
nondeterminism, the fused decode kernel, programmatic dependent launch, the graphs or the
overlapped loop:

    python bench/engine_diag.py [--workload mixed|b] [--out DIR]

Switches: cuda_graphs, overlap, fused (decode attention with RoPE and the KV store inside, or
the two kernels), pdl (WORKBENCH_PDL). Also a kernel-level repeat check of the fused decode
kernel: the same inputs 200 times, bitwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import workbench  # noqa: E402
from workbench_kernels import triton_attention, triton_ops  # noqa: E402

FUSED = triton_ops.decode_with_rope


def two_kernels(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, cu_seqlens_q, seq_lens,
                block_tables, scale, max_seqlen_k):
    """What `decode_with_rope` replaced: rope_store_kv, then paged_attention."""
    triton_ops.rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
    return triton_attention.paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale,
                                            1, max_seqlen_k)


def set_switches(fused: bool, pdl: bool) -> None:
    triton_ops.decode_with_rope = FUSED if fused else two_kernels
    os.environ["WORKBENCH_PDL"] = "1" if pdl else "0"


def mixed_workload():
    from test_gpu import prompts

    ps = prompts(12, 5, lo=30, hi=300)
    kw = [dict(max_new_tokens=20 + 3 * i, ignore_eos=True) | (dict(temperature=0.8, top_p=0.9, seed=i)
                                                                if i % 3 == 0 else {}) for i in range(len(ps))]
    return ps, kw, dict(num_blocks=512, max_batch=8, token_budget=200)


def b_workload():
    from test_gpu import workload_b

    ps, outs = workload_b()
    return ps, [dict(max_new_tokens=m, ignore_eos=True) for m in outs], dict(num_blocks=1500, max_batch=128,
                                                                             token_budget=2048)


def run(loaded, workload, graphs: bool, overlap: bool) -> tuple[list[list[int]], int, float]:
    ps, kw, engine_kw = workload
    t0 = time.perf_counter()
    with workbench.Engine(loaded, dtype="float32", device="cuda", cuda_graphs=graphs, overlap=overlap,
                          **engine_kw) as engine:
        handles = [engine.submit(p, **k) for p, k in zip(ps, kw)]
        tokens = [h.result(timeout=600).token_ids for h in handles]
        preempted = sum(len(s.preempted) for s in engine.telemetry.steps())
        engine.check_invariants()
    return tokens, preempted, time.perf_counter() - t0


def first_diff(a: list[list[int]], b: list[list[int]]) -> str:
    rows = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if not rows:
        return "equal"
    i = rows[0]
    j = next(j for j, (x, y) in enumerate(zip(a[i], b[i])) if x != y)
    return f"{len(rows)} requests differ, first: request {i} at token {j}"


def kernel_repeat_check(reps: int = 200) -> str:
    """The fused decode kernel on fixed inputs, again and again: any race shows as a change."""
    from test_kernels import make_batch

    gen = torch.Generator(device="cuda").manual_seed(0)
    seqs, kv_heads, group, d = 64, 3, 3, 64
    seq_lens = torch.randint(100, 500, (seqs,), generator=gen, device="cuda").tolist()
    batch = make_batch([1] * seqs, seq_lens, kv_heads, group, d, 16, torch.float32, gen)
    positions = batch.seq_lens.long() - 1
    slots = batch.block_tables[torch.arange(seqs, device="cuda"), positions // 16].long() * 16 + positions % 16
    angles = torch.arange(600, device="cuda").float()[:, None] / (
        10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))[None, :]
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    k_new = torch.randn(seqs, kv_heads, d, generator=gen, device="cuda")
    v_new = torch.randn(seqs, kv_heads, d, generator=gen, device="cuda")
    k0, v0 = batch.k_cache.clone(), batch.v_cache.clone()
    outs = set()
    for _ in range(reps):
        batch.k_cache.copy_(k0)
        batch.v_cache.copy_(v0)
        out = FUSED(batch.q, k_new, v_new, positions, cos_sin, batch.k_cache, batch.v_cache, slots,
                    batch.cu_seqlens_q, batch.seq_lens, batch.block_tables, batch.scale, 512)
        outs.add(hash(out.cpu().numpy().tobytes()) ^ hash(batch.k_cache.cpu().numpy().tobytes()))
    return f"fused decode kernel, {reps} runs on the same inputs: {len(outs)} distinct results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=["mixed", "b"], default="mixed")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--combos", nargs="*", default=None,
                    help="graphs,overlap,fused,pdl as 0/1 strings, e.g. 1111 0111; default: the full matrix")
    ap.add_argument("--repeat", type=int, default=2, help="runs of the first combination (nondeterminism check)")
    args = ap.parse_args()
    from test_gpu import random_smollm2, tokenizer

    hf32 = random_smollm2(torch.float32, std=0.05)
    loaded = workbench.load(hf32, tokenizer=tokenizer(), dtype=torch.float32, device="cuda")
    workload = mixed_workload() if args.workload == "mixed" else b_workload()
    lines = [kernel_repeat_check()]
    print(lines[0], flush=True)
    combos = args.combos or ["".join(c) for c in itertools.product("10", repeat=4)]
    results: dict[str, list[list[int]]] = {}
    for combo in combos:
        graphs, overlap, fused, pdl = (c == "1" for c in combo)
        set_switches(fused, pdl)
        for rep in range(args.repeat if combo == combos[0] else 1):
            tokens, preempted, seconds = run(loaded, workload, graphs, overlap)
            key = f"graphs={int(graphs)} overlap={int(overlap)} fused={int(fused)} pdl={int(pdl)} run {rep}"
            results[key] = tokens
            base, prev = next(iter(results.values())), list(results.values())[-2] if len(results) > 1 else tokens
            line = (f"{key}: vs the first run {first_diff(base, tokens)}; vs the run before {first_diff(prev, tokens)};"
                    f" preempted {preempted}; {seconds:.1f} s")
            print(line, flush=True)
            lines.append(line)
    set_switches(True, True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"engine_diag_{args.workload}.txt").write_text("\n".join(lines) + "\n")
        (args.out / f"engine_diag_{args.workload}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
