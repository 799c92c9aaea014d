"""The PPO update of one rollout as a pure jitted function, and the train state it carries.

    update = make_ppo_update(config, policy_graphdef=graphdef, eos_ids=(eos,))
    state = init_train_state(config, {"policy": params}, make_optimizer(config))
    state, metrics = update(state, rollout, scores)

`update` does KL-shaped rewards, GAE, whitening, the PPO epochs x minibatches and the KL
controller step. Everything it reads is an argument or in the state (the reward normalisation's
statistics too), and the factory needs the config, graphdefs and the mesh only, so the update can
be compiled ahead of time from shapes.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlhf_jax import advantages as adv_lib
from rlhf_jax import kl as kl_lib
from rlhf_jax.ppo import lm_ppo_loss, ppo_update, rollout_metrics
from rlhf_jax.rollout import Rollout, response_positions, sequence_values
from rlhf_jax.sharding import batch_constraint, replicated, state_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # PPO iterations done
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
    total = config.train.num_iterations * config.ppo.num_ppo_epochs * config.ppo.num_mini_batches
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

    params: {"policy": trainable params} plus {"value": ...} for a separate value model;
    score_stats: f32[3] (count, mean, M2) of the reference policy's scores for reward.normalize = "reference".
    """
    p = config.ppo
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


def make_ppo_update(config, *, policy_graphdef, value_graphdef=None, eos_ids: Sequence[int] = (),
                    optimizer: optax.GradientTransformation | None = None, mesh=None):
    """The jitted PPO update: `update(state, rollout, scores, frozen=None) -> (state, metrics)`.

    Reads `config.ppo`, `config.reward` (scale, bias, normalize), `config.sampling.temperature` and the
    memory levers of `config.model` (remat, logits_chunk, shard_activations).
    `frozen`: the policy's params outside the state (a LoRA base), merged in for the forward.
    `scores`: f32[b], one per rollout row. `value_graphdef`: a separate value model (its params are
    `state.params["value"]`); without it the policy's value head serves. `eos_ids` serve the
    missing-EOS penalty. The state is donated; on a `mesh` the new state keeps the partition rules.
    """
    p, r = config.ppo, config.reward
    temperature = config.sampling.temperature
    optimizer = optimizer or make_optimizer(config)
    shared_value = value_graphdef is None
    estimator = kl_lib.get_estimator(p.kl_estimator)
    eos_ids = tuple(int(e) for e in eos_ids)

    m = config.model
    shard_batch = batch_constraint(mesh) if mesh is not None and m.shard_activations else None
    backbone_options = dict(remat=m.remat, constrain=shard_batch)

    def loss_fn(frozen, prompt_len: int, response_len: int):
        policy = lambda params: nnx.merge(policy_graphdef, *((params["policy"],) if frozen is None
                                                             else (params["policy"], frozen)))

        def forward(params, mb):
            """Hidden states (the head runs in the loss, in chunks if asked) and values."""
            ids = jnp.concatenate([mb["prompt_ids"], mb["response_ids"]], axis=1)
            mask = jnp.concatenate([mb["prompt_mask"], mb["response_mask"]], axis=1)
            model = policy(params)
            hidden, _ = model.backbone(ids, mask, output_index=response_positions(prompt_len, response_len),
                                       **backbone_options)
            if shared_value:
                return hidden, model.values(hidden)
            return hidden, sequence_values(value_graphdef, params["value"], ids, mask, response_len,
                                           **backbone_options)

        return lm_ppo_loss(forward, temperature=temperature, cliprange=p.cliprange,
                           cliprange_value=p.cliprange_value, vf_coef=p.vf_coef, ent_coef=p.ent_coef,
                           aggregation=p.loss_aggregation, kl_loss_coef=1.0 if p.kl_in_loss else 0.0,
                           kl_estimator=p.kl_loss_estimator, head=lambda params, h: policy(params).logits(h),
                           logits_chunk=m.logits_chunk)

    def update(state: TrainState, rollout: Rollout, scores, frozen=None):
        mask = rollout.response_mask.astype(bool)
        scores, score_stats = normalize_scores(r.scale * scores + r.bias, state.score_stats, r.normalize)
        if p.missing_eos_penalty:
            scores = adv_lib.penalize_missing_eos(scores, rollout.response_ids, eos_ids, p.missing_eos_penalty)
        kl = jnp.where(mask, estimator(rollout.logprobs, rollout.ref_logprobs), 0.0)
        # With the KL in the loss (GRPO style) the reward carries no KL term.
        reward_kl_coef = 0.0 if p.kl_in_loss else state.kl.kl_coef
        rewards, non_score = adv_lib.kl_shaped_rewards(scores, kl, mask, reward_kl_coef)
        if p.whiten_rewards:
            rewards = adv_lib.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = adv_lib.gae(rewards, rollout.values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = jnp.where(mask, adv_lib.masked_whiten(advantages, mask), 0.0)
        batch = {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
                 "response_ids": rollout.response_ids, "response_mask": rollout.response_mask,
                 "logprobs": rollout.logprobs, "ref_logprobs": rollout.ref_logprobs, "values": rollout.values,
                 "advantages": advantages, "returns": returns}
        key, update_key = jax.random.split(state.key)
        prompt_len, response_len = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
        params, opt_state, stats = ppo_update(
            state.params, state.opt_state, batch, update_key, loss_fn=loss_fn(frozen, prompt_len, response_len),
            optimizer=optimizer, num_epochs=p.num_ppo_epochs, num_minibatches=p.num_mini_batches,
            shard_minibatch=shard_batch)
        metrics = rollout_metrics(scores, kl, non_score, rollout.logprobs, mask)
        new_kl = kl_lib.update_kl_controller(state.kl, metrics["objective/kl"], scores.shape[0])
        metrics.update(stats)
        metrics["objective/kl_coef"] = state.kl.kl_coef
        metrics["val/mean"] = jnp.sum(jnp.where(mask, rollout.values, 0.0)) / jnp.maximum(mask.sum(), 1)
        metrics["val/returns_mean"] = jnp.sum(returns) / jnp.maximum(mask.sum(), 1)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, kl=new_kl, key=key,
                                  score_stats=score_stats)
        return new_state, metrics

    if mesh is None:
        return jax.jit(update, donate_argnums=(0,))
    return StateSharded(update, mesh)


class StateSharded:
    """`jax.jit(fn, donate_argnums=0)` for `fn(state, ...) -> (state, metrics)` whose output state has
    the partition rules' shardings (and the metrics are replicated).

    The rules need the state's tree, which the factory does not have: the jitted function is made
    at the first call (or `lower`) for each state structure. The state that comes out carries the
    very shardings that went in, so the next call reuses the compiled program.
    """

    def __init__(self, fn, mesh):
        self.fn, self.mesh, self._jitted = fn, mesh, {}

    def _get(self, state):
        treedef = jax.tree.structure(state)
        if treedef not in self._jitted:
            out_shardings = (state_shardings(state, self.mesh), replicated(self.mesh))
            self._jitted[treedef] = jax.jit(self.fn, donate_argnums=(0,), out_shardings=out_shardings)
        return self._jitted[treedef]

    def __call__(self, state, *args, **kwargs):
        return self._get(state)(state, *args, **kwargs)

    def lower(self, state, *args, **kwargs):
        return self._get(state).lower(state, *args, **kwargs)

    def _cache_size(self) -> int:
        return sum(f._cache_size() for f in self._jitted.values())
