"""The PPO trainer: models, data and reward built from a config; rollout -> reward -> update.

One iteration is three jitted calls and one host step:
  1. `generate` from the policy (the value head's values come along when the trunk is shared);
  2. one forward of the reference (and of a separate value model) over prompt + response;
  3. host: decode and call the Python reward function (or, for a reward model, one more jitted forward);
  4. `update`: KL-shaped rewards, GAE, whitening, `ppo_update`, the KL controller step.
The train state is a pytree: everything a resumed run needs to continue exactly.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rlhf_jax import advantages as adv_lib
from rlhf_jax import kl as kl_lib
from rlhf_jax.config import validate, validate_lengths, validate_tokenizer
from rlhf_jax.data import PromptIterator, read_prompts, tokenize_prompts
from rlhf_jax.models import CausalLM, ModelConfig, ScalarModel, load_pretrained
from rlhf_jax.models.lora import TRAINABLE, load_adapters, merged_params, save_adapters, with_lora
from rlhf_jax.ops import token_logprobs
from rlhf_jax.ppo import lm_ppo_loss, ppo_update, rollout_metrics
from rlhf_jax.sampling import generate
from rlhf_jax.sharding import (BATCH_AXES, batch_sharding, make_mesh, param_shardings, replicated, shard_like,
                               state_shardings)

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # PPO iterations done
    params: Any  # {"policy": nnx.State, "value": nnx.State (separate value model only)}
    opt_state: Any
    kl: kl_lib.KLController
    key: jax.Array  # uint32[2], split every iteration
    data_epoch: jax.Array
    data_offset: jax.Array
    score_stats: jax.Array  # f32[3]: count, mean, sum of squared deviations of the scores seen (running norm)


def load_callable(spec: str) -> Callable:
    """'package.module:name' -> the object (the reward function named in the config)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"config.reward.function = {spec!r}: cannot import module {module_name!r} ({e})") from e
    if not hasattr(module, attr):
        raise AttributeError(f"config.reward.function = {spec!r}: module {module_name!r} has no {attr!r}")
    return getattr(module, attr)


def builtin_model_config(config, vocab_size: int) -> ModelConfig:
    b = config.model.builtin
    heads = b.num_heads
    kw = dict(family=b.family, vocab_size=vocab_size, hidden_size=b.hidden_size, num_layers=b.num_layers,
              num_heads=heads, num_kv_heads=b.num_kv_heads or heads, head_dim=b.hidden_size // heads,
              intermediate_size=b.intermediate_size or 4 * b.hidden_size,
              max_position_embeddings=b.max_position_embeddings, dtype=config.model.dtype,
              param_dtype=config.model.param_dtype)
    if b.family == "gpt2":
        kw.update(qkv_bias=True, o_bias=True, mlp_bias=True)
    return ModelConfig(**kw)


def load_tokenizer(config, workdir: str | None):
    from transformers import AutoTokenizer

    path = config.tokenizer.path or config.model.path
    if not path:
        from rlhf_jax.tasks.reviews import build_tokenizer
        path = build_tokenizer(os.path.join(workdir or os.path.expanduser("~/.cache/rlhf_jax"), "tokenizer"))
    tokenizer = AutoTokenizer.from_pretrained(path)  # local folder; trust_remote_code stays off
    tokenizer.padding_side = "left"
    if config.tokenizer.pad_token:
        tokenizer.pad_token = config.tokenizer.pad_token
    validate_tokenizer(tokenizer)
    return tokenizer


def make_optimizer(config) -> optax.GradientTransformation:
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


def response_positions(prompt_len: int, response_len: int) -> slice:
    """The positions whose outputs predict the response tokens (prompts are left-padded to prompt_len)."""
    return slice(prompt_len - 1, prompt_len - 1 + response_len)


def response_outputs(model, ids, mask, prompt_len: int, response_len: int, with_values: bool):
    """Logits (and values) at the positions that predict each response token."""
    hidden, _ = model.backbone(ids, mask, output_index=response_positions(prompt_len, response_len))
    return model.logits(hidden), (model.values(hidden) if with_values else None)


