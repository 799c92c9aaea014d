"""The update of one rollout as a pure jitted function, one skeleton for every algorithm: PPO and the
value-free family (GRPO with Dr. GRPO, DAPO and GSPO as options, RLOO, REINFORCE++) are
configurations of it.

    update = make_update(config, policy_graphdef=graphdef, eos_ids=(eos,))
    state = init_train_state(config, {"policy": params}, make_optimizer(config))
    state, metrics = update(state, rollout, scores, frozen=None, reference=ref_params)

Every algorithm runs the same sequence; the config picks the parts:
  1. score transforms: `reward.scale`/`bias`, `reward.normalize`, the missing-EOS and overlong penalties;
  2. a scoring pass through the loss's own forward, without gradient: the reference's log-probs, the
     policy's own as the "old" ones (`rl.old_logprobs = "recompute"`), a separate critic's values;
  3. the per-token KL estimate to the reference (`rl.kl_estimator`);
  4. the advantage estimator (`advantage_estimator`): GAE over KL-shaped rewards with a critic (PPO),
     a group baseline over the sequences' scores (GRPO, RLOO), or REINFORCE++'s whitened returns;
  5. the epochs x minibatches of the loss (`make_loss`): the clipped surrogate (token or sequence
     ratios, symmetric or clip-higher), the value loss where there is a critic, the entropy bonus,
     the KL penalty when it is in the loss; the sampler's importance weights on the surrogate;
  6. the KL controller's step.
The rollout holds `train.num_generations` consecutive samples of each prompt (the group of the
value-free baselines). Everything the update reads is an argument or in the state, and the factory
needs the config, graphdefs and the mesh only, so the update compiles ahead of time from shapes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from rlhf_jax.config import uses_value
from rlhf_jax.core import advantages as adv_lib
from rlhf_jax.core import kl as kl_lib
from rlhf_jax.core.losses import (
    clipped_surrogate,
    kl_penalty_loss,
    rollout_metrics,
    sampler_weights,
    truncation_metrics,
    value_loss,
)
from rlhf_jax.core.minibatch import minibatch_orders, ppo_update
from rlhf_jax.core.ops import masked_mean
from rlhf_jax.core.packing import minibatch_layouts
from rlhf_jax.parallel.sharding import replicated, state_shardings
from rlhf_jax.sampling.rollout import Rollout, prompt_group
from rlhf_jax.step.forward import TrainingForward, sequence_batch
from rlhf_jax.step.state import TrainState, make_optimizer, normalize_scores, resolve_old_logprobs

# The loss's statistics under the names of TRL's trainer for each kind: RLTrainer's with a critic,
# GRPOTrainer's without.
_CRITIC_STATS = {"clipfrac": "policy/clipfrac_avg", "approxkl": "policy/approxkl_avg", "ratio": "val/ratio",
                 "ratio_var": "val/ratio_var", "entropy": "policy/entropy_avg"}
_VALUE_FREE_STATS = {"clipfrac": "clip_ratio/region_mean", "clip_low_frac": "clip_ratio/low_mean",
                     "clip_high_frac": "clip_ratio/high_mean", "approxkl": "approxkl", "entropy": "entropy"}


def advantage_estimator(config) -> Callable:
    """The advantages of `config.algorithm`: `estimate(scores, kl, mask, values, kl_coef) -> (advantages,
    returns or None)`. `kl` is the per-token estimate, `kl_coef` its weight in the reward (0 when the
    KL is in the loss), `values` the critic's (PPO only)."""
    p, algorithm, group = config.rl, config.algorithm, config.train.num_generations
    if algorithm == "ppo":
        def gae(scores, kl, mask, values, kl_coef):
            rewards, _ = adv_lib.kl_shaped_rewards(scores, kl, mask, kl_coef)
            if p.whiten_rewards:
                rewards = adv_lib.masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = adv_lib.gae(rewards, values, mask, p.gamma, p.lam)
            if p.whiten_advantages:
                advantages = jnp.where(mask, adv_lib.masked_whiten(advantages, mask), 0.0)
            return advantages, returns
        return gae
    if algorithm == "reinforce_pp":
        return lambda scores, kl, mask, values, kl_coef: (
            adv_lib.reinforce_pp_advantages(scores, kl, mask, kl_coef, group), None)

    def group_baseline(scores, kl, mask, values, kl_coef):
        # KL in the reward, for a sequence-level baseline: the sequence's summed KL off its score.
        shaped = scores - kl_coef * jnp.sum(kl, axis=1)
        if algorithm == "rloo":
            return adv_lib.rloo_advantages(shaped, group), None
        return adv_lib.grpo_advantages(shaped, group, scale_by_std=p.scale_rewards_by_std), None
    return group_baseline


