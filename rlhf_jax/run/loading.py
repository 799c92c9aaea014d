"""What a run loads from its config, on the host: the tokenizer, the prompts, the reward function and
the models' weights (placed on the mesh by the partition rules).

Built-in tasks (the demo's tokenizer, prompts and preference pairs) are modules named in the config
(`data.builtin`), imported by name like the reward function; the library never imports them itself.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from types import ModuleType
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.config import ConfigError, uses_value, validate_tokenizer
from rlhf_jax.models import CausalLM, ModelConfig, ScalarModel, load_pretrained
from rlhf_jax.models.hf import config_from_hf, read_hf_config
from rlhf_jax.models.lora import TRAINABLE, load_adapters, merged_params, with_lora
from rlhf_jax.parallel.sharding import param_placement, param_shardings, shard_like
from rlhf_jax.run.data import as_messages, read_prompts, tokenize_prompts

log = logging.getLogger(__name__)


def load_callable(spec: str, key: str = "config.reward.function") -> Callable:
    """'package.module:name' -> the object it names (`key` is the config key, for the messages)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the module itself, not one it imports
            raise ConfigError(f"{key} = {spec!r}: no module named {e.name!r}") from None
        raise  # an import inside the user's module failed: their traceback
    if not hasattr(module, attr):
        raise ConfigError(f"{key} = {spec!r}: module {module_name!r} has no {attr!r}")
    value = getattr(module, attr)
    if not callable(value):
        raise ConfigError(f"{key} = {spec!r}: {attr!r} is a {type(value).__name__}, not a function")
    return value


class UserCodeError(RuntimeError):
    """The user's code (a reward function) broke its contract without raising: one line, exit status 1."""


