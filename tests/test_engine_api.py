"""The engine as a user meets it: async and sync APIs, streaming, cancel, bad input."""

from __future__ import annotations

import asyncio
import re
import threading

import pytest

import workbench

CHATS = [[{"role": "user", "content": q}] for q in (
    "Say hi.", "Count from one to five.", "Write two sentences about the sea.", "What is 3+4?",
    "List four fruits.", "Describe a cat in one line.", "Write a short poem about rain.", "Name a planet.")]


def test_streams_short_requests_finish_first_and_chunks_add_up(make_engine):
    engine = make_engine(max_batch=8)
    lengths = [4, 40, 8, 32, 12, 24, 16, 20]

    async def run():
        chunks = {i: [] for i in range(len(lengths))}

        async def one(i):
            async for c in engine.stream(CHATS[i], max_new_tokens=lengths[i], ignore_eos=True):
                chunks[i].append(c)

        await asyncio.gather(*(one(i) for i in range(len(lengths))))
        return chunks

    chunks = asyncio.run(run())
    final = {i: cs[-1] for i, cs in chunks.items()}
    for i, cs in chunks.items():
        assert cs[-1].finished and all(not c.finished for c in cs[:-1])
        assert sum(len(c.token_ids) for c in cs) == lengths[i]
    # short requests complete before the long ones finish
    order = sorted(range(len(lengths)), key=lambda i: final[i].time)
    assert final[0].time < final[1].time and final[2].time < final[3].time
    assert order[0] == 0 and order[-1] == 1


