"""The PPO update of one rollout as a pure jitted function, and the train state it carries.

    update = make_ppo_update(config, policy_graphdef=graphdef, eos_ids=(eos,))
    state = init_train_state(config, {"policy": params}, make_optimizer(config))
    state, metrics = update(state, rollout, scores, reference=ref_params)

`update` scores the rollout with the training forward (the reference's log-probs, and the policy's
own where they serve as PPO's old log-probs), then does KL-shaped rewards, GAE, whitening, the PPO
epochs x minibatches and the KL controller step. Everything it reads is an argument or in the state (the reward normalisation's
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
from rlhf_jax.attention import make_attend
from rlhf_jax.models.tree import as_master, cast_floats
from rlhf_jax.ppo import lm_ppo_loss, lm_token_stats, minibatch_orders, ppo_update, rollout_metrics, sampler_weights
from rlhf_jax.rollout import Rollout, join, response_positions, sequence_values
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

    params: {"policy": trainable params} plus {"value": ...} for a separate value model; the state
    keeps them in float32 (master weights: a bf16 weight would drop every update below half its ulp,
    as RLHF learning rates make most of them), and the forward passes cast them to `model.param_dtype`;
    score_stats: f32[3] (count, mean, M2) of the reference policy's scores for reward.normalize = "reference".
    """
    p = config.ppo
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
    """`config.ppo.old_logprobs` with "auto" resolved: "recompute" unless the model computes in float32."""
    mode = config.ppo.old_logprobs
    if mode == "auto":
        return "sampler" if config.model.dtype == "float32" else "recompute"
    return mode


def sequence_batch(rollout: Rollout) -> dict:
    """The token arrays of a rollout that a training forward reads, as the minibatch dict."""
    return {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
            "response_ids": rollout.response_ids, "response_mask": rollout.response_mask}


class _Forward:
    """The training forward of a run's policy (and reference, and value model), shared by the loss and
    the scoring pass so that both are one program: on equal params and rows, equal bits."""

    def __init__(self, config, policy_graphdef, ref_graphdef, value_graphdef, mesh, value_head: bool = True,
                 group: int = 1):
        m = config.model
        self.group = group  # rows per prompt run once through the backbone (`prompt_group`)
        self.value_head = value_head
        self.policy_graphdef, self.ref_graphdef, self.value_graphdef = policy_graphdef, ref_graphdef, value_graphdef
        self.param_dtype = jnp.dtype(m.param_dtype)
        self.temperature, self.logits_chunk = config.sampling.temperature, m.logits_chunk
        self.shard_batch = batch_constraint(mesh) if mesh is not None and m.shard_activations else None
        self.backbone_options = dict(remat=m.remat, constrain=self.shard_batch)
        self.attention, self.mesh = m.attention, mesh

    def hidden(self, model, mb):
        """The backbone's hidden states at the positions that predict each response token."""
        if self.group > 1:
            g = self.group
            return model.backbone.grouped(mb["prompt_ids"][::g], mb["prompt_mask"][::g], mb["response_ids"],
                                          mb["response_mask"], g, **self.backbone_options)
        ids, mask = join(mb["prompt_ids"], mb["prompt_mask"], mb["response_ids"], mb["response_mask"])
        prompt_len, response_len = mb["prompt_ids"].shape[1], mb["response_ids"].shape[1]
        # A fused kernel serves the policy's and the reference's forwards (a separate value model
        # keeps the plain attention).
        attend = make_attend(self.attention, model.cfg, ids.shape[1], self.mesh)
        hidden, _ = model.backbone(ids, mask, output_index=response_positions(prompt_len, response_len),
                                   attend=attend, **self.backbone_options)
        return hidden

    def policy(self, params, frozen):
        trainable = cast_floats(params["policy"], self.param_dtype)  # the forward sees the params' storage dtype
        return nnx.merge(self.policy_graphdef, *((trainable,) if frozen is None else (trainable, frozen)))

    def forward(self, frozen):
        """`forward(params, minibatch) -> (hidden states, values)` for `lm_ppo_loss`."""
        def forward(params, mb):
            model = self.policy(params, frozen)
            hidden = self.hidden(model, mb)
            if not self.value_head:
                return hidden, None
            if self.value_graphdef is None:
                return hidden, model.values(hidden)
            ids, mask = join(mb["prompt_ids"], mb["prompt_mask"], mb["response_ids"], mb["response_mask"])
            return hidden, sequence_values(self.value_graphdef, cast_floats(params["value"], self.param_dtype), ids,
                                           mask, mb["response_ids"].shape[1], **self.backbone_options)
        return forward

    def reference(self, reference, frozen):
        """The reference model. On the policy's own graph with a frozen part (LoRA), `reference` is a
        snapshot of the trainable part only, over the very frozen buffers: passing the base twice
        would make XLA budget it twice."""
        if self.ref_graphdef is self.policy_graphdef and frozen is not None:
            return nnx.merge(self.ref_graphdef, cast_floats(reference, self.param_dtype), frozen)
        return nnx.merge(self.ref_graphdef, reference)

    def head(self, frozen):
        return lambda params, hidden: self.policy(params, frozen).logits(hidden)

    def logprobs(self, hidden, tokens, head):
        return lm_token_stats(hidden, tokens, temperature=self.temperature, head=head,
                              logits_chunk=self.logits_chunk)[0]

    def score(self, params, frozen, reference, batch, order, *, policy: bool, values: bool, ref: bool = True):
        """The reference's log-probs ("ref_logprobs", if `ref`) and, if asked, the policy's ("logprobs")
        and its values ("values") for a rollout `batch`, one minibatch of `order` (int32[minibatches,
        rows]) at a time, returned in row order."""
        forward = self.forward(frozen)

        def one(indices):
            mb = jax.tree.map(lambda x: x[indices], batch)
            if self.shard_batch is not None:
                mb = jax.tree.map(self.shard_batch, mb)
            out = {}
            if ref:
                ref_model = self.reference(reference, frozen)
                out["ref_logprobs"] = self.logprobs(self.hidden(ref_model, mb), mb["response_ids"], ref_model.logits)
            if policy or values:
                hidden, value_out = forward(params, mb)
                if values:
                    out["values"] = value_out
                if policy:
                    out["logprobs"] = self.logprobs(hidden, mb["response_ids"],
                                                    lambda h: self.head(frozen)(params, h))
            return out

        scored = jax.lax.map(one, order)
        inverse = jnp.argsort(order.reshape(-1))
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[inverse], scored)


