"""The overlapped loop (schedule and launch step N+1 before finishing step N) on the CPU.

On a CPU the runner computes inside `launch`, but the engine still runs the
overlapped protocol: PENDING placeholders, carry-over bookkeeping, stops seen
one step late, preemption with a token in flight. Outputs must equal the
synchronous loop's exactly.
"""

from __future__ import annotations

import random

import pytest

CHATS = [[{"role": "user", "content": q}] for q in (
    "Say hi.", "Count from one to five.", "Write two sentences about the sea.", "What is 3+4?",
    "List four fruits.", "Describe a cat in one line.", "Write a short poem about rain.", "Name a planet.")]


def run(make_engine, overlap: bool, prompts, **kw):
    engine = make_engine(overlap=overlap, **{k: kw.pop(k) for k in list(kw) if k in ("num_blocks", "max_batch", "token_budget")})
    outs = engine.generate_batch(prompts, progress=False, **kw)
    steps = engine.telemetry.steps()
    engine.check_invariants()
    return outs, steps, engine


def test_overlap_matches_sync_with_eos_and_lengths(make_engine):
    rng = random.Random(0)
    prompts = [CHATS[i % len(CHATS)] for i in range(12)]
    lengths = [rng.randint(4, 40) for _ in prompts]
    sync_out, sync_steps, _ = run(make_engine, False, prompts, max_new_tokens=40, max_batch=6)
    over_out, over_steps, _ = run(make_engine, True, prompts, max_new_tokens=40, max_batch=6)
    assert [o.token_ids for o in over_out] == [o.token_ids for o in sync_out]
    assert [o.text for o in over_out] == [o.text for o in sync_out]
    assert [o.finish_reason for o in over_out] == [o.finish_reason for o in sync_out]
    assert all(s.overlapped for s in over_steps) and not any(s.overlapped for s in sync_steps)
    assert sum(s.tokens_emitted for s in over_steps) == sum(len(o.token_ids) for o in over_out)
    del lengths


def test_overlap_matches_sync_under_preemption(make_engine):
    """A KV cache far too small for the batch: preemptions with tokens in flight, same outputs."""
    prompts = CHATS
    kw = dict(max_new_tokens=48, ignore_eos=True, num_blocks=24, max_batch=8, token_budget=64)
    sync_out, sync_steps, _ = run(make_engine, False, prompts, **dict(kw))
    over_out, over_steps, engine = run(make_engine, True, prompts, **dict(kw))
    assert sum(len(s.preempted) for s in over_steps) > 0, "the test must force preemption"
    assert [o.token_ids for o in over_out] == [o.token_ids for o in sync_out]
    assert all(len(o.token_ids) == 48 for o in over_out)


