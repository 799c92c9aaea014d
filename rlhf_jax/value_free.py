"""Value-free policy-gradient updates on the PPO step's API: GRPO (and Dr. GRPO, DAPO, GSPO as its
options), RLOO and REINFORCE++.

    update = make_value_free_update(config, policy_graphdef=graphdef, eos_ids=(eos,))
    state, metrics = update(state, rollout, scores, frozen, reference)

The rollout holds `train.num_generations` (G) consecutive samples of each prompt (the trainer repeats
the prompts); the baseline is the group's. No value model or head is used. The reference's
log-probs (and, with `ppo.old_logprobs = "recompute"`, the policy's old ones) come from the same
scoring pass as PPO's (`rlhf_jax.update`); with `ppo.kl_coef = 0` the reference is never run.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import advantages as adv_lib
from rlhf_jax import kl as kl_lib
from rlhf_jax.ops import masked_mean
from rlhf_jax.ppo import clipped_pg_loss, kl_penalty_loss, lm_token_stats, minibatch_orders, ppo_update, sampler_weights
from rlhf_jax.rollout import Rollout, prompt_group
from rlhf_jax.update import (StateSharded, TrainState, _Forward, make_optimizer, make_ppo_update, normalize_scores,
                             resolve_old_logprobs, sequence_batch)

ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce_pp")


def sequence_advantages(algorithm: str, scores, group_size: int, scale_by_std: bool = True):
    """f32[batch] advantages of one score per sequence: GRPO's group baseline (divided by the
    group's std unless `scale_by_std` is False: Dr. GRPO) or RLOO's leave-one-out baseline."""
    if algorithm == "grpo":
        return adv_lib.grpo_advantages(scores, group_size, scale_by_std=scale_by_std)
    if algorithm == "rloo":
        return adv_lib.rloo_advantages(scores, group_size)
    raise ValueError(f"no sequence-level advantages for {algorithm!r}")


def reinforce_pp_advantages(scores, kl, mask, kl_coef: float, group_size: int):
    """REINFORCE++: per-token KL-shaped rewards, their return to the end (gamma 1), whitened over the
    whole batch; with groups (G > 1) the scores are first centred on their group's mean (its
    "baseline" variant)."""
    if group_size > 1:
        scores = adv_lib.grpo_advantages(scores, group_size, scale_by_std=False)
    rewards, _ = adv_lib.kl_shaped_rewards(scores, kl, mask, kl_coef)
    returns = jnp.flip(jnp.cumsum(jnp.flip(rewards, axis=1), axis=1), axis=1)
    return jnp.where(mask, adv_lib.masked_whiten(returns, mask), 0.0)


def make_update(config, *, policy_graphdef, ref_graphdef=None, value_graphdef=None, eos_ids: Sequence[int] = (),
                optimizer: optax.GradientTransformation | None = None, mesh=None):
    """The update of `config.algorithm`: PPO's (`update.make_ppo_update`) or a value-free one."""
    if config.algorithm == "ppo":
        return make_ppo_update(config, policy_graphdef=policy_graphdef, ref_graphdef=ref_graphdef,
                               value_graphdef=value_graphdef, eos_ids=eos_ids, optimizer=optimizer, mesh=mesh)
    return make_value_free_update(config, policy_graphdef=policy_graphdef, ref_graphdef=ref_graphdef, eos_ids=eos_ids,
                                  optimizer=optimizer, mesh=mesh)


