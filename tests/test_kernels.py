"""Both implementations of every kernel, Triton and the tuned torch backend, against the naive oracle.

`workbench_kernels.naive` computes each kernel the plainest way, in float64, one request and one
token at a time; neither implementation shares any code with it. Without CUDA the Triton kernels
run under Triton's interpreter (TRITON_INTERPRET=1) on small shapes; with CUDA the same tests run
compiled, and the `gpu`-marked ones add full-size shapes, CUDA-graph capture and a no-host-sync
check. The torch backend (what the engine runs on a CPU) takes the same cases on the CPU.

Checks follow one rule: ||out - oracle|| / ||oracle|| within the dtype's tolerance; NaN never
passes; outputs are poisoned (allocations filled with NaN, caches pre-filled with NaN) so an
unwritten element fails, and the oracle reads only the cache slots a request owns, so a kernel
that reads another slot fails too. Each test draws a fresh seed and names it in its failure message.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import secrets
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton reads this when a kernel is decorated, so it must be set before the kernel
    # modules are imported (and they are reloaded below if something imported them first).
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from workbench_kernels import naive, table, torch_backend  # noqa: E402


def _load_triton_modules():
    """Import the Triton modules in the mode this process runs them in (see above)."""
    launch = importlib.import_module("workbench_kernels.launch")
    attention = importlib.import_module("workbench_kernels.triton_attention")
    gemm = importlib.import_module("workbench_kernels.triton_gemm")
    ops = importlib.import_module("workbench_kernels.triton_ops")
    interpreted = type(attention._attention_kernel).__name__ == "InterpretedFunction"
    if not HAS_CUDA and not interpreted:  # imported earlier without the interpreter
        importlib.reload(launch)  # its helpers are called from the kernels: first
        attention = importlib.reload(attention)
        gemm = importlib.reload(gemm)
        ops = importlib.reload(ops)
    return attention, gemm, ops


triton_attention, triton_gemm, triton_ops = _load_triton_modules()

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
IMPLEMENTATIONS = {"triton": triton_ops, "torch": torch_backend}
BOTH = pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def seed() -> int:
    return secrets.randbits(31)


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    g = torch.Generator(DEVICE)
    g.manual_seed(seed)
    return g


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every float tensor the kernels allocate starts as NaN, so unwritten output shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def randn(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, seed: int) -> None:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not torch.isnan(out).any(), f"NaN in output (seed {seed})"
    err = ((out.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()
    assert err <= TOLERANCE[dtype], f"relative error {err:.3g} > {TOLERANCE[dtype]} (seed {seed})"


def assert_same_stores(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, seed: int) -> None:
    """A cache after a store against the oracle's: NaN (never written) in exactly the same slots,
    the written slots within tolerance."""
    out, ref = out.cpu(), ref.cpu()
    assert torch.equal(out.isnan(), ref.isnan()), f"wrote a skipped slot or missed one (seed {seed})"
    assert_close(out.nan_to_num(0.0), ref.nan_to_num(0.0), dtype, seed)


# --------------------------------------------------------------------------- the oracle itself


def test_naive_attention_by_hand():
    """The oracle on numbers small enough to check by hand: one request, two positions in two
    one-slot blocks (stored in reverse order), a decode row that sees both and softmaxes 0 and ln 3."""
    k_cache = torch.tensor([[[[0.0, 1.0]]], [[[0.0, 0.0]]]])  # block 0 holds position 1, block 1 position 0
    v_cache = torch.tensor([[[[4.0, 8.0]]], [[[0.0, 4.0]]]])
    q = torch.tensor([[[0.0, math.log(3.0)]]])
    out = naive.paged_attention(q, k_cache, v_cache, torch.tensor([0, 1]), torch.tensor([2]),
                                torch.tensor([[1, 0]]), 1.0)
    # weights 1/4 and 3/4 on positions 0 and 1: 0.25 * [0, 4] + 0.75 * [4, 8]
    torch.testing.assert_close(out, torch.tensor([[[3.0, 7.0]]], dtype=torch.float64))
    causal = naive.paged_attention(torch.cat((q, q)), k_cache, v_cache, torch.tensor([0, 2]), torch.tensor([2]),
                                   torch.tensor([[1, 0]]), 1.0)
    torch.testing.assert_close(causal[0], torch.tensor([[0.0, 4.0]], dtype=torch.float64))  # sees position 0 only


def test_naive_rope_and_store_by_hand():
    """A quarter turn: cos 0 and sin 1 at position 1 map (x1, x2) to (-x2, x1); slot 3 of a
    two-slot-block cache is block 1, offset 1; slot -1 stores nothing."""
    cos_sin = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # D = 2: position 0 no turn, position 1 a quarter
    q, k = torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[3.0, 5.0]]])
    q_rot, k_rot = naive.rope(q, k, torch.tensor([1]), cos_sin)
    assert q_rot.tolist() == [[[-2.0, 1.0]]] and k_rot.tolist() == [[[-5.0, 3.0]]]
    caches = torch.zeros(2, 2, 1, 2), torch.zeros(2, 2, 1, 2)  # 2 blocks of 2 slots, 1 head, D = 2
    k_cache, v_cache = naive.store_kv(torch.ones(2, 1, 2), 2 * torch.ones(2, 1, 2), *caches, torch.tensor([3, -1]))
    assert k_cache[1, 1].tolist() == [[1.0, 1.0]] and v_cache[1, 1].tolist() == [[2.0, 2.0]]
    assert k_cache.sum() == 2 and v_cache.sum() == 4  # the padding token went nowhere
    assert caches[0].sum() == 0  # the inputs are never written


def test_naive_q4_1_layout_by_hand():
    """Byte j of a Q4_1 block holds weight j in its low and weight j + 16 in its high four bits."""
    qs = torch.tensor([[0x21] + [0] * 15], dtype=torch.uint8)  # weight 0: 1, weight 16: 2, the rest 0
    scales = torch.tensor([[[0.5, -1.0]]])  # d, m
    w = naive.dequantize_q4_1(qs, scales)
    assert w[0, 0] == -0.5 and w[0, 16] == 0.0 and w[0, 1] == -1.0
    assert naive.dequantize_q8_0(torch.full((1, 32), -3, dtype=torch.int8), torch.tensor([[0.25]]))[0, 5] == -0.75


# --------------------------------------------------------------------------- dispatcher


def test_select_cpu_gives_the_torch_backend():
    assert table.select("cpu") is table.TORCH
    assert table.select("cpu", "torch").rms_norm is torch_backend.rms_norm


def test_select_rejects_unknown_backend():
    with pytest.raises(ValueError):
        table.select("cpu", "cuda")


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter is what runs Triton without CUDA")
def test_select_cpu_triton_runs_under_interpreter():
    kernels = table.select("cpu", "triton")
    assert kernels.name == "triton"
    assert kernels.paged_attention is triton_attention.paged_attention
    assert type(triton_ops._rms_norm_kernel).__name__ == "InterpretedFunction"


def test_programmatic_dependent_launch_only_where_it_exists(monkeypatch):
    from workbench_kernels import launch

    assert launch.pdl(torch.device("cpu")) == {"USE_PDL": False}  # the interpreter: plain launches
    monkeypatch.setattr(launch, "_device_supports", lambda index: True)  # as on a Hopper GPU
    cuda0 = torch.device("cuda", 0)
    assert launch.pdl(cuda0) == {"USE_PDL": True, "launch_pdl": True}
    monkeypatch.setenv("WORKBENCH_PDL", "0")  # the switch for measuring what it brings
    assert launch.pdl(cuda0) == {"USE_PDL": False}
    monkeypatch.delenv("WORKBENCH_PDL")
    monkeypatch.setattr(launch, "_device_supports", lambda index: False)  # an Ampere GPU
    assert launch.pdl(cuda0) == {"USE_PDL": False}


@needs_cuda
def test_select_cuda_gives_triton():
    assert table.select("cuda").name == "triton"
    assert table.select("cuda", "torch") is table.TORCH


def test_kernel_table_signatures_agree():
    import inspect

    for name in table.Kernels._fields[1:]:
        ours = inspect.signature(getattr(triton_ops, name))
        theirs = inspect.signature(getattr(torch_backend, name))
        assert list(ours.parameters) == list(theirs.parameters), name
        assert getattr(table.TORCH, name) is getattr(torch_backend, name)
        assert hasattr(naive, name), f"the oracle has no {name}"


# --------------------------------------------------------------------------- GEMMs
# The weight-streaming GEMM. The interpreter's bf16 dot is not faithful, so on the CPU it runs
# in fp32 with small tiles; on the GPU the real layer shapes in bf16, through the kernel table.

SMALL_GEMMS = [(1, 64, 128), (3, 128, 64), (33, 64, 256), (64, 64, 128)]  # rows, N, K
LAYER_GEMMS = [(32, 6144, 4096), (32, 4096, 14336), (64, 960, 576), (64, 576, 1536), (7, 49152, 576)]


def _check_gemm(rows: int, n: int, k: int, dtype, gen, seed, **tiles) -> None:
    x, w = randn((rows, k), dtype, gen), randn((n, k), dtype, gen)
    assert triton_gemm.fits(x, w, **tiles) and triton_gemm.fits(x, w, gate_up=True, **tiles)
    ref = naive.linear(x, w)
    assert_close(triton_gemm.skinny_linear(x, w, **tiles), ref, dtype, seed)
    fused = triton_gemm.skinny_linear(x, w, gate_up=True, **tiles)
    # the kernel rounds gate and up to the dtype before the activation, like GEMM + silu_and_mul
    assert_close(fused, naive.silu_and_mul(ref.to(dtype)), dtype, seed)


@pytest.mark.parametrize("rows,n,k", SMALL_GEMMS)
def test_skinny_gemm(rows, n, k, gen, seed):
    _check_gemm(rows, n, k, torch.float32, gen, seed, **({} if HAS_CUDA else {"block_n": 16, "block_k": 32}))


def test_skinny_gemm_declines_what_it_cannot_take(gen, seed):
    w = randn((64, 128), torch.float32, gen)
    assert not triton_gemm.fits(randn((65, 128), torch.float32, gen), w)  # more than 64 rows
    assert not triton_gemm.fits(randn((4, 100), torch.float32, gen), randn((64, 100), torch.float32, gen))
    assert not triton_gemm.fits(randn((4, 256), torch.float32, gen)[:, ::2], w)  # strided K
    x, bias = randn((4, 128), torch.float32, gen), randn((64,), torch.float32, gen)
    assert_close(triton_ops.linear(x, w, bias), naive.linear(x, w, bias), torch.float32, seed)  # another GEMM


@BOTH
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,bias", [(1, False), (5, True), (70, False)])
def test_linear(impl, rows, bias, dtype, gen, seed):
    """The table's GEMMs, whichever path each takes for these rows, dtype and device."""
    ops = IMPLEMENTATIONS[impl]
    x, w = randn((rows, 64), dtype, gen), randn((96, 64), dtype, gen)
    b = randn((96,), dtype, gen) if bias else None
    assert_close(ops.linear(x, w, b), naive.linear(x, w, b), dtype, seed)
    assert_close(ops.gate_up_silu(x, w), naive.gate_up_silu(x, w), dtype, seed)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,n,k", LAYER_GEMMS)
