"""Output processing: sampled tokens to text, stream chunks and the final `RequestOutput`.

`OutputProcessor` is the loop thread's output side. It keeps the requests whose
streams are open (`live`), and after each step routes every sampled token to
its request, detokenizes (all of a step's requests in one call where the
detokenizer allows), cuts the text at a stop string, decides whether the
request ends (EOS, length, stop), pushes the chunk to the request's handle, and
ends requests: the final chunk and output, and the `on_done` callback queued to
run outside the step. It holds no lock and never touches the KV cache: freeing
a request's blocks is the `release` function it is given (the scheduler's).
The functions below it are the per-request steps, pure bookkeeping.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Collection

from .detokenizer import Detokenizer, push_many
from .handle import RequestHandle, wake_all
from .request import Request, RequestOutput, Status, StreamChunk
from .telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LiveRequest:
    """Per-request state the loop keeps beside the scheduler's `Request`."""

    request: Request
    handle: RequestHandle
    detok: Detokenizer
    sent: int = 0  # characters of request.text already streamed
    hold: int = 0  # characters held back while they could still start a stop string


class OutputProcessor:
    """The requests whose streams are open, and what each step's tokens do to them (loop thread)."""

    def __init__(self, eos_ids: Collection[int], telemetry: Telemetry, release: Callable[[Request], None]) -> None:
        self.live: dict[str, LiveRequest] = {}
        self.callbacks: list[RequestHandle] = []  # ended requests whose on_done is still to run
        self._eos_ids, self._telemetry, self._release = eos_ids, telemetry, release

    def is_live(self, live: LiveRequest) -> bool:
        """Is this very request still open? (Its id may already belong to a newer request.)"""
        return self.live.get(live.request.request_id) is live

    def process(self, lives: list[LiveRequest], tokens: list[int], step: int, now: float) -> tuple[int, list[str]]:
        """One step's tokens, row by row, to the requests that step ran; return (tokens taken, ids ended).

        A request that ended while the step ran (cancelled, or a stop seen one step late) drops its
        token."""
        kept = [(live, t) for live, t in zip(lives, tokens) if self.is_live(live)]
        deltas = decode_step([live for live, _ in kept], [t for _, t in kept])
        self._telemetry.events_at([(live.request.request_id, "token" if live.request.timings.first_token
                                    else "first_token") for live, _ in kept], step, now)
        finished: list[str] = []
        for (live, token), delta in zip(kept, deltas):
            if self._take(live, token, step, now, delta):
                finished.append(live.request.request_id)
        wake_all(live.handle for live, _ in kept if live.handle.output is None)
        return len(kept), finished

    def _take(self, live: LiveRequest, token: int, step: int, now: float, delta: str | None) -> bool:
        """Take in one sampled token, stream its text, end the request if it should stop; True if it ended."""
        try:
            reason, chunk = take_token(live, token, now, self._eos_ids, delta)
        except Exception as exc:  # noqa: BLE001 - this request's text is broken, not the step
            log.exception("detokenizing %s failed", live.request.request_id)
            self.end(live, "error", step, token_ids=[token], error=f"{type(exc).__name__}: {exc}")
            return True
        if reason is not None:
            self.end(live, reason, step, token_ids=[token])
            return True
        live.handle.push(chunk, wake=False)
        return False

    def end(self, live: LiveRequest, reason: str, step: int, *, token_ids: list[int] | None = None,
            error: str | None = None) -> None:
        """Finish, cancel or fail a request: free its blocks, close its stream with a final chunk.

        Its `on_done` is queued in `callbacks`, to run outside the step with no lock held."""
        request = live.request
        if live.handle.done:
            return  # ended already (e.g. cancelled and failed in the same step): one final chunk only
        now = time.perf_counter()
        self._release(request)
        request.status = Status.FINISHED
        request.finish_reason, request.error = reason, error
        request.timings.finished = now
        if self.is_live(live):  # not a new request that reuses the id
            del self.live[request.request_id]
        kind = {"cancelled": "cancelled", "error": "error"}.get(reason, "finished")
        self._telemetry.event(request.request_id, kind, step, detail=error or reason, t=now)
        chunk, output = final_output(live, reason, error, token_ids, now)
        live.handle.push(chunk, output)
        self.callbacks.append(live.handle)


def new_live(request: Request, handle: RequestHandle, detok: Detokenizer) -> LiveRequest:
    """A live record that holds back as many characters as the longest stop string could need."""
    return LiveRequest(request, handle, detok, hold=max((len(s) for s in request.params.stop), default=1) - 1)


def decode_step(lives: list[LiveRequest], tokens: list[int]) -> list[str | None]:
    """Each request's new text for its token, in one call; None for all if that call fails
    (then each request decodes alone, so one broken detokenizer fails only its request)."""
    try:
        return list(push_many([live.detok for live in lives], tokens))
    except Exception:  # noqa: BLE001 - one bad request must not fail the others: decode one by one
        return [None] * len(lives)


def take_token(live: LiveRequest, token: int, now: float, eos_ids: Collection[int],
               delta: str | None = None) -> tuple[str | None, StreamChunk | None]:
    """Take in a sampled token: the request receives it (the one place output tokens are written),
    its text grows, and is cut at a stop string.

    Returns (finish reason or None, the chunk to stream when the request goes on). Raises what
    the detokenizer raises: that request's text is broken, the caller fails only it."""
    request = live.request
    request.receive(token)
    generated = len(request.output_token_ids)
    t = request.timings
    if t.first_token is None:
        t.first_token = now
    t.tokens.append(now)
    params = request.params
    old_len = len(request.text)
    request.text += live.detok.push(token) if delta is None else delta
    reason = None
    if not params.ignore_eos and token in eos_ids:
        reason = "stop"
    elif generated >= params.max_new_tokens:
        reason = "length"
    if params.stop and truncate_at_stop(request, old_len):
        reason = "stop"
    if reason is not None:
        return reason, None
    upto = max(live.sent, len(request.text) - live.hold)
    chunk = StreamChunk(request.request_id, [token], request.text[live.sent:upto], time=now)
    live.sent = upto
    return None, chunk


def final_output(live: LiveRequest, reason: str, error: str | None, token_ids: list[int] | None,
                 now: float) -> tuple[StreamChunk, RequestOutput]:
    """The last chunk (the text still held back, the finish reason) and the whole result."""
    request = live.request
    output = RequestOutput(request.request_id, request.prompt_token_ids, list(request.output_token_ids),
                           request.text, reason, request.timings, error, request.num_preemptions,
                           request.num_cached_tokens)
    chunk = StreamChunk(request.request_id, token_ids or [], request.text[live.sent:], True, reason, error, now)
    live.sent = len(request.text)
    return chunk, output


def truncate_at_stop(request: Request, old_len: int) -> bool:
    """Cut the text at the first stop string that the newest text completed."""
    longest = max(len(s) for s in request.params.stop)
    window_start = max(0, old_len - longest + 1)
    hits = [i for i in (request.text.find(s, window_start) for s in request.params.stop) if i >= 0]
    if not hits:
        return False
    request.text = request.text[: min(hits)]
    return True
