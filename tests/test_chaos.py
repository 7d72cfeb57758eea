"""Chaos: callbacks re-entering the API, reused ids, cancels, live reconfigures (decode runs
among them) and a faulty request, in both loops, under a watchdog.

Checked at the end: nothing hung (every handle ended before the deadline), nothing was lost or
duplicated (each stream ends with exactly one final chunk, its chunks add up to its output, each
on_done ran once, each request has one terminal event), no KV block leaked, and no request ended
with an error that was not its own.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

from workbench.handle import RequestHandle

DEADLINE_S = 120  # the watchdog: far above the ~10-20 s a run takes on two busy cores
MAX_REQUESTS = 40
MARKER = 49000  # a token only the poisoned prompts contain
QUESTIONS = ("Name a colour.", "What is 2+2?", "Say hi.", "Name a planet.", "Pick a number.")


class Broken:
    """A detokenizer that fails: only its own request may end with this error."""

    def push(self, token_id: int) -> str:
        raise ValueError("injected detokenizer fault")


@pytest.mark.parametrize("overlap", [False, True])
def test_chaos_in_both_loops(make_engine, monkeypatch, overlap):
    engine = make_engine(num_blocks=48, max_batch=4, token_budget=64, overlap=overlap)
    rng = random.Random(22 + overlap)
    make = engine.new_detokenizer
    monkeypatch.setattr(engine, "new_detokenizer", lambda ids: Broken() if MARKER in ids else make(ids))
    prompts = [engine.tokenize([{"role": "user", "content": q}]) for q in QUESTIONS]
    poisoned = prompts[0][:-1] + [MARKER] + prompts[0][-1:]

    lock = threading.Lock()
    handles: list[RequestHandle] = []
    poisoned_handles: set[int] = set()
    callbacks: Counter[int] = Counter()
    problems: list[str] = []

    def sampling() -> dict:
        kw: dict = dict(max_new_tokens=rng.randint(1, 6), ignore_eos=rng.random() < 0.5)
        if rng.random() < 0.5:
            kw.update(temperature=1.0, seed=rng.randint(0, 2**63 - 1))
        return kw

    def budget_left() -> bool:
        with lock:
            return len(handles) < MAX_REQUESTS

    def track(new: list[RequestHandle], poison: bool = False) -> None:
        with lock:
            handles.extend(new)
            if poison:
                poisoned_handles.update(id(h) for h in new)

    def submit(request_id: str | None = None) -> None:
        poison = rng.random() < 0.1
        prompt = poisoned if poison else rng.choice(prompts)
        try:
            track([engine.submit(prompt, request_id=request_id, on_done=on_done, **sampling())], poison)
        except ValueError as exc:  # an id still in use by a request not yet ended: refused, not lost
            if "request_id must be a new" not in str(exc):
                raise

    def on_done(handle: RequestHandle) -> None:
        with lock:
            callbacks[id(handle)] += 1
        try:
            action = rng.random()
            if not budget_left():
                return
            if action < 0.3:
                submit(request_id=handle.request_id)  # reuse the id that just ended
            elif action < 0.5:
                track(engine.submit_many([rng.choice(prompts), rng.choice(prompts)], on_done=on_done, **sampling()))
            elif action < 0.7:
                with lock:
                    open_ones = [h for h in handles if not h.done]
                if open_ones:
                    engine.cancel(rng.choice(open_ones).request_id)
            elif action < 0.85:
                engine.reconfigure(max_batch=rng.randint(1, 4), token_budget=rng.choice([16, 32, 64]),
                                   num_blocks=rng.randint(24, 48))
            else:
                submit()
        except Exception as exc:  # noqa: BLE001 - a callback that cannot use the API is the failure
            problems.append(f"on_done of {handle.request_id}: {type(exc).__name__}: {exc}")

    start = time.monotonic()
    for i in range(8):
        submit(request_id=f"r{i % 5}")  # ids 0-4 reused while the first ones may still run
    while budget_left() and time.monotonic() - start < DEADLINE_S / 2:
        move = rng.random()
        with lock:
            open_ones = [h for h in handles if not h.done]
        if move < 0.4 and open_ones:
            engine.cancel(rng.choice(open_ones).request_id)
        elif move < 0.6:
            engine.reconfigure(wait=rng.random() < 0.5, max_batch=rng.randint(1, 4),
                               prefix_caching=rng.random() < 0.5, overlap=overlap if rng.random() < 0.7 else not overlap,
                               decode_steps=rng.choice([1, 3, 6]))
        else:
            submit(request_id=rng.choice([None, f"r{rng.randint(0, 4)}"]))
        time.sleep(rng.uniform(0, 0.05))
    engine.reconfigure(overlap=overlap)

    # the watchdog: every handle, including those callbacks add while we wait, ends in time
    seen = 0
    while True:
        with lock:
            pending = handles[seen:]
            seen = len(handles)
        if not pending:
            engine.check_invariants()  # a step boundary: callbacks of ended requests have run by now
            with lock:
                if seen == len(handles) and all(h.done for h in handles):
                    break
            continue
        for h in pending:
            left = DEADLINE_S - (time.monotonic() - start)
            assert left > 0, "the watchdog fired: requests still open"
            h.result(timeout=left)

    assert not problems, problems
    assert len(handles) >= 20, f"chaos too mild: only {len(handles)} requests"
    terminal = Counter(e.request_id for e in engine.telemetry.events() if e.kind in ("finished", "cancelled", "error"))
    assert terminal == Counter(h.request_id for h in handles), "a request ended twice or never"
    reasons = Counter()
    for h in handles:
        out = h.output
        chunks = list(h)
        assert chunks and chunks[-1].finished and not any(c.finished for c in chunks[:-1]), h.request_id
        assert [t for c in chunks for t in c.token_ids] == out.token_ids, f"{h.request_id}: tokens lost or doubled"
        assert "".join(c.text for c in chunks) == out.text
        assert callbacks[id(h)] == 1, f"on_done of {h.request_id} ran {callbacks[id(h)]} times"
        reasons[out.finish_reason] += 1
        if id(h) in poisoned_handles:  # its own fault, unless it was cancelled before its first token
            assert out.finish_reason == "cancelled" or "injected detokenizer fault" in (out.error or ""), out
        else:
            assert out.error is None, f"{h.request_id} ended with an error not its own: {out.error}"
            assert out.finish_reason in ("length", "stop", "cancelled")
    assert reasons["cancelled"] and (reasons["length"] + reasons["stop"]), reasons
    engine.check_invariants()
    assert not engine.outputs.live and not engine.scheduler.has_work()
    assert engine.blocks.num_free == engine.blocks.limit, "KV blocks leaked"
