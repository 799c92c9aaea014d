"""One rollout as a pure jitted function: sample from the policy (and score the samples with a
learned reward model in the same program).

    rollout = make_rollout(config, policy_graphdef=..., eos_ids=(eos,), pad_id=pad)
    batch = rollout(policy_params, prompt_ids, prompt_mask, key)   # -> Rollout

The reference's log-probs (and the policy's own, and a separate value model's values) are not taken
here but by the update, through the very forward its loss uses (`rlhf_jax.step.update`): log-probs from
the decode loop round differently from the full-sequence forward in bf16.
The factory needs the config, graphdefs and the mesh only (no weights), so the function can be
compiled ahead of time from shapes (`rollout.lower(abstract args).compile()`).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.config import ConfigError
from rlhf_jax.core.ops import chunked_token_stats, token_logprobs
from rlhf_jax.models.tree import cast_floats
from rlhf_jax.parallel.sharding import batch_devices, batch_sharding
from rlhf_jax.sampling.engine import continuous_generate, engine_problem
from rlhf_jax.sampling.generate import generate


@flax.struct.dataclass
class Rollout:
    """A batch of sampled responses and what the update needs of them; every array's first axis is the batch.

    prompt_ids, prompt_mask: int32[b, prompt_len] (left-padded);
    response_ids, response_mask: int32[b, response_len] (pad and 0 after EOS);
    logprobs: f32[b, response_len], the sampled tokens' log-probs as the sampler computed them;
    values: f32[b, response_len], the policy's value head as sampled, or None (a separate value model);
    lengths: int32[b], response tokens per row (EOS included);
    scores: f32[b] from a learned reward model, or None (a Python reward is scored on the host);
    truncation_gap: f32[b, response_len] with top-k or top-p sampling (else None): each token's
      `logprobs` minus its log-prob under the unfiltered distribution the trainer scores.
    """

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    response_ids: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    values: jax.Array | None
    lengths: jax.Array
    scores: jax.Array | None = None
    truncation_gap: jax.Array | None = None


def join(prompt_ids, prompt_mask, response_ids, response_mask):
    """Prompt + response ids and mask: int32[b, prompt_len + response_len]."""
    return (jnp.concatenate([prompt_ids, response_ids], axis=1),
            jnp.concatenate([prompt_mask, response_mask], axis=1))


def response_positions(prompt_len: int, response_len: int) -> slice:
    """The positions whose outputs predict the response tokens (prompts are left-padded to prompt_len)."""
    return slice(prompt_len - 1, prompt_len - 1 + response_len)


def sequence_logprobs(graphdef, params, ids, mask, response_ids, temperature: float, logits_chunk: int = 0):
    """Log-probs of `response_ids` under a causal LM over the whole sequence (the training program):
    f32[b, response_len]. `logits_chunk` > 0: that many positions' logits at a time."""
    response_len = response_ids.shape[1]
    model = nnx.merge(graphdef, params)
    hidden, _ = model.backbone(ids, mask, output_index=response_positions(ids.shape[1] - response_len, response_len))
    head = lambda h: model.logits(h) / temperature
    if logits_chunk:
        return chunked_token_stats(hidden, head, response_ids, logits_chunk)[0]
    return token_logprobs(head(hidden), response_ids)


def sequence_values(graphdef, params, ids, mask, response_len: int, **backbone_options):
    """A separate value model's values at the positions that predict each response token."""
    positions = response_positions(ids.shape[1] - response_len, response_len)
    return nnx.merge(graphdef, params)(ids, mask, positions, **backbone_options)