def test_skinny_gemm_layer_shapes(rows, n, k, dtype, gen, seed):
    x, w = (randn((rows, k), torch.float32, gen) * k**-0.5).to(dtype), randn((n, k), dtype, gen)  # no fp16 overflow
    assert triton_gemm.fits(x, w)
    assert_close(triton_ops.linear(x, w), naive.linear(x, w), dtype, seed)
    assert_close(triton_ops.gate_up_silu(x, w), naive.gate_up_silu(x, w), dtype, seed)


# --------------------------------------------------------------------------- RMSNorm

SMALL_ROWS = [(1, 64), (7, 96), (5, 576)]
FULL_ROWS = [(1, 4096), (257, 576), (4096, 4096), (33, 8192)]


def _check_rms_norm(ops, rows: int, hidden: int, dtype, residual: bool, gen, seed) -> None:
    x = randn((rows, hidden), dtype, gen)
    w = (1 + 0.1 * randn((hidden,), torch.float32, gen)).to(dtype)
    r = randn((rows, hidden), dtype, gen) if residual else None
    out, new_res = ops.rms_norm(x, w, 1e-6, r)
    ref, ref_res = naive.rms_norm(x, w, 1e-6, r)
    if residual:
        # both implementations round the summed stream to the input dtype, so it matches bit for bit,
        # except under the interpreter, whose fp32 -> bf16 casts truncate instead of rounding
        if HAS_CUDA or ops is torch_backend or dtype != torch.bfloat16:
            assert torch.equal(new_res, x + r)
        assert_close(new_res, ref_res, dtype, seed)
    else:
        assert new_res is None and ref_res is None
    assert out.dtype == dtype
    assert_close(out, ref, dtype, seed)


