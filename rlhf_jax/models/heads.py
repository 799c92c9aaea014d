"""The models users train: a causal LM (optionally with a value head on its
backbone) and a scalar model (a reward model, or a separate value model)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from rlhf_jax.core.ops import last_token_index
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Dense, Transformer, matmul, softcap


class CausalLM(nnx.Module):
    """A decoder LM; with `value_head=True` also a per-token value on the same backbone.

    The value head starts at zero (so the first values are 0 and the first value
    loss does not pull the shared trunk around).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, value_head: bool = False):
        self.cfg = cfg
        self.backbone = Transformer(cfg, rngs=rngs)
        self.lm_head = (
            None if cfg.tie_word_embeddings
            else Dense(cfg.hidden_size, cfg.vocab_size, use_bias=False, cfg=cfg, rngs=rngs)
        )
        self.value_head = (
            Dense(cfg.hidden_size, 1, use_bias=True, cfg=cfg, rngs=rngs, zero_init=True)
            if value_head else None
        )

    def logits(self, hidden, constrain=None):
        """hidden: f[..., d] -> f32 logits [..., vocab] (soft-capped where the config says so).
        `constrain` is applied to them in the compute dtype, before the cast (a sharding
        constraint then moves half the bytes of float32 ones)."""
        if self.lm_head is None:
            embed = self.backbone.embed[...].astype(hidden.dtype)
            logits = matmul(hidden, embed.T)
        else:
            logits = self.lm_head(hidden)
        if constrain is not None:
            logits = constrain(logits)
        return softcap(logits.astype(jnp.float32), self.cfg.final_softcap)

    def values(self, hidden):
        """hidden: f[..., d] -> f32 values [...]."""
        if self.value_head is None:
            raise ValueError("this CausalLM was built without a value head (value_head=False)")
        return self.value_head(hidden)[..., 0].astype(jnp.float32)

    def __call__(self, input_ids, attention_mask, cache=None):
        """Returns a dict: logits f32[b, s, vocab], values f32[b, s] (with a value head), cache."""
        hidden, cache = self.backbone(input_ids, attention_mask, cache)
        out = {"logits": self.logits(hidden), "cache": cache}
        if self.value_head is not None:
            out["values"] = self.values(hidden)
        return out


class ScalarModel(nnx.Module):
    """A backbone with a scalar head: a reward model (read at the last real token)
    or a separate value model (read at every token). The head is HF's `score`
    (no bias), so transformers' `*ForSequenceClassification` folders load into it."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, zero_head: bool = False):
        self.cfg = cfg
        self.backbone = Transformer(cfg, rngs=rngs)
        self.score = Dense(cfg.hidden_size, 1, use_bias=False, cfg=cfg, rngs=rngs, zero_init=zero_head)

    def __call__(self, input_ids, attention_mask, output_index=None, **backbone_options):
        """Per-token scalars f32[batch, seq] (or at `output_index` only; `backbone_options`: remat,
        pins; see `Transformer`)."""
        hidden, _ = self.backbone(input_ids, attention_mask, output_index=output_index, **backbone_options)
        return self.score(hidden)[..., 0].astype(jnp.float32)

    def sequence_scores(self, input_ids, attention_mask):
        """One score per row, read at its last real token: f32[batch]."""
        return self(input_ids, attention_mask, output_index=last_token_index(attention_mask)[:, None])[:, 0]
