"""Stream-K / split-K and per-shape tiles for the skinny GEMM, against the current kernel.

    python bench/probes/splitk_probe.py [--shapes qkv o] [--out DIR]   # on a GPU: time every variant
    python bench/probes/splitk_probe.py --aot                           # no GPU: compile for sm_90, resources
    python bench/probes/splitk_probe.py --check                         # no GPU: interpreter correctness

Llama-3-8B's projections at 32 rows (workload (c)'s decode step), bf16, each variant timed as
skinny_gemm_sweep does (a CUDA graph of 40 calls over rotating cold weights), twice, so the
spread between the two timings shows the noise. Variants:

- `base*`: the current kernel (`skinny_linear`), default tiles and a few others;
- `sk P<n>`: `streamk_linear` (bench/probes/streamk_gemm.py) with the (tile, K step) units dealt out
  evenly to n programs (132 = one per SM, 264 = two), so every program reads the same bytes;
- `sk whole`: the stream-K kernel with whole tiles per program (its own overhead);
- `split2`: plain split-K in two (units = K steps / 2).

Each timed variant is also checked: error against an fp32 GEMM, two calls bit-equal, and (for
the stream-K ones on qkv and gate_up) rows bit-equal at 1, 32 and 64 rows (batch invariance).
`--aot` compiles every variant for sm_90 on the CPU (Triton ships ptxas) and prints shared
memory, registers, programs per SM and whether the K loop was software-pipelined.
"""

from __future__ import annotations

import os
import sys

if "--check" in sys.argv:  # the interpreter must be chosen before any kernel module is imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "probes"))

import streamk_gemm  # noqa: E402
from workbench_kernels import triton_gemm  # noqa: E402
from workbench_kernels.triton_gemm import config_for, skinny_linear  # noqa: E402
from streamk_gemm import streamk_linear  # noqa: E402

SHAPES = {  # name: (N, K, gate_up); gate_up reads 2N rows
    "qkv": (6144, 4096, False), "o": (4096, 4096, False), "gate_up": (14336, 4096, True),
    "down": (4096, 14336, False), "lm_head": (128256, 4096, False),
}
LAYER = ("qkv", "o", "gate_up", "down")
ROWS = 32
H100_SMS = 132