@BOTH
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", SMALL_ROWS)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(impl, rows, hidden, dtype, residual, gen, seed):
    _check_rms_norm(IMPLEMENTATIONS[impl], rows, hidden, dtype, residual, gen, seed)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", FULL_ROWS)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_full(rows, hidden, dtype, residual, gen, seed):
    _check_rms_norm(triton_ops, rows, hidden, dtype, residual, gen, seed)


@BOTH
def test_rms_norm_keeps_leading_dims(impl, gen, seed):
    x = randn((2, 3, 64), torch.float32, gen)
    w = randn((64,), torch.float32, gen)
    out, res = IMPLEMENTATIONS[impl].rms_norm(x, w, 1e-5, x)
    ref, ref_res = naive.rms_norm(x, w, 1e-5, x)
    assert_close(out, ref, torch.float32, seed)
    assert_close(res, ref_res, torch.float32, seed)


# --------------------------------------------------------------------------- RoPE


def rope_table(max_pos: int, dim: int) -> torch.Tensor:
    """cos_sin [max_pos, D] as the model builds it: cos in the first D/2 columns, sin in the last."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=DEVICE).float() / dim))
    angles = torch.arange(max_pos, device=DEVICE).float()[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def split_qkv(t: torch.Tensor, q_heads: int, k_heads: int, dim: int) -> tuple[torch.Tensor, ...]:
    """q, k, v as views of one fused projection's rows, the way a model produces them."""
    tokens = t.shape[0]
    q = t[:, : q_heads * dim].view(tokens, q_heads, dim)
    k = t[:, q_heads * dim : (q_heads + k_heads) * dim].view(tokens, k_heads, dim)
    v = t[:, (q_heads + k_heads) * dim :].view(tokens, k_heads, dim)
    return q, k, v


def _check_rope(ops, tokens: int, q_heads: int, k_heads: int, dim: int, dtype, gen, seed) -> None:
    max_pos = 4096
    qkv = randn((tokens, (q_heads + 2 * k_heads) * dim), dtype, gen)
    q, k, v = split_qkv(qkv, q_heads, k_heads, dim)
    v_before = v.clone()
    positions = torch.randint(0, max_pos, (tokens,), generator=gen, device=DEVICE)
    cos_sin = rope_table(max_pos, dim)
    q_ref, k_ref = naive.rope(q, k, positions, cos_sin)
    ops.rope(q, k, positions, cos_sin)
    assert_close(q, q_ref, dtype, seed)
    assert_close(k, k_ref, dtype, seed)
    assert torch.equal(v, v_before), "rope wrote outside q, k"


@BOTH
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_heads,k_heads,dim", [(4, 2, 64), (9, 3, 96), (2, 2, 128)])
def test_rope(impl, q_heads, k_heads, dim, dtype, gen, seed):
    _check_rope(IMPLEMENTATIONS[impl], 9, q_heads, k_heads, dim, dtype, gen, seed)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_heads,k_heads,dim", [(32, 8, 128), (9, 3, 64), (16, 16, 256)])
