"""Supervised next-token training (the warm-up that makes an "original" model to start RL from)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlhf_jax.core.ops import token_logprobs


def next_token_loss(graphdef, params, ids, mask):
    """Mean cross-entropy of each real token given the ones before it.

    ids, mask: int32[batch, seq] (any padding side); the first real token of a row has no target.
    """
    model = nnx.merge(graphdef, params)
    logits = model(ids, mask)["logits"][:, :-1]
    targets, target_mask = ids[:, 1:], (mask[:, 1:] * mask[:, :-1]).astype(bool)
    nll = -token_logprobs(logits, targets)
    return jnp.sum(jnp.where(target_mask, nll, 0.0)) / jnp.maximum(target_mask.sum(), 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer"), donate_argnums=(1, 2))
def sft_step(graphdef, params, opt_state, ids, mask, optimizer: optax.GradientTransformation):
    """One optimizer step on a batch; returns (params, opt_state, loss)."""
    loss, grads = jax.value_and_grad(lambda p: next_token_loss(graphdef, p, ids, mask))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
