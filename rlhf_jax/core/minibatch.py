"""The optimisation loop every update shares: epochs x minibatches of optimizer steps over one
rollout batch, all under lax.scan (PPO's inner loop, which the value-free algorithms run too)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.core.packing import MICRO_LOSS_SCOPE, sum_micro_batches


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
               shard_minibatch: Callable | None = None, group: int = 1, orders=None, per_step: dict | None = None):
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
      orders: int32[epochs, minibatches, rows], the rows of each step (default: `minibatch_orders` of
        `key`), e.g. where the host laid the minibatches out beforehand.
      per_step: arrays with leading [epochs, minibatches] axes, each step's own entries added to its
        minibatch (a packed layout: `rlhf_jax.core.packing.minibatch_layouts`). With `micro_steps`
        int32[epochs, minibatches] among them, the other arrays have a micro-batch axis after those
        two: each step runs `loss_fn` on its first `micro_steps` micro-batches (each micro-batch's
        entries added to the minibatch) and sums their losses, stats and gradients, so `loss_fn`
        returns each micro-batch's share of the minibatch's loss.
    Returns (params, opt_state, stats): stats are the means over every minibatch step,
    plus `grad_norm` (before clipping) and `nonfinite_steps` (steps whose gradient
    was not finite; those steps are skipped, and the caller decides to stop).
    """
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    if batch_size % num_minibatches:
        raise ValueError(f"batch of {batch_size} does not split into {num_minibatches} minibatches")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def minibatch_step(carry, step):
        params, opt_state = carry
        indices, own = step
        micro = "micro_steps" in own  # then `own` holds each micro-batch's entries
        minibatch = {**jax.tree.map(lambda x: x[indices], batch), **({} if micro else own)}
        if shard_minibatch is not None:
            minibatch = jax.tree.map(shard_minibatch, minibatch)
        if micro:
            (loss, stats), grads = sum_micro_batches(lambda part: grad_fn(params, {**minibatch, **part}), own,
                                                     MICRO_LOSS_SCOPE, shard_minibatch)
        else:
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

    if orders is None:
        orders = minibatch_orders(key, batch_size, num_epochs, num_minibatches, group)
    epoch_step = lambda carry, steps: jax.lax.scan(minibatch_step, carry, steps)
    (params, opt_state), stats = jax.lax.scan(epoch_step, (params, opt_state), (orders, per_step or {}))
    stats = jax.tree.map(jnp.mean, stats)
    stats["nonfinite_steps"] = stats["nonfinite_steps"] * num_epochs * num_minibatches
    return params, opt_state, stats
