"""PPO losses, metrics and the update loop (epochs x minibatches under lax.scan).

Loss functions take per-token arrays `f32[batch, response_len]` and a mask, and
return `(loss, stats)`; padding never counts. Metric names follow TRL's PPO
trainer (`policy/clipfrac_avg`, `loss/value_avg`, ...).
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import optax

from rlhf_jax.kl import get_estimator
from rlhf_jax.ops import chunked_token_stats, entropy_from_logits, masked_mean, masked_var, token_logprobs

AGGREGATIONS = ("token", "sequence")
SAMPLER_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


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


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float, aggregation: str = "token",
                weights=None):
    """The clipped surrogate: mean of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    logprobs (new), old_logprobs (at rollout), advantages, mask: [batch, response_len].
    weights: per-token factors on the surrogate (the sampler correction's importance weights), or None.
    Returns (loss, stats) with stats clipfrac, approxkl (0.5 * mean log-ratio^2), ratio, ratio_var.
    """
    chex.assert_equal_shape([logprobs, old_logprobs, advantages, mask])
    mask = mask.astype(bool)
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    surrogate = jnp.maximum(unclipped, clipped)
    loss = aggregate(surrogate if weights is None else weights * surrogate, mask, aggregation)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approxkl": 0.5 * masked_mean(jnp.square(log_ratio), mask),
        "ratio": masked_mean(ratio, mask),
        "ratio_var": masked_var(ratio, mask, unbiased=False),
    }
    return loss, stats


def clipped_pg_loss(logprobs, old_logprobs, advantages, mask, *, clip_low: float, clip_high: float,
                    level: str = "token", aggregation: str = "token", max_len: int | None = None, weights=None):
    """The clipped surrogate of the value-free algorithms, with their published variations.

    advantages: f32[batch] (one per sequence, as group baselines give) or f32[batch, response_len].
    clip_low / clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high] (DAPO's clip-higher
    when clip_high > clip_low). level "token": a ratio per token (PPO, GRPO, DAPO); "sequence": one
    per sequence, exp of the mean log-ratio over its tokens (GSPO), applied to each of its tokens.
    aggregation "token": mean over every token of the batch (DAPO); "sequence": each row's mean, then
    the mean over rows (GRPO); "constant": the sum over tokens divided by batch x `max_len` (Dr. GRPO:
    no length bias). weights: per-token factors (the sampler correction), or None.
    Returns (loss, stats): clip_ratio/low_mean (ratio below 1 - clip_low where A < 0), high_mean
    (above 1 + clip_high where A > 0), region_mean (either), approxkl.
    """
    mask = mask.astype(bool)
    if advantages.ndim == 1:
        advantages = jnp.broadcast_to(advantages[:, None], mask.shape)
    chex.assert_equal_shape([logprobs, old_logprobs, advantages, mask])
    log_ratio = jnp.where(mask, logprobs - old_logprobs, 0.0)
    if level == "sequence":
        seq = masked_mean(log_ratio, mask, axis=-1)
        # GSPO-token: the sequence's ratio in value, each token's log-prob in the gradient.
        log_ratio = jax.lax.stop_gradient(seq)[:, None] + logprobs - jax.lax.stop_gradient(logprobs)
    elif level != "token":
        raise ValueError(f"unknown ratio level {level!r}; choose 'token' or 'sequence'")
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
    stats = {"clip_ratio/low_mean": masked_mean(low.astype(jnp.float32), mask),
             "clip_ratio/high_mean": masked_mean(high.astype(jnp.float32), mask),
             "clip_ratio/region_mean": masked_mean((low | high).astype(jnp.float32), mask),
             "approxkl": 0.5 * masked_mean(jnp.square(logprobs - old_logprobs), mask)}
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


def minibatch_orders(key, batch_size: int, num_epochs: int, num_minibatches: int, group: int = 1):
    """The rows of every minibatch `ppo_update` takes with `key`: int32[epochs, minibatches, rows],
    a fresh permutation each epoch; with `group` > 1, of whole groups of that many consecutive rows
    (which stay together and in order)."""
    if group == 1:
        permute = lambda k: jax.random.permutation(k, batch_size).reshape(num_minibatches, -1)
    else:
        permute = lambda k: (jax.random.permutation(k, batch_size // group)[:, None] * group
                             + jnp.arange(group)).reshape(num_minibatches, -1)
    return jax.vmap(permute)(jax.random.split(key, num_epochs))


def ppo_update(params, opt_state, batch: dict, key, *, loss_fn: Callable, optimizer: optax.GradientTransformation,
               num_epochs: int, num_minibatches: int, axis_name: str | None = None,
               shard_minibatch: Callable | None = None, group: int = 1):
    """`num_epochs` x `num_minibatches` optimizer steps over one rollout batch, all in lax.scan.

    Args:
      params, opt_state: what `optimizer` updates (any pytree).
      batch: dict of arrays with a leading batch axis (the rollout).
      key: PRNG key for the per-epoch permutations (a fresh one each epoch).
      loss_fn: `(params, minibatch) -> (loss, stats dict of scalars)`.
      optimizer: an optax transformation (gradient clipping and the schedule live in it).
      axis_name: under pmap/shard_map, gradients and stats are averaged over this axis.
      shard_minibatch: applied to every array of a selected minibatch (under jit on a mesh: a
        sharding constraint, since the random-permutation gather drops the batch axis' sharding).
      group: minibatches of whole groups of that many consecutive rows (`minibatch_orders`).
    Returns (params, opt_state, stats): stats are the means over every minibatch step,
    plus `grad_norm` (before clipping) and `nonfinite_steps` (steps whose gradient
    was not finite; those steps are skipped, and the caller decides to stop).
    """
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    if batch_size % num_minibatches:
        raise ValueError(f"batch of {batch_size} does not split into {num_minibatches} minibatches")
    mb_size = batch_size // num_minibatches
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def minibatch_step(carry, indices):
        params, opt_state = carry
        minibatch = jax.tree.map(lambda x: x[indices], batch)
        if shard_minibatch is not None:
            minibatch = jax.tree.map(shard_minibatch, minibatch)
        (loss, stats), grads = grad_fn(params, minibatch)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            stats = jax.lax.pmean(stats, axis_name)
            loss = jax.lax.pmean(loss, axis_name)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)

        def apply(params, opt_state):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # A non-finite step leaves params and optimizer state as they were. A cond, not a select
        # between old and new: with a select XLA copies every Adam moment before updating it.
        params, opt_state = jax.lax.cond(finite, apply, lambda *state: state, params, opt_state)
        stats = dict(stats, loss=loss, grad_norm=grad_norm, nonfinite_steps=(~finite).astype(jnp.float32))
        return (params, opt_state), stats

    orders = minibatch_orders(key, batch_size, num_epochs, num_minibatches, group)
    epoch_step = lambda carry, order: jax.lax.scan(minibatch_step, carry, order)
    (params, opt_state), stats = jax.lax.scan(epoch_step, (params, opt_state), orders)
    stats = jax.tree.map(jnp.mean, stats)
    stats["nonfinite_steps"] = stats["nonfinite_steps"] * num_epochs * num_minibatches
    return params, opt_state, stats


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


def lm_ppo_loss(forward: Callable, *, temperature: float, cliprange: float, cliprange_value: float,
                vf_coef: float, ent_coef: float = 0.0, aggregation: str = "token",
                kl_loss_coef: float = 0.0, kl_estimator: str = "k3", head: Callable | None = None,
                logits_chunk: int = 0) -> Callable:
    """The PPO loss of a language-model policy, as a `loss_fn` for `ppo_update`.

    `forward(params, minibatch) -> (logits f32[b, response_len, vocab], values f32[b, response_len])`
    gives the policy's logits at the positions that predict each response token
    and the value model's (or value head's) values there. The logits are divided
    by the sampling temperature, exactly as the sampler did, so the first ratio is 1.
    With `head(params, hidden) -> logits` and `logits_chunk` > 0, `forward` returns the hidden
    states f[b, response_len, d] instead, and the log-probs and entropies are computed
    `logits_chunk` positions at a time (`ops.chunked_token_stats`): the same values without
    the whole [b, response_len, vocab] logits in memory.

    The minibatch holds response_ids, response_mask, logprobs (old), values (old),
    advantages, returns, ref_logprobs when kl_loss_coef > 0, and optionally sampler_weights
    (per-token factors on the policy loss, see `sampler_weights`).
    """

    def loss_fn(params, mb: dict[str, Any]):
        outputs, values = forward(params, mb)
        mask = mb["response_mask"].astype(bool)
        logprobs, token_entropy = lm_token_stats(
            outputs, mb["response_ids"], temperature=temperature,
            head=None if head is None else (lambda hidden: head(params, hidden)), logits_chunk=logits_chunk)
        pg_loss, pg = policy_loss(logprobs, mb["logprobs"], mb["advantages"], mask, cliprange, aggregation,
                                  mb.get("sampler_weights"))
        vf_loss, vf = value_loss(values, mb["values"], mb["returns"], mask, cliprange_value, aggregation)
        entropy = masked_mean(token_entropy, mask)
        loss = pg_loss + vf_coef * vf_loss - ent_coef * entropy
        stats = {
            "policy/approxkl_avg": pg["approxkl"],
            "policy/clipfrac_avg": pg["clipfrac"],
            "policy/entropy_avg": entropy,
            "loss/policy_avg": pg_loss,
            "loss/value_avg": vf_loss,
            "val/clipfrac_avg": vf["clipfrac"],
            "val/ratio": pg["ratio"],
            "val/ratio_var": pg["ratio_var"],
        }
        if kl_loss_coef:
            kl = kl_penalty_loss(logprobs, mb["ref_logprobs"], mask, kl_estimator, aggregation)
            loss = loss + kl_loss_coef * kl
            stats["loss/kl_avg"] = kl
        return loss, stats

    return loss_fn
