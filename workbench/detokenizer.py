"""Incremental detokenization: text for each new token, as soon as it is printable.

Decoding a single token alone breaks multi-byte characters and drops the
spaces some tokenizers attach to the next word, so each step decodes a small
window ending at the new token and emits only the text that grew — and
nothing while the window ends in half a character (U+FFFD).
"""

from __future__ import annotations

from typing import Any

CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes (possibly empty)."""
        return push_many(self.tokenizer, [self], [token_id])[0]

    def windows(self) -> tuple[list[int], list[int]]:
        return self.ids[self.prefix : self.read], self.ids[self.prefix :]

    def advance(self, before: str, after: str) -> str:
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


def push_many(tokenizer: Any, detoks: list[IncrementalDetokenizer], token_ids: list[int]) -> list[str]:
    """One token for each of many requests, decoded in a single batched tokenizer call (Rust, no GIL)."""
    windows: list[list[int]] = []
    for d, t in zip(detoks, token_ids):
        d.ids.append(t)
        windows.extend(d.windows())
    try:
        texts = tokenizer.batch_decode(windows, skip_special_tokens=True)
    except Exception:
        for d in detoks:
            d.ids.pop()  # leave every request as it was, so the caller can retry one by one
        raise
    return [d.advance(texts[2 * i], texts[2 * i + 1]) for i, d in enumerate(detoks)]
