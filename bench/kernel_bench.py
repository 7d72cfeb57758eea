"""Achieved memory bandwidth of the Triton kernels against the device's own copy bandwidth.

    python bench/kernel_bench.py [--sweep] [--out-dir bench/results]

Every kernel here is memory bound at these shapes, so each row counts the fewest bytes the
operation must move (each input read once, each output written once) and divides by the
median time from `triton.testing.do_bench`, which clears the L2 cache before every timed
call: the numbers are from device memory, not from cache. The ceiling is a large
device-to-device copy, counted the same way (bytes read + bytes written).

The headline row is decode paged attention at batch 64, context 2048, 32 query / 8 KV
heads, head dim 128, bf16, block size 16 (537 MB of K/V per call). `--sweep` also times
other launch configurations of that kernel, checked against the default one first.
Results go to <out-dir>/kernels_<device>.md and .json, with device, date, command, versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import shlex
import sys
from pathlib import Path
from typing import Callable

import torch
import triton
from triton.testing import do_bench

from workbench_kernels import torch_backend, triton_attention, triton_ops

GB = 1e9


@dataclasses.dataclass
class Row:
    """One timed operation: what ran, the bytes and flops it must move/do, and its times."""

    name: str
    shape: str
    config: str
    bytes: int
    flops: int
    ms: float
    ms_again: float  # the same measurement repeated: the spread between them is the noise

    def gbps(self) -> float:
        return self.bytes / (self.ms * 1e-3) / GB

    def tflops(self) -> float:
        return self.flops / (self.ms * 1e-3) / 1e12


def median_ms(fn: Callable[[], object]) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def timed(name: str, shape: str, config: str, nbytes: int, flops: int, fn) -> Row:
    fn()  # compile / warm up outside the timing
    return Row(name, shape, config, nbytes, flops, median_ms(fn), median_ms(fn))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# --------------------------------------------------------------------------- ceilings


def copy_bandwidth(nbytes: int = 1 << 30) -> Row:
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return timed("device-to-device copy", f"{nbytes >> 20} MiB", "torch copy_", 2 * nbytes, 0,
                 lambda: dst.copy_(src))


# --------------------------------------------------------------------------- attention


@dataclasses.dataclass
class AttentionCase:
    """A batch of requests with contexts in a block-scattered paged cache."""

    q_lens: list[int]
    seq_lens: list[int]
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16

    def build(self, gen: torch.Generator) -> tuple:
        blocks = [-(-s // self.block_size) for s in self.seq_lens]
        order = torch.randperm(sum(blocks), generator=gen, device="cuda").int()
        tables = torch.zeros(len(blocks), max(blocks), dtype=torch.int32, device="cuda")
        start = 0
        for i, n in enumerate(blocks):
            tables[i, :n] = order[start : start + n]
            start += n
        shape = (sum(blocks), self.block_size, self.num_kv_heads, self.head_dim)
        k_cache = torch.randn(shape, generator=gen, device="cuda").to(self.dtype)
        v_cache = torch.randn(shape, generator=gen, device="cuda").to(self.dtype)
        cu = torch.tensor([0, *self.q_lens], device="cuda").cumsum(0).int()
        q = torch.randn((int(cu[-1]), self.num_q_heads, self.head_dim), generator=gen,
                        device="cuda").to(self.dtype)
        seq_lens = torch.tensor(self.seq_lens, dtype=torch.int32, device="cuda")
        return (q, k_cache, v_cache, cu, seq_lens, tables, 1 / math.sqrt(self.head_dim),
                max(self.q_lens), max(self.seq_lens))

    def shape(self) -> str:
        kind = ("decode" if max(self.q_lens) == 1 else
                "prefill" if self.q_lens == self.seq_lens else "mixed")
        return (f"{kind} B={len(self.q_lens)} T={sum(self.q_lens)} ctx<={max(self.seq_lens)} "
                f"Hq={self.num_q_heads} Hk={self.num_kv_heads} D={self.head_dim} "
                f"bs={self.block_size} {str(self.dtype).removeprefix('torch.')}")

    def bytes(self) -> int:
        """K and V once per KV head, q read and out written once, block tables and lengths."""
        elem = self.dtype.itemsize
        kv = 2 * sum(self.seq_lens) * self.num_kv_heads * self.head_dim * elem
        qo = 2 * sum(self.q_lens) * self.num_q_heads * self.head_dim * elem
        tables = sum(-(-s // self.block_size) for s in self.seq_lens) * 4
        return kv + qo + tables + 12 * len(self.seq_lens)

    def flops(self) -> int:
        """QK^T and PV over the causal pairs each query token sees."""
        pairs = sum(sum(s - q + i + 1 for i in range(q)) for q, s in zip(self.q_lens, self.seq_lens))
        return 4 * pairs * self.num_q_heads * self.head_dim


def config_str(c: triton_attention.AttentionConfig) -> str:
    return (f"block_m={c.block_m} tile_n={c.tile_n} splits={c.num_splits} "
            f"warps={c.num_warps} stages={c.num_stages}")


def attention_rows(case: AttentionCase, gen, configs=(), reference_too: bool = False) -> list[Row]:
    """Time the heuristic's choice and every extra config that agrees with it."""
    args = case.build(gen)
    q, k_cache = args[0], args[1]
    default = triton_attention.choose_config(
        len(case.seq_lens), case.num_q_heads, case.num_kv_heads, case.head_dim,
        case.dtype, args[7], args[8], torch.cuda.get_device_properties(0).multi_processor_count)
    rows = [timed("paged attention", case.shape(), f"heuristic: {config_str(default)}",
                  case.bytes(), case.flops(), lambda: triton_attention.paged_attention(*args))]
    expected = triton_attention.paged_attention(*args)
    for config in configs:
        if config == default:
            continue
        try:
            out = triton_attention.paged_attention_with(config, *args[:7])
        except Exception as exc:  # a config the compiler rejects (e.g. out of shared memory)
            print(f"  skipped {config_str(config)}: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        if rel_err(out, expected) > 1e-2:
            print(f"  skipped {config_str(config)}: disagrees with the default config")
            continue
        rows.append(timed("paged attention", case.shape(), config_str(config), case.bytes(),
                          case.flops(), lambda c=config: triton_attention.paged_attention_with(c, *args[:7])))
    if reference_too:
        rows.append(timed("paged attention", case.shape(), "torch reference (gather + SDPA)",
                          case.bytes(), case.flops(), lambda: torch_backend.paged_attention(*args)))
    del q, k_cache, args
    return rows


def decode_sweep(base: triton_attention.AttentionConfig) -> list[triton_attention.AttentionConfig]:
    configs = [dataclasses.replace(base, tile_n=n, num_warps=w, num_stages=s)
               for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]
    return configs + [dataclasses.replace(base, num_splits=k) for k in (2, 4)]


def split_sweep(base: triton_attention.AttentionConfig) -> list[triton_attention.AttentionConfig]:
    return [dataclasses.replace(base, num_splits=k) for k in (1, 2, 4, 8, 16, 32)]


def prefill_sweep(base: triton_attention.AttentionConfig) -> list[triton_attention.AttentionConfig]:
    return [dataclasses.replace(base, block_m=m, tile_n=n, num_warps=w, num_stages=s)
            for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)]


