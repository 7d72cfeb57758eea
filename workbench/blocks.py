"""BlockManager: the paged KV cache's bookkeeping (pure Python, no torch).

The cache is `capacity` fixed-size blocks; a request owns a list of block ids
(its block table). With prefix caching, every full block is named by a chained
hash of (parent hash, its token ids), so a later request whose prompt starts
with the same tokens reuses the block instead of recomputing it. Blocks are
ref-counted; a freed block keeps its hash, and stays findable, until the
allocator reuses it (least recently freed first).

Requests that arrive together with the same opening (a chat template's system
prompt) would each compute the same blocks in the same step. So an admitted
request announces the full blocks it is about to compute (`expect`), and the
scheduler holds back for a step a request whose next block is among them: one
step later that block is cached and shared.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .request import Request


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    parent_hash: int | None = None
    token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class PrefixStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    """A block's name: its tokens and its parent's name, so equal names mean equal prefixes."""
    return hash((parent, token_ids))


def chained_hashes(token_ids: Sequence[int], block_size: int, first: int, stop: int,
                   parent: int | None) -> Iterator[tuple[int, tuple[int, ...]]]:
    """(hash, tokens) of full blocks `first` .. `stop - 1` of `token_ids`, each chained to the one
    before; `parent` is block `first - 1`'s hash (None for block 0). Lazy: callers often stop early."""
    for i in range(first, stop):
        chunk = tuple(token_ids[i * block_size : (i + 1) * block_size])
        parent = block_hash(parent, chunk)
        yield parent, chunk


