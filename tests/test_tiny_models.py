"""Random tiny Llama, Qwen2, Qwen3 and Mistral models (built from configs, no download) vs transformers."""

from __future__ import annotations

import pytest
import torch
import transformers

import workbench
from oracle import forced_logits, hf_greedy, hf_logits

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)

CONFIGS = {
    "llama-tied": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True),
    "llama3-rope": lambda: transformers.LlamaConfig(**COMMON, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2-bias": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=False),
    "qwen3-qknorm": lambda: transformers.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False),
    "mistral": lambda: transformers.MistralConfig(**{**COMMON, "num_key_value_heads": 1}, sliding_window=None),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, embedded):
    torch.manual_seed(hash(request.param) % 2**31)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param](), dtype=torch.float32).eval()
    with torch.no_grad():  # make the biases and norms non-trivial so a dropped one is noticed
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    loaded = workbench.load(hf, tokenizer=embedded.tokenizer)
    return request.param, hf, loaded


def prompts_for(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (int(n),), generator=g).tolist() for n in (5, 17, 33, 70)]


def test_teacher_forced_logits(tiny):
    name, hf, loaded = tiny
    prompts = prompts_for(1)
    conts = [hf_greedy(hf, p, 24) for p in prompts]
    ours = forced_logits(loaded, prompts, conts, block_size=8, token_budget=19)
    for p, c, o in zip(prompts, conts, ours):
        ref = hf_logits(hf, p, c)
        err = (o - ref).abs().max().item()
        assert err < 1e-3, f"{name}: max |ours - transformers| = {err:.2e}"


def test_greedy_matches_generate(tiny):
    name, hf, loaded = tiny
    prompts = prompts_for(2)
    expected = [hf_greedy(hf, p, 20) for p in prompts]
    with workbench.Engine(loaded, block_size=4, token_budget=32, num_blocks=256) as engine:
        outs = engine.generate_batch(prompts, max_new_tokens=20, ignore_eos=True, progress=False)
        engine.check_invariants()
    assert [o.token_ids for o in outs] == expected, name


def test_config_mapping(tiny):
    name, hf, loaded = tiny
    cfg = loaded.config
    assert cfg.qkv_bias == name.startswith("qwen2")
    assert cfg.qk_norm == name.startswith("qwen3")
    assert cfg.tie_word_embeddings == (name == "llama-tied")
    assert (cfg.rope_scaling is not None) == (name == "llama3-rope")
