"""The RL trainer: a host loop over two pure jitted functions built from the config, for every
algorithm (`config.algorithm`: PPO, GRPO, RLOO, REINFORCE++).

One iteration:
  1. `rollout` (rlhf_jax.sampling.rollout): sample from the policy (and score the samples with a
     learned reward model) in one jitted call;
  2. host: decode and call the Python reward function (skipped for a reward model);
  3. `update` (rlhf_jax.step.update): the reference's (and the policy's own) log-probs through the
     training forward, the algorithm's advantages, the epochs of minibatch steps, the KL controller.
The trainer holds what is not train state (tokenizer, prompts, frozen weights) and does the host
work: data order, the Python reward, metrics and samples. The train state is a pytree with
everything a resumed run needs to continue exactly.
"""

from __future__ import annotations

import logging
import numbers
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.config import ConfigError, uses_value, validate, validate_lengths
from rlhf_jax.core.packing import packing_stats
from rlhf_jax.models.lora import save_adapters
from rlhf_jax.models.tree import cast_floats
from rlhf_jax.parallel.attention import validate_attention
from rlhf_jax.parallel.sharding import (
    BATCH_AXES,
    batch_devices,
    batch_sharding,
    make_mesh,
    replicated,
    state_shardings,
)
from rlhf_jax.run.data import PromptIterator
from rlhf_jax.run.loading import UserCodeError, check_folders, load_callable, load_models, load_prompts, load_tokenizer
from rlhf_jax.sampling.generate import generate, validate_decode_layout
from rlhf_jax.sampling.rollout import engine_shape, join, make_rollout, sequence_logprobs
from rlhf_jax.step.state import TrainState, init_train_state, make_optimizer
from rlhf_jax.step.update import make_update, packed_minibatches

log = logging.getLogger(__name__)


