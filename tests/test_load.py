"""Load: 1,000 concurrent requests on a random tiny model while reconfigurations and
cancellations fire at random. Nothing may be lost, duplicated, leaked or left hanging.
"""

from __future__ import annotations

import ast
import logging
import queue
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
import transformers

import workbench
from workbench.engine import Engine

log = logging.getLogger(__name__)

N_REQUESTS = 1000
SUBMITTERS = 4
BLOCK_SIZE = 8
MAX_PROMPT, MAX_NEW = 64, 16
MIN_BLOCKS = -(-(MAX_PROMPT + MAX_NEW) // BLOCK_SIZE) + 2  # every request always fits alone
STOP_STRING = "e"


@pytest.fixture(scope="module")
def tiny(embedded):
    """A random 2-layer Llama (vocab 512); wide initial weights keep greedy choices far from ties."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.5)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return workbench.load(hf, tokenizer=embedded.tokenizer)


def make_specs(rng: random.Random) -> list[dict]:
    """Random prompts (a third start with a shared prefix, for the prefix cache) and sampling."""
    prefixes = [[rng.randrange(3, 512) for _ in range(n)] for n in (16, 20, 24)]
    specs = []
    for i in range(N_REQUESTS):
        head = rng.choice(prefixes) if rng.random() < 0.33 else []
        prompt = (head + [rng.randrange(3, 512) for _ in range(rng.randint(1, MAX_PROMPT))])[:MAX_PROMPT]
        sampling = {"max_new_tokens": rng.randint(1, MAX_NEW), "ignore_eos": rng.random() < 0.5}
        if rng.random() < 0.1:
            sampling["stop"] = [STOP_STRING]
        specs.append({"request_id": f"load-{i}", "prompt": prompt, "sampling": sampling})
    return specs


def random_change(rng: random.Random, capacity: int) -> dict:
    choices = {
        "max_batch": lambda: rng.randint(1, 32),
        "token_budget": lambda: rng.randint(8, 128),
        "num_blocks": lambda: rng.randint(MIN_BLOCKS, capacity),
        "prefix_caching": lambda: rng.random() < 0.5,
    }
    keys = rng.sample(sorted(choices), rng.randint(1, len(choices)))
    return {k: choices[k]() for k in keys}


def check_steps_obeyed_the_config_in_effect(engine: Engine, start: dict) -> int:
    """Every recorded step kept within the max_batch and token_budget of its time; returns steps checked."""
    changes = sorted((e.step, e.seq, ast.literal_eval(e.detail)) for e in engine.telemetry.events()
                     if e.kind == "reconfigured")
    current, i, checked = dict(start), 0, 0
    for step in engine.telemetry.steps():
        while i < len(changes) and changes[i][0] <= step.step:
            current.update(changes[i][2])
            i += 1
        if getattr(step, "overlapped", False):
            continue  # scheduled one step before it was recorded: the boundary is not exact
        real = [s for s in step.slots if s.kind != "padding"]
        assert len(real) <= current["max_batch"], f"step {step.step}: {len(real)} slots > {current['max_batch']}"
        assert step.num_tokens <= current["token_budget"], f"step {step.step}: {step.num_tokens} tokens"
        checked += 1
    return checked


@dataclass
class LoadRun:
    engine: Engine
    specs: dict[str, dict]
    outputs: dict[str, workbench.RequestOutput]
    chunks: dict[str, list[workbench.StreamChunk]]
    cancel_asked: set[str]
    start_config: dict
    elapsed: float


@pytest.fixture(scope="module")
def load_run(tiny):
    """Submit 1,000 requests from 4 threads while a chaos thread reconfigures and cancels."""
    specs = make_specs(random.Random(1234))
    start_config = dict(max_batch=16, token_budget=96, num_blocks=160)
    engine = Engine(tiny, block_size=BLOCK_SIZE, telemetry_steps=200_000, **start_config)
    handles: dict[str, workbench.RequestHandle] = {}
    lock = threading.Lock()
    completions: queue.SimpleQueue = queue.SimpleQueue()
    cancel_asked: set[str] = set()

    def submitter(part: list[dict], seed: int) -> None:
        own = random.Random(seed)
        for k, spec in enumerate(part):
            h = engine.submit(spec["prompt"], request_id=spec["request_id"], on_done=completions.put,
                              **spec["sampling"])
            with lock:
                handles[h.request_id] = h
            if own.random() < 0.03:  # cancel something of ours at once: often still in the inbox
                victim = own.choice(part[: k + 1])["request_id"]
                with lock:
                    cancel_asked.add(victim)
                engine.cancel(victim)

    def chaos() -> None:
        """Paced by completions (no sleeps): every 20 finished requests, reconfigure and cancel."""
        own = random.Random(99)
        engine.reconfigure(num_blocks=MIN_BLOCKS, max_batch=32)  # KV pressure at once: preemptions
        for done in range(1, N_REQUESTS + 1):
            completions.get(timeout=120)
            if done % 20 == 0 and done < N_REQUESTS:
                engine.reconfigure(**random_change(own, engine.capacity))
                with lock:
                    ids = own.sample(sorted(handles), min(3, len(handles)))
                    cancel_asked.update(ids)
                for rid in ids:
                    engine.cancel(rid)

    t0 = time.perf_counter()
    try:
        parts = [specs[i::SUBMITTERS] for i in range(SUBMITTERS)]
        threads = [threading.Thread(target=submitter, args=(p, i)) for i, p in enumerate(parts)]
        chaos_thread = threading.Thread(target=chaos)
        for t in [chaos_thread, *threads]:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        outputs = {rid: h.result(timeout=120) for rid, h in handles.items()}
        chaos_thread.join(120)
        assert not chaos_thread.is_alive()
        elapsed = time.perf_counter() - t0
        log.info("%d requests in %.1f s: %s", len(outputs), elapsed, engine.stats())
        chunks = {rid: list(h) for rid, h in handles.items()}
        yield LoadRun(engine, {s["request_id"]: s for s in specs}, outputs, chunks, cancel_asked, start_config,
                      elapsed)
    finally:
        engine.stop()


def test_thousand_concurrent_requests_none_lost_duplicated_or_leaked(load_run, tiny):
    run, engine = load_run, load_run.engine
    assert run.elapsed < 180, f"took {run.elapsed:.0f} s"
    # ------------------------------------------------ none lost, none duplicated
    assert sorted(run.outputs) == sorted(run.specs)
    assert all(out.request_id == rid for rid, out in run.outputs.items())
    eos = tiny.eos_token_ids
    reasons = Counter()
    for rid, out in run.outputs.items():
        params = run.specs[rid]["sampling"]
        n, max_new = len(out.token_ids), params["max_new_tokens"]
        reasons[out.finish_reason] += 1
        assert out.error is None, f"{rid}: {out.error}"
        assert out.prompt_token_ids == run.specs[rid]["prompt"]
        if out.finish_reason == "length":
            assert n == max_new, f"{rid}: {n} tokens, finish 'length', max_new_tokens={max_new}"
        elif out.finish_reason == "stop":
            assert 1 <= n <= max_new
            by_eos = not params["ignore_eos"] and out.token_ids[-1] in eos
            assert by_eos or (params.get("stop") and STOP_STRING not in out.text), f"{rid}: stopped why?"
        else:
            assert out.finish_reason == "cancelled", f"{rid}: {out.finish_reason}"
            assert rid in run.cancel_asked and n < max_new
        chunks = run.chunks[rid]
        assert [c.finished for c in chunks].count(True) == 1 and chunks[-1].finished
        assert chunks[-1].finish_reason == out.finish_reason
        assert [t for c in chunks for t in c.token_ids] == out.token_ids, f"{rid}: stream != output"
        assert "".join(c.text for c in chunks) == out.text
    assert reasons["cancelled"] > 0 and reasons["length"] > 0, reasons

    events = engine.telemetry.events()
    ends = Counter(e.request_id for e in events if e.kind in ("finished", "cancelled", "error"))
    assert set(ends) == set(run.outputs) and set(ends.values()) == {1}, "a request ended twice or never"
    steps = engine.telemetry.steps()
    assert steps[0].step == 0, "telemetry ring too small for this test"
    assert sum(s.tokens_emitted for s in steps) == sum(len(o.token_ids) for o in run.outputs.values())
    assert check_steps_obeyed_the_config_in_effect(engine, run.start_config) > 100
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_hit_rate"] > 0, stats
    assert sum(e.kind == "reconfigured" for e in events) >= N_REQUESTS // 20 - 1

    # ------------------------------------------------------ no leak, still serving
    engine.check_invariants()
    assert not engine.outputs.live and not engine.scheduler.has_work()
    assert engine.blocks.num_free == engine.blocks.limit
    engine.blocks.check([])
    after = engine.generate_batch([[5, 6, 7]], max_new_tokens=5, ignore_eos=True, progress=False)[0]
    assert after.finish_reason == "length" and len(after.token_ids) == 5


def test_thousand_concurrent_requests_outputs_equal_a_quiet_run(load_run, tiny):
    """Preemption, live reconfiguration and prefix caching under load change no token."""
    groups: dict[tuple, list[str]] = {}
    for rid, out in load_run.outputs.items():
        if out.finish_reason != "cancelled":
            sp = load_run.specs[rid]["sampling"]
            groups.setdefault((sp["max_new_tokens"], sp["ignore_eos"], tuple(sp.get("stop", ()))), []).append(rid)
    with Engine(tiny, block_size=BLOCK_SIZE, num_blocks=512, max_batch=32, token_budget=512) as quiet:
        for (max_new, ignore_eos, stop), ids in sorted(groups.items()):
            ref = quiet.generate_batch([load_run.specs[r]["prompt"] for r in ids], progress=False,
                                       max_new_tokens=max_new, ignore_eos=ignore_eos, stop=list(stop))
            for rid, out in zip(ids, ref):
                assert (load_run.outputs[rid].token_ids, load_run.outputs[rid].finish_reason) == (
                    out.token_ids, out.finish_reason), rid