def micro_shares(mask, gather):
    """A packed (micro-)batch's part of its minibatch: the loss mask of the samples' tokens it holds
    (`gather` >= 0), and, by aggregation mode, the share of the minibatch's mean that its own mean is
    (token: its tokens over the minibatch's; sequence: its sequences over the minibatch's; constant:
    1, the divisor being fixed). Summed over a minibatch's micro-batches, the shared means are the
    minibatch's means (all but the ratio's variance, which comes out as the token-weighted mean of the
    micro-batches' variances); for a whole packed minibatch every share is exactly 1."""
    full, mask = mask, mask & (gather >= 0)
    ratio = lambda part, whole: jnp.sum(part) / jnp.maximum(jnp.sum(whole), 1)
    return mask, {"token": ratio(mask, full), "sequence": ratio(mask.any(-1), full.any(-1)), "constant": 1.0}


def make_loss(config, fwd: TrainingForward, frozen, kl_coef) -> Callable:
    """The loss of one minibatch, `loss(params, minibatch) -> (loss, stats)`, for `ppo_update`: the
    clipped surrogate of the policy's log-probs (from `fwd`, divided by the sampling temperature as the
    sampler did), minus `rl.ent_coef` x the entropy, plus `rl.vf_coef` x the clipped value loss with
    a critic, plus `kl_coef` x the KL penalty when it is in the loss (`rl.kl_in_loss`).

    The minibatch holds response_ids, response_mask, logprobs (old), advantages; loss_mask where
    groups without signal are masked out (`rl.mask_zero_std_groups`; else the response mask counts);
    values and returns with a critic; ref_logprobs with the KL in the loss; sampler_weights with a
    sampler correction.
    """
    p, critic = config.rl, fwd.value_head
    forward, head = fwd.forward(frozen), fwd.head(frozen)
    names = _CRITIC_STATS if critic else _VALUE_FREE_STATS

    def loss(params, mb):
        outputs, values = forward(params, mb)
        logprobs, token_entropy = fwd.token_stats(outputs, mb, lambda h: head(params, h))
        mask = mb["loss_mask"] if "loss_mask" in mb else mb["response_mask"].astype(bool)
        share = {}  # by aggregation mode: the part of the minibatch's mean this (micro-)batch holds
        if "gather" in mb:
            mask, share = micro_shares(mask, mb["gather"])
        part = lambda x, mode="token": x * share[mode] if share else x
        pg, pg_stats = clipped_surrogate(logprobs, mb["logprobs"], mb["advantages"], mask, clip_low=p.cliprange,
                                         clip_high=p.cliprange_high or p.cliprange, level=p.ratio_level,
                                         aggregation=p.loss_aggregation, max_len=config.sampling.max_new_tokens,
                                         weights=mb.get("sampler_weights"))
        pg = part(pg, p.loss_aggregation)
        entropy = part(masked_mean(token_entropy, mask))
        total = pg - p.ent_coef * entropy if p.ent_coef else pg
        stats = {names[k]: part(v) if k != "entropy" else v for k, v in {**pg_stats, "entropy": entropy}.items()
                 if k in names}
        stats["loss/policy_avg"] = pg
        if critic:
            vf, vf_stats = value_loss(values, mb["values"], mb["returns"], mask, p.cliprange_value, p.loss_aggregation)
            vf = part(vf, p.loss_aggregation)
            total = total + p.vf_coef * vf
            stats.update({"loss/value_avg": vf, "val/clipfrac_avg": part(vf_stats["clipfrac"])})
        if "ref_logprobs" in mb and p.kl_in_loss:
            kl_mode = "token" if p.loss_aggregation == "constant" else p.loss_aggregation
            kl = part(kl_penalty_loss(logprobs, mb["ref_logprobs"], mask, p.kl_loss_estimator, kl_mode), kl_mode)
            total = total + kl_coef * kl
            stats["loss/kl_avg"] = kl
        return total, stats

    return loss


