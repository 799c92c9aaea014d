"""The losses of the RL updates: the clipped surrogate (PPO, GRPO, DAPO, GSPO), the clipped value loss,
the KL penalty, the sampler's importance weights, and the per-token log-probs they all start from.

Loss functions take per-token arrays `f32[batch, response_len]` and a mask, and return `(loss,
stats)`; padding never counts.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.core.kl import get_estimator
from rlhf_jax.core.ops import chunked_token_stats, entropy_from_logits, masked_mean, masked_var, token_logprobs
from rlhf_jax.options import AGGREGATIONS, RATIO_LEVELS, SAMPLER_CORRECTIONS


def aggregate(per_token, mask, mode: str = "token"):
    """Masked mean of a per-token quantity.

    "token": over every unmasked token of the batch (long responses weigh more).
    "sequence": the mean over rows of each row's masked mean (rows without tokens are skipped).
    """
    mask = mask.astype(bool)
    if mode == "token":
        return masked_mean(per_token, mask)
    if mode == "sequence":
        row_mean = masked_mean(per_token, mask, axis=-1)
        return masked_mean(row_mean, mask.any(axis=-1))
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {AGGREGATIONS}")


def clipped_surrogate(logprobs, old_logprobs, advantages, mask, *, clip_low: float, clip_high: float | None = None,
                      level: str = "token", aggregation: str = "token", max_len: int | None = None, weights=None):
    """PPO's clipped surrogate, mean of max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)), with
    the published variations of every algorithm here.

    logprobs (new), old_logprobs (at rollout), mask: [batch, response_len]; advantages: f32[batch] (one per
    sequence, as group baselines give) or f32[batch, response_len] (GAE).
    clip_high: None for PPO's symmetric range; above clip_low, DAPO's clip-higher. level "token": a
    ratio per token (PPO, GRPO, DAPO); "sequence": one per sequence, exp of the mean log-ratio over its
    tokens (GSPO), applied to each of its tokens. aggregation "token": mean over every token of the
    batch (PPO, DAPO); "sequence": each row's mean, then the mean over rows (GRPO); "constant": the sum
    over tokens divided by batch x `max_len` (Dr. GRPO: no length bias). weights: per-token factors
    (the sampler correction's importance weights), or None.
    Returns (loss, stats): clipfrac (tokens whose gradient the clip removes: ratio below 1 - clip_low
    where A < 0 or above 1 + clip_high where A > 0), clip_low_frac and clip_high_frac (each side),
    approxkl (0.5 * mean log-ratio^2), ratio and ratio_var (mean and variance of the ratio).
    """
    mask = mask.astype(bool)
    clip_high = clip_low if clip_high is None else clip_high
    if advantages.ndim == 1:
        advantages = jnp.broadcast_to(advantages[:, None], mask.shape)
    chex.assert_equal_shape([logprobs, old_logprobs, advantages, mask])
    log_ratio = jnp.where(mask, logprobs - old_logprobs, 0.0)
    if level == "sequence":
        seq = masked_mean(log_ratio, mask, axis=-1)
        # GSPO-token: the sequence's ratio in value, each token's log-prob in the gradient.
        log_ratio = jax.lax.stop_gradient(seq)[:, None] + logprobs - jax.lax.stop_gradient(logprobs)
    elif level != "token":
        raise ValueError(f"unknown ratio level {level!r}; choose one of {RATIO_LEVELS}")
    ratio = jnp.exp(log_ratio)
    surrogate = jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high))
    if weights is not None:
        surrogate = weights * surrogate
    if aggregation == "constant":
        if not max_len:
            raise ValueError("aggregation 'constant' needs max_len (the response length limit)")
        loss = jnp.sum(jnp.where(mask, surrogate, 0.0)) / (mask.shape[0] * max_len)
    else:
        loss = aggregate(surrogate, mask, aggregation)
    low = (ratio < 1.0 - clip_low) & (advantages < 0)
    high = (ratio > 1.0 + clip_high) & (advantages > 0)
    stats = {"clip_low_frac": masked_mean(low.astype(jnp.float32), mask),
             "clip_high_frac": masked_mean(high.astype(jnp.float32), mask),
             "clipfrac": masked_mean((low | high).astype(jnp.float32), mask),
             "approxkl": 0.5 * masked_mean(jnp.square(logprobs - old_logprobs), mask),
             "ratio": masked_mean(ratio, mask),
             "ratio_var": masked_var(ratio, mask, unbiased=False)}
    return loss, stats


def value_loss(values, old_values, returns, mask, cliprange_value: float, aggregation: str = "token"):
    """0.5 * mean of max((v - R)^2, (v_clipped - R)^2), v_clipped = clip(v, old - eps, old + eps).

    Returns (loss, stats) with stats clipfrac.
    """
    chex.assert_equal_shape([values, old_values, returns, mask])
    mask = mask.astype(bool)
    # clip(v, old - eps, old + eps), not old + clip(v - old, +-eps): inside the range that is v itself, so
    # clipfrac counts clipping, not the rounding of (v - old) + old.
    clipped_values = jnp.clip(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_loss = jnp.square(values - returns)
    clipped_loss = jnp.square(clipped_values - returns)
    loss = 0.5 * aggregate(jnp.maximum(unclipped_loss, clipped_loss), mask, aggregation)
    return loss, {"clipfrac": masked_mean((clipped_loss > unclipped_loss).astype(jnp.float32), mask)}


def kl_penalty_loss(logprobs, ref_logprobs, mask, estimator: str = "k3", aggregation: str = "token"):
    """KL-in-the-loss term (GRPO style): the aggregated per-token estimate.

    k3 is the default: as a loss its gradient is an unbiased KL gradient, while
    k1's expected gradient is zero.
    """
    return aggregate(get_estimator(estimator)(logprobs, ref_logprobs), mask, aggregation)


def sampler_weights(trainer_logprobs, sampler_logprobs, mask, mode: str = "none", cap: float = 3.0):
    """Importance weights w = pi_trainer / pi_sampler for the policy loss, and their metrics.

    The samples come from the sampler's distribution, while the PPO "old" log-probs come from the
    training forward (they differ by rounding in bf16: the decode loop and the full-sequence forward
    add up in different orders). mode "token_truncate": min(w, cap) per token; "token_mask": w where
    1/cap <= w <= cap, else 0; "sequence_*": the same with each row's w = exp(mean log-ratio over its
    tokens); "none": no weights (returns None). Masked tokens keep their place in the loss's
    denominator. Metrics (TRL's names) describe the raw per-token w over the response tokens.
    """
    if mode not in SAMPLER_CORRECTIONS:
        raise ValueError(f"unknown sampler correction {mode!r}; choose one of {SAMPLER_CORRECTIONS}")
    mask = mask.astype(bool)
    log_w = jnp.where(mask, trainer_logprobs - sampler_logprobs, 0.0)
    w = jnp.exp(log_w)
    any_token = mask.any()
    metrics = {
        "sampling/sampling_logp_difference/mean": masked_mean(jnp.abs(log_w), mask),
        "sampling/sampling_logp_difference/max": jnp.max(jnp.abs(log_w)),
        "sampling/importance_sampling_ratio/min": jnp.where(any_token, jnp.min(jnp.where(mask, w, jnp.inf)), 1.0),
        "sampling/importance_sampling_ratio/mean": masked_mean(w, mask),
        "sampling/importance_sampling_ratio/max": jnp.where(any_token, jnp.max(jnp.where(mask, w, -jnp.inf)), 1.0),
    }
    if mode == "none":
        return None, metrics
    if mode.startswith("sequence"):
        w = jnp.broadcast_to(jnp.exp(masked_mean(log_w, mask, axis=-1))[:, None], w.shape)
    if mode.endswith("truncate"):
        weights = jnp.minimum(w, cap)
    else:
        weights = jnp.where((w >= 1.0 / cap) & (w <= cap), w, 0.0)
    metrics["sampling/masked_frac" if mode.endswith("mask") else "sampling/truncated_frac"] = masked_mean(
        (weights != w).astype(jnp.float32), mask)
    return jax.lax.stop_gradient(jnp.where(mask, weights, 0.0)), metrics


def truncation_metrics(gap, mask):
    """`sampling/truncation_logp_gap/{mean,max}` over the response tokens: how much higher each sampled
    token's log-prob is under the top-k / top-p distribution it was drawn from than under the full one
    the trainer scores (-log of the mass the filters kept), a part of `sampling_logp_difference`."""
    mask = mask.astype(bool)
    return {"sampling/truncation_logp_gap/mean": masked_mean(gap, mask),
            "sampling/truncation_logp_gap/max": jnp.max(jnp.where(mask, gap, 0.0))}


def rollout_metrics(scores, kl, non_score_rewards, logprobs, mask):
    """The `objective/*` metrics of one rollout (TRL's definitions: sums over tokens, means over rows).

    scores: f32[batch]; kl, non_score_rewards, logprobs, mask: [batch, response_len].
    objective/entropy is the sampled-token estimate, mean over rows of -sum(logprobs).
    """
    mask = mask.astype(bool)
    row_sum = lambda x: jnp.sum(jnp.where(mask, x, 0.0), axis=-1)
    non_score = row_sum(non_score_rewards).mean()
    return {
        "objective/kl": row_sum(kl).mean(),
        "objective/entropy": row_sum(-logprobs).mean(),
        "objective/non_score_reward": non_score,
        "objective/rlhf_reward": scores.mean() + non_score,
        "objective/scores": scores.mean(),
    }


def lm_token_stats(outputs, tokens, *, temperature: float, head: Callable | None = None, logits_chunk: int = 0):
    """(log-probs of `tokens`, entropies): f32[b, n] each, from a forward's outputs at the positions
    that predict them: logits f[b, n, vocab] (`head` None), or hidden states f[b, n, d] that
    `head(hidden) -> logits` turns into logits (`logits_chunk` > 0: that many positions at a time).
    The logits are divided by the sampling temperature, exactly as the sampler did. The PPO loss and
    the update's scoring pass (old, reference log-probs) both go through here, so that on equal
    params and rows they agree bit for bit.
    """
    if head is not None and logits_chunk:
        return chunked_token_stats(outputs, lambda hidden: head(hidden) / temperature, tokens, logits_chunk)
    logits = (outputs if head is None else head(outputs)) / temperature
    return token_logprobs(logits, tokens), entropy_from_logits(logits)