def prompt_group(config, mesh=None, *, update: bool = True) -> int:
    """How many consecutive rows share one run of their prompt through the backbone (1: none):
    `train.num_generations` where `train.share_prompts` is on and it applies. The rollout's prefill
    (`update=False`; `generate`'s prompt_group) and a value-free update's forwards (`Transformer.grouped`)
    share them for value-free algorithms, and on a mesh whose batch axes split the rows, where the
    prompts split evenly over them. The update also needs the plain attention (the fused kernels
    take no KV cache), minibatches of whole groups and no packing (`train.pack_tokens`)."""
    generations, rows = config.train.num_generations, config.train.rollout_batch_size
    if not config.train.share_prompts or config.algorithm == "ppo" or generations < 2:
        return 1
    if update and config.train.pack_tokens:  # packed rows hold each sample with its own prompt
        return 1
    if update:
        if config.model.attention != "xla" or rows % config.rl.num_mini_batches:
            return 1
        rows //= config.rl.num_mini_batches
    if rows % generations:
        return 1
    split = config.model.shard_activations if update else config.sampling.shard_cache
    if mesh is not None and split and (rows // generations) % batch_devices(mesh):
        return 1
    return generations


def cache_row_unit(config, mesh) -> int:
    """The devices the rollout's KV cache rows split over (`sampling.shard_cache`): the engine's slot
    counts are multiples of it."""
    return batch_devices(mesh) if mesh is not None and config.sampling.shard_cache else 1


# The shortest budget for which `sampling.engine = "auto"` picks the continuous engine.
AUTO_ENGINE_TOKENS = 128


def engine_shape(config, mesh=None, has_eos: bool = True) -> dict | None:
    """The continuous-batching engine's `slots`, `refill` and `tail_halvings` for a run (None: the
    static sampler). `sampling.engine = "auto"` picks the engine where rows can end early (`has_eos`)
    and the budget is long enough (`AUTO_ENGINE_TOKENS`) for their lengths to spread: where every row
    runs to `max_new_tokens` it has nothing to refill, and on short budgets its refills and smaller
    matmuls cost more than the padding they save (the demo's 24 tokens: 34 s of PPO against 23 s).
    Slots 0 means half the rollout's rows; refill 0 the prompt group. Raises ConfigError naming the
    key where the shape does not fit the rows or the mesh."""
    s = config.sampling
    pays = has_eos and s.max_new_tokens >= AUTO_ENGINE_TOKENS
    if s.engine == "static" or (s.engine == "auto" and not pays):
        return None
    rows = config.train.rollout_batch_size
    group = prompt_group(config, mesh, update=False)
    refill = s.refill or group
    unit = cache_row_unit(config, mesh)
    step = refill * unit // math.gcd(refill, unit)
    slots = s.slots or max(step, rows // 2 // step * step)
    problem = engine_problem(rows, min(slots, rows), refill, group)
    if problem is None and min(slots, rows) % unit:
        problem = f"slots ({slots}) do not split over the mesh's {unit} batch devices (data x fsdp)"
    if problem:
        auto = "" if s.engine == "continuous" else " (set by config.sampling.engine = 'auto')"
        raise ConfigError(f"config.sampling.slots = {s.slots}, refill = {s.refill}{auto}: {problem} for "
                          f"config.train.rollout_batch_size = {rows}")
    return {"slots": slots, "refill": refill, "tail_halvings": s.tail_halvings}


def make_rollout(config, *, policy_graphdef, reward_graphdef=None, eos_ids: Sequence[int] = (), pad_id: int = 0,
                 mesh=None):
    """The jitted rollout of a run: `rollout(policy_params, prompt_ids, prompt_mask, key, reward_params=None)
    -> Rollout`.

    Reads `config.sampling` (max_new_tokens, temperature, top_k, top_p) and `config.model.param_dtype`
    (float params, such as f32 master weights, are cast to it: the forward sees what the update's
    forward sees) and where the activations sit on a mesh (`sampling.shard_cache`, `shard_prefill`,
    `decode_layout`; see `generate`) and which sampler runs it (`sampling.engine`, `slots`, `refill`,
    `tail_halvings`; see `engine_shape` and `rlhf_jax.sampling.engine`). With
    `config.model.value_model = "shared"` the policy's value head comes along as sampled. With
    `reward_graphdef` the Rollout carries the reward model's scores.
    `eos_ids` end a row (empty: every row runs to max_new_tokens); `pad_id` fills the rest.
    On a `mesh`, the outputs are sharded over the batch axes.
    """
    s = config.sampling
    param_dtype = jnp.dtype(config.model.param_dtype)
    # The decode loop's residual stream is left to XLA in the batch layout: pinned to the batch axes,
    # XLA gathered every layer's weights at once (the 8B LoRA rollout on v5e:2x2 needed 17.9 GiB per
    # chip; left to XLA, 10.2). The prefill's is pinned (`sampling.shard_prefill`, on by default) and
    # the KV cache split by rows (`sampling.shard_cache`), which XLA would replicate (see `generate`).
    gen_kwargs = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                      eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id),
                      batch_mesh=mesh if s.shard_cache else None, shard_prefill=s.shard_prefill,
                      decode_segments=s.decode_segments,
                      decode_layout=s.decode_layout if mesh is not None else "batch",
                      prompt_group=prompt_group(config, mesh, update=False))
    with_values = config.algorithm == "ppo" and config.model.value_model == "shared"
    engine = engine_shape(config, mesh, bool(eos_ids))
    if engine is None:
        sample = functools.partial(generate, **gen_kwargs)
    else:
        del gen_kwargs["decode_segments"]
        sample = functools.partial(continuous_generate, **gen_kwargs, **engine)

    def rollout(policy_params, prompt_ids, prompt_mask, key, reward_params=None):
        out = sample(policy_graphdef, cast_floats(policy_params, param_dtype), prompt_ids, prompt_mask, key,
                     with_values=with_values)
        scores = None
        if reward_graphdef is not None:
            ids, mask = join(prompt_ids, prompt_mask, out["response_ids"], out["response_mask"])
            scores = nnx.merge(reward_graphdef, reward_params).sequence_scores(ids, mask)
        result = Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=out["response_ids"],
                         response_mask=out["response_mask"], logprobs=out["logprobs"], values=out.get("values"),
                         lengths=out["lengths"], scores=scores,
                         truncation_gap=out.get("truncation_gap"))
        if mesh is None:
            return result
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim)), result)

    return jax.jit(rollout)