def make_update(config, *, policy_graphdef, ref_graphdef=None, value_graphdef=None, eos_ids: Sequence[int] = (),
                optimizer: optax.GradientTransformation | None = None, mesh=None):
    """The jitted update of `config.algorithm`: `update(state, rollout, scores, frozen=None, reference=None,
    packing=None) -> (state, metrics)`.

    Reads `config.rl` (the options of every algorithm; the README's table names the published method
    of each combination), `config.reward` (scale, bias, normalize), `config.sampling` (temperature,
    max_new_tokens) and `config.model` (param_dtype and the memory levers remat, logits_chunk,
    shard_activations).
    `reference`: the reference policy's params, for `ref_graphdef` (default: the policy's graphdef; then,
    with `frozen`, a snapshot of the trainable part only, merged with `frozen`); not needed by a
    value-free algorithm with `rl.kl_coef = 0`, which never runs the reference.
    `frozen`: the policy's params outside the state (a LoRA base), merged in for the forward.
    `scores`: f32[b], one per rollout row. `packing` (with `train.pack_tokens`): the minibatches' orders
    and packed layouts from `packed_minibatches`; the forwards then run packed rows, and every per-token
    quantity comes back in the padded layout, equal to the unpacked update's up to float rounding.
    `value_graphdef`: PPO's separate critic (its params are
    `state.params["value"]`); without it the policy's value head serves. `eos_ids` serve the
    missing-EOS penalty and the clipped-ratio metric. The state is donated; on a `mesh` the new state
    keeps the partition rules.

    On equal params the policy and the reference give equal log-probs (step 0's KL is exactly 0) and
    the first minibatch's ratio is exactly 1 under "recompute", whatever the rounding of the sampler.
    """
    p, r = config.rl, config.reward
    critic = uses_value(config)
    optimizer = optimizer or make_optimizer(config)
    share = 1 if critic else prompt_group(config, mesh)
    fwd = TrainingForward(config, policy_graphdef, ref_graphdef or policy_graphdef,
                          value_graphdef if critic else None, mesh, value_head=critic, group=share)
    recompute = resolve_old_logprobs(config) == "recompute"
    # PPO always measures the KL (its metric, its controller); the value-free algorithms skip the
    # reference's forward when it has no weight.
    use_ref = critic or p.kl_coef > 0
    estimate = advantage_estimator(config)
    estimator = kl_lib.get_estimator(p.kl_estimator)
    group = config.train.num_generations
    eos_ids = tuple(int(e) for e in eos_ids)

    def update(state: TrainState, rollout: Rollout, scores, frozen=None, reference=None, packing=None):
        if use_ref and reference is None:
            raise ValueError("update(state, rollout, scores, frozen, reference): the reference policy's params "
                             "are needed (its log-probs are taken here, by the loss's own forward)")
        mask = rollout.response_mask.astype(bool)
        raw = r.scale * scores + r.bias
        scores, score_stats = normalize_scores(raw, state.score_stats, r.normalize)
        if p.missing_eos_penalty:
            scores = adv_lib.penalize_missing_eos(scores, rollout.response_ids, eos_ids, p.missing_eos_penalty)
        if p.overlong_buffer:
            scores = scores + adv_lib.overlong_penalty(rollout.lengths, config.sampling.max_new_tokens,
                                                       p.overlong_buffer, p.overlong_penalty)
        batch = sequence_batch(rollout)
        key, update_key = jax.random.split(state.key)
        if packing is None:
            orders, per_step = minibatch_orders(update_key, mask.shape[0], p.num_ppo_epochs, p.num_mini_batches,
                                                share), None
        else:
            orders, per_step = packing["orders"], {k: v for k, v in packing.items() if k != "orders"}
        separate_critic = critic and value_graphdef is not None
        scored = fwd.score(state.params, frozen, reference, batch, orders[0], policy=recompute,
                           values=critic and recompute or separate_critic, ref=use_ref,
                           packed=None if per_step is None else jax.tree.map(lambda x: x[0], per_step),
                           ) if use_ref or recompute else {}  # a critic always runs the reference
        old_logprobs = scored["logprobs"] if recompute else rollout.logprobs
        kl = (jnp.where(mask, estimator(old_logprobs, scored["ref_logprobs"]), 0.0) if use_ref
              else jnp.zeros(mask.shape, jnp.float32))
        kl_coef = state.kl.kl_coef
        reward_kl_coef = 0.0 if p.kl_in_loss else kl_coef  # with the KL in the loss the reward carries none
        values = jnp.where(mask, scored["values"] if "values" in scored else rollout.values, 0.0) if critic else None
        advantages, returns = estimate(scores, kl, mask, values, reward_kl_coef)
        zero_std = adv_lib.zero_std_groups(scores, group) if group > 1 else jnp.zeros(scores.shape, bool)
        weights, sampling_metrics = sampler_weights(old_logprobs, rollout.logprobs, mask, p.sampler_correction,
                                                    p.sampler_correction_cap)
        batch.update(logprobs=old_logprobs, advantages=advantages)
        if p.mask_zero_std_groups:
            batch["loss_mask"] = mask & ~zero_std[:, None]
        if critic:
            batch.update(values=values, returns=returns)
        if use_ref and p.kl_in_loss:
            batch["ref_logprobs"] = scored["ref_logprobs"]
        if weights is not None:
            batch["sampler_weights"] = weights
        params, opt_state, stats = ppo_update(
            state.params, state.opt_state, batch, update_key, loss_fn=make_loss(config, fwd, frozen, kl_coef),
            optimizer=optimizer, num_epochs=p.num_ppo_epochs, num_minibatches=p.num_mini_batches,
            shard_minibatch=fwd.shard_batch, group=share, orders=orders, per_step=per_step)
        metrics = {**stats, **sampling_metrics, "objective/kl_coef": kl_coef}
        if rollout.truncation_gap is not None:  # top-k / top-p: the part of the difference the filters make
            metrics.update(truncation_metrics(rollout.truncation_gap, mask))
        if critic:  # TRL's PPOTrainer's
            non_score = jnp.where(mask, -reward_kl_coef * kl, 0.0)
            metrics.update(rollout_metrics(scores, kl, non_score, old_logprobs, mask))
            metrics["val/mean"] = jnp.sum(values) / jnp.maximum(mask.sum(), 1)
            metrics["val/returns_mean"] = jnp.sum(returns) / jnp.maximum(mask.sum(), 1)
        else:  # TRL's GRPOTrainer's
            lengths = rollout.lengths.astype(jnp.float32)
            ended = jnp.any(jnp.isin(rollout.response_ids, jnp.asarray(eos_ids, jnp.int32)) & mask, axis=1)
            metrics.update({
                "reward/mean": jnp.mean(raw), "reward/std": jnp.std(raw, ddof=1),
                "frac_reward_zero_std": jnp.mean(zero_std.astype(jnp.float32)),
                "completions/mean_length": jnp.mean(lengths),
                "completions/clipped_ratio": jnp.mean(~ended if eos_ids else jnp.ones(lengths.shape, bool)),
                "kl": masked_mean(kl, mask), "objective/kl": jnp.mean(jnp.sum(kl, axis=1)),
                "objective/scores": jnp.mean(scores)})
        new_kl = kl_lib.update_kl_controller(state.kl, metrics["objective/kl"], scores.shape[0])
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, kl=new_kl, key=key,
                                  score_stats=score_stats)
        return new_state, metrics

    if mesh is None:
        return jax.jit(update, donate_argnums=(0,))
    return StateSharded(update, mesh)


def packed_minibatches(config, state_key, rollout: Rollout, pad_id: int = 0, unit: int = 1) -> dict:
    """The `packing` argument of the update (`make_update`) for `config.train.pack_tokens` > 0, laid out
    on the host: the minibatch orders the update would draw from `state_key` (the train state's key),
    and each minibatch's samples packed into rows of `pack_tokens` tokens (`minibatch_layouts`; the
    packed row counts a multiple of `unit`, the devices that split them)."""
    p = config.rl
    orders = np.asarray(minibatch_orders(jax.random.split(state_key)[1], rollout.response_mask.shape[0],
                                         p.num_ppo_epochs, p.num_mini_batches))
    # Every process lays out the whole batch, the same way (with several, each first gathers the
    # token arrays, a few bytes a token): the layout is an argument every process passes alike.
    arrays = [np.asarray(x) if x.is_fully_addressable else np.asarray(multihost_utils.process_allgather(x, tiled=True))
              for x in (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)]
    return {"orders": orders, **minibatch_layouts(*arrays, orders, config.train.pack_tokens, pad_id, unit,
                                                  config.train.micro_rows)}


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
