"""KL-shaped per-token rewards, GAE, whitening and group-relative baselines.

Pure functions over arrays; every mask is honoured (masked tokens are the
padding after a response's EOS). Shapes: `[batch, response_len]` per token,
`[batch]` per sequence.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.core.ops import last_token_index, masked_mean, masked_var


def kl_shaped_rewards(scores, kl, mask, kl_coef):
    """Per-token rewards: -kl_coef * kl_t on every response token, plus the score on the last real one.

    Args:
      scores: f32[batch], one score per response.
      kl: f32[batch, response_len], a per-token KL estimate (see rlhf_jax.core.kl).
      mask: [batch, response_len], 1 on response tokens (EOS included).
      kl_coef: scalar.
    Returns (rewards, non_score_rewards), both f32[batch, response_len], 0 where masked.
    A row with no response token gets no score.
    """
    chex.assert_rank([scores, kl, mask], [1, 2, 2])
    chex.assert_equal_shape([kl, mask])
    mask = mask.astype(bool)
    non_score = jnp.where(mask, -kl_coef * kl, 0.0)
    last = last_token_index(mask)
    at_last = (jnp.arange(mask.shape[1])[None, :] == last[:, None]) & mask
    rewards = non_score + jnp.where(at_last, scores[:, None], 0.0)
    return rewards, non_score


def penalize_missing_eos(scores, response_ids, eos_ids, penalty):
    """Subtract `penalty` from the score of every response that contains no EOS token.

    scores: f32[batch]; response_ids: int[batch, response_len]; eos_ids: sequence of ints.
    """
    has_eos = jnp.any(jnp.isin(response_ids, jnp.asarray(eos_ids)), axis=-1)
    return jnp.where(has_eos, scores, scores - penalty)


def masked_whiten(x, mask, shift_mean: bool = True, axis_name: str | None = None, eps: float = 1e-8):
    """(x - mean) / std over the masked entries; entries outside the mask are returned unchanged.

    With shift_mean=False the mean is added back (only the scale changes), as for
    reward whitening. With `axis_name` the statistics are taken over that mapped axis too.
    """
    mask = mask.astype(bool)
    mean = masked_mean(x, mask, axis_name=axis_name)
    var = masked_var(x, mask, axis_name=axis_name)
    whitened = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask, whitened, x)


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalized advantage estimation over the masked tokens.

    Args:
      rewards, values: f32[batch, response_len]; values[t] is V(state before token t).
      mask: [batch, response_len]; masked tokens are skipped (the value after the
        last real token is 0: the episode ends there).
      gamma, lam: discount and GAE lambda.
    Returns (advantages, returns), f32[batch, response_len], 0 where masked;
    returns = advantages + values.
    """
    chex.assert_equal_shape([rewards, values, mask])
    mask = mask.astype(bool)

    def step(carry, xs):
        next_adv, next_value = carry
        reward, value, live = xs
        delta = reward + gamma * next_value - value
        adv = delta + gamma * lam * next_adv
        carry = (jnp.where(live, adv, next_adv), jnp.where(live, value, next_value))
        return carry, jnp.where(live, adv, 0.0)

    batch = rewards.shape[0]
    init = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.float32))
    xs = (rewards.T.astype(jnp.float32), values.T.astype(jnp.float32), mask.T)
    _, advantages = jax.lax.scan(step, init, xs, reverse=True)
    advantages = advantages.T
    returns = jnp.where(mask, advantages + values, 0.0)
    return advantages, returns


def _groups(scores, group_size: int):
    chex.assert_rank(scores, 1)
    if scores.shape[0] % group_size:
        raise ValueError(f"batch of {scores.shape[0]} scores does not split into groups of {group_size}")
    return scores.reshape(-1, group_size)


def grpo_advantages(scores, group_size: int, eps: float = 1e-4, scale_by_std: bool = True):
    """(score - group mean) / (group std + eps), rows grouped consecutively by prompt.

    scores: f32[batch] with batch = n_prompts * group_size -> f32[batch]. The std is
    the unbiased one (as torch.std in the GRPO reference code). `scale_by_std=False` keeps the
    centred scores (Dr. GRPO: the std division weights easy and hard prompts unequally).
    """
    groups = _groups(scores, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if scale_by_std:
        centred = centred / (groups.std(axis=1, ddof=1, keepdims=True) + eps)
    return centred.reshape(-1)


def zero_std_groups(scores, group_size: int):
    """bool[batch]: rows whose group's scores are all equal (no learning signal: DAPO's dynamic
    sampling drops them)."""
    groups = _groups(scores, group_size)
    same = jnp.all(groups == groups[:, :1], axis=1, keepdims=True)
    return jnp.broadcast_to(same, groups.shape).reshape(-1)


def overlong_penalty(lengths, max_len: int, buffer: int, penalty: float = 1.0):
    """DAPO's soft overlong punishment, f32[batch]: 0 up to max_len - buffer tokens, then falling
    linearly to -penalty at max_len (the sampler's limit)."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer {buffer} must be in (0, max_len = {max_len}]")
    excess = lengths.astype(jnp.float32) - (max_len - buffer)
    return -penalty * jnp.clip(excess / buffer, 0.0, 1.0)


def rloo_advantages(scores, group_size: int):
    """score - mean of the other samples of the same prompt (leave-one-out baseline)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    groups = _groups(scores, group_size)
    others = (groups.sum(axis=1, keepdims=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def reinforce_pp_advantages(scores, kl, mask, kl_coef: float, group_size: int):
    """REINFORCE++: per-token KL-shaped rewards, their return to the end (gamma 1), whitened over the
    whole batch; with groups (G > 1) the scores are first centred on their group's mean (its
    "baseline" variant)."""
    if group_size > 1:
        scores = grpo_advantages(scores, group_size, scale_by_std=False)
    rewards, _ = kl_shaped_rewards(scores, kl, mask, kl_coef)
    returns = jnp.flip(jnp.cumsum(jnp.flip(rewards, axis=1), axis=1), axis=1)
    return jnp.where(mask, masked_whiten(returns, mask), 0.0)