Gemm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Variant:
    """A kernel choice: tiles over the defaults and, for stream-K, how units are dealt out."""

    def __init__(self, streamk: bool, per_sm: float | None = None, split: int | None = None, **cfg: int):
        self.streamk, self.per_sm, self.split, self.cfg = streamk, per_sm, split, cfg

    def config(self, n: int, k: int, gate_up: bool = False) -> dict[str, int]:
        return {**config_for(n, k, gate_up), **self.cfg}

    def programs(self, n: int, k: int, sms: int) -> int:
        """The grid: tiles x split (split-K), or SMs x programs per SM (stream-K)."""
        c = self.config(n, k)
        units = n // c["block_n"] * (k // c["block_k"])
        return min(units, n // c["block_n"] * self.split if self.split else int(sms * self.per_sm))

    def gemm(self, n: int, k: int, gate_up: bool, sms: int) -> Gemm:
        c = self.config(n, k, gate_up)
        if not self.streamk:
            return lambda x, w: skinny_linear(x, w, gate_up=gate_up, **c)
        programs = self.programs(n, k, sms)
        return lambda x, w: streamk_linear(x, w, programs=programs, gate_up=gate_up, **c)


VARIANTS = {
    "base": Variant(False),
    "base st3": Variant(False, num_stages=3),
    "base st4": Variant(False, num_stages=4),
    "base st6": Variant(False, num_stages=6),
    "base bn64 w4": Variant(False, block_n=64, num_warps=4),
    "sk whole": Variant(True, split=1),
    "split2": Variant(True, split=2),
    "sk P132": Variant(True, 1),
    "sk P132 st3": Variant(True, 1, num_stages=3),
    "sk P132 bk128": Variant(True, 1, block_k=128),
    "sk P264 bk128": Variant(True, 2, block_k=128),
    "sk P264 st2": Variant(True, 2, num_stages=2),
    "sk P132 bn64 st3 w4": Variant(True, 1, block_n=64, num_stages=3, num_warps=4),
    "sk P132 bn64 bk128 w4": Variant(True, 1, block_n=64, block_k=128, num_warps=4),
}
LM_HEAD_VARIANTS = ("base", "base st3", "base st4", "base st6", "sk P132", "sk P132 bk128", "sk P264 bk128")
INVARIANCE_CHECKED = {"qkv", "gate_up"}


# --------------------------------------------------------------------------- timing (GPU)


def rows_invariant(gemm: Gemm, x: torch.Tensor, w: torch.Tensor) -> bool:
    """Row results bit-equal at 1, 32 and 64 rows: the split must not depend on the batch."""
    full = gemm(x, w)
    one = gemm(x[:1].contiguous(), w)
    wide = gemm(torch.cat((x, torch.randn_like(x))), w)
    return bool(torch.equal(one[0], full[0]) and torch.equal(wide[: x.shape[0]], full))


def measure(name: str, shape: str, weights: list[torch.Tensor], x: torch.Tensor, sms: int,
            ref: torch.Tensor, copy: float) -> dict:
    from skinny_gemm_sweep import time_it

    n, k, gate_up = SHAPES[shape]
    variant = VARIANTS[name]
    gemm = variant.gemm(n, k, gate_up, sms)
    row: dict = {"shape": shape, "variant": name}
    try:
        first = gemm(x, weights[0])
        row["err"] = ((first.float() - ref).norm() / ref.norm()).item()
        row["repeatable"] = bool(torch.equal(first, gemm(x, weights[0])))
        if shape in INVARIANCE_CHECKED and (variant.streamk or name == "base"):
            row["rows_invariant"] = rows_invariant(gemm, x, weights[0])
        counter = itertools.count()
        times = [time_it(lambda: gemm(x, weights[next(counter) % len(weights)])) for _ in range(2)]
    except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a result too
        row["error"] = repr(exc)[:200]
        return row
    nbytes = weights[0].numel() * 2
    row.update(us=1e6 * min(times), us_both=[1e6 * t for t in times], GBps=nbytes / min(times) / 1e9,
               pct_copy=100 * nbytes / min(times) / copy)
    return row


def reference(x: torch.Tensor, w: torch.Tensor, gate_up: bool) -> torch.Tensor:
    y = F.linear(x.float(), w.float())
    if not gate_up:
        return y
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate.bfloat16().float()) * up.bfloat16().float()


