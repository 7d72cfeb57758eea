"""CPU weight packing: exact round trip, the naive oracle's results, undone when the model moves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workbench.models.packed_linear import PackedLinear, packing_available
from workbench_kernels import naive, torch_backend

pytestmark = pytest.mark.skipif(not packing_available(), reason="needs torch's oneDNN packing (x86-64 CPU)")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 8, 37])
def test_packed_linear_matches_linear_and_unpacks_bit_for_bit(bias, rows):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 160, bias=bias)
    packed = PackedLinear.of(linear)
    x = torch.randn(rows, 96)
    ref = naive.linear(x, linear.weight, linear.bias)
    # the module, and the torch backend's linear as the model calls it (the packed weight in hand)
    for y in (packed(x), torch_backend.linear(x, packed.weight, packed.bias)):
        assert y.dtype == torch.float32 and y.shape == (rows, 160)
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    plain = packed.unpack()
    assert torch.equal(plain.weight, linear.weight)
    assert (plain.bias is None) == (not bias) and (not bias or torch.equal(plain.bias, linear.bias))


def _tiny_model():
    from transformers import LlamaConfig

    from workbench.models import DecoderModel, ModelConfig

    cfg = ModelConfig.from_hf(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    torch.manual_seed(0)
    model = DecoderModel(cfg).eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.05)
    return model


def test_place_packs_on_cpu_fp32_and_unpacks_for_other_dtypes():
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([5, 17, 200, 3])
    plain_logits = model.compute_logits(model.embed_tokens(ids))

    model.place(torch.device("cpu"), torch.float32)
    assert all(isinstance(layer.mlp.down_proj, PackedLinear) for layer in model.layers)
    torch.testing.assert_close(model.compute_logits(model.embed_tokens(ids)), plain_logits, atol=1e-5, rtol=1e-5)
    model.place(torch.device("cpu"), torch.float32)  # idempotent
    assert isinstance(model.layers[0].self_attn.qkv_proj, PackedLinear)

    model.place(torch.device("cpu"), torch.bfloat16)  # a bf16 engine: plain layers again, values rounded once
    assert isinstance(model.layers[0].self_attn.qkv_proj, nn.Linear) and model.packed_head is None
    model.place(torch.device("cpu"), torch.float32)
    model._unpack()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name].to(torch.bfloat16).float(), atol=0, rtol=0)