def make_scoring(config, *, policy_graphdef, ref_graphdef=None, value_graphdef=None, mesh=None):
    """The update's scoring pass on its own, jitted: `score(params, rollout, frozen=None, reference=None)
    -> {"logprobs", "ref_logprobs", "values"}`, f32[b, response_len] each, through the training forward
    in minibatches of the config's size. `params` as in the train state ({"policy": ..., "value": ...}).
    What the update uses as PPO's old log-probs under `ppo.old_logprobs = "recompute"`, for comparing with
    the sampler's (`scripts/precision.py`)."""
    fwd = _Forward(config, policy_graphdef, ref_graphdef or policy_graphdef, value_graphdef, mesh)
    minibatches = config.ppo.num_mini_batches

    def score(params, rollout: Rollout, frozen=None, reference=None):
        batch = sequence_batch(rollout)
        order = jnp.arange(rollout.prompt_ids.shape[0]).reshape(minibatches, -1)
        return fwd.score(params, frozen, reference, batch, order, policy=True, values=True)

    return jax.jit(score)


def make_ppo_update(config, *, policy_graphdef, ref_graphdef=None, value_graphdef=None,
                    eos_ids: Sequence[int] = (), optimizer: optax.GradientTransformation | None = None, mesh=None):
    """The jitted PPO update: `update(state, rollout, scores, frozen=None, reference=None) -> (state, metrics)`.

    Reads `config.ppo`, `config.reward` (scale, bias, normalize), `config.sampling.temperature` and
    `config.model` (param_dtype and the memory levers remat, logits_chunk, shard_activations).
    `reference`: the reference policy's params, for `ref_graphdef` (default: the policy's graphdef; then,
    with `frozen`, a snapshot of the trainable part only, merged with `frozen`).
    `frozen`: the policy's params outside the state (a LoRA base), merged in for the forward.
    `scores`: f32[b], one per rollout row. `value_graphdef`: a separate value model (its params are
    `state.params["value"]`); without it the policy's value head serves. `eos_ids` serve the
    missing-EOS penalty. The state is donated; on a `mesh` the new state keeps the partition rules.

    Before the PPO epochs a scoring pass runs the loss's own forward (no gradient) over the first
    epoch's minibatches: the reference's log-probs, a separate value model's values and, with
    `ppo.old_logprobs = "recompute"`, the policy's log-probs and value head, which are then PPO's
    "old" values. On equal params the policy and the reference give equal log-probs (step 0's KL is
    exactly 0) and the first minibatch's ratio is exactly 1, whatever the rounding of the sampler.
    """
    p, r = config.ppo, config.reward
    optimizer = optimizer or make_optimizer(config)
    fwd = _Forward(config, policy_graphdef, ref_graphdef or policy_graphdef, value_graphdef, mesh)
    recompute = resolve_old_logprobs(config) == "recompute"
    estimator = kl_lib.get_estimator(p.kl_estimator)
    eos_ids = tuple(int(e) for e in eos_ids)

    def loss_fn(frozen):
        return lm_ppo_loss(fwd.forward(frozen), temperature=fwd.temperature, cliprange=p.cliprange,
                           cliprange_value=p.cliprange_value, vf_coef=p.vf_coef, ent_coef=p.ent_coef,
                           aggregation=p.loss_aggregation, kl_loss_coef=1.0 if p.kl_in_loss else 0.0,
                           kl_estimator=p.kl_loss_estimator, head=fwd.head(frozen), logits_chunk=fwd.logits_chunk)

    def update(state: TrainState, rollout: Rollout, scores, frozen=None, reference=None):
        if reference is None:
            raise ValueError("update(state, rollout, scores, frozen, reference): the reference policy's params "
                             "are needed (its log-probs are taken here, by the loss's own forward)")
        mask = rollout.response_mask.astype(bool)
        scores, score_stats = normalize_scores(r.scale * scores + r.bias, state.score_stats, r.normalize)
        if p.missing_eos_penalty:
            scores = adv_lib.penalize_missing_eos(scores, rollout.response_ids, eos_ids, p.missing_eos_penalty)
        batch = sequence_batch(rollout)
        key, update_key = jax.random.split(state.key)
        orders = minibatch_orders(update_key, mask.shape[0], p.num_ppo_epochs, p.num_mini_batches)
        scored = fwd.score(state.params, frozen, reference, batch, orders[0], policy=recompute,
                           values=recompute or value_graphdef is not None)
        old_logprobs = scored["logprobs"] if recompute else rollout.logprobs
        values = jnp.where(mask, scored["values"] if "values" in scored else rollout.values, 0.0)
        kl = jnp.where(mask, estimator(old_logprobs, scored["ref_logprobs"]), 0.0)
        # With the KL in the loss (GRPO style) the reward carries no KL term.
        reward_kl_coef = 0.0 if p.kl_in_loss else state.kl.kl_coef
        rewards, non_score = adv_lib.kl_shaped_rewards(scores, kl, mask, reward_kl_coef)
        if p.whiten_rewards:
            rewards = adv_lib.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = adv_lib.gae(rewards, values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = jnp.where(mask, adv_lib.masked_whiten(advantages, mask), 0.0)
        weights, sampling_metrics = sampler_weights(old_logprobs, rollout.logprobs, mask, p.sampler_correction,
                                                    p.sampler_correction_cap)
        batch.update(logprobs=old_logprobs, ref_logprobs=scored["ref_logprobs"], values=values,
                     advantages=advantages, returns=returns)
        if weights is not None:
            batch["sampler_weights"] = weights
        params, opt_state, stats = ppo_update(
            state.params, state.opt_state, batch, update_key, loss_fn=loss_fn(frozen), optimizer=optimizer,
            num_epochs=p.num_ppo_epochs, num_minibatches=p.num_mini_batches, shard_minibatch=fwd.shard_batch)
        metrics = rollout_metrics(scores, kl, non_score, old_logprobs, mask)
        new_kl = kl_lib.update_kl_controller(state.kl, metrics["objective/kl"], scores.shape[0])
        metrics.update(stats)
        metrics.update(sampling_metrics)
        metrics["objective/kl_coef"] = state.kl.kl_coef
        metrics["val/mean"] = jnp.sum(values) / jnp.maximum(mask.sum(), 1)
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