def test_rope_full(q_heads, k_heads, dim, dtype, gen, seed):
    _check_rope(triton_ops, 2048, q_heads, k_heads, dim, dtype, gen, seed)


# --------------------------------------------------------------------------- SiLU * mul


@BOTH
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2 * 64), (6, 2 * 1536), (2, 3, 2 * 100)])
def test_silu_and_mul(impl, shape, dtype, gen, seed):
    x = randn(shape, dtype, gen)
    assert_close(IMPLEMENTATIONS[impl].silu_and_mul(x), naive.silu_and_mul(x), dtype, seed)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4096, 2 * 14336), (3, 2 * 1536), (1000, 2 * 100)])
def test_silu_and_mul_full(shape, dtype, gen, seed):
    x = randn(shape, dtype, gen)
    assert_close(triton_ops.silu_and_mul(x), naive.silu_and_mul(x), dtype, seed)


# --------------------------------------------------------------------------- KV store


def _check_store_kv(ops, tokens: int, heads: int, dim: int, block_size: int, dtype, gen) -> None:
    num_blocks = 2 * tokens // block_size + 2
    slots = torch.randperm(num_blocks * block_size, generator=gen, device=DEVICE)[:tokens]
    slots[torch.rand(tokens, generator=gen, device=DEVICE) < 0.25] = -1  # padding tokens
    # k and v as views of one fused projection, the way a model produces them
    kv = randn((tokens, 2 * heads * dim), dtype, gen)
    k = kv[:, : heads * dim].view(tokens, heads, dim)
    v = kv[:, heads * dim :].view(tokens, heads, dim)
    k_cache, v_cache = (torch.full((num_blocks, block_size, heads, dim), float("nan"), dtype=dtype, device=DEVICE)
                        for _ in range(2))
    k_ref, v_ref = naive.store_kv(k, v, k_cache, v_cache, slots)
    ops.store_kv(k, v, k_cache, v_cache, slots)
    for ours, ref in ((k_cache, k_ref), (v_cache, v_ref)):
        assert torch.equal(ours.isnan(), ref.isnan()), "wrote a skipped slot or missed one"
        assert torch.equal(ours.nan_to_num(0.0), ref.nan_to_num(0.0))  # a store is a copy: bit for bit


@BOTH
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("heads,dim", [(2, 64), (3, 96)])
def test_store_kv(impl, heads, dim, block_size, dtype, gen):
    _check_store_kv(IMPLEMENTATIONS[impl], 37, heads, dim, block_size, dtype, gen)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 16, 64, 256])
def test_store_kv_full(block_size, dtype, gen):
    _check_store_kv(triton_ops, 4096, 8, 128, block_size, dtype, gen)


def test_torch_backend_stores_into_the_engines_cache_layout(gen, seed):
    """The engine's cache is one tensor [layers, 2, blocks, ...] and k, v sit side by side in the
    qkv rows: the torch backend then stores both with one copy and gathers both with one index.
    Same bytes as the oracle's two plain stores, and its gather reads what was stored."""
    tokens, heads, dim, blocks, block_size = 11, 3, 8, 12, 4
    planes = randn((4, 2, blocks, block_size, heads, dim), torch.float32, gen)  # layers, K/V, ...
    qkv = randn((tokens, 4 * heads * dim), torch.float32, gen)
    _, k, v = split_qkv(qkv, 2 * heads, heads, dim)
    assert torch_backend._kv_planes(planes[2, 0], planes[2, 1]) is not None
    assert torch_backend._stacked(k, v) is not None
    slots = torch.randperm(blocks * block_size, generator=gen, device=DEVICE)[:tokens]
    slots[3] = -1
    k_ref, v_ref = naive.store_kv(k, v, planes[2, 0], planes[2, 1], slots)
    others = planes[[0, 1, 3]].clone()
    torch_backend.store_kv(k, v, planes[2, 0], planes[2, 1], slots)
    assert torch.equal(planes[2, 0], k_ref) and torch.equal(planes[2, 1], v_ref), f"seed {seed}"
    assert torch.equal(planes[[0, 1, 3]], others), f"wrote into another layer (seed {seed})"
    index = torch.randint(0, blocks, (7,), generator=gen, device=DEVICE)
    for got, want in zip(torch_backend._gather_kv_blocks(planes[2, 0], planes[2, 1], index), (k_ref, v_ref)):
        assert torch.equal(got, want[index]), f"seed {seed}"
    assert torch_backend._kv_planes(planes[2, 1], planes[2, 0]) is None  # reversed: not K then V


# --------------------------------------------------------------------------- RoPE + KV store, fused


