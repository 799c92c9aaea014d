"""Supervised next-token training (the warm-up that makes an "original" model to start RL from), on
padded rows or with several short examples packed into one row (`pack_examples`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rlhf_jax.core.ops import token_logprobs
from rlhf_jax.core.packing import has_successor, next_tokens, pack


def next_token_loss(graphdef, params, ids, mask):
    """Mean cross-entropy of each real token given the ones before it.

    ids, mask: int32[batch, seq] (any padding side); the first real token of a row has no target.
    """
    model = nnx.merge(graphdef, params)
    logits = model(ids, mask)["logits"][:, :-1]
    targets, target_mask = ids[:, 1:], (mask[:, 1:] * mask[:, :-1]).astype(bool)
    nll = -token_logprobs(logits, targets)
    return jnp.sum(jnp.where(target_mask, nll, 0.0)) / jnp.maximum(target_mask.sum(), 1)


def pack_examples(ids, mask, budget: int, pad_id: int = 0) -> dict:
    """Examples (ids, mask: [n, seq], each example's real tokens contiguous) packed into rows of
    `budget` tokens on the host (`rlhf_jax.core.packing.pack`): packed_ids and segment_ids [rows,
    budget], targets (each token's successor in its own example) and target_mask (1 where there is
    one). numpy int32 arrays, for `packed_next_token_loss`."""
    layout = pack(ids, mask, budget, pad_id)
    segments = layout.segment_ids
    return {"packed_ids": layout.ids, "segment_ids": segments, "targets": next_tokens(layout.ids, segments, pad_id),
            "target_mask": has_successor(segments).astype(np.int32)}


def packed_next_token_loss(graphdef, params, packed: dict):
    """`next_token_loss` of the examples `pack_examples` packed: positions restart in each example and
    attention stays inside it, so it equals the padded loss up to float rounding, computing only the
    rows' tokens."""
    model = nnx.merge(graphdef, params)
    hidden, _ = model.backbone(packed["packed_ids"], None, segment_ids=packed["segment_ids"])
    nll = -token_logprobs(model.logits(hidden), packed["targets"])
    target_mask = packed["target_mask"].astype(bool)
    return jnp.sum(jnp.where(target_mask, nll, 0.0)) / jnp.maximum(target_mask.sum(), 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer"), donate_argnums=(1, 2))
def sft_step(graphdef, params, opt_state, ids, mask, optimizer: optax.GradientTransformation):
    """One optimizer step on a batch; returns (params, opt_state, loss)."""
    loss, grads = jax.value_and_grad(lambda p: next_token_loss(graphdef, p, ids, mask))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