@dataclass(slots=True)
class BlockManager:
    capacity: int
    block_size: int
    prefix_caching: bool = True
    limit: int = -1
    blocks: list[Block] = field(default_factory=list)
    free: OrderedDict[int, None] = field(default_factory=OrderedDict)
    cached: dict[int, int] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)  # blocks owned by more than one request
    pending: dict[int, int] = field(default_factory=dict)  # hash -> admitted requests about to compute it
    expected: dict[str, list[int]] = field(default_factory=dict)  # request id -> its pending hashes, in order
    stats: PrefixStats = field(default_factory=PrefixStats)

    def __post_init__(self) -> None:
        if self.limit < 0:
            self.limit = self.capacity
        self.blocks = [Block(i) for i in range(self.capacity)]
        self.free = OrderedDict((i, None) for i in range(self.limit))

    # ----------------------------------------------------------------- queries
    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def over_limit(self, request: Request) -> bool:
        if self.limit == self.capacity:
            return False  # the common case, asked for every running request at every step
        return any(b >= self.limit for b in request.block_ids)

    # -------------------------------------------------------------- allocation
    def match_prefix(self, request: Request) -> int:
        """Attach cached blocks matching the request's leading tokens; return tokens reused.

        At least one token is always left to compute, so the step that finishes
        the prompt has logits to sample from.
        """
        tokens = request.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        if not self.prefix_caching:
            return 0
        parent: int | None = None
        for h, chunk in chained_hashes(tokens, self.block_size, 0, max_blocks, None):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.parent_hash != parent or block.token_ids != chunk or block_id >= self.limit:
                break
            self._ref(block_id)
            request.block_ids.append(block_id)
            request.block_hashes.append(h)
            parent = h
        reused = len(request.block_ids) * self.block_size
        request.num_computed = reused
        return reused

    def awaits_pending(self, request: Request) -> bool:
        """Is the next block this request must compute already being computed by another?"""
        return bool(self.pending) and next(self._upcoming_hashes(request), None) in self.pending

    def expect(self, request: Request) -> None:
        """Announce the full blocks an admitted request will compute, until it commits or frees them."""
        if not self.prefix_caching:
            return
        hashes = list(self._upcoming_hashes(request))
        for h in hashes:
            self.pending[h] = self.pending.get(h, 0) + 1
        if hashes:
            self.expected[request.request_id] = hashes

    def _upcoming_hashes(self, request: Request) -> Iterator[int]:
        """Hashes of the full prompt blocks after the request's named ones (lazily: often one is asked)."""
        tokens, parent = request.all_token_ids, request.block_hashes[-1] if request.block_hashes else None
        stop = (len(tokens) - 1) // self.block_size
        for h, _ in chained_hashes(tokens, self.block_size, len(request.block_hashes), stop, parent):
            yield h

    def _settle(self, request: Request, count: int) -> None:
        """The first `count` (or all, -1) announced blocks of the request are computed or given up."""
        hashes = self.expected.pop(request.request_id, None)
        if hashes is None:
            return
        done, rest = (hashes, []) if count < 0 else (hashes[:count], hashes[count:])
        for h in done:
            if self.pending[h] == 1:
                del self.pending[h]
            else:
                self.pending[h] -= 1
        if rest:
            self.expected[request.request_id] = rest

    def count_admission(self, request: Request) -> None:
        """Add an admitted request's lookup to the hit rate: once per admission, not per retry."""
        self.stats.queried_tokens += request.num_tokens
        self.stats.hit_tokens += request.num_computed
        request.num_cached_tokens += request.num_computed

    def ensure(self, request: Request, num_tokens: int) -> bool:
        """Give the request enough blocks for `num_tokens`; all or nothing."""
        missing = self.blocks_needed(num_tokens) - len(request.block_ids)
        if missing <= 0:
            return True
        if missing > len(self.free):
            return False
        for _ in range(missing):
            request.block_ids.append(self._take_free())
        return True

    def commit(self, request: Request) -> None:
        """Name the request's newly filled blocks so later prompts can find them.

        Only blocks whose every token the host knows: a block that ends in a token still in flight
        is named at a later step, once that token has arrived."""
        known = min(request.num_computed, len(request.prompt_token_ids) + len(request.output_token_ids))
        full = min(known // self.block_size, len(request.block_ids))
        if not self.prefix_caching or full <= len(request.block_hashes):
            return  # most steps fill no block: no need to build the token list
        if request.request_id in self.expected:
            self._settle(request, full - len(request.block_hashes))
        first = len(request.block_hashes)
        parent = request.block_hashes[-1] if request.block_hashes else None
        for i, (h, chunk) in enumerate(chained_hashes(request.all_token_ids, self.block_size, first, full, parent),
                                       first):
            request.block_hashes.append(h)
            block = self.blocks[request.block_ids[i]]
            if block.hash is None and h not in self.cached:
                block.hash, block.parent_hash, block.token_ids = h, parent, chunk
                self.cached[h] = block.block_id
            parent = h

    def free_request(self, request: Request) -> None:
        """Drop the request's references; its tail blocks are the first to be reused."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 1:
                self.shared.discard(block_id)
            elif block.ref_count == 0:
                if block_id < self.limit:
                    self.free[block_id] = None
                else:
                    self._forget(block)
        request.block_ids = []
        request.block_hashes = []
        self._settle(request, -1)

    def set_limit(self, limit: int) -> None:
        """Change how many blocks may be used; blocks past the limit leave the pool."""
        if not 1 <= limit <= self.capacity:
            raise ValueError(f"num_blocks must be in [1, {self.capacity}], got {limit}")
        old, self.limit = self.limit, limit
        for block_id in range(limit, old):
            if block_id in self.free:
                del self.free[block_id]
                self._forget(self.blocks[block_id])
        for block_id in range(old, limit):
            if self.blocks[block_id].ref_count == 0:
                self.free[block_id] = None

    def set_prefix_caching(self, enabled: bool) -> None:
        self.prefix_caching = enabled
        if not enabled:
            for block in self.blocks:
                self._forget(block)
            self.pending.clear()
            self.expected.clear()

    # ---------------------------------------------------------------- internals
    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        self._forget(block)
        block.ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        elif block.ref_count == 1:
            self.shared.add(block_id)
        block.ref_count += 1

    def _forget(self, block: Block) -> None:
        if block.hash is not None and self.cached.get(block.hash) == block.block_id:
            del self.cached[block.hash]
        block.hash, block.parent_hash, block.token_ids = None, None, ()

    # --------------------------------------------------------------- invariants
    def check(self, requests: list[Request]) -> None:
        """Raise AssertionError unless every block is free xor owned, with exact ref-counts."""
        owners = [0] * self.capacity
        for request in requests:
            assert len(set(request.block_ids)) == len(request.block_ids), f"{request.request_id} repeats a block"
            for block_id in request.block_ids:
                owners[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == owners[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count} != owners {owners[block.block_id]}")
            in_free = block.block_id in self.free
            if block.ref_count > 0:
                assert not in_free, f"block {block.block_id} is owned and free"
            elif block.block_id < self.limit:
                assert in_free, f"block {block.block_id} leaked: neither owned nor free"
            else:
                assert not in_free, f"block {block.block_id} past the limit is in the free list"
        assert self.shared == {b.block_id for b in self.blocks if b.ref_count > 1}, "shared-block set is stale"
        for h, block_id in self.cached.items():
            assert self.blocks[block_id].hash == h, f"cache entry for block {block_id} is stale"
        announced: dict[int, int] = {}
        for hashes in self.expected.values():
            for h in hashes:
                announced[h] = announced.get(h, 0) + 1
        assert announced == self.pending, "pending blocks disagree with what admitted requests announced"
        assert set(self.expected) <= {r.request_id for r in requests}, "a gone request still announces blocks"
