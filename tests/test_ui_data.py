"""Dashboard plot data vs the engine's own counts, on recorded telemetry of real runs.

The plot columns are pure functions of telemetry (workbench.ui.data). Here a
real engine on the embedded model runs a few requests while the test records,
from the engine itself, what each step really scheduled (the scheduler's
batches) and which KV blocks each running request really owned and filled
(its block table and computed-token count, read as each step is recorded).
The plot data must agree with that, step by step, and the token timelines
with each request's output.
"""

from __future__ import annotations

import pytest

from workbench.scheduler import Scheduler
from workbench.telemetry import SlotRecord, StepRecord
from workbench.ui import data

SYSTEM = ("You are a patient teacher who explains things about the sea, ships, fish, weather and tides to "
          "children in short, clear sentences.")
QUESTIONS = ("Why is the sea salty?", "What is a tide?", "Name a fish.", "How do ships float?", "What is a wave?")


def chat(q: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


class Truth:
    """What the engine itself did at each step, read from its scheduler and requests (test-only access)."""

    def __init__(self, engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[list[tuple[str, str, int]]] = []
        self.tables: dict[int, dict[str, tuple[list[int], int]]] = {}
        schedule = Scheduler.schedule

        def recording_schedule(scheduler: Scheduler):
            plan = schedule(scheduler)
            if scheduler is engine.scheduler and len(plan):
                self.batches.append(list(zip(plan.request_ids, plan.kinds, plan.num_tokens))
                                    + [("(padding)", "padding", 0)] * plan.padded_slots)
            return plan

        monkeypatch.setattr(Scheduler, "schedule", recording_schedule)
        record_step = engine.telemetry.record_step

        def recording_record_step(record: StepRecord) -> None:
            self.tables[record.step] = {r.request_id: (list(r.block_ids), r.num_computed)
                                        for r in engine.scheduler.running}
            record_step(record)

        engine.telemetry.record_step = recording_record_step

    def fills(self, step: int, block_size: int) -> dict[int, int]:
        out: dict[int, int] = {}
        for blocks, computed in self.tables[step].values():
            for i, b in enumerate(blocks):
                out[b] = max(out.get(b, 0), min(block_size, computed - i * block_size))
        return out

    def owners(self, step: int) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for rid, (blocks, _) in self.tables[step].items():
            for b in blocks:
                out.setdefault(b, []).append(rid)
        return out


def check_against_truth(engine, truth: Truth, outputs) -> dict[str, int]:
    """Assert every plot-data function against the engine; return how often each interesting case occurred."""
    steps = engine.telemetry.steps()
    events = engine.telemetry.events()
    bs, cap = engine.config.block_size, engine.capacity
    assert len(steps) == len(truth.batches) > 0

    # -- slot occupancy per step: the heatmap cells are exactly the engine's batches
    occupancy = data.slot_occupancy(data.slot_cells(steps))
    assert [occupancy[r.step] for r in steps] == truth.batches

    # -- blocks owned per request and their fill, every step, folding telemetry as the dashboard does
    seen = {"shared": 0, "partial": 0, "steps": 0}
    context: dict[str, int] = {}
    for r in steps:
        data.fold_context(context, [r])
        cells = data.kv_cells(r, cap, bs, context, r.num_blocks)
        owners = truth.owners(r.step)
        fills = truth.fills(r.step, bs)
        for b in range(cap):
            want = owners.get(b, [])
            if want:
                assert cells["owners"][b].split(", ") == want, (
                    f"step {r.step} block {b}: dashboard says {cells['owners'][b]!r}, engine {want}")
            else:
                assert cells["state"][b] == ("free" if b < r.num_blocks else "off")
            assert cells["fill"][b] == fills.get(b, 0), (
                f"step {r.step} block {b}: dashboard fill {cells['fill'][b]}, engine {fills.get(b, 0)}")
            assert (cells["state"][b] == "shared") == (len(want) > 1)
        per_request = {rid: [b for b in range(cap) if rid in cells["owners"][b].split(", ")]
                       for rid in truth.tables[r.step]}
        assert {rid: sorted(bl) for rid, bl in per_request.items()} == {
            rid: sorted(blocks) for rid, (blocks, _) in truth.tables[r.step].items()}
        free = sum(1 for s in cells["state"] if s == "free")
        assert free >= r.num_free_blocks  # a queued request may hold prefix blocks no running request owns
        if r.num_waiting == 0:
            assert free == r.num_free_blocks
        seen["shared"] += sum(1 for s in cells["state"] if s == "shared")
        seen["partial"] += sum(1 for f, s in zip(cells["fill"], cells["state"]) if s == "owned" and 0 < f < bs)
        seen["steps"] += 1

    # -- tokens per request: the timeline's ticks are the request's output tokens
    log = data.fold_requests(data.RequestLog(), events)
    ticks = data.token_ticks(events, log.by_id, engine.telemetry.t0)
    for out in outputs:
        s = log.by_id[out.request_id]
        assert s.num_tokens == len(out.token_ids) > 0
        mine = [i for i, rid in zip(ticks["index"], ticks["request_id"]) if rid == out.request_id]
        assert mine == list(range(len(out.token_ids)))
        assert len(s.preemptions) == out.num_preemptions
        assert s.queued <= s.scheduled <= s.first_token <= s.token_times[-1] <= s.end
        assert s.end_kind == "finished" and s.detail == out.finish_reason
        assert s.ttft == pytest.approx(out.timings.ttft, abs=1e-9)
    bars = data.timeline_bars(list(log.by_id.values()), engine.telemetry.t0, 0.0)
    assert sorted(set(bars["request_id"])) == sorted(o.request_id for o in outputs)
    assert all(a <= b for a, b in zip(bars["left"], bars["right"]))
    marks = data.timeline_marks(list(log.by_id.values()), engine.telemetry.t0)
    assert marks["label"].count("preempted") == sum(o.num_preemptions for o in outputs)
    assert data.counters(steps, log, 0, now=steps[-1].t_end).finished == len(outputs)
    seen["preemptions"] = sum(o.num_preemptions for o in outputs)

    # -- prefill chunks of the Gantt view are the prefill slots, token for token
    chunks = data.prefill_chunks(steps, log.by_id, engine.telemetry.t0)
    assert sum(chunks["num_tokens"]) == sum(n for b in truth.batches for _, kind, n in b if kind == "prefill")
    return seen


def test_plot_data_match_engine_with_shared_prefixes_and_chunked_prefill(make_engine, monkeypatch):
    engine = make_engine(max_batch=3, token_budget=24, num_blocks=48)
    truth = Truth(engine, monkeypatch)
    lengths = [6, 14, 9, 11, 5]
    handles = [engine.submit(chat(q), max_new_tokens=n, ignore_eos=True) for q, n in zip(QUESTIONS, lengths)]
    outputs = [h.result(timeout=300) for h in handles]
    seen = check_against_truth(engine, truth, outputs)
    assert seen["shared"] > 0, "no shared prefix block was ever drawn: the test did not exercise prefix sharing"
    assert seen["partial"] > 0
    assert any(o.num_cached_tokens > 0 for o in outputs)


def test_plot_data_match_engine_through_preemption(make_engine, monkeypatch):
    engine = make_engine(max_batch=3, num_blocks=9, prefix_caching=False)
    truth = Truth(engine, monkeypatch)
    handles = [engine.submit(chat(q), max_new_tokens=40, ignore_eos=True) for q in QUESTIONS[:3]]
    outputs = [h.result(timeout=300) for h in handles]
    seen = check_against_truth(engine, truth, outputs)
    assert seen["preemptions"] > 0, "no request was preempted: the test did not exercise preemption"


# ------------------------------------------------------------------ pure functions on hand-made records
def _record(step: int, slots, tables, t: float, **kw) -> StepRecord:
    return StepRecord(step=step, t_start=t, t_end=t + 0.1, slots=[SlotRecord(*s) for s in slots],
                      block_tables=tables, shared_blocks=[], num_blocks=8, num_free_blocks=8, num_running=len(tables),
                      num_waiting=0, tokens_emitted=0, **kw)


def test_fold_context_restarts_after_preemption_and_forgets_finished():
    ctx: dict[str, int] = {}
    data.fold_context(ctx, [_record(0, [("a", 20, "prefill"), ("b", 5, "prefill")], {"a": [0, 1], "b": [2]}, 0)])
    assert ctx == {"a": 20, "b": 5}
    data.fold_context(ctx, [_record(1, [("a", 1, "decode")], {"a": [0, 1]}, 1, preempted=["b"])])
    assert ctx == {"a": 21}
    data.fold_context(ctx, [_record(2, [("b", 7, "prefill")], {"b": [3]}, 2)])
    assert ctx == {"b": 7}


def test_block_fills_fills_every_block_but_the_last():
    rec = _record(0, [("a", 3, "prefill")], {"a": [4, 5, 6]}, 0)
    assert data.block_fills(rec, {"a": 35}, 16) == {4: 16, 5: 16, 6: 3}
    assert data.block_fills(rec, {"a": 32}, 16) == {4: 16, 5: 16, 6: 16}


def test_column_patch_turns_old_into_new():
    old = {"a": [1, 2, 3], "b": ["x", "y", "z"]}
    new = {"a": [1, 5, 3], "b": ["x", "y", "w"]}
    patch = data.column_patch(old, new)
    assert patch == {"a": [(1, 5)], "b": [(2, "w")]}
    assert data.column_patch(new, new) == {}


def test_spans_and_gpu_busy():
    from workbench.telemetry import Telemetry, gpu_busy

    recs = [_record(i, [("a", 1, "decode")], {"a": [0]}, float(i), schedule_s=0.01, prepare_s=0.02, forward_s=0.05,
                    postprocess_s=0.02) for i in range(3)]
    quads = data.span_quads(recs, 0.0)
    assert quads["phase"] == list(data.PHASES) * 3
    assert quads["ms"][:4] == [10.0, 20.0, 50.0, 20.0]
    assert gpu_busy(recs) is None and data.gpu_busy is gpu_busy  # one definition, re-exported for the views
    # overlapping GPU spans (as in an overlapped loop) count once: union [0, 1.05] + [2.0, 2.1] over 0 .. 2.1
    for r, span in zip(recs, [(0.0, 0.6), (0.4, 1.05), (2.0, 2.1)]):
        r.gpu_start, r.gpu_end = span
    assert gpu_busy(recs) == pytest.approx(1.15 / 2.1)
    # the window is the GPU's (first start to last end), not the host's: host work before the first launch
    # is not GPU idle time
    recs[0].gpu_start, recs[1].gpu_start = 0.5, 0.55
    assert recs[0].t_start == 0.0 and gpu_busy(recs) == pytest.approx((0.55 + 0.1) / 1.6)
    tel = Telemetry()
    for r in recs:
        tel.record_step(r)
    assert tel.gpu_busy() == gpu_busy(recs) and tel.gpu_busy(last=1) == pytest.approx(1.0)
    assert data.span_quads(recs, 0.0)["phase"].count("compute") == 3


def test_request_colors_are_stable_and_distinct_for_neighbours():
    assert data.request_color("req-3") == data.request_color("req-3")
    assert len({data.request_color(f"req-{i}") for i in range(20)}) == 20
    assert data.request_color("my-own-id") in data.PALETTE


def test_grid_shape_fits_capacity():
    for cap in (1, 9, 64, 512, 1000, 65536):
        cols, rows = data.grid_shape(cap)
        assert cols * rows >= cap and cols % 8 == 0