def test_overlap_stop_strings_and_exact_max_new_tokens(make_engine):
    engine = make_engine(overlap=True)
    prompt = [{"role": "user", "content": "Count from one to ten."}]
    full = engine.generate_batch([prompt], max_new_tokens=40, progress=False)[0]
    stop = full.text[len(full.text) // 2 :][:3]
    cut = engine.generate_batch([prompt], max_new_tokens=40, stop=[stop], progress=False)[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    exact = engine.generate_batch(CHATS[:3], max_new_tokens=7, ignore_eos=True, progress=False)
    assert [len(o.token_ids) for o in exact] == [7, 7, 7]
    assert all(-1 not in o.token_ids for o in exact)


def test_overlap_cancel_mid_flight_and_toggle_live(make_engine):
    engine = make_engine(overlap=True, max_batch=4)
    handles = [engine.submit(c, max_new_tokens=200, ignore_eos=True) for c in CHATS[:4]]
    next(iter(handles[0]))
    engine.reconfigure(overlap=False)
    engine.cancel(handles[1].request_id)
    engine.reconfigure(overlap=True)
    engine.cancel(handles[2].request_id)
    outs = [h.result(timeout=120) for h in handles]
    assert outs[1].finish_reason == outs[2].finish_reason == "cancelled"
    assert len(outs[0].token_ids) == len(outs[3].token_ids) == 200
    assert all(-1 not in o.token_ids for o in outs)
    steps = engine.telemetry.steps()
    assert any(s.overlapped for s in steps) and any(not s.overlapped for s in steps)


@pytest.mark.parametrize("overlap", [False, True])
def test_seeded_sampling_same_in_both_loops(make_engine, overlap):
    engine = make_engine(overlap=overlap)
    kw = dict(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True, progress=False)
    a = engine.generate_batch([CHATS[6], CHATS[2]], **kw)
    b = engine.generate_batch([CHATS[6]], **kw)
    assert a[0].token_ids == b[0].token_ids


def test_graph_inputs_staged_padded_and_carried():
    """The decode-graph input path on plain tensors: one staged buffer holds the step in the
    static layout, padding rows write no KV slot, and carried tokens come from the step before."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from workbench.graphs import DecodeGraphs

    model = SimpleNamespace(embed_tokens=torch.nn.Embedding(10, 4), lm_head=None)
    runner = SimpleNamespace(device=torch.device("cpu"), max_blocks=5, max_model_len=80, model=model,
                             last_sampled=torch.tensor([40, 41, 42, 43, 44, 45, 46, 47, 48]))
    graphs = DecodeGraphs(runner, max_batch=8)
    B, size = 3, graphs.bucket(3)
    assert size == 4 and graphs.sizes[-1] == 8
    host = np.full(graphs.numel, 99, dtype=np.int64)  # stale values everywhere
    tables = np.array([[7, 8], [3, 0], [5, 6]], dtype=np.int64)
    numel = graphs.stage(host, ids=np.array([11, 0, 13]), positions=np.array([17, 4, 20]),
                         slots=np.array([113, 52, 84]), carry=np.array([-1, 2, -1]), cu=np.arange(4),
                         seq_lens=np.array([18, 5, 21]), logits_idx=np.arange(3), tables=tables)
    graphs.load(torch.from_numpy(host), numel)
    graphs.carry_in(size)  # the first nodes of the captured graph
    assert graphs.ids[:size].tolist() == [11, 42, 13, 0]  # row 1 carried the previous step's sample 2
    assert graphs.positions[:size].tolist() == [17, 4, 20, 0]
    assert graphs.slot_mapping[:size].tolist() == [113, 52, 84, -1]  # the padding row stores nothing
    assert graphs.seq_lens[:size].tolist() == [18, 5, 21, 1]
    assert graphs.tables[:B, :2].tolist() == tables.tolist() and graphs.tables[3, 0].item() == 0
    graphs._argmax_out(torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 5.0]]))  # the last nodes of the graph
    assert runner.last_sampled[:3].tolist() == [1, 2, 42]  # the next step carries from here


def test_mixed_step_graph_inputs_padded_into_one_padding_sequence():
    """A prefill chunk and a decode in one step, staged for a mixed-step graph: the padding tokens
    form one extra sequence that stores nothing and reads block 0, the other slots are empty."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from workbench.graphs import MixedGraphs, token_buckets

    assert token_buckets(512) == [64, 96, 128, 192, 256, 384, 512]
    assert token_buckets(100) == [64, 96, 100]
    model = SimpleNamespace(embed_tokens=torch.nn.Embedding(10, 4), lm_head=None)
    runner = SimpleNamespace(device=torch.device("cpu"), max_blocks=16, max_model_len=64, block_size=4, model=model,
                             last_sampled=torch.tensor([70, 71, 72, 73, 74]))
    graphs = MixedGraphs(runner, max_batch=3, token_budget=100)
    assert graphs.sizes == [64] and graphs.p == 4  # buckets capped at max_model_len
    host = np.full(graphs.numel, 99, dtype=np.int64)  # stale values everywhere
    T = 6  # request 0: a 5-token chunk at positions 3..7 (samples); request 1: one decode (carried)
    numel = graphs.stage(host, ids=np.array([5, 6, 7, 8, 9, 0]), positions=np.array([3, 4, 5, 6, 7, 10]),
                         slots=np.array([3, 4, 5, 6, 7, 50]), carry=np.array([-1, -1, -1, -1, -1, 1]),
                         cu=np.array([0, 5, 6]), seq_lens=np.array([8, 11]), logits_idx=np.array([4, 5]),
                         tables=np.array([[0, 1, 0], [9, 11, 12]]))
    graphs.load(torch.from_numpy(host), numel)
    graphs.carry_in(64)
    assert graphs.ids[:T].tolist() == [5, 6, 7, 8, 9, 71] and not graphs.ids[T:64].any()
    assert graphs.slot_mapping[T:64].eq(-1).all() and graphs.positions[T:64].eq(0).all()
    assert graphs.cu.tolist() == [0, 5, 6, 64, 64]  # the padding sequence owns tokens 6..63
    assert graphs.seq_lens.tolist() == [8, 11, 58, 0]
    assert graphs.logits_idx.tolist() == [4, 5, 0, 0]
    assert graphs.tables[:2, :3].tolist() == [[0, 1, 0], [9, 11, 12]]
    assert graphs.tables[2, :15].eq(0).all()  # 58 tokens of its own context: block 0, always
