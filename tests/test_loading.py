"""`workbench.load` for each kind of source, without network."""

from __future__ import annotations

import pytest
import torch
import transformers

import workbench
from workbench import loading


def _all_equal(ours, hf) -> bool:
    """Our fused weights of a fresh (unpacked) load against transformers' own, every layer."""
    for ours_layer, hf_layer in zip(ours.model.layers, hf.model.layers, strict=True):
        a, m = hf_layer.self_attn, hf_layer.mlp
        expected = [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), a.o_proj.weight,
                    torch.cat([m.gate_proj.weight, m.up_proj.weight]), m.down_proj.weight]
        got = [ours_layer.self_attn.qkv_proj.weight, ours_layer.self_attn.o_proj.weight,
               ours_layer.mlp.gate_up_proj.weight, ours_layer.mlp.down_proj.weight]
        if not all(torch.equal(x, y) for x, y in zip(got, expected)):
            return False
    return torch.equal(ours.model.embed_tokens.weight, hf.model.embed_tokens.weight)


def test_embedded_model_is_cached_after_first_conversion(embedded, hf_model, monkeypatch):
    assert embedded.path is not None and (embedded.path / "model.safetensors").exists()
    assert embedded.config.arch == "llama" and embedded.config.num_layers == 30
    assert embedded.eos_token_ids and embedded.tokenizer.chat_template

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached model must not be converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    again = workbench.load()
    assert again.path == embedded.path
    assert _all_equal(again, hf_model)  # (the shared `embedded` may be packed for a CPU engine by now)


def test_gguf_path_and_folder_give_the_same_weights(embedded, hf_model):
    from_gguf = workbench.load(loading.embedded_gguf_path())
    from_folder = workbench.load(str(embedded.path))
    assert _all_equal(from_gguf, hf_model) and _all_equal(from_folder, hf_model)


def test_hub_id_downloads_through_snapshot_download(embedded, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: asked.append(repo_id) or str(embedded.path))
    loaded = workbench.load("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert asked == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert loaded.name == "HuggingFaceTB/SmolLM2-135M-Instruct" and loaded.config == embedded.config


@pytest.mark.parametrize("source,message", [
    (42, "source must be"),
    ("README.md", "neither a .gguf file nor a model folder"),
])
def test_bad_sources(source, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent if source != "README.md" else __import__("pathlib").Path(__file__).parents[1])
    with pytest.raises(ValueError, match=message):
        workbench.load(source)


def test_transformers_object_needs_a_tokenizer():
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="tokenizer"):
        workbench.load(hf)


def test_unsupported_architecture_is_named():
    hf = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(ValueError, match="model_type"):
        workbench.load(hf, tokenizer=object())