# --------------------------------------------------------------------------- element-wise


def elementwise_rows(gen) -> list[Row]:
    rows = []
    bf16, size = torch.bfloat16, 2

    def randn(*shape, dtype=bf16):
        return torch.randn(shape, generator=gen, device="cuda").to(dtype)

    tokens, hidden = 16384, 4096
    x, r, w = randn(tokens, hidden), randn(tokens, hidden), randn(hidden)
    for residual in (None, r):
        tensors = 2 if residual is None else 4  # x (+ r) read, out (+ new residual) written
        rows.append(timed("rms_norm" + (" + residual" if residual is not None else ""),
                          f"T={tokens} H={hidden} bf16", "", tensors * tokens * hidden * size
                          + hidden * size, 5 * tokens * hidden,
                          lambda res=residual: triton_ops.rms_norm(x, w, 1e-6, res)))
    del x, r

    tokens, inter = 4096, 14336
    x = randn(tokens, 2 * inter)
    rows.append(timed("silu_and_mul", f"T={tokens} I={inter} bf16", "", 3 * tokens * inter * size,
                      5 * tokens * inter, lambda: triton_ops.silu_and_mul(x)))
    del x

    tokens, hq, hk, dim = 16384, 32, 8, 128
    q, k = randn(tokens, hq, dim), randn(tokens, hk, dim)
    positions = torch.randint(0, 32768, (tokens,), generator=gen, device="cuda")
    cos_sin = torch.randn(32768, dim, generator=gen, device="cuda")
    rows.append(timed("rope (in place)", f"T={tokens} Hq={hq} Hk={hk} D={dim} bf16", "",
                      2 * tokens * (hq + hk) * dim * size + tokens * (dim * 4 + 8),
                      6 * tokens * (hq + hk) * dim, lambda: triton_ops.rope(q, k, positions, cos_sin)))
    v = randn(tokens, hk, dim)
    blocks = tokens // 16 * 2
    k_cache = torch.empty(blocks, 16, hk, dim, dtype=bf16, device="cuda")
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(blocks * 16, generator=gen, device="cuda")[:tokens]
    rows.append(timed("store_kv", f"T={tokens} Hk={hk} D={dim} bs=16 bf16", "",
                      4 * tokens * hk * dim * size + tokens * 8, 0,
                      lambda: triton_ops.store_kv(k, v, k_cache, v_cache, slots)))
    return rows