def test_a_step_wakes_each_event_loop_once_not_once_per_stream(make_engine):
    """Eight streams in one event loop: every token arrives, but the engine thread calls into the
    loop about once per step (plus once per finished request), not once per token."""
    engine = make_engine(max_batch=8)
    calls = []

    async def run():
        loop = asyncio.get_running_loop()
        plain = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):
            calls.append(callback)
            return plain(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting
        async def collect(i):
            return [c async for c in engine.stream(CHATS[i], max_new_tokens=16, ignore_eos=True)]

        return await asyncio.gather(*(collect(i) for i in range(8)))

    chunks = asyncio.run(run())
    assert [sum(len(c.token_ids) for c in cs) for cs in chunks] == [16] * 8
    steps = len([s for s in engine.telemetry.steps() if s.tokens_emitted])
    assert len(calls) <= steps + 8 < 8 * 16, (len(calls), steps)


def test_concatenated_chunks_equal_final_text(make_engine):
    engine = make_engine()

    async def run():
        handle = engine.submit(CHATS[6], max_new_tokens=40)
        pieces = [c.text async for c in handle.chunks()]
        return "".join(pieces), handle.output

    text, output = asyncio.run(run())
    assert text == output.text and output.text
    assert output.timings.first_token <= output.timings.tokens[-1] <= output.timings.finished
    assert len(output.timings.tokens) == len(output.token_ids)


def test_generate_returns_text_ids_and_timings(make_engine):
    engine = make_engine()
    out = asyncio.run(engine.generate(CHATS[3], max_new_tokens=16))
    assert out.finish_reason in ("stop", "length") and out.token_ids
    assert out.timings.ttft is not None and out.timings.ttft > 0 and out.timings.latency >= out.timings.ttft


def test_running_event_loop_is_not_blocked(make_engine):
    """As in a Jupyter cell: the loop keeps ticking while the engine generates."""
    engine = make_engine()

    async def run():
        ticks = 0
        task = asyncio.ensure_future(engine.generate(CHATS[2], max_new_tokens=24, ignore_eos=True))
        while not task.done():
            ticks += 1
            await asyncio.sleep(0.005)
        return ticks, task.result()

    ticks, out = asyncio.run(run())
    assert len(out.token_ids) == 24 and ticks > 5


def test_cancel_queued_and_running(make_engine):
    engine = make_engine(max_batch=1)
    first = engine.submit(CHATS[1], max_new_tokens=200, ignore_eos=True)
    queued = engine.submit(CHATS[2], max_new_tokens=200, ignore_eos=True)
    next(iter(first))  # first is decoding now
    engine.cancel(queued.request_id)
    engine.cancel(first.request_id)
    for h in (first, queued):
        out = h.result(timeout=30)
        assert out.finish_reason == "cancelled"
    assert len(first.output.token_ids) < 200 and queued.output.token_ids == []
    engine.check_invariants()


@pytest.mark.parametrize("prompt,sampling,field", [
    ("", {}, "prompt"),
    ("   ", {}, "prompt"),
    (12345, {}, "prompt"),
    (None, {}, "prompt"),
    ([], {}, "prompt"),
    ([{"role": "user"}], {}, "prompt"),
    ([1, 2, 10**9], {}, "prompt"),
    ("hello " * 3000, {}, "prompt"),
    ("hi", {"max_new_tokens": 0}, "max_new_tokens"),
    ("hi", {"max_new_tokens": -3}, "max_new_tokens"),
    ("hi", {"max_new_tokens": 10**7}, "max_new_tokens"),
    ("hi", {"temperature": -0.5}, "temperature"),
    ("hi", {"temperature": float("nan")}, "temperature"),
    ("hi", {"top_p": 0.0}, "top_p"),
    ("hi", {"top_p": 1.5}, "top_p"),
    ("hi", {"top_k": -1}, "top_k"),
    ("hi", {"seed": "x"}, "seed"),
    ("hi", {"stop": [""]}, "stop"),
    ("hi", {"colour": "red"}, "colour"),
])
def test_bad_input_is_rejected_at_submit_and_others_keep_streaming(make_engine, prompt, sampling, field):
    engine = make_engine(num_blocks=128)
    other = engine.submit(CHATS[4], max_new_tokens=16, ignore_eos=True)
    with pytest.raises(ValueError, match=re.escape(field)):
        engine.submit(prompt, **sampling)
    assert len(other.result(timeout=60).token_ids) == 16
    assert engine.is_running


def test_reconfigure_rejects_bad_values_and_changes_nothing(make_engine):
    engine = make_engine(num_blocks=64)
    before = engine.config
    for bad in ({"max_batch": 0}, {"token_budget": -1}, {"num_blocks": 65}, {"num_blocks": "8"},
                {"policy": "fastest"}, {"block_size": 8}, {"prefix_caching": 1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            engine.reconfigure(**bad)
    assert engine.config == before
    assert engine.reconfigure(max_batch=3).max_batch == 3 and engine.scheduler.max_batch == 3


def test_stop_strings_cut_the_text(make_engine):
    engine = make_engine()
    prompt = [{"role": "user", "content": "Count from one to ten."}]
    full = engine.generate_batch([prompt], max_new_tokens=40, progress=False)[0]
    stop = full.text[len(full.text) // 2 :][:3]
    assert len(stop) == 3
    cut = engine.generate_batch([prompt], max_new_tokens=40, stop=["never-seen", stop], progress=False)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_seeded_sampling_is_reproducible_whatever_the_batch(make_engine):
    engine = make_engine()
    kw = dict(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    alone = engine.generate_batch([CHATS[6]], progress=False, **kw)[0]
    crowd = engine.generate_batch([CHATS[6], CHATS[1], CHATS[2]], progress=False, **kw)[0]
    other_seed = engine.generate_batch([CHATS[6]], progress=False, **{**kw, "seed": 99})[0]
    assert alone.token_ids == crowd.token_ids
    assert alone.token_ids != other_seed.token_ids


def test_stop_with_requests_in_flight_closes_them_and_restart_works(make_engine):
    engine = make_engine()
    handles = [engine.submit(c, max_new_tokens=300, ignore_eos=True) for c in CHATS[:3]]
    next(iter(handles[0]))
    engine.stop()
    for h in handles:
        out = h.result(timeout=30)
        assert out.finish_reason in ("error", "length") and (out.error or out.finish_reason == "length")
    assert engine.blocks.num_free == engine.blocks.limit
    engine.start()
    assert engine.generate_batch([CHATS[0]], max_new_tokens=4, progress=False)[0].token_ids


def test_submit_from_many_threads(make_engine):
    engine = make_engine()
    results: list = []
    threads = [threading.Thread(target=lambda c=c: results.append(
        engine.submit(c, max_new_tokens=8, ignore_eos=True).result(timeout=60))) for c in CHATS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(r.token_ids) for r in results) == [8] * len(CHATS)
    assert len({r.request_id for r in results}) == len(CHATS)


def test_telemetry_records_steps_and_exports_a_trace(make_engine, tmp_path):
    engine = make_engine(token_budget=16)
    outs = engine.generate_batch(CHATS[:3], max_new_tokens=8, ignore_eos=True, progress=False)
    steps = engine.telemetry.steps()
    emitted = sum(s.tokens_emitted for s in steps)
    assert emitted == sum(len(o.token_ids) for o in outs)
    assert all(s.num_tokens <= 16 for s in steps)
    assert any(s.kind == "prefill" for r in steps for s in r.slots) and any(s.kind == "decode" for r in steps for s in r.slots)
    trace = engine.telemetry.save_trace(tmp_path / "trace.json")
    import json

    data = json.loads(trace.read_text())
    assert any(e["name"] == "forward" for e in data["traceEvents"])


def test_a_burst_lands_at_one_step_boundary(make_engine):
    """submit_many: every request of a burst is in the first step (static batching depends on it)."""
    for _ in range(3):
        engine = make_engine(policy="static", max_batch=6)
        engine.generate_batch(CHATS[:6], max_new_tokens=4, ignore_eos=True, progress=False)
        first = engine.telemetry.steps()[0]
        assert first.num_running == 6, f"first step ran {first.num_running} of 6"


def test_incremental_detokenizer_streams_exact_text_with_about_one_decode_per_token(embedded):
    """Multi-byte characters (accents, CJK, emoji with modifiers) come out whole and exact, never
    as half a character, and a token costs one window decode, not two, after the first."""
    from workbench.detokenizer import IncrementalDetokenizer, window_decoder

    tok = embedded.tokenizer
    decode = window_decoder(tok)
    calls = []

    def counting(windows):
        calls.append(len(windows))
        return decode(windows)

    text = "Héllo wörld, naïve café 😀👍🏽 中文字符 ñ — and plain words after them " * 3
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(counting, tok.encode("Hi", add_special_tokens=False))
    pieces = [d.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(calls) < 1.3 * len(ids), (sum(calls), len(ids))


def test_byte_level_detokenizer_streams_what_the_tokenizer_decodes(embedded):
    """The byte-table detokenizer (picked for byte-level BPE tokenizers such as SmolLM2's) streams
    exactly tokenizer.decode(output ids): random ids (invalid UTF-8, special tokens, ids past the
    vocabulary) and real multi-byte text, never half a character. A tokenizer that cleans up
    spaces on decode gets the window detokenizer instead."""
    import copy
    import random

    from workbench.detokenizer import ByteDetokenizer, IncrementalDetokenizer, detokenizer_factory

    tok = embedded.tokenizer
    make = detokenizer_factory(tok)
    assert isinstance(make([1]), ByteDetokenizer)
    rng = random.Random(3)
    for _ in range(300):
        ids = [rng.randrange(0, 49200) for _ in range(rng.randint(1, 30))]
        d = make([5, 6])
        text = "".join(d.push(i) for i in ids) + d.utf8.decode(b"", final=True)  # flush a trailing half
        assert text == tok.decode([i for i in ids if i < 49152], skip_special_tokens=True)
    text = "Héllo wörld, naïve café 😀👍🏽 中文字符 ñ — and plain words after them"
    d = make([1])
    pieces = [d.push(i) for i in tok.encode(text, add_special_tokens=False)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    cleaning = copy.deepcopy(tok)
    cleaning.clean_up_tokenization_spaces = True
    assert isinstance(detokenizer_factory(cleaning)([1]), IncrementalDetokenizer)


def test_handle_delivers_every_chunk_to_a_blocked_thread_in_order():
    """Token chunks are queued without the lock unless a thread waits: none may be lost or
    reordered while a consumer blocks, wakes and drains concurrently with the producer."""
    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, so races show up
    try:
        for _ in range(3):
            _stream_through_a_handle(20000)
    finally:
        sys.setswitchinterval(interval)


def _stream_through_a_handle(n: int) -> None:
    from workbench.handle import RequestHandle
    from workbench.request import RequestOutput, StreamChunk, Timings

    handle = RequestHandle("r")

    def produce() -> None:
        for i in range(n):
            handle.push(StreamChunk("r", [i], "x"), wake=False)
        handle.push(StreamChunk("r", [], "", True, "length"), RequestOutput("r", [], [], "", "length", Timings()))

    producer = threading.Thread(target=produce)
    producer.start()
    chunks = list(handle)
    producer.join()
    assert [c.token_ids[0] for c in chunks[:-1]] == list(range(n))
    assert chunks[-1].finished and handle.result(timeout=1).finish_reason == "length"


def test_quick_posts_of_different_knobs_all_hold(make_engine):
    """reconfigure(wait=False) twice, on two knobs, before the loop applies either: both hold (each
    post builds on the last posted config, not on the applied one, which would undo the first)."""
    engine = make_engine(max_batch=4, token_budget=256)
    handle = engine.submit("Tell me a story.", max_new_tokens=24, ignore_eos=True)  # the loop is busy stepping
    a = engine.reconfigure(wait=False, max_batch=3)
    b = engine.reconfigure(wait=False, token_budget=128)
    assert (a.max_batch, b.max_batch, b.token_budget) == (3, 3, 128)
    handle.result(timeout=120)
    applied = engine.reconfigure(policy=engine.config.policy)  # waits: every post before it has applied
    assert (applied.max_batch, applied.token_budget) == (3, 128)
