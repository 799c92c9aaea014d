"""Small numerical building blocks shared by sampling, the RL core and the trainer."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits, tokens):
    """log softmax(logits)[token], without materialising the full log-softmax.

    logits: f[..., vocab]; tokens: int[...] -> f32[...].
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits):
    """Entropy of softmax(logits) over the last axis: f[..., vocab] -> f32[...]."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - logz)
    return logz[..., 0] - jnp.sum(probs * logits, axis=-1)


def chunked_token_stats(hidden, head, tokens, chunk: int):
    """Log-probs of `tokens` and entropies under softmax(head(hidden)), `chunk` positions at a time.

    hidden: f[b, n, d]; head: f[..., d] -> logits f32[..., vocab]; tokens: int[b, n]; `chunk` divides n.
    Returns (logprobs, entropy): f32[b, n]. Only one chunk's [b, chunk, vocab] logits exist at a time,
    in the backward too (each chunk's logits are recomputed there): the vocabulary-sized tensor that
    otherwise dominates a long response's memory.
    """
    b, n, d = hidden.shape
    if n % chunk:
        raise ValueError(f"logits chunk {chunk} does not divide the {n} response positions")

    @jax.checkpoint
    def one(args):
        h, t = args
        logits = head(h)
        return token_logprobs(logits, t), entropy_from_logits(logits)

    chunks = (hidden.reshape(b, n // chunk, chunk, d).swapaxes(0, 1),
              tokens.reshape(b, n // chunk, chunk).swapaxes(0, 1))
    logprobs, entropy = jax.lax.map(one, chunks)
    return logprobs.swapaxes(0, 1).reshape(b, n), entropy.swapaxes(0, 1).reshape(b, n)


def masked_sum(x, mask, axis=None, axis_name=None):
    total = jnp.sum(jnp.where(mask, x, 0.0), axis=axis)
    return total if axis_name is None else jax.lax.psum(total, axis_name)


def masked_mean(x, mask, axis=None, axis_name=None):
    """Mean of x over entries where mask is true (0 where there are none).

    With `axis_name`, the sums are taken over that mapped axis too (pmap/shard_map).
    """
    mask = mask.astype(bool)
    count = masked_sum(jnp.ones_like(x, jnp.float32), mask, axis, axis_name)
    return masked_sum(x, mask, axis, axis_name) / jnp.maximum(count, 1.0)


def masked_var(x, mask, unbiased=True, axis_name=None):
    """Variance of x over the masked entries (Bessel-corrected by default, like TRL)."""
    mask = mask.astype(bool)
    mean = masked_mean(x, mask, axis_name=axis_name)
    count = masked_sum(jnp.ones_like(x, jnp.float32), mask, axis_name=axis_name)
    var = masked_sum(jnp.square(x - mean), mask, axis_name=axis_name) / jnp.maximum(count, 1.0)
    if unbiased:
        var = var * count / jnp.maximum(count - 1.0, 1.0)
    return var


def last_token_index(mask):
    """Index of the last real token of each row. mask: int|bool[batch, seq] -> int32[batch].

    Works for left padding, right padding and both; a row with no real token gives 0.
    """
    seq = mask.shape[-1]
    positions = jnp.arange(seq, dtype=jnp.int32)
    return jnp.max(jnp.where(mask.astype(bool), positions, 0), axis=-1)