# --------------------------------------------------------------------------- report


def compiled_report(jit_fn) -> list[str]:
    """Registers, spills, shared memory and pipelining evidence of each compiled variant."""
    lines = []
    for kernel_cache, *_ in list(getattr(jit_fn, "device_caches", {}).values()):
        for key, kernel in kernel_cache.items():
            try:
                meta, ptx = kernel.metadata, kernel.asm.get("ptx", "")
                lines.append(
                    f"warps={meta.num_warps} stages={meta.num_stages} regs={kernel.n_regs} "
                    f"spills={kernel.n_spills} shared={meta.shared}B "
                    f"cp.async={ptx.count('cp.async.c')} ld.global.v4={ptx.count('ld.global.v4')} "
                    f"ld.global={ptx.count('ld.global')} key={str(key)[:300]}")
            except Exception as exc:  # report what can be read, never fail the benchmark on it
                lines.append(f"(unreadable variant: {type(exc).__name__}: {exc})")
    return lines


def environment(argv: list[str]) -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "multiprocessors": props.multi_processor_count,
        "l2_mb": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(shlex.quote(a) for a in ["python", *argv]),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }


def markdown(env: dict, copy: Row, rows: list[Row]) -> str:
    lines = [f"# Kernel bandwidth on {env['device']}", ""]
    lines += [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in env.items()]
    lines += ["", f"Copy ceiling: {copy.gbps():.0f} GB/s ({copy.shape}, {copy.ms:.3f} / "
              f"{copy.ms_again:.3f} ms, bytes read + written).", "",
              "| kernel | shape | config | MB moved | ms (median) | ms (again) | GB/s | % of copy | TFLOP/s |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.name} | {r.shape} | {r.config} | {r.bytes / 1e6:.1f} | {r.ms:.4f} | "
                     f"{r.ms_again:.4f} | {r.gbps():.0f} | {100 * r.gbps() / copy.gbps():.1f} | "
                     f"{r.tflops():.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time other attention configs")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv[1:])
    if not torch.cuda.is_available():
        print("kernel_bench needs a CUDA device", file=sys.stderr)
        return 2
    gen = torch.Generator("cuda")
    gen.manual_seed(opts.seed)
    env = environment(argv)
    copy = copy_bandwidth()

    sms = env["multiprocessors"]

    def heuristic(case: AttentionCase) -> triton_attention.AttentionConfig:
        return triton_attention.choose_config(
            len(case.q_lens), case.num_q_heads, case.num_kv_heads,
            case.head_dim, case.dtype, max(case.q_lens), max(case.seq_lens), sms)

    ragged = torch.randint(1, 4096, (64,), generator=gen, device="cuda").tolist()
    cases = [  # (case, the configs --sweep adds, also time the torch reference)
        (AttentionCase(q_lens=[1] * 64, seq_lens=[2048] * 64), decode_sweep, True),
        (AttentionCase(q_lens=[1] * 4, seq_lens=[32768] * 4), split_sweep, False),
        (AttentionCase(q_lens=[1] * 64, seq_lens=ragged), split_sweep, False),
        (AttentionCase(q_lens=[512] * 4 + [1] * 60, seq_lens=[2048] * 64), prefill_sweep, False),
        (AttentionCase(q_lens=[4096], seq_lens=[4096]), prefill_sweep, False),
    ]
    rows = []
    for case, sweep, reference_too in cases:
        configs = sweep(heuristic(case)) if opts.sweep else ()
        rows += attention_rows(case, gen, configs, reference_too)
    rows += elementwise_rows(gen)

    opts.out_dir.mkdir(parents=True, exist_ok=True)
    slug = env["device"].lower().replace("nvidia", "").strip().split()[0]
    report = markdown(env, copy, rows)
    (opts.out_dir / f"kernels_{slug}.md").write_text(report)
    (opts.out_dir / f"kernels_{slug}.json").write_text(json.dumps(
        {"environment": env, "copy": dataclasses.asdict(copy) | {"gbps": copy.gbps()},
         "rows": [dataclasses.asdict(r) | {"gbps": r.gbps(), "tflops": r.tflops()} for r in rows]},
        indent=1))
    print("\n".join(["compiled attention variants:", *compiled_report(triton_attention._attention_kernel)]))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