def check_path(key: str, path: str, kind: str = "folder") -> None:
    """A ConfigError naming `key` (a config key or a command-line flag) unless `path` is a local `kind`:
    "file", "folder", "model" (a Hugging Face folder this library reads: config.json of a supported
    model_type and safetensors weights) or "tokenizer" (a folder with a tokenizer's files). Every entry
    point checks the paths it is given here before anything loads: a typo is one line, never a hub
    lookup (nothing contacts a hub)."""
    if kind == "file":
        if not os.path.isfile(path):
            raise ConfigError(f"{key} = {path!r}: no such file")
        return
    if not os.path.isdir(path):
        raise ConfigError(f"{key} = {path!r}: no such folder (a local folder; nothing is downloaded from a hub)")
    if kind == "model":
        config_from_hf(read_hf_config(path))  # a supported model_type, or the field named
        weights = ("model.safetensors", "model.safetensors.index.json")
        if not any(os.path.isfile(os.path.join(path, f)) for f in weights):
            raise ConfigError(f"{key} = {path!r}: no model.safetensors (or its index) in it; only "
                              "safetensors weights are read")
    elif kind == "tokenizer" and not any(os.path.isfile(os.path.join(path, f))
                                         for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ConfigError(f"{key} = {path!r}: no tokenizer in it (tokenizer.json or tokenizer_config.json)")


def check_folders(config) -> None:
    """Every local folder the config names (`check_path`): a model folder a Hugging Face folder this
    library reads; checked before anything loads."""
    c = config
    paths = {"config.model.path": (c.model.path, "model"), "config.tokenizer.path": (c.tokenizer.path, "tokenizer"),
             "config.model.reference_path": (c.model.reference_path, "model"),
             "config.model.value_path": (c.model.value_path, "model"),
             "config.lora.adapter_path": (c.lora.adapter_path, "folder")}
    if c.reward.kind == "model":
        paths["config.reward.model_path"] = (c.reward.model_path, "model")
    for key, (path, kind) in paths.items():
        if path:
            check_path(key, path, kind)


def builtin_task(config) -> ModuleType:
    """The module named by `config.data.builtin`: it provides `build_tokenizer(folder) -> folder`,
    `sample_prompts(n, seed) -> list[str]` and, for reward-model training, `preference_pairs(n, seed)`."""
    name = config.data.builtin
    if not name:
        raise ConfigError("config.data.builtin is empty, but the run needs the built-in task (config.data.path "
                          "or config.tokenizer.path / config.model.path is empty)")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            raise ConfigError(f"config.data.builtin = {name!r}: no module named {e.name!r}") from None
        raise


def builtin_model_config(config, vocab_size: int) -> ModelConfig:
    """The ModelConfig of `config.model.builtin` (a random architecture of the given family); its
    vocabulary is `vocab_size` (the tokenizer's) unless the config sets one."""
    b = config.model.builtin
    if b.vocab_size and b.vocab_size < vocab_size:
        raise ConfigError(f"config.model.builtin.vocab_size = {b.vocab_size} is smaller than the tokenizer's "
                          f"{vocab_size} tokens")
    heads = b.num_heads
    kw = dict(family=b.family, vocab_size=b.vocab_size or vocab_size, hidden_size=b.hidden_size,
              num_layers=b.num_layers, num_heads=heads, num_kv_heads=b.num_kv_heads or heads,
              head_dim=b.head_dim or b.hidden_size // heads, intermediate_size=b.intermediate_size or 4 * b.hidden_size,
              max_position_embeddings=b.max_position_embeddings, rope_theta=float(b.rope_theta),
              norm_eps=float(b.norm_eps), tie_word_embeddings=bool(b.tie_word_embeddings), qk_norm=bool(b.qk_norm),
              dtype=config.model.dtype, param_dtype=config.model.param_dtype,
              scan_layers=bool(config.model.scan_layers))
    if b.family == "gpt2":
        kw.update(qkv_bias=True, o_bias=True, mlp_bias=True)
    if b.family == "gemma3":
        sliding = tuple(i for i in range(b.num_layers) if (i + 1) % 6) if b.sliding_window else ()
        kw.update(qk_norm=True, sliding_window=b.sliding_window, sliding_layers=sliding, rope_local_theta=10000.0)
    return ModelConfig(**kw)


def load_tokenizer(config, workdir: str | None):
    """The run's tokenizer (a local folder; the built-in task's when no path is set), left-padding."""
    from transformers import AutoTokenizer

    path = config.tokenizer.path or config.model.path
    if not path:
        # One folder per task: a task's build_tokenizer keeps a folder that already holds a tokenizer.
        task = config.data.builtin.rsplit(".", 1)[-1]
        cache = os.path.join(workdir or os.path.expanduser("~/.cache/rlhf_jax"), f"tokenizer-{task}")
        path = builtin_task(config).build_tokenizer(cache)
    tokenizer = AutoTokenizer.from_pretrained(path)  # local folder; trust_remote_code stays off
    tokenizer.padding_side = "left"
    if config.tokenizer.pad_token:
        tokenizer.pad_token = config.tokenizer.pad_token
    validate_tokenizer(tokenizer)
    if config.data.chat_template and not tokenizer.chat_template:
        raise ConfigError(f"config.data.chat_template = True: the tokenizer in {path!r} has no chat template "
                          "(use one that has, or leave the prompts as they are with chat_template = False)")
    return tokenizer


@dataclasses.dataclass
class Prompts:
    ids: Any  # int32[n, max_prompt_len], left-padded
    mask: Any  # int32[n, max_prompt_len]
    texts: list[str]
    report: Any  # data.PromptReport


def load_prompts(config, tokenizer) -> Prompts:
    """The prompt set: `data.path`, or the built-in task's prompts; chat-templated if asked; reported."""
    c = config
    if c.data.path:
        raw = read_prompts(c.data.path, c.data.field)
    else:
        raw = builtin_task(c).sample_prompts(c.data.builtin_prompts, seed=c.seed)
    if c.data.chat_template:
        raw = [tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True)
               for p in raw]
    elif not all(isinstance(p, str) for p in raw):
        raise ConfigError(f"data.path {c.data.path}: its prompts are conversations (lists of messages): "
                          "set config.data.chat_template = True")
    ids, mask, texts, report = tokenize_prompts(raw, tokenizer, c.data.max_prompt_len, c.data.truncation)
    if report.truncated or report.rejected_empty or report.rejected_too_long:
        log.warning("prompts: %d read, %d kept, %d cut from the left, %d rejected as too long, %d empty",
                    report.total, report.kept, report.truncated, report.rejected_too_long, report.rejected_empty)
    if report.kept < c.train.rollout_batch_size:
        raise ConfigError(f"only {report.kept} usable prompts (of {report.total}; {report.rejected_too_long} "
                          f"longer than config.data.max_prompt_len = {c.data.max_prompt_len} with truncation "
                          f"{c.data.truncation!r}, {report.rejected_empty} empty): fewer than "
                          f"config.train.rollout_batch_size = {c.train.rollout_batch_size}")
    return Prompts(ids, mask, texts, report)


@dataclasses.dataclass
class Models:
    """Graphdefs and weights of one run, on the mesh.

    policy_params: the trainable part (the whole policy, or the LoRA adapters and a value head);
    frozen: the rest of the policy (the LoRA base; empty without LoRA), held once;
    ref_params: the whole reference policy (sharing `frozen`'s buffers where it is the policy's graph);
    ref_trainable: what the update takes as the reference on the policy's graph: a snapshot of the
      trainable part (None with `model.reference_path`, whose whole params are `ref_params`);
    value_params / reward_params: a separate value model and a learned reward model, or None.
    """

    policy_config: ModelConfig
    policy_graphdef: Any
    ref_graphdef: Any
    policy_params: Any
    frozen: Any
    ref_params: Any
    ref_trainable: Any = None
    value_graphdef: Any = None
    value_params: Any = None
    reward_graphdef: Any = None
    reward_params: Any = None


