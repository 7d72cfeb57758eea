"""A Llama-family decoder (Llama, Qwen2, Qwen3, Mistral, SmolLM2) over a paged KV cache.

The model sees one flat ragged batch per step: `input_ids` and `positions` of
shape [T] for all requests together, no padding. Everything about how those
tokens map to requests and cache slots travels in `AttentionContext`. Every
operation, the linear layers included, goes through the `Kernels` table, so the
same model runs the torch references on a CPU (with oneDNN-packed weights, see
`place`) and the Triton kernels on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from workbench_kernels.table import TORCH, Kernels

from .config import ModelConfig
from .block_linear import BlockLinear
from .packed_linear import PackedLinear, packing_available


@dataclass(slots=True)
class AttentionContext:
    """Where this step's tokens belong: per-request ranges, cache slots, block tables."""

    cu_seqlens_q: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64, -1 = do not store
    max_seqlen_q: int
    max_seqlen_k: int
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                ctx: AttentionContext, layer: int, kernels: Kernels, scratch: dict | None = None) -> torch.Tensor:
        T = x.shape[0]
        qkv = kernels.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = kernels.rms_norm(q, self.q_norm.weight, self.q_norm.eps)[0]
            k = kernels.rms_norm(k, self.k_norm.weight, self.k_norm.eps)[0]
        # q, k and v stay strided views into the qkv output (head dim contiguous), which saves
        # copies: RoPE, the KV store and attention read them with their strides (on a GPU, a
        # decode step does all three in one kernel).
        k_cache, v_cache = ctx.kv_caches[layer]
        o = kernels.rope_store_attention(
            q, k, v, positions, cos_sin, k_cache, v_cache, ctx.slot_mapping, ctx.cu_seqlens_q, ctx.seq_lens,
            ctx.block_tables, self.scale, ctx.max_seqlen_q, ctx.max_seqlen_k, scratch=scratch,
        )
        return kernels.linear(o.reshape(T, self.q_size), self.o_proj.weight)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        return kernels.linear(kernels.gate_up_silu(x, self.gate_up_proj.weight), self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class DecoderModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head; `forward` returns hidden states."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.kernels: Kernels = TORCH
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.packed_head: PackedLinear | BlockLinear | None = None  # set by `place` on a CPU
        self.block_weights = True  # on a CPU in fp32, keep weights that are exactly GGUF blocks as blocks
        self.register_buffer("cos_sin", self._rope_table(cfg.max_position_embeddings), persistent=False)

    def _rope_table(self, max_len: int) -> torch.Tensor:
        inv = self.config.inv_freq()
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv[None, :]
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)

    def extend_rope(self, max_len: int) -> None:
        """Grow the cos/sin table when the engine allows longer contexts than the config says."""
        if max_len > self.cos_sin.shape[0]:
            self.cos_sin = self._rope_table(max_len).to(self.cos_sin.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        k = self.kernels
        x = self.embed_tokens(input_ids)
        residual = None
        scratch: dict = {}  # what the kernels derive from this step's metadata, shared by the layers
        for i, layer in enumerate(self.layers):
            h, residual = k.rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.eps, residual)
            if residual is None:
                residual = x
            x = layer.self_attn(h, positions, self.cos_sin, ctx, i, k, scratch)
            h, residual = k.rms_norm(x, layer.post_attention_layernorm.weight,
                                     layer.post_attention_layernorm.eps, residual)
            x = layer.mlp(h, k)
        return k.rms_norm(x, self.norm.weight, self.norm.eps, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed_head is not None and out is None and (hidden.shape[0] > 1
                                                              or isinstance(self.packed_head, BlockLinear)):
            return self.packed_head(hidden)  # oneDNN's packed copy streams faster for several rows, blocks for any
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return self.kernels.linear(hidden, weight, out=out)

    # ------------------------------------------------------------- placement
    def place(self, device: torch.device, dtype: torch.dtype, block_weights: bool | None = None) -> None:
        """Move to the serving device and dtype, with the weights laid out for its GEMMs.

        On a CPU in fp32 the linear layers are packed for oneDNN (`packed_linear.py`) where
        torch has it, and those that are exactly GGUF blocks are also kept as blocks for decode
        steps (`block_linear.py`) unless `block_weights` is False; other CPU set-ups store the wide
        matrices column-major. Values never change, only their memory order, and placing again
        elsewhere undoes the packing. `block_weights=None` keeps the last choice.
        """
        if block_weights is not None and block_weights != self.block_weights:
            self._unpack()
            self.block_weights = block_weights
        cpu_fp32 = device.type == "cpu" and dtype == torch.float32
        if not cpu_fp32:
            self._unpack()
        self.to(device=device, dtype=dtype)
        self.cos_sin = self.cos_sin.float()
        if cpu_fp32 and packing_available():
            self._pack()
        elif device.type == "cpu":
            self._column_major(self._heads() + [getattr(owner, name) for owner, name in self._linear_slots()
                                                if name != "down_proj"])

    def _linear_slots(self) -> list[tuple[nn.Module, str]]:
        return [(owner, name) for layer in self.layers
                for owner, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                    (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj"))]

    def _heads(self) -> list[nn.Module]:
        return [self.embed_tokens] + ([self.lm_head] if self.lm_head is not None else [])

    def _pack(self) -> None:
        for owner, name in self._linear_slots():
            linear = getattr(owner, name)
            if isinstance(linear, nn.Linear):
                setattr(owner, name, self._packed(linear.weight, linear.bias))
        if self.packed_head is None:  # a copy: embedding lookups (and single rows, unless blocks) keep the plain one
            self.packed_head = self._packed(self._heads()[-1].weight, None)
        self._column_major(self._heads())

    def _packed(self, weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear | BlockLinear:
        blocks = BlockLinear.of(weight, bias) if self.block_weights else None
        return blocks if blocks is not None else PackedLinear(weight, bias)

    def _unpack(self) -> None:
        for owner, name in self._linear_slots():
            if isinstance(getattr(owner, name), (PackedLinear, BlockLinear)):
                setattr(owner, name, getattr(owner, name).unpack())
        self.packed_head = None

    @staticmethod
    def _column_major(modules: list[nn.Module]) -> None:
        """Without oneDNN packing, MKL's skinny GEMMs read column-major weights ~10-50% faster.

        Measured on the 2-core CI machine (bench/NOTES.md, CPU entry 2): the LM head 22 -> 10 ms
        per decode step at batch 8, qkv, o and gate_up ~10%; down_proj is slower that way, so
        it stays row-major. A single row (the LM head at batch 1) is fastest column-major too.
        """
        for module in modules:
            module.weight.data = module.weight.data.t().contiguous().t()

    # ------------------------------------------------------------- weights
    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy weights named the transformers way, fusing q/k/v and gate/up."""
        own = self.state_dict()
        get = lambda name: state[name] if name in state else state["model." + name]  # noqa: E731
        for i in range(self.config.num_layers):
            p = f"layers.{i}."
            a = p + "self_attn."
            own[a + "qkv_proj.weight"].copy_(torch.cat([get(a + f"{n}_proj.weight") for n in "qkv"]))
            if self.config.qkv_bias:
                own[a + "qkv_proj.bias"].copy_(torch.cat([get(a + f"{n}_proj.bias") for n in "qkv"]))
            own[a + "o_proj.weight"].copy_(get(a + "o_proj.weight"))
            if self.config.qk_norm:
                own[a + "q_norm.weight"].copy_(get(a + "q_norm.weight"))
                own[a + "k_norm.weight"].copy_(get(a + "k_norm.weight"))
            m = p + "mlp."
            own[m + "gate_up_proj.weight"].copy_(torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")]))
            own[m + "down_proj.weight"].copy_(get(m + "down_proj.weight"))
            for n in ("input_layernorm", "post_attention_layernorm"):
                own[p + n + ".weight"].copy_(get(p + n + ".weight"))
        own["embed_tokens.weight"].copy_(get("embed_tokens.weight"))
        own["norm.weight"].copy_(get("norm.weight"))
        if self.lm_head is not None:
            own["lm_head.weight"].copy_(state["lm_head.weight"] if "lm_head.weight" in state else get("embed_tokens.weight"))