class RLTrainer:
    """Builds everything from a config and runs iterations of its RL algorithm on a `TrainState`.

    `extra_metrics` maps a metric name to `fn(prompts, responses, ended) -> list[float]`
    (host-side text metrics, e.g. the demo's validity); their means are logged.
    """

    def __init__(self, config, workdir: str | None = None, extra_metrics: dict[str, Callable] | None = None):
        validate(config)
        try:
            self.mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        except ValueError as e:
            raise ConfigError(f"config.mesh: {e}") from None
        validate(config, num_devices=batch_devices(self.mesh))
        validate_attention(config, self.mesh.devices.flat[0].platform)
        check_folders(config)
        # Before anything loads or compiles: a reward that cannot be found is a one-line error.
        self.reward_fn = load_callable(config.reward.function) if config.reward.kind == "function" else None
        self.config = config
        self.workdir = workdir
        self.extra_metrics = extra_metrics or {}
        self.tokenizer = load_tokenizer(config, workdir)
        self.eos_ids = (int(self.tokenizer.eos_token_id),)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.shared_value = uses_value(config) and config.model.value_model == "shared"
        self.lora = bool(config.lora.enabled)
        engine = engine_shape(config, self.mesh, has_eos=True)  # a shape that does not fit stops before any model loads

        models = load_models(config, self.mesh, len(self.tokenizer))
        validate_lengths(config, models.policy_config.max_position_embeddings)
        validate_decode_layout(config, models.policy_config, self.mesh, engine and engine["slots"])
        self.policy_graphdef, self.ref_graphdef = models.policy_graphdef, models.ref_graphdef
        self.value_graphdef, self.rm_graphdef = models.value_graphdef, models.reward_graphdef
        self.frozen, self.ref_params, self.rm_params = models.frozen, models.ref_params, models.reward_params
        # What the update takes as the reference: on the policy's graph, the snapshot of its trainable part.
        self.update_reference = models.ref_params if models.ref_trainable is None else models.ref_trainable
        self._initial_params = {"policy": models.policy_params}
        if models.value_params is not None:
            self._initial_params["value"] = models.value_params

        prompts = load_prompts(config, self.tokenizer)
        self.prompt_ids, self.prompt_mask, self.prompt_texts = prompts.ids, prompts.mask, prompts.texts
        self.prompt_report = prompts.report
        # Prompts per iteration; each is sampled num_generations times, the samples of one prompt side by
        # side in this host's rows (a group never spans hosts, and stays consecutive in the global batch).
        self.generations = config.train.num_generations
        self.iterator = PromptIterator(len(self.prompt_texts), config.train.rollout_batch_size // self.generations,
                                       config.seed, jax.process_index(), jax.process_count())
        self.optimizer = make_optimizer(config)
        self.rollout_fn = self.make_rollout_fn(self.eos_ids)
        self.update_fn = make_update(config, policy_graphdef=self.policy_graphdef, ref_graphdef=self.ref_graphdef,
                                     value_graphdef=self.value_graphdef, eos_ids=self.eos_ids,
                                     optimizer=self.optimizer, mesh=self.mesh)
        self._reference_logprobs = jax.jit(sequence_logprobs, static_argnames=("graphdef", "temperature"))
        if self.rm_graphdef is not None:
            rm_graphdef = self.rm_graphdef
            self._reward_scores = jax.jit(lambda p, ids, mask: nnx.merge(rm_graphdef, p).sequence_scores(ids, mask))
        self.reference_score_stats = None
        if config.reward.normalize == "reference":
            self.reference_score_stats = self._measure_reference_scores()

    def make_rollout_fn(self, eos_ids):
        """The run's rollout function, stopping rows at `eos_ids` (empty: never)."""
        return make_rollout(self.config, policy_graphdef=self.policy_graphdef, reward_graphdef=self.rm_graphdef,
                            eos_ids=eos_ids, pad_id=self.pad_id, mesh=self.mesh)

    # ---------------------------------------------------------------- state and batches
    def init_state(self) -> TrainState:
        """The state at iteration 0. Call it once: it hands the initial params over to the state, whose
        buffers the update donates (the reference keeps its own copy)."""
        if self._initial_params is None:
            raise RuntimeError("init_state() was already called on this trainer")
        params, self._initial_params = self._initial_params, None
        init = lambda p: init_train_state(self.config, p, self.optimizer, self.reference_score_stats)
        # Made on the mesh: the optimizer state is sharded like the params it follows.
        shardings = state_shardings(jax.eval_shape(init, params), self.mesh)
        return jax.jit(init, out_shardings=shardings)(params)

    def to_device_batch(self, local):
        """This host's rows (numpy) -> a global array sharded over (data, fsdp)."""
        local = np.asarray(local)
        return jax.make_array_from_process_local_data(batch_sharding(self.mesh, local.ndim), local)

    def local_rows(self, array) -> np.ndarray:
        """This host's rows of a batch-sharded global array."""
        if array.is_fully_addressable:
            return np.asarray(array)
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.global_array_to_host_local_array(
            array, self.mesh, jax.sharding.PartitionSpec(BATCH_AXES)))

    def sum_over_hosts(self, values) -> np.ndarray:
        """The element-wise sum of a small float vector over every process (itself on one host): a
        collective, so every process must call it at the same point."""
        values = np.asarray(values, np.float64)
        if jax.process_count() == 1:
            return values
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)

    def any_host(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (a collective, like `sum_over_hosts`)."""
        return bool(self.sum_over_hosts([flag])[0])

    def policy_params(self, state: TrainState):
        """The policy's full params: the state's trainable part plus the frozen base."""
        return nnx.merge_state(state.params["policy"], self.frozen)

    # ---------------------------------------------------------------- sampling helpers (evaluation, normalisation)
    def generate(self, params, prompt_ids, prompt_mask, key, graphdef=None):
        """Sample responses with the run's sampling settings (the policy's graphdef unless given;
        with a shared trunk the policy's values come along)."""
        graphdef = graphdef or self.policy_graphdef
        s = self.config.sampling
        with_values = self.shared_value and graphdef is self.policy_graphdef
        params = cast_floats(params, jnp.dtype(self.config.model.param_dtype))  # as the rollout sees master weights
        return generate(graphdef, params, prompt_ids, prompt_mask, key, with_values=with_values,
                        max_new_tokens=s.max_new_tokens, temperature=s.temperature, eos_ids=self.eos_ids,
                        pad_id=self.pad_id)

    def decode_responses(self, out):
        """This host's rows of a `generate` output (or a Rollout) as (texts without special tokens,
        lengths, whether each ended with EOS)."""
        get = (lambda k: out[k]) if isinstance(out, dict) else (lambda k: getattr(out, k))
        response_ids, lengths = self.local_rows(get("response_ids")), self.local_rows(get("lengths"))
        rows = [r[:n] for r, n in zip(response_ids, lengths)]
        responses = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        ended = [bool(np.isin(r, self.eos_ids).any()) for r in rows]
        return responses, lengths, ended

    def kl_to_reference(self, prompt_ids, prompt_mask, out) -> np.ndarray:
        """Per-row KL of a `generate` output to the reference: the sum over response tokens of
        log pi(y) - log pi_ref(y), with pi's logprobs as sampled (this host's rows)."""
        ids, mask = join(prompt_ids, prompt_mask, out["response_ids"], out["response_mask"])
        ref_logprobs = self._reference_logprobs(self.ref_graphdef, self.ref_params, ids, mask, out["response_ids"],
                                                temperature=self.config.sampling.temperature)
        return self.local_rows(_row_kl(out["logprobs"], ref_logprobs, out["response_mask"]))

    def _measure_reference_scores(self) -> np.ndarray:
        """(count, mean, M2) of the scores of the reference policy's samples, which give the gain and
        offset of reward.normalize = "reference" (fixed keys: a resumed run measures the same)."""
        c = self.config
        scores = []
        for i in range(c.reward.normalize_batches):
            index = np.random.default_rng([c.seed, 99, i]).choice(len(self.prompt_texts), c.train.rollout_batch_size,
                                                                   replace=False)
            per_host = len(index) // jax.process_count()
            index = index[jax.process_index() * per_host:(jax.process_index() + 1) * per_host]  # this host's rows
            prompt_ids, prompt_mask = self.to_device_batch(self.prompt_ids[index]), self.to_device_batch(
                self.prompt_mask[index])
            out = self.generate(self.ref_params, prompt_ids, prompt_mask, jax.random.PRNGKey(10_000 + i),
                                graphdef=self.ref_graphdef)
            ids, mask = join(prompt_ids, prompt_mask, out["response_ids"], out["response_mask"])
            prompts = [self.prompt_texts[i] for i in index]
            responses, _, _ = self.decode_responses(out)
            scores.append(c.reward.scale * self.scores_for(prompts, responses, ids, mask) + c.reward.bias)
        scores = np.concatenate(scores).astype(np.float64)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            scores = np.asarray(multihost_utils.process_allgather(scores), np.float64).reshape(-1)
        log.info("reward normalisation from %d reference samples: mean %.4f, std %.4f", len(scores),
                 scores.mean(), scores.std())
        return np.array([len(scores), scores.mean(), np.sum(np.square(scores - scores.mean()))], np.float32)

    def scores_for(self, prompts: list[str], responses: list[str], ids, mask) -> np.ndarray:
        """Rewards of a batch: the Python function on text, or the reward model on device."""
        if self.reward_fn is not None:
            return self._call_reward(prompts, responses)
        return self.local_rows(self._reward_scores(self.rm_params, ids, mask))

    def _call_reward(self, prompts, responses) -> np.ndarray:
        return check_rewards(self.reward_fn(prompts, responses), len(prompts), self.config.reward.function)

    # ---------------------------------------------------------------- one iteration
    def iteration(self, state: TrainState, want_samples: bool = False):
        """One RL iteration (rollout, reward, update). Returns (new state, metrics dict of floats, sample rows)."""
        c = self.config
        timings = {}
        t0 = time.perf_counter()
        self.iterator.restore({"epoch": int(state.data_epoch), "offset": int(state.data_offset)})
        index = np.repeat(self.iterator.next(), self.generations)
        prompt_ids = self.to_device_batch(self.prompt_ids[index])
        prompt_mask = self.to_device_batch(self.prompt_mask[index])
        rollout = self.rollout_fn(self.policy_params(state), prompt_ids, prompt_mask, jax.random.fold_in(state.key, 1),
                                  reward_params=self.rm_params)
        jax.block_until_ready(rollout)
        timings["time/rollout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        prompts = [self.prompt_texts[i] for i in index]
        responses, lengths, ended = self.decode_responses(rollout)
        step = int(state.step)
        model_scores = None if rollout.scores is None else self.local_rows(rollout.scores)
        # The host side can fail on one host only (a user's reward function, a non-finite reward in its
        # rows): every host learns of it in the one exchange below and stops, instead of waiting in the
        # update's collectives for a host that is gone.
        error, scores, extra_sums = None, None, np.zeros(len(self.extra_metrics))
        try:
            scores = self._call_reward(prompts, responses) if model_scores is None else model_scores
            if not np.all(np.isfinite(scores)):
                bad = int(np.flatnonzero(~np.isfinite(scores))[0])
                raise FloatingPointError(f"iteration {step}: non-finite reward {scores[bad]} for response {bad} "
                                         f"({responses[bad]!r})")
            extra_sums = np.array([np.sum(np.asarray(fn(prompts, responses, ended), np.float64))
                                   for fn in self.extra_metrics.values()])
        except Exception as e:  # re-raised below, with its own traceback
            error = e
        totals = self.sum_over_hosts([error is not None, lengths.sum(), len(lengths), np.sum(ended), *extra_sums])
        if error is not None:
            raise error
        if totals[0]:
            raise RuntimeError(f"iteration {step}: another process failed in its reward step (its log has the "
                               "error); this one stops too")
        device_scores = self.to_device_batch(scores) if model_scores is None else rollout.scores
        rows = totals[2]
        extra = {name: float(total / rows) for name, total in zip(self.extra_metrics, totals[4:])}
        timings["time/reward"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        packing = None
        if c.train.pack_tokens:
            packing = packed_minibatches(c, state.key, rollout, self.pad_id, batch_devices(self.mesh))
        state, metrics = self.update_fn(state, rollout, device_scores, self.frozen, self.update_reference, packing)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if packing is not None:
            packed = packing_stats(packing)
            metrics["packing/rows"] = float(packed["rows"])
            metrics["packing/real_fraction"] = packed["real_fraction"]
        timings["time/update"] = time.perf_counter() - t0

        nonfinite = metrics["nonfinite_steps"]
        if nonfinite and c.train.on_nonfinite == "stop":
            raise FloatingPointError(
                f"iteration {step}: non-finite loss or gradient in {int(nonfinite)} of "
                f"{c.rl.num_ppo_epochs * c.rl.num_mini_batches} minibatch steps (those steps were not applied; "
                "set config.train.on_nonfinite='skip' to carry on)")
        position = {"data_epoch": jnp.int32(self.iterator.epoch), "data_offset": jnp.int32(self.iterator.offset)}
        state = state.replace(**jax.device_put(position, replicated(self.mesh)))
        metrics.update(timings)
        metrics.update(extra)
        metrics["time/iteration"] = sum(timings.values())
        metrics["response/length_mean"] = float(totals[1] / rows)
        metrics["response/eos_frac"] = float(totals[3] / rows)
        metrics["speed/generated_tokens_per_s"] = float(totals[1]) / max(timings["time/rollout"], 1e-9)
        samples = []
        if want_samples:
            kl_rows = self.kl_to_reference(prompt_ids, prompt_mask, {"response_ids": rollout.response_ids,
                                                                      "response_mask": rollout.response_mask,
                                                                      "logprobs": rollout.logprobs})
            for i in range(min(c.logging.num_samples, len(prompts))):
                samples.append({"prompt": prompts[i], "response": responses[i], "score": float(scores[i]),
                                "kl": float(kl_rows[i])})
        return state, metrics, samples

    # ---------------------------------------------------------------- export
    def export_policy(self, state: TrainState, path: str) -> None:
        """Write the policy as an HF folder (config.json + safetensors) and the tokenizer beside it;
        a LoRA policy is written merged, and its adapters alone to `path/adapter` (PEFT layout). The
        trained weights are written in `model.param_dtype`, as the forward saw them. With several
        processes every one must call this (the weights are gathered); process 0 writes."""
        from rlhf_jax.models import read_hf_config, save_pretrained
        trainable = cast_floats(state.params["policy"], jnp.dtype(self.config.model.param_dtype))
        frozen = self.frozen
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            gather = lambda tree: jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                                               tree)
            trainable, frozen = gather(trainable), gather(frozen)
            if jax.process_index() != 0:
                return
        model = nnx.merge(self.policy_graphdef, trainable, frozen)
        source = read_hf_config(self.config.model.path) if self.config.model.path else None
        extra = {"pad_token_id": self.pad_id, "eos_token_id": self.eos_ids[0]}
        save_pretrained(model, path, hf_config={**(source or {}), **extra})  # adapters merged in
        self.tokenizer.save_pretrained(path)
        if self.lora:
            save_adapters(model, os.path.join(path, "adapter"), base_model_name_or_path=self.config.model.path)


def _row_kl(logprobs, ref_logprobs, response_mask):
    """Per-row sum over response tokens of log pi(y) - log pi_ref(y) (k1), on device."""
    return jnp.sum((logprobs - ref_logprobs) * response_mask, axis=1)


def check_rewards(raw, n: int, source: str) -> np.ndarray:
    """A reward function's result as f32[n]: a list, tuple or 1-D array of exactly one real number per
    response (bools count as 0 and 1). Anything else (a string, even a numeric one, None, a nested
    list, too few or too many values) is a UserCodeError naming `source` (the reward function), the
    first offending response and what it returned there."""
    def refuse(what: str):
        raise UserCodeError(f"config.reward.function = {source!r} must return one real number per response; "
                            f"it returned {what}")
    if isinstance(raw, np.ndarray):
        if raw.ndim != 1 or raw.dtype.kind not in "biuf":
            refuse(f"an array of shape {raw.shape} and dtype {raw.dtype} for {n} responses")
        values = raw
    elif isinstance(raw, (list, tuple)):
        for i, value in enumerate(raw):
            if not isinstance(value, (numbers.Real, np.bool_)):
                refuse(f"a {type(value).__name__} for response {i} ({value!r:.60})")
        values = raw
    else:
        refuse(f"a {type(raw).__name__} ({raw!r:.60}), not a list of numbers")
    if len(values) != n:
        refuse(f"{len(values)} values for {n} responses")
    return np.asarray(values, dtype=np.float32)