def _check_rope_store_kv(ops, tokens: int, q_heads: int, k_heads: int, dim: int, block_size: int, dtype, gen,
                         seed) -> None:
    """The fused operation against the oracle in float64, and, for Triton on the GPU, bitwise
    against the two kernels it replaces (the same rounding)."""
    max_pos, num_blocks = 4096, 2 * tokens // block_size + 2
    qkv = randn((tokens, (q_heads + 2 * k_heads) * dim), dtype, gen)
    cos_sin = rope_table(max_pos, dim)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen, device=DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen, device=DEVICE)[:tokens]
    slots[torch.rand(tokens, generator=gen, device=DEVICE) < 0.25] = -1

    def run(fused: bool, t: torch.Tensor) -> list[torch.Tensor]:
        q, k, v = split_qkv(t, q_heads, k_heads, dim)
        caches = [torch.full((num_blocks, block_size, k_heads, dim), float("nan"), dtype=t.dtype, device=DEVICE)
                  for _ in range(2)]
        if fused:
            ops.rope_store_kv(q, k, v, positions, cos_sin, *caches, slots)
        else:
            ops.rope(q, k, positions, cos_sin)
            ops.store_kv(k, v, *caches, slots)
        return [q, k, v, *caches]

    q, k, v = split_qkv(qkv, q_heads, k_heads, dim)
    nan_caches = [torch.full((num_blocks, block_size, k_heads, dim), float("nan"), dtype=torch.float64,
                             device=DEVICE) for _ in range(2)]
    ref = [*naive.rope_store_kv(q, k, v, positions, cos_sin, *nan_caches, slots)]
    ref.insert(2, v.double())  # q, k, v, k_cache, v_cache
    fused, split = run(True, qkv.clone()), run(False, qkv.clone())
    for a, b, r in zip(fused, split, ref):
        assert_same_stores(a, r, dtype, seed)
        if HAS_CUDA and ops is triton_ops:
            assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)), f"fused != rope + store_kv (seed {seed})"


@BOTH
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_heads,k_heads,dim,block_size", [(4, 2, 64, 16), (9, 3, 96, 7), (2, 2, 128, 1)])
def test_rope_store_kv(impl, q_heads, k_heads, dim, block_size, dtype, gen, seed):
    _check_rope_store_kv(IMPLEMENTATIONS[impl], 13, q_heads, k_heads, dim, block_size, dtype, gen, seed)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_heads,k_heads,dim", [(32, 8, 128), (9, 3, 64)])
def test_rope_store_kv_full(q_heads, k_heads, dim, dtype, gen, seed):
    _check_rope_store_kv(triton_ops, 2048, q_heads, k_heads, dim, 16, dtype, gen, seed)


# --------------------------------------------------------------------------- paged attention