def make_value_free_update(config, *, policy_graphdef, ref_graphdef=None, eos_ids: Sequence[int] = (),
                           optimizer: optax.GradientTransformation | None = None, mesh=None):
    """The jitted update of `config.algorithm` ("grpo", "rloo", "reinforce_pp"):
    `update(state, rollout, scores, frozen=None, reference=None) -> (state, metrics)`, as PPO's.

    Reads `config.ppo`: cliprange (low) and cliprange_high (0: the same), ratio_level ("token",
    "sequence": GSPO), loss_aggregation ("token": DAPO, "sequence": GRPO, "constant": Dr. GRPO),
    scale_rewards_by_std, mask_zero_std_groups (DAPO's dynamic sampling without refill),
    overlong_buffer / overlong_penalty (DAPO's soft length penalty), kl_coef with kl_in_loss and
    kl_loss_estimator (in the loss) or kl_estimator (in the reward), ent_coef, the epochs and
    minibatches, old_logprobs and the sampler correction.
    """
    p, r = config.ppo, config.reward
    algorithm = config.algorithm
    if algorithm not in ALGORITHMS[1:]:
        raise ValueError(f"config.algorithm = {algorithm!r}: the value-free ones are {ALGORITHMS[1:]}")
    group = config.train.num_generations
    optimizer = optimizer or make_optimizer(config)
    share = prompt_group(config, mesh)
    fwd = _Forward(config, policy_graphdef, ref_graphdef or policy_graphdef, None, mesh, value_head=False, group=share)
    recompute = resolve_old_logprobs(config) == "recompute"
    use_ref = p.kl_coef > 0
    kl_in_loss = use_ref and p.kl_in_loss
    estimator = kl_lib.get_estimator(p.kl_estimator)
    clip_low, clip_high = p.cliprange, p.cliprange_high or p.cliprange
    max_len = config.sampling.max_new_tokens
    eos_ids = tuple(int(e) for e in eos_ids)

    def loss_fn(frozen):
        forward, head = fwd.forward(frozen), fwd.head(frozen)

        def loss(params, mb):
            hidden, _ = forward(params, mb)
            logprobs, entropy = lm_token_stats(hidden, mb["response_ids"], temperature=fwd.temperature,
                                               head=lambda h: head(params, h), logits_chunk=fwd.logits_chunk)
            mask = mb["loss_mask"]
            pg, stats = clipped_pg_loss(logprobs, mb["logprobs"], mb["advantages"], mask, clip_low=clip_low,
                                        clip_high=clip_high, level=p.ratio_level, aggregation=p.loss_aggregation,
                                        max_len=max_len, weights=mb.get("sampler_weights"))
            total = pg - p.ent_coef * masked_mean(entropy, mask) if p.ent_coef else pg
            stats = {**stats, "loss/policy_avg": pg, "entropy": masked_mean(entropy, mask.astype(bool))}
            if kl_in_loss:
                kl = kl_penalty_loss(logprobs, mb["ref_logprobs"], mask, p.kl_loss_estimator,
                                     "token" if p.loss_aggregation == "constant" else p.loss_aggregation)
                total = total + p.kl_coef * kl
                stats["loss/kl_avg"] = kl
            return total, stats

        return loss

    def update(state: TrainState, rollout: Rollout, scores, frozen=None, reference=None):
        if use_ref and reference is None:
            raise ValueError("update(state, rollout, scores, frozen, reference): ppo.kl_coef > 0 needs the "
                             "reference policy's params")
        mask = rollout.response_mask.astype(bool)
        raw = r.scale * scores + r.bias
        scores, score_stats = normalize_scores(raw, state.score_stats, r.normalize)
        if p.missing_eos_penalty:
            scores = adv_lib.penalize_missing_eos(scores, rollout.response_ids, eos_ids, p.missing_eos_penalty)
        if p.overlong_buffer:
            scores = scores + adv_lib.overlong_penalty(rollout.lengths, max_len, p.overlong_buffer,
                                                       p.overlong_penalty)
        batch = sequence_batch(rollout)
        key, update_key = jax.random.split(state.key)
        orders = minibatch_orders(update_key, mask.shape[0], p.num_ppo_epochs, p.num_mini_batches, share)
        scored = fwd.score(state.params, frozen, reference, batch, orders[0], policy=recompute, values=False,
                           ref=use_ref) if (use_ref or recompute) else {}
        old_logprobs = scored["logprobs"] if recompute else rollout.logprobs
        kl = jnp.where(mask, estimator(old_logprobs, scored["ref_logprobs"]), 0.0) if use_ref else jnp.zeros(
            mask.shape, jnp.float32)
        reward_kl = 0.0 if kl_in_loss else p.kl_coef
        if algorithm == "reinforce_pp":
            advantages = reinforce_pp_advantages(scores, kl, mask, reward_kl, group)
        else:
            # KL in the reward, for a sequence-level baseline: the sequence's summed KL off its score.
            shaped = scores - reward_kl * jnp.sum(kl, axis=1)
            advantages = sequence_advantages(algorithm, shaped, group, p.scale_rewards_by_std)
        zero_std = adv_lib.zero_std_groups(scores, group) if group > 1 else jnp.zeros(scores.shape, bool)
        loss_mask = mask & ~zero_std[:, None] if p.mask_zero_std_groups else mask
        weights, sampling_metrics = sampler_weights(old_logprobs, rollout.logprobs, mask, p.sampler_correction,
                                                    p.sampler_correction_cap)
        batch.update(logprobs=old_logprobs, advantages=advantages, loss_mask=loss_mask)
        if use_ref:
            batch["ref_logprobs"] = scored["ref_logprobs"]
        if weights is not None:
            batch["sampler_weights"] = weights
        params, opt_state, stats = ppo_update(
            state.params, state.opt_state, batch, update_key, loss_fn=loss_fn(frozen), optimizer=optimizer,
            num_epochs=p.num_ppo_epochs, num_minibatches=p.num_mini_batches, shard_minibatch=fwd.shard_batch,
            group=share)
        row_kl = jnp.sum(kl, axis=1)
        lengths = rollout.lengths.astype(jnp.float32)
        metrics = {
            **stats, **sampling_metrics,
            "reward/mean": jnp.mean(raw), "reward/std": jnp.std(raw, ddof=1),
            "frac_reward_zero_std": jnp.mean(zero_std.astype(jnp.float32)),
            "completions/mean_length": jnp.mean(lengths),
            "completions/clipped_ratio": jnp.mean(
                ~jnp.any(jnp.isin(rollout.response_ids, jnp.asarray(eos_ids, jnp.int32)) & mask, axis=1)
                if eos_ids else jnp.ones(lengths.shape, bool)),
            "kl": masked_mean(kl, mask), "objective/kl": jnp.mean(row_kl),
            "objective/scores": jnp.mean(scores), "objective/kl_coef": jnp.float32(p.kl_coef),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, key=key,
                                  score_stats=score_stats)
        return new_state, metrics

    if mesh is None:
        return jax.jit(update, donate_argnums=(0,))
    return StateSharded(update, mesh)