def probe_shape(shape: str, sms: int, copy: float, only: list[str] | None = None) -> list[dict]:
    n, k, gate_up = SHAPES[shape]
    rows_w = 2 * n if gate_up else n
    copies = max(2, -(-400 * 2**20 // (rows_w * k * 2)))  # > 400 MB of weights: every read from HBM
    weights = [torch.randn(rows_w, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(ROWS, k, device="cuda", dtype=torch.bfloat16)
    ref = reference(x, weights[0], gate_up)
    results = []
    for name in LM_HEAD_VARIANTS if shape == "lm_head" else VARIANTS:
        if only and name not in only:
            continue
        results.append(measure(name, shape, weights, x, sms, ref, copy))
        print(format_row(results[-1]), flush=True)
    return results


def format_row(row: dict) -> str:
    head = f"{row['shape']:8s} {row['variant']:22s}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    both = "/".join(f"{t:.1f}" for t in row["us_both"])
    inv = f" inv={row['rows_invariant']}" if "rows_invariant" in row else ""
    return (f"{head} {row['us']:7.1f} us ({both}) {row['GBps']:6.0f} GB/s {row['pct_copy']:5.1f}% "
            f"err {row['err']:.1e} rep={row['repeatable']}{inv}")


def summary(results: list[dict]) -> list[str]:
    """Best variant per shape against `base`, and what the best per layer would save per (c) step."""
    lines, saved = [], 0.0
    for shape in SHAPES:
        ok = [r for r in results if r["shape"] == shape and "us" in r]
        if not ok:
            continue
        b = next(r for r in ok if r["variant"] == "base")
        best = min(ok, key=lambda r: r["us"])
        layers = 32 if shape in LAYER else 1
        saved += layers * (b["us"] - best["us"])
        lines.append(f"{shape:8s} base {b['us']:7.1f} us {b['GBps']:5.0f} GB/s | best {best['variant']:22s} "
                     f"{best['us']:7.1f} us {best['GBps']:5.0f} GB/s | x{layers}: "
                     f"-{layers * (b['us'] - best['us']):.0f} us")
    lines.append(f"per (c) decode step, best of each shape: -{saved / 1e3:.3f} ms")
    return lines


def time_all(shapes: list[str], out: Path | None, only: list[str] | None = None) -> None:
    from skinny_gemm_sweep import copy_bandwidth

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy = copy_bandwidth()
    print(f"copy {copy / 1e9:.0f} GB/s; {sms} SMs; {torch.cuda.get_device_name()}; torch {torch.__version__}",
          flush=True)
    results = [row for shape in shapes for row in probe_shape(shape, sms, copy, only)]
    lines = summary(results)
    print("\n".join(lines))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "splitk_probe.json").write_text(
            json.dumps({"copy_GBps": copy / 1e9, "sms": sms, "rows": results, "summary": lines}, indent=1))


# --------------------------------------------------------------------------- compile only (CPU)


def compile_sm90(variant: Variant, n: int, k: int, gate_up: bool):
    """The variant's kernel compiled for sm_90 as a 32-row launch would compile it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    c = variant.config(n, k, gate_up)
    consts = dict(K=k, UP_OFFSET=n, BLOCK_M=ROWS, BLOCK_N=c["block_n"], BLOCK_K=c["block_k"], GATE_UP=gate_up,
                  DOT_PRECISION="tf32", USE_PDL=True)
    fn = triton_gemm._skinny_gemm_kernel
    pointers = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16"}
    if variant.streamk:
        fn = streamk_gemm._streamk_gemm_kernel
        consts.update(TOTAL=n // c["block_n"] * (k // c["block_k"]), PROGRAMS=variant.programs(n, k, H100_SMS),
                      INTERPRETED=False)
        pointers.update(ws_ptr="*fp32", count_ptr="*i32")
    sig = {a: pointers.get(a, "constexpr" if a in consts else "i32") for a in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in pointers or "stride" in a}
    return triton.compile(ASTSource(fn, sig, consts, aligned), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=c["num_warps"], num_stages=c["num_stages"]))


def registers(cubin: bytes) -> int:
    """Registers per thread, from cuobjdump (shipped with Triton) on the compiled cubin."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return int(re.search(r"REG:(\d+)", text).group(1))


def per_sm(shared: int, regs: int, warps: int) -> int:
    """Resident programs per H100 SM: 228 KB shared (1 KB reserved a block), 64 K registers."""
    by_smem = 233472 // (shared + 1024)
    by_regs = 65536 // (warps * (-(-regs * 32 // 256) * 256))
    return min(by_smem, by_regs, 64 // warps)


def aot_report() -> list[str]:
    lines = [f"{'shape':8s} {'variant':22s} {'grid':>6s} {'smem':>7s} {'regs':>4s} {'/SM':>3s} {'waves':>5s} pipelined"]
    print(lines[0], flush=True)
    for shape, (n, k, gate_up) in SHAPES.items():
        for name in LM_HEAD_VARIANTS if shape == "lm_head" else VARIANTS:
            variant = VARIANTS[name]
            c = variant.config(n, k, gate_up)
            try:
                kern = compile_sm90(variant, n, k, gate_up)
            except Exception as exc:  # noqa: BLE001 - out of shared memory is a result too
                lines.append(f"{shape:8s} {name:22s} does not compile: {repr(exc)[:80]}")
                continue
            tiles = n // c["block_n"]
            grid = variant.programs(n, k, H100_SMS) if variant.streamk else tiles
            regs = registers(kern.asm["cubin"])
            fit = per_sm(kern.metadata.shared, regs, c["num_warps"])
            piped = "async_copy_global_to_local" in kern.asm["ttgir"]
            waves = f"{grid / (H100_SMS * fit):5.2f}" if fit else "  -  "  # 0: over 227 KB, no launch
            lines.append(f"{shape:8s} {name:22s} {grid:6d} {kern.metadata.shared:7d} {regs:4d} {fit:3d} "
                         f"{waves} {piped}")
            print(lines[-1], flush=True)
    return lines


# --------------------------------------------------------------------------- interpreter (CPU)


def check_interpreted() -> list[str]:
    """The split and its fix-up on small fp32 shapes under the interpreter: splits that cut tiles
    in 2, 3 and many pieces, programs spanning several tiles, 1 / 33 / 64 rows, gate_up, and two
    calls in a row (the counts must be back at zero), against float64."""
    cases = [  # rows, N, K, gate_up, programs (block_n 16, block_k 32: units = N / 16 x K / 32)
        (1, 64, 128, True, 5),     # 16 units: shares of 3-4, tiles of 4 cut in 2
        (33, 48, 160, False, 7),   # 15 units in shares of 2-3: tiles of 5 in 2-3 pieces
        (64, 32, 128, True, 4),    # split-K in 2 (tiles x 2)
        (5, 64, 128, False, 2),    # 8 units a program: two whole tiles each
        (2, 32, 128, True, 8),     # one unit a program: a tile in 4 pieces
        (7, 80, 96, False, 4),     # 15 units, shares of 3-4 across tiles of 3
        (64, 48, 224, False, 5),   # 21 units: shares of 4-5, tiles of 7 in 2-3 pieces
        (3, 48, 96, True, 9),      # split-K in 3 (odd)
    ]
    lines, gen = [], torch.Generator().manual_seed(0)
    for rows, n, k, gate_up, programs in cases:
        x = torch.randn(rows, k, generator=gen)
        w = torch.randn(2 * n if gate_up else n, k, generator=gen)
        ref = x.double() @ w.double().t()
        if gate_up:
            gate, up = ref.chunk(2, dim=-1)
            ref = F.silu(gate) * up
        tiles = dict(block_n=16, block_k=32, num_stages=2, num_warps=4)
        streamk_linear(x, w, programs=programs, gate_up=gate_up, **tiles)  # makes the workspace, then:
        for workspace, _ in streamk_gemm._SPLIT_BUFFERS.values():
            workspace.fill_(float("nan"))  # a piece read before it is written shows
        outs = [streamk_linear(x, w, programs=programs, gate_up=gate_up, **tiles) for _ in range(2)]
        err = max(((o.double() - ref).norm() / ref.norm()).item() for o in outs)
        one = streamk_linear(x[-1:].contiguous(), w, programs=programs, gate_up=gate_up, **tiles)
        ok = err < 1e-5 and torch.equal(outs[0], outs[1]) and torch.equal(one[0], outs[0][-1])
        lines.append(f"rows {rows:2d} N {n:3d} K {k:3d} gate_up {gate_up!s:5} programs {programs}: "
                     f"err {err:.1e}, repeat and 1-row bit-equal: {ok}")
        print(lines[-1], flush=True)
        assert ok, lines[-1]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--variants", nargs="+", default=None, help="time only these (default: all)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--aot", action="store_true", help="compile for sm_90 on the CPU, print resources")
    mode.add_argument("--check", action="store_true", help="interpreter correctness of the split, on the CPU")
    args = ap.parse_args()
    if args.check:
        check_interpreted()
    elif args.aot:
        aot_report()
    else:
        time_all(args.shapes, args.out, args.variants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
