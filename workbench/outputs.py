"""Output processing: sampled tokens to text, stream chunks and the final `RequestOutput`.

Pure bookkeeping on one request at a time, run by the engine's loop thread
after each step: detokenize the new token (all of a step's requests in one
call where the detokenizer allows), cut the text at a stop string, decide
whether the request ends (EOS, length, stop), and build the chunk to stream
or the final chunk and output. Nothing here touches the scheduler, the KV
cache or a lock; the engine does the freeing and the delivering.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Collection

from .detokenizer import Detokenizer, push_many
from .handle import RequestHandle
from .request import PENDING, Request, RequestOutput, StreamChunk

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LiveRequest:
    """Per-request state the loop keeps beside the scheduler's `Request`."""

    request: Request
    handle: RequestHandle
    detok: Detokenizer
    sent: int = 0  # characters of request.text already streamed
    hold: int = 0  # characters held back while they could still start a stop string


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


def take_token(live: LiveRequest, token: int, generated: int, now: float, eos_ids: Collection[int],
               delta: str | None = None) -> tuple[str | None, StreamChunk | None]:
    """Take in the `generated`-th sampled token: append its text, cut at a stop string.

    Returns (finish reason or None, the chunk to stream when the request goes on). Raises what
    the detokenizer raises: that request's text is broken, the caller fails only it."""
    request = live.request
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
    request.output_token_ids = [t for t in request.output_token_ids if t != PENDING]
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
