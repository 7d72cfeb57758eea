"""Reliability on the embedded model: prefix caching, preemption, live reconfiguration,
cancellation in every state, fault containment, stop with requests in flight, admission control.

Every engine comes from `make_engine`, which afterwards checks that every KV block is free
and every request ended. Faults are injected with monkeypatch; synchronisation uses the
request handles and events set from inside the engine loop, never sleeps.
"""

from __future__ import annotations

import threading

import pytest

import workbench
from workbench.engine import QueueFullError
from workbench.scheduler import Scheduler

SYSTEM = ("You are a careful assistant for a small public library. Answer every question in one short, "
          "plain sentence, without lists, greetings or apologies, and never invent titles or authors.")
QUESTIONS = ("Name a colour.", "What is 2+2?", "Say hi in French.", "Name a planet.")


def chat(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def terminal_events(engine: workbench.Engine, request_id: str) -> list[str]:
    return [e.kind for e in engine.telemetry.events()
            if e.request_id == request_id and e.kind in ("finished", "cancelled", "error")]


# ------------------------------------------------------------------ prefix caching
def test_shared_system_prompt_hits_the_prefix_cache_and_gives_the_same_text(make_engine):
    engine = make_engine(num_blocks=64, max_batch=4)
    assert len(engine.tokenize(chat(QUESTIONS[0]))) > 3 * 16, "the system prompt must span whole blocks"
    kw = dict(max_new_tokens=12, ignore_eos=True, progress=False)

    first = engine.generate_batch([chat(QUESTIONS[0])], **kw)
    rest = engine.generate_batch([chat(q) for q in QUESTIONS[1:]], **kw)
    cached_on = first + rest
    assert first[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens >= 32 for o in rest), [o.num_cached_tokens for o in rest]
    # the hit rate in telemetry is exactly the reused prompt tokens over the looked-up ones
    looked_up = sum(len(o.prompt_token_ids) for o in cached_on)
    hits = sum(o.num_cached_tokens for o in cached_on)
    rate = engine.telemetry.last_step().prefix_hit_rate
    assert rate > 0 and rate == pytest.approx(hits / looked_up)
    assert engine.stats()["prefix_hit_rate"] == pytest.approx(rate)
    assert any(len(s.shared_blocks) >= 2 for s in engine.telemetry.steps()), "no step shows shared blocks"

    engine.reconfigure(prefix_caching=False)
    cached_off = engine.generate_batch([chat(q) for q in QUESTIONS], **kw)
    assert all(o.num_cached_tokens == 0 for o in cached_off)
    assert [o.token_ids for o in cached_off] == [o.token_ids for o in cached_on]
    assert [o.text for o in cached_off] == [o.text for o in cached_on]
    assert engine.telemetry.last_step().prefix_hit_rate == pytest.approx(
        hits / (looked_up + sum(len(o.prompt_token_ids) for o in cached_off)))


# ------------------------------------------------------------------- chunked prefill
def test_a_prompt_prefilled_alone_in_small_chunks_gives_the_same_text(make_engine):
    """Steps that only prefill (nothing samples yet) must still write the KV cache."""
    engine = make_engine(num_blocks=64)
    prompt = chat(QUESTIONS[3])
    kw = dict(max_new_tokens=8, ignore_eos=True, progress=False)
    whole = engine.generate_batch([prompt], **kw)[0]
    engine.reconfigure(token_budget=16, prefix_caching=False)
    chunked = engine.generate_batch([prompt], **kw)[0]
    sizes = [s.num_tokens for s in engine.telemetry.steps() if s.slots and s.slots[0].request_id == chunked.request_id]
    assert sizes[:3] == [16, 16, 16]  # prefilled alone, in chunks that do not sample
    assert chunked.token_ids == whole.token_ids


# ------------------------------------------------------------------------- preemption
def test_kv_cache_too_small_for_the_batch_preempts_and_outputs_equal_solo_runs(make_engine):
    prompts = [chat(q) for q in QUESTIONS[:3]]
    kw = dict(max_new_tokens=20, ignore_eos=True, progress=False)
    roomy = make_engine(num_blocks=64)
    solo = [roomy.generate_batch([p], **kw)[0] for p in prompts]
    need = [-(-(len(o.prompt_token_ids) + 20) // 16) for o in solo]  # blocks each needs at its end

    small = make_engine(num_blocks=max(need) + 2, max_batch=3)  # one fits; three at once do not
    assert sum(need) > small.blocks.limit
    crowd = small.generate_batch(prompts, **kw)
    preempted = [rid for s in small.telemetry.steps() for rid in s.preempted]
    assert preempted, "the small cache never preempted"
    assert small.stats()["preemptions"] == len(preempted) == sum(o.num_preemptions for o in crowd)
    assert [o.token_ids for o in crowd] == [o.token_ids for o in solo]
    assert all(o.finish_reason == "length" for o in crowd)


# ------------------------------------------------------------ live reconfiguration
def test_shrinking_num_blocks_in_flight_preempts_what_still_fits_and_fails_what_cannot(make_engine):
    engine = make_engine(num_blocks=32, prefix_caching=False)
    prompt = chat(QUESTIONS[1])
    kw = dict(max_new_tokens=24, ignore_eos=True)
    solo = engine.generate_batch([prompt], progress=False, **kw)[0]  # also moves the free list on
    needed = -(-(len(solo.prompt_token_ids) + 24) // 16)

    fits = engine.submit(prompt, **kw)
    too_big = engine.submit(chat(QUESTIONS[2]), max_new_tokens=needed * 16, ignore_eos=True)
    next(iter(fits))  # decoding now, on blocks past the new limit
    engine.reconfigure(num_blocks=needed + 1)

    out = fits.result(timeout=120)
    assert out.finish_reason == "length" and out.token_ids == solo.token_ids
    assert out.num_preemptions >= 1, "a request holding blocks past the new limit must be preempted"
    failed = too_big.result(timeout=60)
    assert failed.finish_reason == "error" and "num_blocks was reduced" in failed.error
    engine.check_invariants()


def test_reconfigure_max_batch_and_token_budget_in_flight(make_engine):
    engine = make_engine(num_blocks=64, max_batch=3)
    handles = [engine.submit(chat(q), max_new_tokens=6, ignore_eos=True) for q in QUESTIONS[:3]]
    next(iter(handles[-1]))  # all three are running
    engine.reconfigure(max_batch=1, token_budget=16)
    applied = max(e.step for e in engine.telemetry.events() if e.kind == "reconfigured")
    outs = [h.result(timeout=120) for h in handles]
    assert all(len(o.token_ids) == 6 for o in outs)
    before = [s for s in engine.telemetry.steps() if s.step < applied]
    after = [s for s in engine.telemetry.steps() if s.step >= applied]
    assert max(len(s.slots) for s in before) == 3
    assert after and all(len(s.slots) <= 1 and s.num_tokens <= 16 for s in after)


# --------------------------------------------------------------------- cancellation
def test_cancel_queued_prefilling_and_decoding_requests(make_engine, monkeypatch):
    engine = make_engine(num_blocks=64, max_batch=2, token_budget=8)
    decoding = engine.submit(chat(QUESTIONS[0]), max_new_tokens=200, ignore_eos=True)
    decoding_chunks = iter(decoding)
    first = next(decoding_chunks)
    assert first.token_ids and not first.finished

    # Hold the loop inside a step once the long prompt is partly prefilled, until the cancels are queued.
    prefilling_now, cancels_sent = threading.Event(), threading.Event()
    advance = Scheduler.advance

    def advance_and_pause(self):
        long = next((r for r in self.running if r.request_id == "long"), None)
        advance(self)
        if self is engine.scheduler and any(r.request_id == "queued" for r in self.waiting) and (
                long is not None and long.num_computed < long.num_tokens - 16):
            prefilling_now.set()
            cancels_sent.wait(30)

    monkeypatch.setattr(Scheduler, "advance", advance_and_pause)
    prefilling = engine.submit(" ".join(["library"] * 120), request_id="long", max_new_tokens=4)
    queued = engine.submit(chat(QUESTIONS[1]), request_id="queued", max_new_tokens=4)
    assert prefilling_now.wait(60)
    for handle in (queued, prefilling, decoding):
        engine.cancel(handle.request_id)
    cancels_sent.set()

    for handle, chunks in ((queued, list(queued)), (prefilling, list(prefilling)),
                           (decoding, [first, *decoding_chunks])):
        last = chunks[-1]
        assert last.finished and last.finish_reason == "cancelled" and not any(c.finished for c in chunks[:-1])
        assert handle.output.finish_reason == "cancelled"
        assert sum(len(c.token_ids) for c in chunks) == len(handle.output.token_ids)
        assert terminal_events(engine, handle.request_id) == ["cancelled"]
    assert queued.output.token_ids == [] and prefilling.output.token_ids == []
    assert 1 <= len(decoding.output.token_ids) < 200
    kinds = {e.kind for e in engine.telemetry.events() if e.request_id == "long"}
    assert "scheduled" in kinds and "first_token" not in kinds  # it really was mid-prefill
    assert not {e.kind for e in engine.telemetry.events() if e.request_id == queued.request_id} & {"scheduled"}
    engine.check_invariants()
    assert engine.blocks.num_free == engine.blocks.limit  # nothing else runs: every block came back
    assert len(engine.generate_batch([chat(QUESTIONS[2])], max_new_tokens=3, progress=False)[0].token_ids) >= 1


# ---------------------------------------------------------------- fault containment
class InjectedFault(RuntimeError):
    pass


def break_forward(monkeypatch, engine: workbench.Engine, fail_calls: set[int] | None) -> list[int]:
    """Make the model's forward raise on the given call numbers (None: on every call)."""
    model = engine.runner.model
    forward = model.forward
    calls: list[int] = []

    def flaky(*args, **kwargs):
        calls.append(len(calls))
        if fail_calls is None or calls[-1] in fail_calls:
            raise InjectedFault(f"injected kernel fault at forward {calls[-1]}")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    return calls


def test_an_exception_in_one_step_fails_that_batch_and_the_engine_keeps_serving(make_engine, monkeypatch):
    engine = make_engine(num_blocks=64, max_batch=2)
    kw = dict(max_new_tokens=8, ignore_eos=True)
    reference = engine.generate_batch([chat(QUESTIONS[2])], progress=False, **kw)[0]
    calls = break_forward(monkeypatch, engine, fail_calls={2})
    a, b = engine.submit(chat(QUESTIONS[0]), **kw), engine.submit(chat(QUESTIONS[1]), **kw)
    waiting = engine.submit(chat(QUESTIONS[2]), **kw)  # max_batch=2: not in the failing step
    for h in (a, b):
        out = h.result(timeout=60)
        assert out.finish_reason == "error" and "InjectedFault: injected kernel fault at forward 2" in out.error
        assert 1 <= len(out.token_ids) <= 2  # admitted at forward 0 or 1, failed at forward 2
    out = waiting.result(timeout=60)
    assert out.finish_reason == "length" and out.token_ids == reference.token_ids
    assert engine.is_running and len(calls) > 3
    engine.check_invariants()


def test_an_error_in_one_requests_detokenizer_fails_only_that_request(make_engine, monkeypatch):
    engine = make_engine(num_blocks=64)
    marker = 49000  # a token only the poisoned prompt contains
    make = engine.new_detokenizer

    class Broken:
        def push(self, token_id: int) -> str:
            raise ValueError("injected detokenizer fault")

    monkeypatch.setattr(engine, "new_detokenizer", lambda ids: Broken() if marker in ids else make(ids))
    good_ids = engine.tokenize(chat(QUESTIONS[3]))
    handles = [engine.submit(good_ids, max_new_tokens=6, ignore_eos=True),
               engine.submit(good_ids[:-1] + [marker] + good_ids[-1:], max_new_tokens=6, ignore_eos=True),
               engine.submit(good_ids, max_new_tokens=6, ignore_eos=True)]
    good1, bad, good2 = (h.result(timeout=60) for h in handles)
    assert bad.finish_reason == "error" and "injected detokenizer fault" in bad.error
    assert good1.finish_reason == good2.finish_reason == "length"
    assert good1.token_ids == good2.token_ids and len(good1.token_ids) == 6 and good1.text
    assert engine.is_running


def test_repeated_failures_fail_every_pending_request_instead_of_hanging(make_engine, monkeypatch):
    engine = make_engine(num_blocks=64, max_batch=2)
    break_forward(monkeypatch, engine, fail_calls=None)
    handles = [engine.submit(chat(q), max_new_tokens=8) for q in QUESTIONS * 2]
    for h in handles:
        out = h.result(timeout=60)  # TimeoutError here would be the hang
        assert out.finish_reason == "error" and "InjectedFault" in out.error
    assert engine.is_running and not engine.scheduler.has_work()
    monkeypatch.undo()
    assert engine.generate_batch([chat(QUESTIONS[0])], max_new_tokens=4, ignore_eos=True,
                                 progress=False)[0].finish_reason == "length"


def test_a_raising_on_done_callback_does_not_hurt_other_requests(make_engine):
    engine = make_engine(num_blocks=64)

    def explode(handle):
        raise RuntimeError("user callback bug")

    bad = engine.submit(chat(QUESTIONS[0]), max_new_tokens=3, ignore_eos=True, on_done=explode)
    good = engine.submit(chat(QUESTIONS[1]), max_new_tokens=9, ignore_eos=True)
    assert bad.result(timeout=60).finish_reason == "length"
    assert good.result(timeout=60).finish_reason == "length" and len(good.output.token_ids) == 9
    engine.cancel(bad.request_id)  # cancelling an ended request is a no-op, also after a callback error
    assert engine.is_running and engine.generate_batch(["Hi"], max_new_tokens=2, progress=False)[0].token_ids


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop re-raises, by design
def test_a_loop_that_dies_fails_every_request_with_the_cause(make_engine, monkeypatch):
    """An error the step cannot contain (on CUDA: a sticky device fault, raised again while
    cleaning up) ends the loop; every open request gets the cause, none hangs."""
    engine = make_engine(num_blocks=64, max_batch=2)
    handles = [engine.submit(chat(q), max_new_tokens=300, ignore_eos=True) for q in QUESTIONS[:3]]
    next(iter(handles[0]))  # running; the third one is queued

    def sticky_fault(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.core, "step", sticky_fault)
    for h in handles:
        out = h.result(timeout=60)
        assert out.finish_reason == "error"
        assert out.error == "engine stopped: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert not engine.is_running and engine.blocks.num_free == engine.blocks.limit
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit("hi")
    monkeypatch.undo()
    engine.start()
    assert engine.generate_batch([chat(QUESTIONS[1])], max_new_tokens=4, ignore_eos=True,
                                 progress=False)[0].finish_reason == "length"


# ------------------------------------------------------------------ stop / start
def test_stop_with_requests_in_flight_closes_every_one_with_an_error(make_engine):
    engine = make_engine(num_blocks=64, max_batch=2)
    handles = [engine.submit(chat(q), max_new_tokens=300, ignore_eos=True) for q in QUESTIONS]
    next(iter(handles[0]))  # running; two of the others are queued
    engine.stop()
    assert all(h.done for h in handles), "stop() returned with requests still open"
    for h in handles:
        assert h.output.finish_reason == "error" and h.output.error == "engine stopped"
        assert terminal_events(engine, h.request_id) == ["error"]
    assert engine.blocks.num_free == engine.blocks.limit and not engine.scheduler.has_work()
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit("hi")
    engine.start()
    assert engine.generate_batch([chat(QUESTIONS[1])], max_new_tokens=4, ignore_eos=True,
                                 progress=False)[0].finish_reason == "length"


def test_stop_racing_concurrent_submits_leaves_no_request_open(make_engine):
    engine = make_engine(num_blocks=64, max_batch=4)
    accepted: list = []
    enough = threading.Event()

    def submitter():
        while True:
            try:
                accepted.append(engine.submit(chat(QUESTIONS[0]), max_new_tokens=50, ignore_eos=True))
            except RuntimeError:
                return  # stopped
            if len(accepted) >= 30:
                enough.set()

    threads = [threading.Thread(target=submitter) for _ in range(3)]
    for t in threads:
        t.start()
    assert enough.wait(60)
    engine.stop()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    for h in accepted:
        out = h.result(timeout=10)
        assert out.finish_reason in ("error", "length")
    assert not engine.outputs.live


def test_a_submit_still_validating_when_stop_returns_is_refused_not_left_open(make_engine, monkeypatch):
    engine = make_engine(num_blocks=64)
    busy = engine.submit(chat(QUESTIONS[0]), max_new_tokens=300, ignore_eos=True)
    next(iter(busy))
    in_submit, stopped = threading.Event(), threading.Event()
    tokenize = engine.tokenize

    def tokenize_until_stopped(prompt):
        in_submit.set()
        stopped.wait(30)
        return tokenize(prompt)

    monkeypatch.setattr(engine, "tokenize", tokenize_until_stopped)
    outcome: list = []

    def late_submit():
        try:
            outcome.append(engine.submit("a late request", max_new_tokens=4))
        except RuntimeError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=late_submit)
    thread.start()
    assert in_submit.wait(30)  # past submit's first is-running check
    engine.stop()
    stopped.set()
    thread.join(30)
    assert busy.result(timeout=10).error == "engine stopped"
    assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError), f"got {outcome}: it would never end"
    assert not engine.outputs.live


# --------------------------------------------------------------- admission control
def test_max_queue_rejects_submissions_beyond_the_waiting_limit(make_engine):
    engine = make_engine(num_blocks=64, max_batch=1, max_queue=2)
    running = engine.submit(chat(QUESTIONS[0]), max_new_tokens=300, ignore_eos=True)
    next(iter(running))
    waiting = [engine.submit(chat(q), max_new_tokens=4) for q in QUESTIONS[1:3]]
    engine.check_invariants()  # a step boundary: both are in the scheduler's queue now
    with pytest.raises(QueueFullError, match=r"queue is full: max_queue=2"):
        engine.submit(chat(QUESTIONS[3]), max_new_tokens=4)
    with pytest.raises(ValueError, match="request_id must be a new"):
        engine.submit(chat(QUESTIONS[3]), request_id=running.request_id)
    engine.cancel(waiting[0].request_id)
    assert waiting[0].result(timeout=30).finish_reason == "cancelled"
    late = engine.submit(chat(QUESTIONS[3]), max_new_tokens=4)  # room again
    engine.cancel(running.request_id)
    for h in (waiting[1], late):
        assert h.result(timeout=60).finish_reason in ("length", "stop")


def test_a_failing_engine_command_does_not_kill_the_loop(make_engine):
    """A command that raises on the loop thread is logged; the engine keeps serving."""
    engine = make_engine()

    def boom() -> None:
        raise RuntimeError("injected command fault")

    engine._inbox.put(boom)
    out = engine.generate_batch([chat(QUESTIONS[0])], max_new_tokens=4, ignore_eos=True, progress=False)[0]
    assert len(out.token_ids) == 4 and engine.is_running
