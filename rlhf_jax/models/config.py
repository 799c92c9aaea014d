"""Architecture description shared by every model family we support."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from rlhf_jax.options import FAMILIES, LORA_TARGETS  # noqa: F401 (part of this module's interface)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer.

    `family` selects the block layout: "gpt2" (learned positions, LayerNorm,
    tanh-GELU MLP, biases everywhere), "llama" (RoPE, RMSNorm, SwiGLU,
    grouped-query attention; Qwen2 and Mistral are "llama" with other bias
    flags, Qwen3 with `qk_norm`, SmolLM3 with `nope_layers`) or "gemma3" (Gemma 3's text model:
    the llama layout with (1 + weight) RMSNorms before and after both attention and the MLP,
    embeddings times sqrt(hidden_size), tanh-GELU gating, query/key norms, and the options below).
    Frozen so it can be a static argument of jitted functions.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE scaling as a sorted tuple of (key, value) pairs (hashable), with "rope_type" "llama3"
    # (factor, low/high_freq_factor, original_max_position_embeddings) or "linear" (factor).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Qwen3: an RMSNorm over each head's query and key, before RoPE.
    qk_norm: bool = False
    # Attention scores are divided by sqrt(query_pre_attn_scalar) (0: sqrt(head_dim)); Gemma sets it.
    query_pre_attn_scalar: int = 0
    # Soft-capping of the final logits, cap * tanh(x / cap) (0: none).
    final_softcap: float = 0.0
    # The layers in `sliding_layers` attend to the last `sliding_window` positions only (their own
    # included), with RoPE base `rope_local_theta` (0: rope_theta) and no RoPE scaling (Gemma 3).
    sliding_window: int = 0
    sliding_layers: tuple[int, ...] = ()
    rope_local_theta: float = 0.0
    # Layers that use no positional encoding at all (SmolLM3's NoPE layers).
    nope_layers: tuple[int, ...] = ()
    dtype: str = "float32"
    param_dtype: str = "float32"
    # The blocks' weights stacked on a leading layer axis and run under `jax.lax.scan`: one block is
    # compiled instead of `num_layers`, so compile time stays flat in depth (the KV cache is stacked too).
    scan_layers: bool = False
    # LoRA adapters (rank 0: none) on the named projections: q_proj, k_proj, v_proj, o_proj,
    # gate_proj, up_proj, down_proj (GPT-2's MLP is up_proj / down_proj).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"model family {self.family!r} is not supported; use one of {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {LORA_TARGETS}")
        if self.family == "gemma3" and not self.qk_norm:
            raise ValueError("the gemma3 family normalises queries and keys: qk_norm must be True")
        if self.family == "gpt2" and self.qk_norm:
            raise ValueError("qk_norm (Qwen3's per-head query/key RMSNorm) needs the llama family")
        if self.rope_scaling and dict(self.rope_scaling).get("rope_type") not in ("llama3", "linear"):
            raise ValueError(f"rope_scaling {self.rope_scaling} needs a ('rope_type', 'llama3' or 'linear') pair")
        if self.sliding_layers and self.sliding_window <= 0:
            raise ValueError(f"sliding_layers {self.sliding_layers} need sliding_window > 0")
        for name in ("sliding_layers", "nope_layers"):
            outside = [i for i in getattr(self, name) if not 0 <= i < self.num_layers]
            if outside:
                raise ValueError(f"{name}: layer(s) {outside} outside 0..{self.num_layers - 1}")
        if self.family == "gpt2" and (self.nope_layers or self.rope_scaling or self.rope_local_theta):
            raise ValueError("the gpt2 family has learned positions, no RoPE options")
        if self.family == "gpt2" and self.num_kv_heads != self.num_heads:
            raise ValueError("the gpt2 family has no grouped-query attention: num_kv_heads must equal num_heads")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def gpt2_config(
    vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, max_position_embeddings=128, **kw
) -> ModelConfig:
    """A GPT-2-architecture config (the family of the demo and the benchmarks)."""
    return ModelConfig(
        family="gpt2",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hidden_size // num_heads,
        intermediate_size=kw.pop("intermediate_size", 4 * hidden_size),
        max_position_embeddings=max_position_embeddings,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        **kw,
    )