@dataclasses.dataclass
class Batch:
    """One ragged batch as the engine hands it to `paged_attention`."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    scale: float
    max_seqlen_q: int
    max_seqlen_k: int

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.cu_seqlens_q, self.seq_lens,
                self.block_tables, self.scale, self.max_seqlen_q, self.max_seqlen_k)

    def oracle(self) -> torch.Tensor:
        """The float64 result; it reads only the slots each request owns, never the poisoned ones."""
        return naive.paged_attention(*self.args()[:7])


def ragged_lengths(mode: str, num_seqs: int, max_len: int, gen) -> tuple[list[int], list[int]]:
    """(q_lens, seq_lens) for a batch of decodes, fresh prefills, or a mix with chunks."""

    def draw(hi: int) -> int:
        return int(torch.randint(1, hi + 1, (1,), generator=gen, device=DEVICE))

    seq_lens = [draw(max_len) for _ in range(num_seqs)]
    seq_lens[0], seq_lens[-1] = 1, max_len  # always cover both ends
    if mode == "decode":
        q_lens = [1] * num_seqs
    elif mode == "prefill":
        q_lens = list(seq_lens)
    else:  # mixed: decodes, fresh prefills and later chunks of chunked prefills
        q_lens = [(1, s, draw(s))[i % 3] for i, s in enumerate(seq_lens)]
    return q_lens, seq_lens


def make_batch(q_lens: list[int], seq_lens: list[int], num_kv_heads: int, group: int,
               head_dim: int, block_size: int, dtype: torch.dtype, gen, unused: float = float("nan")) -> Batch:
    """Scatter each request's blocks at random, poison every unused cache slot with NaN, and
    fill the block-table entries past a request's last block with -1 (even requests) or with
    random blocks (odd ones: other requests' or NaN-poisoned spares), which a kernel that
    read them would turn into a wrong or NaN result. The torch backend gathers whole blocks and
    masks what it must not see, as the engine's zeroed cache allows: its batches pass unused=0."""
    num_seqs = len(seq_lens)
    used = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(used) + 3
    max_blocks = max(used) + 2
    order = torch.randperm(num_blocks, generator=gen, device=DEVICE).int()
    garbage = torch.randint(0, num_blocks, (num_seqs, max_blocks), generator=gen, device=DEVICE)
    odd = torch.arange(num_seqs, device=DEVICE)[:, None] % 2 == 1
    tables = torch.where(odd, garbage, -1).int()
    start = 0
    for i, n in enumerate(used):
        tables[i, :n] = order[start : start + n]
        start += n

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = randn(shape, dtype, gen), randn(shape, dtype, gen)
    live = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    for i, s in enumerate(seq_lens):
        pos = torch.arange(s, device=DEVICE)
        live[tables[i, pos // block_size].long() * block_size + pos % block_size] = True
    k_cache.view(-1, num_kv_heads, head_dim)[~live] = unused
    v_cache.view(-1, num_kv_heads, head_dim)[~live] = unused

    cu = torch.tensor([0, *q_lens], device=DEVICE).cumsum(0).int()
    q = randn((int(cu[-1]), num_kv_heads * group, head_dim), dtype, gen)
    return Batch(q, k_cache, v_cache, cu, torch.tensor(seq_lens, device=DEVICE).int(), tables,
                 1.0 / math.sqrt(head_dim), max(q_lens), max(seq_lens))


@pytest.mark.parametrize("mode", ["decode", "mixed"])
def test_torch_backend_scratch_shared_by_layers_changes_nothing(mode, gen, seed):
    """Two layers of one step share `scratch` (the torch backend keeps the gather index, mask, RoPE
    rows and slots there): each layer's output must equal a call with no scratch, and the oracle's."""
    q_lens, seq_lens = ragged_lengths(mode, 5, 40, gen)
    layers = [make_batch(q_lens, seq_lens, 2, 3, 16, 4, torch.float32, gen) for _ in range(2)]
    for layer in layers[1:]:  # one step: the same metadata, other q and caches
        layer.block_tables, layer.seq_lens, layer.cu_seqlens_q = (
            layers[0].block_tables, layers[0].seq_lens, layers[0].cu_seqlens_q)
    tokens = layers[0].q.shape[0]
    positions = torch.randint(0, 64, (tokens,), generator=gen, device=DEVICE)
    slots = torch.randperm(layers[0].k_cache.shape[0] * 4, generator=gen, device=DEVICE)[:tokens]
    slots[0] = -1  # a padding token: stored nowhere
    cos_sin = randn((64, 16), torch.float32, gen)
    scratch: dict = {}
    for layer in layers:
        k_cache, v_cache = (c.nan_to_num(0.0) for c in (layer.k_cache, layer.v_cache))
        qkv = randn((tokens, 10 * 16), torch.float32, gen)
        outs = []
        for shared in (scratch, None):
            t, caches = qkv.clone(), (k_cache.clone(), v_cache.clone())
            q, k, v = split_qkv(t, 6, 2, 16)
            torch_backend.rope_store_kv(q, k, v, positions, cos_sin, *caches, slots, scratch=shared)
            out = torch_backend.paged_attention(q, *caches, *layer.args()[3:], scratch=shared)
            outs.append((t, *caches, out))
        for a, b in zip(*outs):
            assert torch.equal(a, b), f"scratch changed a result (seed {seed})"
        q, k, v = split_qkv(qkv, 6, 2, 16)
        ref, _, _ = naive.rope_store_attention(q, k, v, positions, cos_sin, k_cache, v_cache, slots,
                                               *layer.args()[3:7])
        assert_close(outs[0][-1], ref, torch.float32, seed)
    assert {"rope_rows", "store_slots"} <= scratch.keys()
    assert ("decode_plan" in scratch) == (mode == "decode")


def _check_attention(batch: Batch, dtype, seed, config=None, ops=triton_ops) -> None:
    if ops is torch_backend:
        out = torch_backend.paged_attention(*batch.args())
    elif config is None:
        out = triton_attention.paged_attention(*batch.args())
    else:
        out = triton_attention.paged_attention_with(config, *batch.args()[:7])
    assert out.dtype == batch.q.dtype
    assert_close(out, batch.oracle(), dtype, seed)


def unused_for(impl: str) -> float:
    """What make_batch writes into the slots no request owns (see there)."""
    return 0.0 if impl == "torch" else float("nan")


@BOTH
@pytest.mark.parametrize("mode", ["decode", "prefill", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size,group", [(1, 4), (7, 3), (16, 1), (16, 3), (64, 8), (16, 8), (64, 3)])
def test_paged_attention(impl, mode, dtype, block_size, group, gen, seed):
    # three fresh prompts of up to 300 tokens already cost the interpreter seconds
    q_lens, seq_lens = ragged_lengths(mode, 3 if mode == "prefill" else 4, 300, gen)
    batch = make_batch(q_lens, seq_lens, 2, group, 64, block_size, dtype, gen, unused_for(impl))
    _check_attention(batch, dtype, seed, ops=IMPLEMENTATIONS[impl])


@BOTH
@pytest.mark.parametrize("head_dim", [32, 80, 128, 256])
def test_paged_attention_head_dims(impl, head_dim, gen, seed):
    q_lens, seq_lens = ragged_lengths("mixed", 3, 130, gen)
    batch = make_batch(q_lens, seq_lens, 1, 4, head_dim, 16, torch.bfloat16, gen, unused_for(impl))
    _check_attention(batch, torch.bfloat16, seed, ops=IMPLEMENTATIONS[impl])


@pytest.mark.parametrize("num_splits", [2, 4, 32] if HAS_CUDA else [2, 4])
@pytest.mark.parametrize("mode", ["decode", "mixed"])
def test_paged_attention_split_k(mode, num_splits, gen, seed):
    """Flash-decoding pieces, including pieces with no keys at all, merge to the same result."""
    q_lens, seq_lens = ragged_lengths(mode, 3, 160, gen)
    batch = make_batch(q_lens, seq_lens, 2, 4, 64, 16, torch.float32, gen)
    base = triton_attention.choose_config(3, 8, 2, 64, torch.float32,
                                          batch.max_seqlen_q, batch.max_seqlen_k, 132)
    config = dataclasses.replace(base, num_splits=num_splits)
    _check_attention(batch, torch.float32, seed, config)


@BOTH
def test_paged_attention_noncontiguous_q(impl, gen, seed):
    """q as a view of a fused qkv projection (token stride larger than Hq * D)."""
    q_lens, seq_lens = ragged_lengths("mixed", 3, 100, gen)
    batch = make_batch(q_lens, seq_lens, 2, 3, 64, 16, torch.float32, gen, unused_for(impl))
    tokens = batch.q.shape[0]
    qkv = randn((tokens, 10 * 64), torch.float32, gen)
    qkv[:, : 6 * 64] = batch.q.reshape(tokens, -1)
    batch.q = qkv[:, : 6 * 64].view(tokens, 6, 64)
    _check_attention(batch, torch.float32, seed, ops=IMPLEMENTATIONS[impl])


# --------------------------------------------------------------------------- RoPE + KV store + attention


def _check_rope_store_attention(impl: str, mode: str, num_seqs: int, max_len: int, group: int, head_dim: int,
                                block_size: int, dtype, gen, seed, num_splits: int | None = None) -> None:
    """The table's `rope_store_attention` (Triton's decode: one kernel that rotates, stores and
    attends; other steps: two) against the oracle in float64, and, for Triton on the GPU, bitwise
    against `rope_store_kv` + `paged_attention`. The new tokens' cache slots start as NaN, so a
    store that never happened fails; a quarter of the tokens have slot -1 and must store nothing."""
    kv_heads = 2
    q_lens, seq_lens = ragged_lengths(mode, num_seqs, max_len, gen)
    batch = make_batch(q_lens, seq_lens, kv_heads, group, head_dim, block_size, dtype, gen, unused_for(impl))
    tokens, q_heads = batch.q.shape[0], kv_heads * group
    owner = torch.repeat_interleave(torch.arange(num_seqs, device=DEVICE), torch.tensor(q_lens, device=DEVICE))
    positions = batch.seq_lens[owner] - (batch.cu_seqlens_q[1:][owner] - torch.arange(tokens, device=DEVICE))
    blocks = batch.block_tables[owner, positions // block_size].long()
    slots = blocks * block_size + positions % block_size
    skip = torch.rand(tokens, generator=gen, device=DEVICE) < 0.25
    for cache in (batch.k_cache, batch.v_cache):
        cache.view(-1, kv_heads, head_dim)[slots[~skip]] = float("nan")
    slots[skip] = -1  # these tokens' K/V are already in the cache (a prefix hit)
    cos_sin = rope_table(max_len + 1, head_dim)
    qkv = randn((tokens, (q_heads + 2 * kv_heads) * head_dim), dtype, gen)
    meta = (batch.cu_seqlens_q, batch.seq_lens, batch.block_tables, batch.scale)

    def run(t: torch.Tensor, how: str) -> list[torch.Tensor]:
        q, k, v = split_qkv(t, q_heads, kv_heads, head_dim)
        caches = [c.clone() for c in (batch.k_cache, batch.v_cache)]
        # a forced split count goes to both Triton paths: pieces of other sizes round differently
        forced = None if num_splits is None else dataclasses.replace(triton_attention.choose_config(
            num_seqs, q_heads, kv_heads, head_dim, dtype, 1, max_len, 132), num_splits=num_splits)
        if how == "fused" and forced is not None:
            out = triton_attention.paged_attention_with(
                forced, q, *caches, *meta, rope=triton_attention.RopeInputs(k, v, positions, cos_sin, slots))
        elif how == "apart" and forced is not None:
            triton_ops.rope_store_kv(q, k, v, positions, cos_sin, *caches, slots)
            out = triton_attention.paged_attention_with(forced, q, *caches, *meta)
        elif how == "fused":
            out = IMPLEMENTATIONS[impl].rope_store_attention(q, k, v, positions, cos_sin, *caches, slots, *meta,
                                                             batch.max_seqlen_q, batch.max_seqlen_k)
        else:
            triton_ops.rope_store_kv(q, k, v, positions, cos_sin, *caches, slots)
            out = triton_ops.paged_attention(q, *caches, *meta, batch.max_seqlen_q, batch.max_seqlen_k)
        return [out, *caches]

    q, k, v = split_qkv(qkv, q_heads, kv_heads, head_dim)
    ref = naive.rope_store_attention(q, k, v, positions, cos_sin, batch.k_cache.double(), batch.v_cache.double(),
                                     slots, *meta)
    fused = run(qkv.clone(), "fused")
    for name, a, r in zip(("out", "k_cache", "v_cache"), fused, ref):
        assert torch.equal(a.isnan(), r.isnan()), f"{name}: a store missing or misplaced (seed {seed})"
        assert_close(a.nan_to_num(0.0), r.nan_to_num(0.0), dtype, seed)
    if HAS_CUDA and impl == "triton":
        for name, a, b in zip(("out", "k_cache", "v_cache"), fused, run(qkv.clone(), "apart")):
            assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)), f"{name}: fused != two kernels (seed {seed})"


@BOTH
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group,head_dim,block_size", [(3, 64, 16), (1, 32, 1), (4, 80, 7)])
def test_rope_store_attention_decode(impl, group, head_dim, block_size, dtype, gen, seed):
    _check_rope_store_attention(impl, "decode", 5, 150, group, head_dim, block_size, dtype, gen, seed)


@pytest.mark.parametrize("num_splits", [2, 4])
def test_rope_store_attention_decode_split_k(num_splits, gen, seed):
    """Only the piece whose keys include the new token stores it, and reads it back."""
    _check_rope_store_attention("triton", "decode", 3, 200, 3, 64, 16, torch.float32, gen, seed, num_splits)


@BOTH
def test_rope_store_attention_mixed_step(impl, gen, seed):
    _check_rope_store_attention(impl, "mixed", 4, 90, 3, 64, 16, torch.float32, gen, seed)


def test_decode_config_refuses_a_ragged_batch(gen):
    batch = make_batch([2, 1], [10, 5], 2, 2, 64, 16, torch.float32, gen)
    config = triton_attention.choose_config(2, 4, 2, 64, torch.float32, 1, 10, 132)
    with pytest.raises(ValueError, match="one query token per request"):
        triton_attention.paged_attention_with(config, *batch.args()[:7])


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("num_seqs,group,head_dim", [(64, 3, 64), (32, 4, 128), (4, 4, 128)])
def test_rope_store_attention_decode_full(num_seqs, group, head_dim, dtype, gen, seed):
    _check_rope_store_attention("triton", "decode", num_seqs, 3000, group, head_dim, 16, dtype, gen, seed)


@BOTH
def test_paged_attention_empty_request(impl, gen, seed):
    """A request with no query rows this step (q_len 0) is skipped, as in the oracle."""
    batch = make_batch([3, 0, 1], [40, 17, 9], 2, 2, 64, 16, torch.float32, gen, unused_for(impl))
    _check_attention(batch, torch.float32, seed, ops=IMPLEMENTATIONS[impl])


def test_choose_config_splits_only_long_small_batches():
    big = triton_attention.choose_config(64, 32, 8, 128, torch.bfloat16, 1, 2048, 132)
    small = triton_attention.choose_config(2, 32, 8, 128, torch.bfloat16, 1, 32768, 132)
    short = triton_attention.choose_config(2, 32, 8, 128, torch.bfloat16, 1, 100, 132)
    assert big.num_splits == 1
    assert small.num_splits > 1
    assert short.num_splits == 1
    prefill = triton_attention.choose_config(1, 32, 8, 128, torch.bfloat16, 512, 512, 132)
    assert prefill.block_m == 64 and prefill.num_splits == 1


def test_choose_config_long_key_tiles_only_where_three_stages_fit():
    tile = lambda *shape: triton_attention.choose_config(*shape).tile_n  # noqa: E731
    assert tile(32, 32, 8, 128, torch.bfloat16, 1, 511, 132) == 128  # decode, 2 x 3 x 32 KB
    assert tile(32, 32, 8, 128, torch.float32, 1, 511, 132) == 32  # fp32: 64 KB tiles would not fit
    assert tile(32, 16, 16, 256, torch.bfloat16, 1, 511, 132) == 32
    assert tile(64, 9, 3, 64, torch.bfloat16, 1, 511, 132) == 64  # SmolLM2: 64 measured best
    assert tile(1, 32, 8, 128, torch.bfloat16, 512, 512, 132) == 64  # prefill keeps its q tile room


# --------------------------------------------------------------------------- full size (GPU)

FULL_SHAPES = [  # (group, head_dim, block_size)
    (1, 128, 16), (3, 64, 1), (4, 128, 64), (8, 128, 256), (4, 64, 16), (8, 128, 16),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["decode", "prefill", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group,head_dim,block_size", FULL_SHAPES)
def test_paged_attention_full(mode, dtype, group, head_dim, block_size, gen, seed):
    q_lens, seq_lens = ragged_lengths(mode, 24, 1500, gen)
    batch = make_batch(q_lens, seq_lens, 8, group, head_dim, block_size, dtype, gen)
    _check_attention(batch, dtype, seed)


@gpu
@needs_cuda
@pytest.mark.parametrize("head_dim", [32, 96, 256])
@pytest.mark.parametrize("mode", ["decode", "mixed"])
def test_paged_attention_full_head_dims(mode, head_dim, gen, seed):
    q_lens, seq_lens = ragged_lengths(mode, 16, 1000, gen)
    batch = make_batch(q_lens, seq_lens, 8, 4, head_dim, 16, torch.bfloat16, gen)
    _check_attention(batch, torch.bfloat16, seed)


@gpu
@needs_cuda
@pytest.mark.parametrize("num_seqs,max_len", [(1, 32768), (4, 8192), (64, 2048)])
def test_paged_attention_full_decode_heuristic(num_seqs, max_len, gen, seed):
    """The shapes the benchmark times, through whatever config the heuristic picks."""
    q_lens, seq_lens = ragged_lengths("decode", num_seqs, max_len, gen)
    batch = make_batch(q_lens, seq_lens, 8, 4, 128, 16, torch.bfloat16, gen)
    _check_attention(batch, torch.bfloat16, seed)


@gpu
@needs_cuda
def test_paged_attention_never_syncs_the_host(gen, seed):
    q_lens, seq_lens = ragged_lengths("mixed", 8, 500, gen)
    batch = make_batch(q_lens, seq_lens, 8, 4, 128, 16, torch.bfloat16, gen)
    triton_attention.paged_attention(*batch.args())  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = triton_attention.paged_attention(*batch.args())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(out, batch.oracle(), torch.bfloat16, seed)


@gpu
@needs_cuda
@pytest.mark.parametrize("num_seqs,max_len", [(32, 1000), (2, 20000)])  # plain and split-K
def test_paged_attention_cuda_graph(num_seqs, max_len, gen, seed):
    """Capture once, then replay on new lengths written into the same device tensors."""
    q_lens, seq_lens = ragged_lengths("decode", num_seqs, max_len, gen)
    batch = make_batch(q_lens, seq_lens, 8, 4, 128, 16, torch.bfloat16, gen)
    batch.max_seqlen_k = max_len
    triton_attention.paged_attention(*batch.args())  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_attention.paged_attention(*batch.args())
    shorter = torch.clamp(batch.seq_lens - 7, min=1)
    batch.seq_lens.copy_(shorter)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, batch.oracle(), torch.bfloat16, seed)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
