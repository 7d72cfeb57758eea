"""RequestHandle: the bridge from the engine thread to whoever waits for a request.

The engine thread pushes chunks; an asyncio consumer is woken through its own
event loop (`call_soon_threadsafe`), a plain thread through a condition
variable. Either way a chunk is visible the moment its step finishes. A step's
token chunks wake each event loop once (`wake_all`), not once per request.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import AsyncIterator, Callable, Iterable, Iterator

from .request import RequestOutput, StreamChunk


class RequestHandle:
    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None,
                 on_done: Callable[["RequestHandle"], None] | None = None) -> None:
        self.request_id = request_id
        self.output: RequestOutput | None = None
        self._chunks: deque[StreamChunk] = deque()  # appended and popped without the lock (atomic)
        self._cond = threading.Condition()
        self._waiters = 0  # threads blocked in __iter__: only then does a token chunk take the lock
        self._loop = loop
        self._wakeup = asyncio.Event() if loop is not None else None
        self._on_done = on_done

    @property
    def done(self) -> bool:
        return self.output is not None

    # ---------------------------------------------------------- engine side
    def push(self, chunk: StreamChunk, output: RequestOutput | None = None, *, wake: bool = True) -> None:
        """Queue a chunk; `wake=False` leaves waking an asyncio consumer to `wake_all`.

        A token chunk is one atomic append unless a thread is blocked on this handle: the
        engine pushes one per request per step, and a condition variable each time was half
        the cost of streaming a token. (No lost wake-up: a consumer counts itself as a
        waiter before it checks the queue, and the append comes before the producer's check.)
        """
        self._chunks.append(chunk)
        if output is not None or self._waiters:
            with self._cond:
                if output is not None:
                    self.output = output
                self._cond.notify_all()
        if wake:
            wake_all([self])

    def run_on_done(self) -> None:
        """Call the caller's `on_done` once the request has ended. The engine calls this on its loop
        thread with no lock held and outside any step, so the callback may call the engine's API."""
        callback, self._on_done = self._on_done, None
        if callback is not None and self.output is not None:
            callback(self)

    # -------------------------------------------------------- consumer side
    def _drain(self) -> tuple[list[StreamChunk], bool]:
        done = self.output is not None  # before draining: the final chunk is queued before output is set
        chunks = []
        try:
            while True:
                chunks.append(self._chunks.popleft())
        except IndexError:  # empty (the engine may append meanwhile: that chunk waits for the next drain)
            return chunks, done

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        """Yield chunks as they arrive (inside the event loop that submitted the request)."""
        if self._wakeup is None:
            raise RuntimeError("this request was submitted outside an event loop; iterate it synchronously")
        while True:
            chunks, done = self._drain()
            for c in chunks:
                yield c
            if done and not chunks:
                return
            if not done:
                await self._wakeup.wait()
                self._wakeup.clear()

    async def result_async(self) -> RequestOutput:
        async for _ in self.chunks():
            pass
        assert self.output is not None
        return self.output

    def __iter__(self) -> Iterator[StreamChunk]:
        """Blocking iteration over chunks, for scripts and threads."""
        while True:
            with self._cond:
                self._waiters += 1
                try:
                    self._cond.wait_for(lambda: self._chunks or self.output is not None)
                finally:
                    self._waiters -= 1
            chunks, done = self._drain()
            yield from chunks
            if done and not chunks:
                return

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Block until the request ends; raise TimeoutError if it does not in time."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.output is not None, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        assert self.output is not None
        return self.output


def wake_all(handles: Iterable[RequestHandle]) -> None:
    """Wake the asyncio consumers of many handles: one call into each event loop (a call
    from another thread writes to the loop's wake-up pipe: a system call each)."""
    events: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for handle in handles:
        if handle._loop is not None and handle._wakeup is not None:
            events.setdefault(handle._loop, []).append(handle._wakeup)
    for loop, wakeups in events.items():
        try:
            loop.call_soon_threadsafe(_set_all, wakeups)
        except RuntimeError:
            pass  # the consumer's loop is closed: nobody is listening any more


def _set_all(wakeups: list[asyncio.Event]) -> None:
    for event in wakeups:
        event.set()
