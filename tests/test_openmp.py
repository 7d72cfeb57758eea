"""OpenMP worker pools on a CPU engine: one thread's team at a time, so libgomp never throttles its spin.

libgomp keeps each thread's workers as OS threads, so /proc/self/task counts them:
a parallel region on a thread adds torch.get_num_threads() - 1 workers, and
releasing the pool takes them away again.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from workbench.openmp import release_idle_workers

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")


def num_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def settles_at(expected: int, timeout: float = 5.0) -> int:
    """The thread count once it reaches `expected` (workers exit just after they are released), or the last seen."""
    deadline = time.monotonic() + timeout
    while (n := num_threads()) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return n


def parallel_region() -> None:
    torch.randn(1 << 22).exp_()  # 4 M elements: well over torch's grain size, so it runs on every thread


@pytest.fixture
def workers() -> int:
    """The workers one thread's pool holds; skips where there are none to count, or libgomp is not the runtime."""
    if torch.get_num_threads() < 2:
        pytest.skip("torch runs one thread here: no OpenMP workers to release")
    if not release_idle_workers():
        pytest.skip("torch's OpenMP runtime is not libgomp")
    return torch.get_num_threads() - 1


def test_release_frees_the_calling_threads_workers_only(workers):
    seen: dict[str, int] = {}

    def other_thread() -> None:
        base = num_threads()
        parallel_region()
        seen["with_pool"] = num_threads() - base
        assert release_idle_workers()
        seen["released"] = settles_at(base) - base
        parallel_region()  # the next region builds a pool again
        seen["rebuilt"] = num_threads() - base
        release_idle_workers()

    release_idle_workers()
    parallel_region()  # this thread's pool, which the other thread's release must leave alone
    base = num_threads()
    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert seen == {"with_pool": workers, "released": 0, "rebuilt": workers}
    assert settles_at(base) == base, "another thread's release took this thread's workers"
    release_idle_workers()
    assert settles_at(base - workers) == base - workers


def test_cpu_engine_keeps_one_team_at_a_time(make_engine, workers):
    engine = make_engine(max_batch=4)
    release_idle_workers()  # loading the model ran regions on this thread
    time.sleep(0.5)  # the loop thread is up and idle
    base = num_threads()
    parallel_region()  # the notebook's own torch work gives this thread a pool
    assert num_threads() == base + workers
    outs = engine.generate_batch(["Hi!", "List three colours.", "What is 2 + 2?"], max_new_tokens=6,
                                 ignore_eos=True, progress=False)
    assert [o.finish_reason for o in outs] == ["length"] * 3
    # submit released this thread's pool; the loop built one for its steps and released it once idle
    assert settles_at(base) == base, "OpenMP workers outlived the work: two teams would throttle each other"