def _policy(config, mesh, vocab_size: int, value_head: bool) -> CausalLM:
    c = config
    if c.model.path:
        policy = load_pretrained(c.model.path, value_head=value_head, dtype=c.model.dtype,
                                 param_dtype=c.model.param_dtype, scan_layers=c.model.scan_layers,
                               placement=param_placement(mesh))
    else:
        cfg = builtin_model_config(c, vocab_size)
        build = lambda: CausalLM(cfg, rngs=nnx.Rngs(c.model.builtin.init_seed), value_head=value_head)
        graphdef, abstract = nnx.split(nnx.eval_shape(build))
        # Initialised on the mesh: each device computes only its own shards.
        params = jax.jit(lambda: nnx.state(build()), out_shardings=param_shardings(abstract, mesh))()
        policy = nnx.merge(graphdef, params)
    if not c.lora.enabled:
        return policy
    if c.lora.adapter_path:
        return load_adapters(policy, c.lora.adapter_path, seed=c.seed)
    return with_lora(policy, c.lora.rank, c.lora.alpha, tuple(c.lora.targets), seed=c.seed)


def _value_model(config, policy: CausalLM, mesh) -> ScalarModel:
    c = config
    if c.model.value_path:
        return load_pretrained(c.model.value_path, kind="scalar", dtype=c.model.dtype,
                               param_dtype=c.model.param_dtype, scan_layers=c.model.scan_layers,
                               placement=param_placement(mesh))
    # Start from the policy's backbone (adapters folded in) with a zero head (first values are 0).
    cfg = policy.cfg.replace(lora_rank=0, lora_targets=())
    value = ScalarModel(cfg, rngs=nnx.Rngs(0), zero_head=True)
    backbone = merged_params(policy)["backbone"] if policy.cfg.lora_rank else nnx.state(policy.backbone)
    nnx.update(value.backbone, jax.tree.map(jnp.copy, backbone))
    return value


def load_models(config, mesh, vocab_size: int) -> Models:
    """Every model of a run, split into graphdefs and params on `mesh`."""
    c = config
    value = uses_value(c)
    shared = value and c.model.value_model == "shared"
    lora = bool(c.lora.enabled)
    policy = _policy(c, mesh, vocab_size, value_head=shared)
    # Trainable params go into the train state; the frozen rest (the LoRA base) is held once, outside it.
    policy_graphdef, policy_params, frozen = nnx.split(policy, TRAINABLE if lora else nnx.Param, ...)
    ref_graphdef, ref_params = policy_graphdef, None
    if c.model.reference_path:  # another model: its own graph and whole params
        ref_graphdef, ref_params = nnx.split(load_pretrained(
            c.model.reference_path, value_head=shared, dtype=c.model.dtype, param_dtype=c.model.param_dtype,
            scan_layers=c.model.scan_layers))

    value_graphdef = value_params = None
    if value and not shared:
        value_graphdef, value_params = nnx.split(_value_model(c, policy, mesh))

    place = lambda tree: shard_like(tree, param_shardings(tree, mesh))
    frozen, policy_params = place(frozen), place(policy_params)
    value_params = None if value_params is None else place(value_params)
    ref_trainable = None
    if ref_params is not None:
        ref_params = place(ref_params)
    else:
        # The policy as RL starts, through the policy's own program: a snapshot of the trainable part (a
        # copy, as the policy's buffers are donated to the update) over the very frozen buffers. Fresh
        # LoRA adapters have B = 0: the base with the adapters off, bit for bit the policy's step-0
        # forward (a graph without adapters rounds differently in bf16).
        ref_trainable = jax.tree.map(jnp.copy, policy_params)
        ref_params = nnx.merge_state(ref_trainable, frozen)

    reward_graphdef = reward_params = None
    if c.reward.kind == "model":
        reward_graphdef, reward_params = nnx.split(load_pretrained(
            c.reward.model_path, kind="scalar", dtype=c.model.dtype, scan_layers=c.model.scan_layers,
            placement=param_placement(mesh)))
    return Models(policy.cfg, policy_graphdef, ref_graphdef, policy_params, frozen, ref_params, ref_trainable,
                  value_graphdef, value_params, reward_graphdef, reward_params)
