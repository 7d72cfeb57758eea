"""Weights held as GGUF blocks on a CPU: exact recovery, the block GEMM against the naive oracle
(which reads the blocks itself, in float64), and the embedded model running on them (the oracle
tests run the default engine, which uses them)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workbench_kernels import cpu_blocks, naive, torch_backend
from workbench.models.block_linear import BlockLinear
from workbench.models.packed_linear import PackedLinear

pytestmark = pytest.mark.skipif(not cpu_blocks.available(), reason="needs a C compiler and an x86-64 CPU with AVX2")


def ggml_q4_1(x: torch.Tensor) -> torch.Tensor:
    """x quantized and dequantized the way llama.cpp writes Q4_1 and gguf-py reads it back (fp32)."""
    b = x.unflatten(1, (-1, 32))
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = ((hi - lo) / 15).half().float()
    m = lo.half().float()
    q = ((b - lo) / d.clamp_min(1e-30)).add(0.5).floor().clamp(0, 15)
    return (d * q + m).flatten(1)


def ggml_q8_0(x: torch.Tensor) -> torch.Tensor:
    b = x.unflatten(1, (-1, 32))
    d = (b.abs().amax(-1, keepdim=True) / 127).half().float()
    q = (b / d.clamp_min(1e-30)).round().clamp(-127, 127)
    return (d * q).flatten(1)


@pytest.mark.parametrize("fmt, make", [("q4_1", ggml_q4_1), ("q8_0", ggml_q8_0)])
def test_recovers_the_blocks_and_rebuilds_every_weight_bit_for_bit(fmt, make):
    torch.manual_seed(0)
    raw = torch.randn(67, 160) * 0.05
    raw[3, :32] = 0.25  # a constant block
    raw[5, 64:96] = 0.0  # a zero block
    w = make(raw)
    blocks = cpu_blocks.from_dense(w)
    assert blocks is not None and blocks.format == fmt and blocks.shape == (67, 160)
    assert torch.equal(blocks.to_dense(), w)
    # the oracle's reading of the packed blocks, exact in float64, rounds to the very same fp32 weights
    assert torch.equal(naive.dequantize(blocks).float(), w)


def test_weights_that_are_not_blocks_stay_dense():
    torch.manual_seed(1)
    assert cpu_blocks.from_dense(torch.randn(64, 128)) is None  # plain fp32
    assert cpu_blocks.from_dense(ggml_q4_1(torch.randn(64, 128))[:, :100].contiguous()) is None  # K % 32 != 0
    assert cpu_blocks.from_dense(ggml_q4_1(torch.randn(64, 128)).half()) is None  # not fp32
    nearly = ggml_q4_1(torch.randn(64, 128))
    nearly[10, 40] = torch.nextafter(nearly[10, 40], torch.tensor(1.0))  # one weight off by an ulp
    assert cpu_blocks.from_dense(nearly) is None


@pytest.mark.parametrize("fmt, make", [("q4_1", ggml_q4_1), ("q8_0", ggml_q8_0)])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16])
def test_block_gemm_matches_float64(fmt, make, rows):
    """Odd column counts (the last pass takes one column), row counts around a pass's 4 or 8
    rows, x a strided view (as the attention output and qkv slices are), and a bias."""
    torch.manual_seed(rows)
    w = make(torch.randn(97, 192) * 0.05)
    blocks = cpu_blocks.from_dense(w)
    wide = torch.randn(rows, 256)
    x = wide[:, 10:202]  # stride 256, not contiguous
    bias = torch.randn(97)
    y = cpu_blocks.linear(x, blocks, bias)
    ref = naive.block_linear(x, blocks, bias)
    assert y.dtype == torch.float32 and y.shape == (rows, 97)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6


def test_linear_takes_the_dense_copy_above_max_rows():
    torch.manual_seed(2)
    w = ggml_q4_1(torch.randn(48, 64))
    layer = BlockLinear.of(w)
    assert layer is not None
    for rows in (1, layer.weight.max_rows, layer.weight.max_rows + 1, 70):
        x = torch.randn(rows, 64)
        y, ref = torch_backend.linear(x, layer.weight), naive.block_linear(x, layer.weight)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6, rows
    assert torch.equal(layer.unpack().weight, w)


def test_embedded_model_decodes_on_blocks_and_dense_gives_the_same_tokens(embedded, make_engine):
    """Every linear layer of the embedded Q4_1 model and its Q8_0 head are held as blocks by
    default; with block_weights=False the same engine is dense fp32 and greedy tokens agree."""
    model = embedded.model
    prompts = [[1, 9690, 314, 260, 3575, 30], [1, 504, 3458, 282, 4649, 314]]
    engine = make_engine(max_batch=4)
    layers = [m for m in model.modules() if isinstance(m, (BlockLinear, PackedLinear))]
    assert len(layers) == 4 * model.config.num_layers + 1
    assert all(isinstance(m, BlockLinear) for m in layers), "a layer of the embedded model fell back to dense"
    assert model.packed_head.weight.format == "q8_0"
    on_blocks = [o.token_ids for o in engine.generate_batch(prompts, max_new_tokens=24, ignore_eos=True,
                                                            progress=False)]
    engine.stop()
    try:
        dense = make_engine(max_batch=4, block_weights=False)
        assert not any(isinstance(m, BlockLinear) for m in model.modules())
        dense_tokens = [o.token_ids for o in dense.generate_batch(prompts, max_new_tokens=24, ignore_eos=True,
                                                                  progress=False)]
        dense.stop()
    finally:
        model.place(torch.device("cpu"), torch.float32, block_weights=True)  # the shared fixture as it was
    assert dense_tokens == on_blocks
    assert any(isinstance(m, BlockLinear) for m in model.modules())


def test_block_weights_must_be_a_bool():
    import workbench

    with pytest.raises(ValueError, match="block_weights"):
        workbench.EngineConfig(block_weights="yes").validate()


def test_other_dtypes_unpack_the_blocks():
    from transformers import LlamaConfig

    from workbench.models import DecoderModel, ModelConfig

    cfg = ModelConfig.from_hf(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    torch.manual_seed(3)
    model = DecoderModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(ggml_q4_1(torch.randn_like(p).view(p.shape[0], -1) * 0.05).view_as(p) if p.dim() == 2
                    else torch.ones_like(p))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.place(torch.device("cpu"), torch.float32)
    assert isinstance(model.layers[0].mlp.down_proj, BlockLinear)
    model.place(torch.device("cpu"), torch.bfloat16)
    assert isinstance(model.layers[0].mlp.down_proj, nn.Linear) and model.packed_head is None
    model.place(torch.device("cpu"), torch.float32, block_weights=False)
    assert isinstance(model.layers[0].mlp.down_proj, PackedLinear)
    model._unpack()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name].to(torch.bfloat16).float(), atol=0, rtol=0)
