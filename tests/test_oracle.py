"""Our engine against transformers on the embedded SmolLM2: logits and greedy text."""

from __future__ import annotations

import pytest
import torch

from oracle import forced_logits, hf_greedy, hf_logits

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about graphics cards.",
    "Explain continuous batching in one sentence.",
    "What is 17 times 3?",
    "Name three colours of the rainbow.",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
]
NEW_TOKENS = 48
TOL = 1e-3


@pytest.fixture(scope="module")
def cases(embedded, hf_model):
    """Chat prompts, transformers' greedy continuations, and its logits over both."""
    tok = embedded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False) for q in QUESTIONS]
    greedy = [hf_greedy(hf_model, p, NEW_TOKENS, eos=None) for p in prompts]
    reference = [hf_logits(hf_model, p, g) for p, g in zip(prompts, greedy)]
    return prompts, greedy, reference


@pytest.mark.parametrize("block_size,token_budget,together", [
    (16, 4096, True),    # whole prompts in one step, all 8 requests batched
    (16, 7, True),       # every prompt split into several prefill chunks
    (1, 13, True),       # one token per block
    (64, 11, True),      # blocks larger than most prompts
    (16, 4096, False),   # one request at a time
    (64, 5, False),
])
def test_teacher_forced_logits_match_transformers(embedded, cases, block_size, token_budget, together):
    prompts, greedy, reference = cases
    if together:
        ours = forced_logits(embedded, prompts, greedy, block_size=block_size, token_budget=token_budget)
    else:
        ours = [forced_logits(embedded, [p], [g], block_size=block_size, token_budget=token_budget)[0]
                for p, g in zip(prompts, greedy)]
    assert all(len(p) > token_budget for p in prompts) or token_budget > 100
    for i, (o, r) in enumerate(zip(ours, reference)):
        assert o.shape == r.shape
        err = (o - r).abs().max().item()
        assert err < TOL, f"prompt {i}: max |ours - transformers| = {err:.2e}"


def test_greedy_text_equals_transformers_generate(embedded, hf_model, cases, make_engine):
    prompts, _, _ = cases
    eos = next(iter(embedded.eos_token_ids))
    expected = [hf_greedy(hf_model, p, NEW_TOKENS, eos=eos) for p in prompts]
    engine = make_engine(token_budget=64)
    outputs = engine.generate_batch(prompts, max_new_tokens=NEW_TOKENS, progress=False)
    for out, exp in zip(outputs, expected):
        exp_ids = exp[: exp.index(eos) + 1] if eos in exp else exp
        assert out.token_ids == exp_ids
        text = embedded.tokenizer.decode(exp_ids, skip_special_tokens=True)
        assert out.text == text


def test_decode_attention_path_matches_prefill_path(embedded, cases):
    """The batched decode kernel path and the per-request prefill path give the same logits."""
    prompts, greedy, _ = cases
    a = forced_logits(embedded, prompts[:3], greedy[:3], token_budget=4096)
    long_prompts = [p + g for p, g in zip(prompts[:3], greedy[:3])]
    b = forced_logits(embedded, [lp[:-1] for lp in long_prompts], [[lp[-1]] for lp in long_prompts])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=TOL, rtol=0)
