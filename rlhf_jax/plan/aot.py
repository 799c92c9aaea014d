"""A run's rollout and update, lowered from shapes alone: no weights are created.

    step = abstract_iteration(config, model_cfg, mesh)
    compiled = step.lower_rollout().compile()      # or step.lower_update()
    compiled.memory_analysis(), compiled.cost_analysis()

Every argument is a `jax.ShapeDtypeStruct` carrying the sharding the trainer would give it (the
partition rules for params and optimizer state, the batch axes for rollout arrays), so the same
call compiles for this machine's devices or for a TPU slice's compile-only devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.config import uses_value
from rlhf_jax.core.minibatch import minibatch_orders
from rlhf_jax.core.packing import micro_trips, minibatch_layouts
from rlhf_jax.models import CausalLM, ModelConfig, ScalarModel
from rlhf_jax.models.lora import TRAINABLE, with_lora
from rlhf_jax.parallel.sharding import batch_devices, batch_sharding, param_shardings, replicated, state_shardings
from rlhf_jax.sampling.rollout import make_rollout
from rlhf_jax.step.state import init_train_state, make_optimizer
from rlhf_jax.step.update import make_update


def with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves, each with its sharding."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _sharded_params(tree, mesh):
    return with_shardings(tree, param_shardings(tree, mesh))


@dataclasses.dataclass
class AbstractIteration:
    """The jitted rollout and update of a run and abstract arguments for each."""

    rollout_fn: Any
    update_fn: Any
    rollout_args: tuple
    rollout_kwargs: dict
    update_args: tuple
    # What a run keeps on the devices between calls, each buffer once: the train state, the frozen
    # LoRA base, the reference's own weights (none when it is that base) and a reward model's.
    resident: dict
    # With `train.pack_tokens`: the update's packed layout (numpy; `update_args` ends with its shapes)
    # and the mean trips of its micro-batch loops (`rlhf_jax.plan.hlo.program_costs`' `trips`).
    packing: dict | None = None
    update_trips: dict | None = None

    def lower_rollout(self):
        return self.rollout_fn.lower(*self.rollout_args, **self.rollout_kwargs)

    def lower_update(self):
        return self.update_fn.lower(*self.update_args)


def abstract_iteration(config, model_cfg: ModelConfig, mesh, *, reward_cfg: ModelConfig | None = None,
                       eos_ids=(1,), pad_id: int = 0, response_lengths=None) -> AbstractIteration:
    """The rollout and update of `config` for a policy of `model_cfg` on `mesh`, with abstract arguments.

    The batch is `config.train.rollout_batch_size` prompts of `config.data.max_prompt_len` tokens. A
    learned reward model (`config.reward.kind = "model"`) has `reward_cfg` (default: the policy's).
    With `train.pack_tokens`, the update runs the packed layout of those prompts and responses of
    `response_lengths` tokens (default: every one at `max_new_tokens`), laid out as the trainer would.
    """
    value = uses_value(config)
    shared = value and config.model.value_model == "shared"
    lora = bool(config.lora.enabled)
    base_cfg = model_cfg.replace(lora_rank=0, lora_targets=())  # the reference, value and reward models

    def build_policy():
        policy = CausalLM(model_cfg, rngs=nnx.Rngs(0), value_head=shared)
        if lora:
            policy = with_lora(policy, config.lora.rank, config.lora.alpha, tuple(config.lora.targets))
        return policy

    policy_graphdef, trainable, frozen = nnx.split(nnx.eval_shape(build_policy), TRAINABLE if lora else nnx.Param,
                                                   ...)
    trainable, frozen = _sharded_params(trainable, mesh), _sharded_params(frozen, mesh)
    # The reference: the policy's graph over a snapshot of its trainable part and the very frozen rest.
    ref_graphdef, ref_snapshot = policy_graphdef, trainable

    params = {"policy": trainable}
    value_graphdef = None
    if value and not shared:
        value_graphdef, value_params = nnx.split(nnx.eval_shape(
            lambda: ScalarModel(base_cfg, rngs=nnx.Rngs(0))))
        params["value"] = _sharded_params(value_params, mesh)
    reward_graphdef = reward_params = None
    if config.reward.kind == "model":
        reward_graphdef, reward_params = nnx.split(nnx.eval_shape(
            lambda: ScalarModel(reward_cfg or base_cfg, rngs=nnx.Rngs(0))))
        reward_params = _sharded_params(reward_params, mesh)

    optimizer = make_optimizer(config)
    state = jax.eval_shape(lambda p: init_train_state(config, p, optimizer), params)
    state = with_shardings(state, state_shardings(state, mesh))

    batch, prompt_len = config.train.rollout_batch_size, config.data.max_prompt_len
    prompt = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=batch_sharding(mesh, 2))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated(mesh))
    rollout_fn = make_rollout(config, policy_graphdef=policy_graphdef, reward_graphdef=reward_graphdef,
                              eos_ids=eos_ids, pad_id=pad_id, mesh=mesh)
    rollout_args = (nnx.merge_state(state.params["policy"], frozen), prompt, prompt, key)
    rollout_kwargs = dict(reward_params=reward_params)
    rollout = jax.eval_shape(rollout_fn, *rollout_args, **rollout_kwargs)
    rollout = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding(mesh, x.ndim)),
                           rollout)
    scores = jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=batch_sharding(mesh, 1))
    update_fn = make_update(config, policy_graphdef=policy_graphdef, ref_graphdef=ref_graphdef,
                            value_graphdef=value_graphdef, eos_ids=eos_ids, optimizer=optimizer, mesh=mesh)
    resident = {"state": state, "frozen": frozen, "reference": ref_snapshot, "reward": reward_params}
    update_args, packing, trips = (state, rollout, scores, frozen, ref_snapshot), None, None
    if config.train.pack_tokens:
        packing = packed_layout(config, mesh, response_lengths)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)), packing)
        update_args = update_args + (abstract,)
        trips = micro_trips(packing)
    return AbstractIteration(rollout_fn, update_fn, rollout_args, rollout_kwargs, update_args, resident, packing, trips)


def packed_layout(config, mesh, response_lengths=None) -> dict:
    """The update's `packing` argument for a batch of full-length prompts and responses of
    `response_lengths` tokens (default: all at `sampling.max_new_tokens`), as the trainer lays it out
    (`rlhf_jax.step.update.packed_minibatches`), in numpy."""
    batch, prompt_len = config.train.rollout_batch_size, config.data.max_prompt_len
    budget = config.sampling.max_new_tokens
    lengths = np.full(batch, budget) if response_lengths is None else np.asarray(response_lengths)
    response_mask = (np.arange(budget) < lengths[:, None]).astype(np.int32)
    p = config.rl
    orders = np.asarray(minibatch_orders(jax.random.PRNGKey(0), batch, p.num_ppo_epochs, p.num_mini_batches))
    ones = np.ones((batch, prompt_len), np.int32)
    return {"orders": orders, **minibatch_layouts(ones, ones, response_mask, response_mask, orders,
                                                  config.train.pack_tokens, unit=batch_devices(mesh),
                                                  micro_rows=config.train.micro_rows)}
