"""BlockManager + Scheduler alone (no model, no torch), driven by hypothesis.

A stateful machine submits, steps, finishes, cancels and reconfigures at random.
The "model" is a pure function of the context (same tokens in, same token out),
so every request's output is known in advance from a solo run; a simulated KV
cache records which token each step wrote into each slot, so a block handed to
the wrong request, a stale prefix-cache hit or a lost token shows up as a wrong
context. Decode runs (several decode steps in one plan) are simulated step by
step, each reading the token the one before "sampled". After every rule the block and queue invariants must hold, every step
must respect the token budget and max batch, and once submissions stop every
request must finish within a bounded number of steps.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from workbench.blocks import BlockManager
from workbench.request import Request, SamplingParams, Status
from workbench.scheduler import Batch, Scheduler

VOCAB = 4  # few distinct tokens, so prompts and outputs share blocks often
STOP_TOKEN = 3
PREFIXES = ([], [1, 2, 1, 2, 1, 2, 1], [1, 2, 1, 2, 0, 0, 0, 0, 3], [2] * 11)


def fake_token(context: list[int]) -> int:
    """A deterministic stand-in for greedy sampling: the next token depends only on the context."""
    return hash(tuple(context)) % VOCAB


def solo_output(prompt: list[int], max_new: int, stops: bool) -> list[int]:
    out: list[int] = []
    while len(out) < max_new:
        out.append(fake_token(prompt + out))
        if stops and out[-1] == STOP_TOKEN:
            break
    return out


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(capacity=st.integers(4, 24), block_size=st.sampled_from([1, 2, 4]),
                max_batch=st.integers(1, 6), token_budget=st.integers(1, 24), caching=st.booleans(),
                policy=st.sampled_from(["continuous", "continuous", "static", "sequential"]),
                decode_steps=st.sampled_from([1, 1, 2, 4]))
    def setup(self, capacity: int, block_size: int, max_batch: int, token_budget: int, caching: bool,
              policy: str, decode_steps: int) -> None:
        self.blocks = BlockManager(capacity, block_size, caching)
        self.sched = Scheduler(self.blocks, max_batch, token_budget, policy, decode_steps)
        self.kv = [[None] * block_size for _ in range(capacity)]
        self.live: list[Request] = []
        self.ended: list[Request] = []
        self.ids = itertools.count()
        self.steps = 0
        self.runner_tables: dict[str, list[int]] = {}  # what a runner that only reads plans holds
        self.most_batch = max_batch

    # ------------------------------------------------------------------ helpers
    def _end(self, request: Request, reason: str) -> None:
        """What the output processor's `end` does to the scheduler: out of the queues, blocks back."""
        self.sched.remove(request)
        request.status = Status.FINISHED
        request.finish_reason = reason
        self.live.remove(request)
        self.ended.append(request)

    def _fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.blocks.limit * self.blocks.block_size

    def _check_batch(self, batch: Batch) -> None:
        s, bm = self.sched, self.blocks
        assert batch.num_tokens <= s.token_budget, f"{batch.num_tokens} tokens > budget {s.token_budget}"
        assert len(batch) + batch.padded_slots <= s.max_batch, f"{len(batch)} items > max_batch {s.max_batch}"
        assert len(s.running) <= s.max_batch, f"{len(s.running)} running > max_batch {s.max_batch}"
        assert len({id(i.request) for i in batch.items}) == len(batch.items), "a request twice in one batch"
        scheduled = {id(i.request) for i in batch.items}
        for request in batch.preempted:  # back in the queue with nothing, or re-admitted at once into an idle engine
            if request.status is Status.WAITING:
                assert not request.block_ids and request.num_computed == 0 and id(request) not in scheduled
            else:
                assert id(request) in scheduled, "a preempted request runs again but is not scheduled"
        k = batch.steps
        assert 1 <= k <= max(1, s.decode_steps), f"a run of {k} steps > decode_steps {s.decode_steps}"
        if k > 1:
            assert not s.waiting and not batch.preempted, "a run while a request waits (or after a preemption)"
            assert all(i.kind == "decode" for i in batch.items) and len(batch.items) == len(s.running)
        written: set[tuple[int, int]] = set()
        for item in batch.items:
            r = item.request
            assert r.status is Status.RUNNING and r in s.running
            assert item.num_tokens >= 1 and item.start == r.num_computed
            assert item.start + item.num_tokens <= r.num_tokens
            assert item.kind == "prefill" or r.num_tokens - item.start == 1, "a decode of more than one token"
            assert r.num_generated + k * item.samples <= r.params.max_new_tokens, "a run past max_new_tokens"
            assert len(r.block_ids) >= bm.blocks_needed(item.start + item.num_tokens * k)
            assert all(b < bm.limit for b in r.block_ids), "a scheduled request holds a block past the limit"
            for p in range(item.start, item.start + item.num_tokens * k):
                block = r.block_ids[p // bm.block_size]
                assert bm.blocks[block].ref_count == 1, f"{r.request_id} writes shared block {block}"
                slot = (block, p % bm.block_size)
                assert slot not in written, f"two requests write slot {slot} in one step"
                written.add(slot)

    def _check_plan(self, batch: Batch, plan) -> None:
        """The plan is the batch in plain data, and a runner that only reads plans keeps every
        running request's block table exactly (admissions, block deltas, preemptions, departures),
        in no more rows than the largest max_batch so far."""
        assert plan.request_ids == [i.request.request_id for i in batch.items]
        assert plan.starts == [i.start for i in batch.items] and plan.num_tokens == [i.num_tokens for i in batch.items]
        assert plan.samples == [i.samples for i in batch.items] and plan.kinds == [i.kind for i in batch.items]
        assert plan.preempted_ids == [r.request_id for r in batch.preempted]
        for rid in plan.finished_ids:
            self.runner_tables.pop(rid, None)
        for rid in plan.preempted_ids:
            if rid in self.runner_tables:
                self.runner_tables[rid] = []
        for admission in plan.admitted:
            self.runner_tables[admission.request_id] = []
        for rid, new in zip(plan.request_ids, plan.new_block_ids):
            self.runner_tables[rid] += new
        for item in batch.items:
            assert self.runner_tables[item.request.request_id] == item.request.block_ids, "a runner's table drifted"
        self.most_batch = max(self.most_batch, self.sched.max_batch)
        assert len(self.runner_tables) <= self.most_batch, "the runner would hold more rows than max_batch"

    def _run_step(self) -> Batch:
        """One engine step without a model: schedule, 'compute' into the simulated KV, sample, finish."""
        batch = self.sched.schedule_batch()
        self._check_batch(batch)
        self._check_plan(batch, self.sched.emit(batch))
        assert batch.items, "work is waiting but nothing was scheduled (livelock)"
        bs = self.blocks.block_size
        sampled: dict[int, list[int]] = {id(i.request): [] for i in batch.items}  # on the "device"
        for j in range(batch.steps):  # a run's steps one after the other, each one position further
            for item in batch.items:
                r, tokens = item.request, item.request.all_token_ids + sampled[id(item.request)]
                for p in range(item.start + j, item.start + j + item.num_tokens):
                    self.kv[r.block_ids[p // bs]][p % bs] = tokens[p]
            for item in batch.items:  # attention reads the whole context through the block table
                r, tokens = item.request, item.request.all_token_ids + sampled[id(item.request)]
                end = item.start + j + item.num_tokens
                seen = [self.kv[r.block_ids[p // bs]][p % bs] for p in range(end)]
                assert seen == tokens[:end], f"{r.request_id} reads a wrong context"
                if item.samples:
                    sampled[id(r)].append(fake_token(tokens[:end]))
        self.sched.advance()
        for j in range(batch.steps):  # the output processor: step by step, a stopped request drops the rest
            for item in batch.items:
                r = item.request
                if not item.samples or r.finished:
                    continue
                assert r.num_in_flight == batch.steps - j
                r.receive(sampled[id(r)][j])
                if len(r.output_token_ids) >= r.params.max_new_tokens:
                    self._end(r, "length")
                elif r.params.stop and r.output_token_ids[-1] == STOP_TOKEN:
                    self._end(r, "stop")
        self.steps += 1
        return batch

    # -------------------------------------------------------------------- rules
    @rule(prefix=st.sampled_from(PREFIXES), suffix=st.lists(st.integers(0, VOCAB - 1), max_size=10),
          max_new=st.integers(1, 8), stops=st.booleans())
    def submit(self, prefix: list[int], suffix: list[int], max_new: int, stops: bool) -> None:
        prompt = prefix + suffix or [0]
        if not self._fits(len(prompt) + max_new):
            return  # Engine.submit rejects it (prompt + max_new_tokens over the KV cache)
        request = Request(f"r{next(self.ids)}", prompt, SamplingParams(max_new, stop=("x",) if stops else ()))
        self.sched.add(request)
        self.live.append(request)

    @precondition(lambda self: self.sched.has_work())
    @rule()
    def step(self) -> None:
        self._run_step()

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 1000), reason=st.sampled_from(["cancelled", "error"]))
    def end_one(self, index: int, reason: str) -> None:
        """Cancel (or fail) a queued, prefilling or decoding request."""
        self._end(self.live[index % len(self.live)], reason)

    @rule(max_batch=st.none() | st.integers(1, 6), token_budget=st.none() | st.integers(1, 24),
          num_blocks=st.none() | st.integers(1, 24), caching=st.none() | st.booleans(),
          policy=st.none() | st.sampled_from(["continuous", "static", "sequential"]),
          decode_steps=st.none() | st.sampled_from([1, 2, 4]))
    def reconfigure(self, max_batch: int | None, token_budget: int | None, num_blocks: int | None,
                    caching: bool | None, policy: str | None, decode_steps: int | None) -> None:
        """What EngineCore.apply_config does, at a step boundary."""
        s = self.sched
        s.decode_steps = decode_steps or s.decode_steps
        s.max_batch = max_batch or s.max_batch
        s.token_budget = token_budget or s.token_budget
        s.policy = policy or s.policy
        if caching is not None and caching != self.blocks.prefix_caching:
            self.blocks.set_prefix_caching(caching)
        if num_blocks is not None:
            self.blocks.set_limit(min(num_blocks, self.blocks.capacity))
            for request in list(self.live):
                if not self._fits(request.max_total_tokens()):
                    self._end(request, "error")

    # --------------------------------------------------------------- invariants
    @invariant()
    def queues_and_blocks_are_consistent(self) -> None:
        if not hasattr(self, "sched"):
            return
        self.sched.check()  # includes BlockManager.check: free xor owned, ref-counts == owners
        queued = {id(r) for r in self.sched.running} | {id(r) for r in self.sched.waiting}
        assert queued == {id(r) for r in self.live}, "a live request is missing from the queues, or a dead one is in"
        assert all(not r.block_ids for r in self.ended), "an ended request still holds blocks"
        stats = self.blocks.stats
        assert 0 <= stats.hit_tokens <= stats.queried_tokens

    def teardown(self) -> None:
        """Finite workload: with no more submissions every request finishes, with its solo output."""
        if not hasattr(self, "sched"):
            return
        bound = sum(r.max_total_tokens() for r in self.live) * (len(self.live) + 1) + 10
        for _ in range(bound):
            if not self.sched.has_work():
                break
            self._run_step()
            self.sched.check()
        assert not self.sched.has_work(), f"requests still unfinished after {bound} steps: livelock"
        assert not self.live
        self.blocks.check([])
        assert self.blocks.num_free == self.blocks.limit
        for r in self.ended:
            expected = solo_output(r.prompt_token_ids, r.params.max_new_tokens, bool(r.params.stop))
            if r.finish_reason in ("length", "stop"):
                assert r.output_token_ids == expected, f"{r.request_id}: output differs from its solo run"
            else:
                assert r.output_token_ids == expected[: len(r.output_token_ids)]


SchedulerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestScheduler = SchedulerMachine.TestCase


# ------------------------------------------------------------ deterministic cases
def _computed(bm: BlockManager, request: Request) -> None:
    assert bm.ensure(request, request.num_tokens)
    request.num_computed = request.num_tokens
    bm.commit(request)


def test_freed_blocks_keep_their_hash_until_reused_least_recently_freed_first() -> None:
    bm = BlockManager(capacity=8, block_size=4)
    params = SamplingParams(4)
    a = Request("a", list(range(9)), params)  # blocks 0, 1 full (hashed), block 2 partial
    bm.match_prefix(a)
    _computed(bm, a)
    assert a.block_ids == [0, 1, 2] and bm.blocks[0].hash is not None and bm.blocks[2].hash is None
    bm.free_request(a)
    assert list(bm.free) == [3, 4, 5, 6, 7, 2, 1, 0]  # a's tail is reused before its head
    c = Request("c", [9] * 20, params)
    bm.match_prefix(c)
    assert bm.ensure(c, 24) and c.block_ids == [3, 4, 5, 6, 7, 2]
    b = Request("b", list(range(9)) + [7], params)
    assert bm.match_prefix(b) == 8 and b.block_ids == [0, 1]  # still cached after being freed
    bm.count_admission(b)
    assert (bm.stats.hit_tokens, bm.stats.queried_tokens, b.num_cached_tokens) == (8, 10, 8)
    bm.free_request(b)
    bm.free_request(c)
    d = Request("d", [5] * 8, params)
    bm.match_prefix(d)
    assert bm.ensure(d, 8) and d.block_ids == [1, 0]  # b freed 1, 0 first (tail first): the LRU end
    assert bm.blocks[0].hash is None and bm.blocks[1].hash is None  # reuse forgets the old hash at once
    bm.check([d])
    e = Request("e", list(range(9)), params)
    assert bm.match_prefix(e) == 0 and not e.block_ids  # both evicted: a miss, not a stale hit
    bm.free_request(d)
    bm.check([])


def test_prefix_hit_compares_tokens_not_just_hashes(monkeypatch) -> None:
    import workbench.blocks as blocks

    monkeypatch.setattr(blocks, "block_hash", lambda parent, tokens: 42)  # every block collides
    bm = BlockManager(capacity=4, block_size=2)
    a = Request("a", [1, 2, 3], SamplingParams(1))
    bm.match_prefix(a)
    _computed(bm, a)
    b = Request("b", [5, 6, 7], SamplingParams(1))
    assert bm.match_prefix(b) == 0 and not b.block_ids
    bm.free_request(a)
    bm.check([])


def test_set_limit_shrink_keeps_owned_blocks_until_freed_and_grow_returns_them() -> None:
    bm = BlockManager(capacity=8, block_size=2)
    r = Request("r", list(range(12)), SamplingParams(1))
    bm.match_prefix(r)
    _computed(bm, r)
    bm.set_limit(3)
    assert bm.over_limit(r) and bm.num_free == 0
    bm.check([r])
    bm.free_request(r)
    assert sorted(bm.free) == [0, 1, 2] and all(b.hash is None for b in bm.blocks[3:])
    bm.set_limit(8)
    assert bm.num_free == 8
    bm.check([])


def test_preemption_takes_the_newest_running_request_and_requeues_it_first() -> None:
    """Out of blocks in a decode step: the newest running request gives its blocks back, keeps
    its generated tokens, and goes to the head of the queue, ahead of requests never admitted."""
    bm = BlockManager(capacity=6, block_size=2, prefix_caching=False)
    sched = Scheduler(bm, max_batch=3, token_budget=100)
    old, mid, new = (Request(name, [1, 2, 3, 4], SamplingParams(8)) for name in ("old", "mid", "new"))
    for r in (old, mid, new):
        sched.add(r)
    plan = sched.schedule()  # all three prefilled: 2 blocks each, the cache is full
    assert plan.request_ids == ["old", "mid", "new"] and bm.num_free == 0
    assert [a.request_id for a in plan.admitted] == ["old", "mid", "new"] and plan.new_block_ids == [[0, 1], [2, 3], [4, 5]]
    sched.advance()
    for r in (old, mid, new):
        r.receive(0)
    late = Request("late", [1, 1], SamplingParams(2))
    sched.add(late)
    plan = sched.schedule()  # each decode needs a third block: only preempting frees one
    assert plan.preempted_ids == ["new"] and not plan.admitted
    assert plan.request_ids == ["old", "mid"] and list(sched.running) == [old, mid]
    assert plan.new_block_ids == [[5], [4]]  # the blocks `new` gave back, newest first
    assert list(sched.waiting) == [new, late]
    assert new.block_ids == [] and new.num_computed == 0 and new.output_token_ids == [0]
    assert new.num_preemptions == 1 and new.status is Status.WAITING
    sched.check()


def test_requests_sharing_an_opening_wait_one_step_and_then_reuse_its_blocks() -> None:
    """Three chats with the same two-block system prompt arrive together: the first computes the
    shared blocks, the other two wait one step and then find them cached; a request with another
    opening is not held back, and nothing is held back when it would leave the step empty."""
    bm = BlockManager(capacity=32, block_size=4)
    sched = Scheduler(bm, max_batch=8, token_budget=100)
    system = [7, 7, 1, 2, 3, 4, 5, 6]
    a, b, c = (Request(name, system + tail, SamplingParams(4)) for name, tail in
               (("a", [10, 11, 12]), ("b", [20, 21]), ("c", [30, 31, 32, 33, 34])))
    other = Request("other", [9, 9, 9, 9, 9], SamplingParams(4))
    for r in (a, b, c):
        sched.add(r)
    plan = sched.schedule()
    assert plan.request_ids == ["a"] and list(sched.waiting) == [b, c]
    assert b.block_ids == [] and b.num_computed == 0
    sched.check()
    sched.advance()
    a.receive(0)
    sched.add(other)
    plan = sched.schedule()
    assert plan.request_ids == ["a", "b", "c", "other"]
    assert b.block_ids[:2] == c.block_ids[:2] == a.block_ids[:2], "the system prompt's blocks are shared"
    assert (b.num_computed, c.num_computed, other.num_computed) == (8, 8, 0)
    assert plan.num_tokens == [1, 2, 5, 5]
    sched.advance()
    sched.check()
    assert not bm.pending and not bm.expected, "every announced block was computed"


def test_a_held_back_request_runs_when_the_block_it_waits_for_is_given_up() -> None:
    """The request computing a shared block is cancelled before the block is done: the one that
    waited for it is admitted at the next step and computes the block itself."""
    bm = BlockManager(capacity=32, block_size=4)
    sched = Scheduler(bm, max_batch=8, token_budget=5)  # the first prompt needs three steps
    first, second = Request("first", [1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams(2)), Request(
        "second", [1, 2, 3, 4, 5, 6, 7, 8, 0], SamplingParams(2))
    sched.add(first)
    sched.add(second)
    plan = sched.schedule()
    assert plan.request_ids == ["first"] and bm.pending
    sched.advance()  # block 0 of `first` is cached; block 1 is still pending
    plan = sched.schedule()
    assert plan.request_ids == ["first"], "second waits for block 1"
    sched.remove(first)  # cancelled mid-prefill, before that step ran
    assert not bm.pending
    plan = sched.schedule()
    assert plan.request_ids == ["second"] and second.num_computed == 4
    assert plan.finished_ids == ["first"], "the runner hears that `first` left"
    sched.check()
