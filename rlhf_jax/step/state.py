"""What an update carries from one iteration to the next, and the pure functions that make it:
the train state, the optimizer, the reward normalisation's statistics.

    state = init_train_state(config, {"policy": params}, make_optimizer(config))
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from rlhf_jax.core import kl as kl_lib
from rlhf_jax.models.tree import as_master


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # iterations done
    params: Any  # {"policy": nnx.State (the trainable part), "value": nnx.State (separate value model only)}
    opt_state: Any
    kl: kl_lib.KLController
    key: jax.Array  # uint32[2], split every iteration
    data_epoch: jax.Array
    data_offset: jax.Array
    # f32[3]: count, mean and sum of squared deviations of the scores: every score seen so far
    # (reward.normalize = "running") or the reference policy's samples' ("reference").
    score_stats: jax.Array


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW with warm-up, schedule and global-norm clipping from `config.optim`; the schedule spans
    every optimizer step of the run (iterations x epochs x minibatches)."""
    o = config.optim
    total = config.train.num_iterations * config.rl.num_ppo_epochs * config.rl.num_mini_batches
    decay_steps = max(total - o.warmup_steps, 1)
    if o.schedule == "constant":
        after = optax.constant_schedule(o.learning_rate)
    elif o.schedule == "linear":
        after = optax.linear_schedule(o.learning_rate, 0.0, decay_steps)
    else:
        after = optax.cosine_decay_schedule(o.learning_rate, decay_steps)
    schedule = optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps), after],
                                    [o.warmup_steps]) if o.warmup_steps else after
    parts = [optax.clip_by_global_norm(o.max_grad_norm)] if o.max_grad_norm else []
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    return optax.chain(*parts)


def init_train_state(config, params, optimizer: optax.GradientTransformation, score_stats=None) -> TrainState:
    """The state at iteration 0 (pure: works under `jax.eval_shape` and `jax.jit`).

    params: {"policy": trainable params} plus {"value": ...} for a separate value model; the state
    keeps them in float32 (master weights: a bf16 weight would drop every update below half its ulp,
    as RLHF learning rates make most of them), and the forward passes cast them to `model.param_dtype`;
    score_stats: f32[3] (count, mean, M2) of the reference policy's scores for reward.normalize = "reference".
    """
    p = config.rl
    params = as_master(params)
    if p.adaptive_kl:
        kl = kl_lib.adaptive_kl_controller(p.kl_coef, p.kl_target, p.kl_horizon)
    else:
        kl = kl_lib.fixed_kl_controller(p.kl_coef)
    stats = jnp.zeros((3,), jnp.float32) if score_stats is None else jnp.asarray(score_stats, jnp.float32)
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params), kl=kl,
                      key=jax.random.PRNGKey(config.seed), data_epoch=jnp.int32(0), data_offset=jnp.int32(0),
                      score_stats=stats)


def merge_stats(stats, x):
    """Chan et al.'s parallel update of (count, mean, M2) with a batch x: f32[n]."""
    count, mean, m2 = stats[0], stats[1], stats[2]
    n = jnp.float32(x.shape[0])
    batch_mean = jnp.mean(x)
    batch_m2 = jnp.sum(jnp.square(x - batch_mean))
    total = count + n
    delta = batch_mean - mean
    new_mean = mean + delta * n / total
    new_m2 = m2 + batch_m2 + jnp.square(delta) * count * n / total
    return jnp.stack([total, new_mean, new_m2])


def normalize_scores(scores, stats, mode: str):
    """Apply `reward.normalize` to raw scores f32[b]. Returns (scores, updated stats).

    "running": whiten by the mean and (sample) std of every score seen, this batch included;
    "reference": a fixed gain and offset from the reference policy's scores (mean 0, std 1 there);
    "none": as they are.
    """
    if mode == "running":
        stats = merge_stats(stats, scores)
        variance = stats[2] / jnp.maximum(stats[0] - 1.0, 1.0)
        return (scores - stats[1]) * jax.lax.rsqrt(variance + 1e-8), stats
    if mode == "reference":
        std = jnp.sqrt(stats[2] / jnp.maximum(stats[0], 1.0))
        std = jnp.where(std > 0, std, 1.0)
        return scores * (1.0 / std) - stats[1] / std, stats
    return scores, stats


def resolve_old_logprobs(config) -> str:
    """`config.rl.old_logprobs` with "auto" resolved: "recompute" unless the model computes in float32."""
    mode = config.rl.old_logprobs
    if mode == "auto":
        return "sampler" if config.model.dtype == "float32" else "recompute"
    return mode
