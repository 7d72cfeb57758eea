"""RequestHandle: the bridge from the engine thread to whoever waits for a request.

The engine thread pushes chunks; an asyncio consumer is woken through its own
event loop (`call_soon_threadsafe`), a plain thread through a condition
variable. Either way a chunk is visible the moment its step finishes.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import AsyncIterator, Callable, Iterator

from .request import RequestOutput, StreamChunk


class RequestHandle:
    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None,
                 on_done: Callable[["RequestHandle"], None] | None = None) -> None:
        self.request_id = request_id
        self.output: RequestOutput | None = None
        self._chunks: deque[StreamChunk] = deque()
        self._cond = threading.Condition()
        self._loop = loop
        self._wakeup = asyncio.Event() if loop is not None else None
        self._on_done = on_done

    @property
    def done(self) -> bool:
        return self.output is not None

    # ---------------------------------------------------------- engine side
    def push(self, chunk: StreamChunk, output: RequestOutput | None = None) -> None:
        with self._cond:
            self._chunks.append(chunk)
            if output is not None:
                self.output = output
            self._cond.notify_all()
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wakeup.set)
            except RuntimeError:
                pass  # the consumer's loop is closed: nobody is listening any more
        if output is not None and self._on_done is not None:
            self._on_done(self)

    # -------------------------------------------------------- consumer side
    def _drain(self) -> tuple[list[StreamChunk], bool]:
        with self._cond:
            chunks = list(self._chunks)
            self._chunks.clear()
            return chunks, self.output is not None

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
                self._cond.wait_for(lambda: self._chunks or self.output is not None)
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
