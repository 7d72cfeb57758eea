"""Input processing: a caller's prompt and sampling keywords to a validated request, off the loop.

Everything here runs in the caller's thread, before anything reaches the engine:
the sampling fields are checked (`make_params`), the prompt is bounded,
checked and tokenized — a string, a chat through the tokenizer's template, or
token ids (`InputProcessor.tokenize`) — and the request is checked to fit the
engine (`check_fits`). Every bad value raises a ValueError naming the field
and its usable range.

Two rules keep one caller's input from slowing another's:

* A text longer than `max_tokens x longest token` characters cannot fit, so it
  is refused by its length alone, before any tokenizing (a 10 MB paste costs
  nothing).
* Tokenizing holds no engine-wide lock. Each call borrows a private copy of
  the tokenizer from a small pool (a Hugging Face fast tokenizer shared between
  threads can raise "Already borrowed" when one call changes its settings while
  another encodes), so a long prompt tokenizing in one thread never delays a
  short one in another.
"""

from __future__ import annotations

import copy
import queue
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from .request import SamplingParams

POOL_SIZE = 4  # copies of the tokenizer at most: more threads than that wait for one to come back


class QueueFullError(ValueError):
    """Raised by submit when `max_queue` requests are already waiting (the HTTP server's 429)."""


class TokenizerPool:
    """Private copies of one tokenizer, lent to one thread at a time (made on first need)."""

    def __init__(self, tokenizer: Any, size: int = POOL_SIZE) -> None:
        self._source = tokenizer
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._size = size
        self._lock = threading.Lock()  # guards `_made` only: never held while tokenizing
        self._made = 1
        self._free.put(copy.deepcopy(tokenizer))

    @contextmanager
    def borrow(self) -> Iterator[Any]:
        """A tokenizer copy no other thread uses until this block ends."""
        try:
            tok = self._free.get_nowait()
        except queue.Empty:
            with self._lock:
                grow = self._made < self._size
                self._made += grow
            tok = copy.deepcopy(self._source) if grow else self._free.get()
        try:
            yield tok
        finally:
            self._free.put(tok)


def longest_token_chars(tokenizer: Any) -> int:
    """Characters in the tokenizer's longest vocabulary entry: no token decodes to more.

    (Byte-level BPE spells each byte as one character, so this also bounds the
    UTF-8 bytes, hence the characters, of any token's text.)"""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary: a generous fixed bound
        return 256
    return max((len(t) for t in vocab), default=1) or 1


class InputProcessor:
    """Validation and tokenization of prompts for one tokenizer (thread-safe, lock-free per call)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.token_chars = longest_token_chars(tokenizer)
        self._pool = TokenizerPool(tokenizer)

    def char_limit(self, max_tokens: int) -> int:
        """Most characters a prompt of at most `max_tokens` tokens can have."""
        return max_tokens * self.token_chars

    def tokenize(self, prompt: Any, max_tokens: int) -> list[int]:
        """A string, a chat (list of {role, content}) or token ids -> token ids; ValueError on bad input.

        `max_tokens` bounds the prompt: text too long to fit is refused before tokenizing."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt must be a non-empty string")
            self._check_text("prompt", prompt, max_tokens)
            with self._pool.borrow() as tok:
                return list(tok.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            return self._tokenize_chat(prompt, max_tokens)
        if isinstance(prompt, (list, tuple)) and prompt and all(type(t) is int for t in prompt):
            if len(prompt) >= max_tokens:
                raise ValueError(f"prompt is {len(prompt)} tokens; at most {max_tokens - 1} fit this engine")
            vocab = self.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise ValueError(f"prompt token ids must be integers in [0, {vocab - 1}]")
            return list(prompt)
        if isinstance(prompt, (list, tuple)) and not prompt:
            raise ValueError("prompt must not be empty")
        raise ValueError("prompt must be a string, a list of chat messages ({role, content}) or a list of "
                         f"token ids, got {type(prompt).__name__}")

    def _tokenize_chat(self, messages: Sequence[dict], max_tokens: int) -> list[int]:
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError("prompt messages must each have string 'role' and 'content'")
        if not any(m["content"].strip() for m in messages):
            raise ValueError("prompt messages must not all be empty")
        self._check_text("prompt", "".join(m["role"] + m["content"] for m in messages), max_tokens)
        with self._pool.borrow() as tok:
            text = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
            return list(tok.encode(text, add_special_tokens=False))

    def _check_text(self, field: str, text: str, max_tokens: int) -> None:
        """Cheap checks before tokenizing: a length that cannot fit, text that cannot be encoded."""
        limit = self.char_limit(max_tokens)
        if len(text) > limit:
            raise ValueError(
                f"{field} is {len(text)} characters; at most {limit} can fit this engine ({max_tokens} tokens "
                f"x {self.token_chars} characters, the tokenizer's longest token)")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{field} must be valid Unicode text: a lone surrogate at character {exc.start} "
                             "cannot be encoded") from None


def make_params(params: SamplingParams | None, sampling: dict[str, Any]) -> SamplingParams:
    """SamplingParams from `params=` or from keywords (not both), validated."""
    if params is not None and sampling:
        raise ValueError("pass either params= or sampling keywords, not both")
    if params is None:
        fields = SamplingParams.__dataclass_fields__
        for key in sampling:
            if key not in fields:
                raise ValueError(f"unknown sampling field {key!r}; fields are {sorted(fields)}")
        params = SamplingParams(**sampling)
    elif not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    return params.validate()


def check_fits(prompt_len: int, params: SamplingParams, limit: int, num_blocks: int) -> None:
    """A prompt of `prompt_len` tokens plus `params.max_new_tokens` must fit `limit` tokens."""
    if prompt_len + 1 > limit:
        raise ValueError(f"prompt is {prompt_len} tokens; at most {limit - 1} fit this engine "
                         f"(model context / KV cache of {num_blocks} blocks)")
    if prompt_len + params.max_new_tokens > limit:
        raise ValueError(f"max_new_tokens={params.max_new_tokens} with a {prompt_len}-token prompt exceeds "
                         f"the {limit}-token limit; max_new_tokens must be in [1, {limit - prompt_len}]")


def check_request_id(request_id: Any) -> str:
    """A caller's request id must be a non-empty string."""
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id must be a new non-empty string, got {request_id!r}")
    return request_id