class PPOTrainer:
    """Builds everything from a config and runs PPO iterations on a `TrainState`.

    `extra_metrics` maps a metric name to `fn(prompts, responses, ended) -> list[float]`
    (host-side text metrics, e.g. the demo's validity); their means are logged.
    """

    def __init__(self, config, workdir: str | None = None, extra_metrics: dict[str, Callable] | None = None):
        validate(config)
        self.mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        validate(config, num_devices=batch_devices)
        self.config = config
        self.workdir = workdir
        self.extra_metrics = extra_metrics or {}
        self.tokenizer = load_tokenizer(config, workdir)
        self.eos_ids = (int(self.tokenizer.eos_token_id),)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.shared_value = config.model.value_model == "shared"

        policy = self._load_policy()
        validate_lengths(config, policy.cfg.max_position_embeddings)
        self.lora = bool(config.lora.enabled)
        # Trainable params go into the train state; the frozen rest (the LoRA base) stays here, once.
        trainable = TRAINABLE if self.lora else nnx.Param
        self.policy_graphdef, initial_trainable, self.frozen = nnx.split(policy, trainable, ...)
        self.initial_policy_params = initial_trainable
        if config.model.reference_path:
            self.ref_graphdef, self.ref_params = nnx.split(load_pretrained(
                config.model.reference_path, value_head=self.shared_value, dtype=config.model.dtype,
                param_dtype=config.model.param_dtype))
        elif not self.lora or config.lora.adapter_path:
            self.ref_graphdef, self.ref_params = self.policy_graphdef, None  # made in _place_params
        else:
            # The base with the adapters off: a graph without adapters over the very same base buffers.
            base_cfg = policy.cfg.replace(lora_rank=0, lora_targets=())
            self.ref_graphdef = nnx.graphdef(nnx.eval_shape(
                lambda: CausalLM(base_cfg, rngs=nnx.Rngs(0), value_head=False)))
            self.ref_params = None

        self.value_graphdef = self.initial_value_params = None
        if not self.shared_value:
            self.value_graphdef, self.initial_value_params = nnx.split(self._load_value_model(policy))

        self._place_params()

        self.reward_fn = self.rm_graphdef = self.rm_params = None
        if config.reward.kind == "function":
            self.reward_fn = load_callable(config.reward.function)
        else:
            self.rm_graphdef, self.rm_params = nnx.split(load_pretrained(
                config.reward.model_path, kind="scalar", dtype=config.model.dtype, mesh=self.mesh))

        self._load_prompts()
        self.iterator = PromptIterator(len(self.prompt_texts), config.train.rollout_batch_size, config.seed,
                                       jax.process_index(), jax.process_count())
        self.optimizer = make_optimizer(config)
        self.reference_score_gain, self.reference_score_bias = 1.0, 0.0
        self._build_functions()
        if config.reward.normalize == "reference":
            self._measure_reference_scores()

    # ---------------------------------------------------------------- setup
    def _load_policy(self) -> CausalLM:
        c = self.config
        if c.model.path:
            policy = load_pretrained(c.model.path, value_head=self.shared_value, dtype=c.model.dtype,
                                     param_dtype=c.model.param_dtype, mesh=self.mesh)
        else:
            cfg = builtin_model_config(c, len(self.tokenizer))
            build = lambda: CausalLM(cfg, rngs=nnx.Rngs(c.model.builtin.init_seed), value_head=self.shared_value)
            graphdef, abstract = nnx.split(nnx.eval_shape(build))
            # Initialised on the mesh: each device computes only its own shards.
            params = jax.jit(lambda: nnx.state(build()), out_shardings=param_shardings(abstract, self.mesh))()
            policy = nnx.merge(graphdef, params)
        if not c.lora.enabled:
            return policy
        if c.lora.adapter_path:
            return load_adapters(policy, c.lora.adapter_path, seed=c.seed)
        return with_lora(policy, c.lora.rank, c.lora.alpha, tuple(c.lora.targets), seed=c.seed)

    def _place_params(self) -> None:
        """Put every parameter tree on the mesh by the partition rules (shards go straight to their devices)."""
        place = lambda tree: shard_like(tree, param_shardings(tree, self.mesh))
        self.frozen = place(self.frozen)
        self.initial_policy_params = place(self.initial_policy_params)
        if self.ref_params is not None:
            self.ref_params = place(self.ref_params)
        if self.initial_value_params is not None:
            self.initial_value_params = place(self.initial_value_params)
        if self.config.model.reference_path:
            return
        if not self.lora:
            # A copy, not an alias: the policy's buffers are donated to the update.
            self.ref_params = jax.tree.map(jnp.copy, nnx.merge_state(self.initial_policy_params, self.frozen))
        elif self.config.lora.adapter_path:
            # Adapters from a LoRA SFT: the reference is the base plus a frozen snapshot of those adapters.
            self.ref_params = nnx.merge_state(jax.tree.map(jnp.copy, self.initial_policy_params), self.frozen)
        else:
            self.ref_params = self.frozen

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

    def generate(self, params, prompt_ids, prompt_mask, key, graphdef=None):
        """Sample responses with the run's sampling settings (the policy's graphdef unless given;
        with a shared trunk the policy's values come along)."""
        graphdef = graphdef or self.policy_graphdef
        with_values = self.shared_value and graphdef is self.policy_graphdef
        return generate(graphdef, params, prompt_ids, prompt_mask, key, with_values=with_values,
                        **self._generate_kwargs)

    def policy_params(self, state: TrainState):
        """The policy's full params: the state's trainable part plus the frozen base."""
        return nnx.merge_state(state.params["policy"], self.frozen)

    def _load_value_model(self, policy: CausalLM) -> ScalarModel:
        c = self.config
        if c.model.value_path:
            return load_pretrained(c.model.value_path, kind="scalar", dtype=c.model.dtype,
                                   param_dtype=c.model.param_dtype, mesh=self.mesh)
        # Start from the policy's backbone (adapters folded in) with a zero head (first values are 0).
        cfg = policy.cfg.replace(lora_rank=0, lora_targets=())
        value = ScalarModel(cfg, rngs=nnx.Rngs(0), zero_head=True)
        backbone = merged_params(policy)["backbone"] if policy.cfg.lora_rank else nnx.state(policy.backbone)
        nnx.update(value.backbone, jax.tree.map(jnp.copy, backbone))
        return value

    def _load_prompts(self) -> None:
        c = self.config
        if c.data.path:
            raw = read_prompts(c.data.path, c.data.field)
        else:
            from rlhf_jax.tasks.reviews import sample_prompts
            raw = sample_prompts(c.data.builtin_prompts, seed=c.seed)
        if c.data.chat_template:
            raw = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                      add_generation_prompt=True) for p in raw]
        ids, mask, texts, report = tokenize_prompts(raw, self.tokenizer, c.data.max_prompt_len, c.data.truncation)
        if report.truncated or report.rejected_empty or report.rejected_too_long:
            log.warning("prompts: %d read, %d kept, %d cut from the left, %d rejected as too long, %d empty",
                        report.total, report.kept, report.truncated, report.rejected_too_long, report.rejected_empty)
        if report.kept < c.train.rollout_batch_size:
            raise ValueError(f"only {report.kept} usable prompts (of {report.total}): fewer than "
                             f"config.train.rollout_batch_size = {c.train.rollout_batch_size}")
        self.prompt_report = report
        self.prompt_ids, self.prompt_mask, self.prompt_texts = ids, mask, texts

    def init_state(self) -> TrainState:
        """The state at iteration 0. Call it once: it hands the initial params over to the state, whose
        buffers the update donates (the reference keeps its own copy)."""
        c = self.config
        if self.initial_policy_params is None:
            raise RuntimeError("init_state() was already called on this trainer")
        params = {"policy": self.initial_policy_params}
        if not self.shared_value:
            params["value"] = self.initial_value_params
        self.initial_policy_params = self.initial_value_params = None
        if c.ppo.adaptive_kl:
            kl = kl_lib.adaptive_kl_controller(c.ppo.kl_coef, c.ppo.kl_target, c.ppo.kl_horizon)
        else:
            kl = kl_lib.fixed_kl_controller(c.ppo.kl_coef)
        # The optimizer state is made on the mesh, shaped and sharded like the params it follows.
        opt_shardings = state_shardings(jax.eval_shape(self.optimizer.init, params), self.mesh)
        opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(params)
        state = TrainState(step=jnp.int32(0), params=params, opt_state=opt_state, kl=kl,
                           key=jax.random.PRNGKey(c.seed), data_epoch=jnp.int32(0), data_offset=jnp.int32(0),
                           score_stats=jnp.zeros((3,), jnp.float32))
        self.state_sharding = state_shardings(state, self.mesh)
        self._update = jax.jit(self._update_fn, donate_argnums=(0,),
                               out_shardings=(self.state_sharding, replicated(self.mesh)))
        return jax.device_put(state, self.state_sharding)

    # ---------------------------------------------------------------- jitted pieces
    def _build_functions(self) -> None:
        c = self.config
        temperature = c.sampling.temperature
        prompt_len, response_len = c.data.max_prompt_len, c.sampling.max_new_tokens
        policy_gd, value_gd, shared = self.policy_graphdef, self.value_graphdef, self.shared_value
        ref_gd = self.ref_graphdef

        self._generate_kwargs = dict(max_new_tokens=response_len, temperature=temperature, eos_ids=self.eos_ids,
                                     pad_id=self.pad_id)

        def forward_values(value_params, ids, mask):
            return nnx.merge(value_gd, value_params)(ids, mask, response_positions(prompt_len, response_len))

        def reference_logprobs(ref_params, ids, mask, response_ids):
            ref_logits, _ = response_outputs(nnx.merge(ref_gd, ref_params), ids, mask, prompt_len,
                                             response_len, with_values=False)
            return token_logprobs(ref_logits / temperature, response_ids)

        @jax.jit
        def reference_forward(ref_params, value_params, ids, mask, response_ids):
            values = None if shared else forward_values(value_params, ids, mask)
            return reference_logprobs(ref_params, ids, mask, response_ids), values

        self.reference_forward = reference_forward
        self._reference_logprobs = jax.jit(reference_logprobs)

        if self.rm_graphdef is not None:
            rm_gd = self.rm_graphdef
            self._reward_model = jax.jit(lambda p, ids, mask: nnx.merge(rm_gd, p).sequence_scores(ids, mask))

        def make_loss(frozen):
            def forward(params, mb):
                ids = jnp.concatenate([mb["prompt_ids"], mb["response_ids"]], axis=1)
                mask = jnp.concatenate([mb["prompt_mask"], mb["response_mask"]], axis=1)
                model = nnx.merge(policy_gd, params["policy"], frozen)
                logits, values = response_outputs(model, ids, mask, prompt_len, response_len, with_values=shared)
                if not shared:
                    values = forward_values(params["value"], ids, mask)
                return logits, values

            return lm_ppo_loss(forward, temperature=temperature, cliprange=p.cliprange,
                               cliprange_value=p.cliprange_value, vf_coef=p.vf_coef, ent_coef=p.ent_coef,
                               aggregation=p.loss_aggregation, kl_loss_coef=1.0 if p.kl_in_loss else 0.0,
                               kl_estimator=p.kl_loss_estimator)

        p = c.ppo
        estimator = kl_lib.get_estimator(p.kl_estimator)
        optimizer = self.optimizer

        def update(state: TrainState, frozen, batch: dict, scores):
            """Advantages from the rollout, then the PPO epochs; returns (state, metrics)."""
            mask = batch["response_mask"].astype(bool)
            scores = c.reward.scale * scores + c.reward.bias
            score_stats = state.score_stats
            if c.reward.normalize == "running":
                score_stats = _merge_stats(score_stats, scores)
                variance = score_stats[2] / jnp.maximum(score_stats[0] - 1.0, 1.0)
                scores = (scores - score_stats[1]) * jax.lax.rsqrt(variance + 1e-8)
            elif c.reward.normalize == "reference":
                scores = scores * self.reference_score_gain + self.reference_score_bias
            if p.missing_eos_penalty:
                scores = adv_lib.penalize_missing_eos(scores, batch["response_ids"], self.eos_ids,
                                                      p.missing_eos_penalty)
            kl = jnp.where(mask, estimator(batch["logprobs"], batch["ref_logprobs"]), 0.0)
            # With the KL in the loss (GRPO style) the reward carries no KL term.
            reward_kl_coef = 0.0 if p.kl_in_loss else state.kl.kl_coef
            rewards, non_score = adv_lib.kl_shaped_rewards(scores, kl, mask, reward_kl_coef)
            if p.whiten_rewards:
                rewards = adv_lib.masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = adv_lib.gae(rewards, batch["values"], mask, p.gamma, p.lam)
            if p.whiten_advantages:
                advantages = jnp.where(mask, adv_lib.masked_whiten(advantages, mask), 0.0)
            train_batch = dict(batch, advantages=advantages, returns=returns)
            key, update_key = jax.random.split(state.key)
            params, opt_state, stats = ppo_update(
                state.params, state.opt_state, train_batch, update_key, loss_fn=make_loss(frozen), optimizer=optimizer,
                num_epochs=p.num_ppo_epochs, num_minibatches=p.num_mini_batches)
            metrics = rollout_metrics(scores, kl, non_score, batch["logprobs"], mask)
            batch_size = scores.shape[0]
            new_kl = kl_lib.update_kl_controller(state.kl, metrics["objective/kl"], batch_size)
            metrics.update(stats)
            metrics["objective/kl_coef"] = state.kl.kl_coef
            metrics["val/mean"] = jnp.sum(jnp.where(mask, batch["values"], 0.0)) / jnp.maximum(mask.sum(), 1)
            metrics["val/returns_mean"] = jnp.sum(returns) / jnp.maximum(mask.sum(), 1)
            new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, kl=new_kl, key=key,
                                      score_stats=score_stats)
            return new_state, metrics

        self._update_fn = update  # jitted in init_state, once the state's shardings are known

    def _measure_reference_scores(self) -> None:
        """Gain and offset that give the reference policy's samples mean 0 and std 1 (fixed keys, so a
        resumed run measures the same values). Runs before `_update` is first traced."""
        c = self.config
        scores = []
        for i in range(c.reward.normalize_batches):
            index = np.random.default_rng([c.seed, 99, i]).choice(len(self.prompt_texts), c.train.rollout_batch_size,
                                                                   replace=False)
            prompt_ids, prompt_mask = self.to_device_batch(self.prompt_ids[index]), self.to_device_batch(
                self.prompt_mask[index])
            out = self.generate(self.ref_params, prompt_ids, prompt_mask, jax.random.PRNGKey(10_000 + i),
                                graphdef=self.ref_graphdef)
            ids, mask = _join(prompt_ids, prompt_mask, out)
            prompts = [self.prompt_texts[i] for i in index]
            responses, _, _ = self.decode_responses(out)
            scores.append(c.reward.scale * self.scores_for(prompts, responses, ids, mask) + c.reward.bias)
        scores = np.concatenate(scores)
        std = float(scores.std()) or 1.0
        self.reference_score_gain, self.reference_score_bias = 1.0 / std, -float(scores.mean()) / std
        log.info("reward normalisation from %d reference samples: mean %.4f, std %.4f", len(scores),
                 scores.mean(), std)

    def decode_responses(self, out):
        """This host's rows of a `generate` output as (texts without special tokens, lengths,
        whether each ended with EOS)."""
        response_ids, lengths = self.local_rows(out["response_ids"]), self.local_rows(out["lengths"])
        rows = [r[:n] for r, n in zip(response_ids, lengths)]
        responses = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        ended = [bool(np.isin(r, self.eos_ids).any()) for r in rows]
        return responses, lengths, ended

    def kl_to_reference(self, prompt_ids, prompt_mask, out) -> np.ndarray:
        """Per-row KL of a `generate` output to the reference: the sum over response tokens of
        log pi(y) - log pi_ref(y), with pi's logprobs as sampled (this host's rows)."""
        ids, mask = _join(prompt_ids, prompt_mask, out)
        ref_logprobs = self._reference_logprobs(self.ref_params, ids, mask, out["response_ids"])
        return self.local_rows(_row_kl(out, ref_logprobs))

    # ---------------------------------------------------------------- one iteration
    def scores_for(self, prompts: list[str], responses: list[str], ids, mask) -> np.ndarray:
        """Rewards of a batch: the Python function on text, or the reward model on device."""
        if self.reward_fn is not None:
            raw = self.reward_fn(prompts, responses)
            scores = np.asarray(raw, dtype=np.float32)
            if scores.shape != (len(prompts),):
                raise ValueError(f"config.reward.function returned {len(raw) if hasattr(raw, '__len__') else raw!r} "
                                 f"values for {len(prompts)} responses")
            return scores
        return np.asarray(self._reward_model(self.rm_params, ids, mask))

    def iteration(self, state: TrainState, want_samples: bool = False):
        """One PPO iteration. Returns (new state, metrics dict of floats, sample rows)."""
        c = self.config
        timings = {}
        t0 = time.perf_counter()
        self.iterator.restore({"epoch": int(state.data_epoch), "offset": int(state.data_offset)})
        index = self.iterator.next()
        prompt_ids = self.to_device_batch(self.prompt_ids[index])
        prompt_mask = self.to_device_batch(self.prompt_mask[index])
        gen_key = jax.random.fold_in(state.key, 1)
        out = self.generate(self.policy_params(state), prompt_ids, prompt_mask, gen_key)
        jax.block_until_ready(out["response_ids"])
        timings["time/generate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ids, mask = _join(prompt_ids, prompt_mask, out)
        ref_logprobs, values = self.reference_forward(self.ref_params, state.params.get("value"), ids, mask,
                                                       out["response_ids"])
        jax.block_until_ready(ref_logprobs)
        timings["time/reference_value_forward"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        prompts = [self.prompt_texts[i] for i in index]
        responses, lengths, ended = self.decode_responses(out)
        scores = self.scores_for(prompts, responses, ids, mask)
        step = int(state.step)
        if not np.all(np.isfinite(scores)):
            bad = int(np.flatnonzero(~np.isfinite(scores))[0])
            raise FloatingPointError(f"iteration {step}: non-finite reward {scores[bad]} for response {bad} "
                                     f"({responses[bad]!r})")
        extra = {name: float(np.mean(fn(prompts, responses, ended))) for name, fn in self.extra_metrics.items()}
        timings["time/reward"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": out["response_ids"],
                 "response_mask": out["response_mask"], "logprobs": out["logprobs"], "ref_logprobs": ref_logprobs,
                 "values": out["values"] if self.shared_value else values}
        state, metrics = self._update(state, self.frozen, batch, self.to_device_batch(scores))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        timings["time/update"] = time.perf_counter() - t0

        nonfinite = metrics["nonfinite_steps"]
        if nonfinite and c.train.on_nonfinite == "stop":
            raise FloatingPointError(
                f"iteration {step}: non-finite loss or gradient in {int(nonfinite)} of "
                f"{c.ppo.num_ppo_epochs * c.ppo.num_mini_batches} PPO steps (those steps were not applied; "
                "set config.train.on_nonfinite='skip' to carry on)")
        position = {"data_epoch": jnp.int32(self.iterator.epoch), "data_offset": jnp.int32(self.iterator.offset)}
        state = state.replace(**jax.device_put(position, replicated(self.mesh)))
        metrics.update(timings)
        metrics.update(extra)
        metrics["time/iteration"] = sum(timings.values())
        n_tokens = int(lengths.sum())
        metrics["response/length_mean"] = float(lengths.mean())
        metrics["response/eos_frac"] = float(np.mean(ended))
        metrics["speed/generated_tokens_per_s"] = n_tokens / max(timings["time/generate"], 1e-9)
        samples = []
        if want_samples:
            kl_rows = self.local_rows(_row_kl(out, ref_logprobs))
            for i in range(min(c.logging.num_samples, len(prompts))):
                samples.append({"prompt": prompts[i], "response": responses[i], "score": float(scores[i]),
                                "kl": float(kl_rows[i])})
        return state, metrics, samples

    # ---------------------------------------------------------------- export
    def export_policy(self, state: TrainState, path: str) -> None:
        """Write the policy as an HF folder (config.json + safetensors) and the tokenizer beside it;
        a LoRA policy is written merged, and its adapters alone to `path/adapter` (PEFT layout)."""
        from rlhf_jax.models import read_hf_config, save_pretrained
        model = nnx.merge(self.policy_graphdef, state.params["policy"], self.frozen)
        source = read_hf_config(self.config.model.path) if self.config.model.path else None
        extra = {"pad_token_id": self.pad_id, "eos_token_id": self.eos_ids[0]}
        save_pretrained(model, path, hf_config={**(source or {}), **extra})  # adapters merged in
        self.tokenizer.save_pretrained(path)
        if self.lora:
            save_adapters(model, os.path.join(path, "adapter"), base_model_name_or_path=self.config.model.path)


def _join(prompt_ids, prompt_mask, out):
    """Prompt + response ids and mask: int32[batch, prompt_len + response_len]."""
    return (jnp.concatenate([prompt_ids, out["response_ids"]], axis=1),
            jnp.concatenate([prompt_mask, out["response_mask"]], axis=1))


def _row_kl(out, ref_logprobs):
    """Per-row sum over response tokens of log pi(y) - log pi_ref(y) (k1), on device."""
    return jnp.sum((out["logprobs"] - ref_logprobs) * out["response_mask"], axis=1)


def _merge_stats(stats, x):
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


def params_are_finite(params) -> bool:
    leaves = jax.tree.leaves(params)
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))
