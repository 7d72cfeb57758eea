"""Scheduler: which requests run at the next step, and how many tokens each.

Continuous batching policy (pure Python, no torch):
  1. decodes first — every running request that has its whole context cached
     gets one token;
  2. then prefill chunks of running requests, under the step's token budget;
  3. then admission of waiting requests, FIFO, while fewer than `max_batch` run;
     a request whose next prompt block another request is computing right now
     waits one step and then finds it in the prefix cache (see blocks.py).
When the KV cache has no block left, the newest running request is preempted:
its blocks are freed and it goes back to the front of the queue, to be
recomputed (its generated tokens kept) once room returns.

While the batch holds still (decodes only, nobody waiting, no block short), up
to `decode_steps` decode steps are planned as one run: the host then plans,
prepares and launches once for several steps (plan.py).

Two teaching policies sit beside it: `sequential` runs one request at a time;
`static` admits a batch only when the previous batch has entirely finished.

`schedule` returns a `StepPlan` (plan.py): plain data for the runner, which never
sees a `Request`. After the step is launched, `advance` records its tokens as
computed and its sampled tokens as in flight.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .blocks import BlockManager
from .plan import Admission, Kind, StepPlan
from .request import Request, Status

_NO_BLOCKS: list[int] = []  # shared by the rows of a plan that got no new block (read, never written)


@dataclass(slots=True)
class ScheduledItem:
    """`num_tokens` tokens of `request`, starting at position `start`.

    `samples` is fixed when scheduled: the chunk reaches the end of the
    request's tokens, so its last position's logits give the next token.
    """

    request: Request
    start: int
    num_tokens: int
    kind: Kind
    samples: bool = False

    @classmethod
    def of(cls, request: Request, num_tokens: int, kind: Kind) -> "ScheduledItem":
        start = request.num_computed
        return cls(request, start, num_tokens, kind, start + num_tokens == request.num_tokens)


@dataclass(slots=True)
class Batch:
    items: list[ScheduledItem] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    padded_slots: int = 0
    steps: int = 1  # decode steps in a row (a decode run)

    @property
    def num_tokens(self) -> int:
        return sum(i.num_tokens for i in self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(slots=True)
class Scheduler:
    blocks: BlockManager
    max_batch: int = 32
    token_budget: int = 512
    policy: str = "continuous"
    decode_steps: int = 1  # the longest decode run
    waiting: deque[Request] = field(default_factory=deque)
    running: list[Request] = field(default_factory=list)
    static_members: int = 0
    num_preemptions: int = 0
    # blocks of each running request that a plan has told the runner of (absent: none, since admission)
    _told: dict[Request, int] = field(default_factory=dict)
    _left: list[str] = field(default_factory=list)  # ids removed since the last plan
    _last: Batch | None = None  # the batch of the last plan, until `advance`

    # ---------------------------------------------------------------- intake
    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of the queues and give back its blocks (cancel, error, finish)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.blocks.free_request(request)
        self._told.pop(request, None)
        self._left.append(request.request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -------------------------------------------------------------- schedule
    def schedule(self) -> StepPlan:
        """Decide the next step; its plan (call `advance()` once the step is launched)."""
        return self.emit(self.schedule_batch())

    def schedule_batch(self) -> Batch:
        """The next step as the scheduler's own working data (live requests), for tests and tools."""
        batch = self._last = Batch()
        if not self.running:
            self.static_members = 0
        self._shed_after_reconfigure(batch)
        budget = self._schedule_running(batch, self.token_budget)
        # After a preemption, admitting would only take the blocks back; but with nothing left
        # running, the head of the queue (often the request just preempted) must run, or the
        # step would be empty and the engine would stall.
        if (not batch.preempted or not self.running) and self._may_admit():
            self._admit(batch, budget)
        if self.policy == "static":
            batch.padded_slots = max(0, min(self.static_members, self.max_batch) - len(self.running))
        batch.steps = self._run_length(batch)
        return batch

    def _run_length(self, batch: Batch) -> int:
        """How many decode steps this batch can run in a row: 1 unless every running request decodes
        in it, none is waiting (a newcomer would wait the whole run) and the KV cache has blocks for
        the run; never past a request's max_new_tokens. Reserves the run's blocks."""
        items = batch.items
        if self.decode_steps <= 1 or self.waiting or batch.preempted or len(items) != len(self.running):
            return 1
        if any(i.kind != "decode" for i in items):
            return 1
        steps = min(self.decode_steps, min(i.request.params.max_new_tokens - i.request.num_generated for i in items))
        if steps <= 1:
            return 1
        ends = [(i.request, i.start + steps) for i in items]
        missing = sum(max(0, self.blocks.blocks_needed(end) - len(r.block_ids)) for r, end in ends)
        if missing > self.blocks.num_free:
            return 1
        for request, end in ends:
            self.blocks.ensure(request, end)
        return steps

    def _shed_after_reconfigure(self, batch: Batch) -> None:
        """Preempt, newest first, requests that a shrunk num_blocks or max_batch no longer allows."""
        for request in reversed([r for r in self.running if self.blocks.over_limit(r)]):
            self._preempt(request, batch)
        while len(self.running) > self.max_batch:
            self._preempt(self.running[-1], batch)

    def _schedule_running(self, batch: Batch, budget: int) -> int:
        # Decodes before prefill chunks; within each, oldest first. `remaining` is read once per
        # request: this loop runs every step for every running request.
        todo = [(r, r.num_tokens - r.num_computed) for r in self.running]
        order = [x for x in todo if x[1] <= 1] + [x for x in todo if x[1] > 1]
        for request, remaining in order:
            if budget <= 0:
                break
            if request.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            if request.num_generated >= request.params.max_new_tokens:
                continue  # its last token is still on the device; the engine finishes it on collection
            n = min(remaining, budget)
            if not self._reserve(request, n, batch):
                continue
            kind: Kind = "prefill" if remaining > 1 else "decode"
            batch.items.append(ScheduledItem(request, request.num_computed, n, kind, n == remaining))
            budget -= n
        return budget

    def _reserve(self, request: Request, n: int, batch: Batch) -> bool:
        """Find blocks for n more tokens, preempting the newest requests if needed."""
        while not self.blocks.ensure(request, request.num_computed + n):
            victim = self.running[-1]
            self._preempt(victim, batch)
            if victim is request:
                return False
        return True

    def _may_admit(self) -> bool:
        if self.policy == "continuous":
            return len(self.running) < self.max_batch
        return not self.running  # sequential and static: only into an empty engine

    def _admit(self, batch: Batch, budget: int) -> None:
        limit = 1 if self.policy == "sequential" else self.max_batch
        admitted = 0
        while self.waiting and len(self.running) < limit and budget > 0:
            request = self.waiting[0]
            self.blocks.match_prefix(request)
            n = min(request.remaining, budget)
            if self._shares_pending(request, batch) or not self.blocks.ensure(request, request.num_computed + n):
                self._unmatch(request)
                break
            self.waiting.popleft()
            self.blocks.count_admission(request)
            self.blocks.expect(request)
            request.status = Status.RUNNING
            self.running.append(request)
            batch.items.append(ScheduledItem.of(request, n, "prefill"))
            budget -= n
            admitted += 1
        if self.policy == "static" and admitted:
            self.static_members = admitted
            self._admit_static_rest(limit)

    def _shares_pending(self, request: Request, batch: Batch) -> bool:
        """Hold a request back while its next block is being computed by another (continuous
        policy, and only if something else runs this step, so the engine never stalls)."""
        return (self.policy == "continuous" and bool(batch.items or self.running)
                and self.blocks.awaits_pending(request))

    def _admit_static_rest(self, limit: int) -> None:
        """A static batch takes all its members now, even those with no budget this step."""
        while self.waiting and len(self.running) < limit:
            request = self.waiting[0]
            self.blocks.match_prefix(request)
            if not self.blocks.ensure(request, request.num_computed + 1):
                self._unmatch(request)
                break
            self.waiting.popleft()
            self.blocks.count_admission(request)
            self.blocks.expect(request)
            request.status = Status.RUNNING
            self.running.append(request)
            self.static_members += 1

    def _unmatch(self, request: Request) -> None:
        """A request that stays queued holds no blocks: pinned prefix blocks could starve the
        running requests, and a lone request could then never fit (a false 'too big' error)."""
        self.blocks.free_request(request)
        request.num_computed = 0

    def _preempt(self, request: Request, batch: Batch) -> None:
        """Recompute-style preemption: drop the KV, keep the tokens, queue at the front."""
        self.running.remove(request)
        self.blocks.free_request(request)
        self._told.pop(request, None)
        request.num_computed = 0
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        batch.preempted.append(request)
        batch.items = [i for i in batch.items if i.request is not request]

    def emit(self, batch: Batch) -> StepPlan:
        """The batch as plain data: ids, token spans, and each row's blocks since the runner last heard
        (call it once per scheduled batch: it moves the scheduler's record of what the runner knows).

        It runs every step for every scheduled request, so it is written as list comprehensions
        and one loop that mostly finds no new block."""
        items, told = batch.items, self._told
        requests = [i.request for i in items]
        plan = StepPlan([r.request_id for r in requests], [i.start for i in items], [i.num_tokens for i in items],
                        [i.samples for i in items], [i.kind for i in items],
                        preempted_ids=[r.request_id for r in batch.preempted], finished_ids=self._left,
                        padded_slots=batch.padded_slots, steps=batch.steps)
        self._left = []
        for r in requests:
            known, held = told.get(r), len(r.block_ids)
            if known is None:  # admitted (again) since the last plan: the runner's block list starts afresh
                known = 0
                plan.admitted.append(Admission(r.request_id, r.prompt_token_ids, r.params,
                                               r.seed if r.seed is not None else r.params.seed))
            plan.new_block_ids.append(r.block_ids[known:] if held > known else _NO_BLOCKS)
            told[r] = held
        return plan

    # ------------------------------------------------------------ after step
    def advance(self) -> None:
        """The step (or run) just scheduled is launched: its tokens count as computed (their K/V are on
        the way into the cache) and each of its sampling rows has one more token in flight per step."""
        batch, self._last = self._last, None
        assert batch is not None, "advance() without a step scheduled since the last one"
        steps = batch.steps
        for item in batch.items:
            item.request.num_computed = item.start + item.num_tokens * steps
            item.request.num_in_flight += item.samples * steps
            self.blocks.commit(item.request)

    def finish(self, request: Request) -> None:
        request.status = Status.FINISHED
        self.remove(request)

    def check(self) -> None:
        """Invariants for tests: queues disjoint, statuses consistent, blocks exact."""
        running, waiting = set(map(id, self.running)), set(map(id, self.waiting))
        assert not running & waiting, "a request is both running and waiting"
        assert len(running) == len(self.running) and len(waiting) == len(self.waiting), "duplicate in a queue"
        assert all(r.status is Status.RUNNING for r in self.running)
        assert all(r.status is Status.WAITING for r in self.waiting)
        assert all(not r.block_ids and r.num_computed == 0 for r in self.waiting), "a queued request holds blocks"
        self.blocks.check(self.running + list(self.waiting))
