"""The trainer's config schema (ml_collections) and its validation.

Config files under configs/ start from `base_config()` and change what they
need; every field that exists is listed here with its default, so a misspelt
override is an error, not a silently ignored key.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
from typing import Iterable

import ml_collections

from rlhf_jax import options


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # "ppo" (a value model or head, GAE), or value-free with a group baseline over train.num_generations
    # samples per prompt: "grpo" (with Dr. GRPO, DAPO and GSPO as rl.* options), "rloo", "reinforce_pp".
    c.algorithm = "ppo"

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # a local HF folder (config.json + safetensors); empty: the built-in architecture below
    # family: "gpt2", "llama" or "gemma3" (Gemma 3's text model). vocab_size 0: the tokenizer's;
    # num_kv_heads / intermediate_size / head_dim 0: num_heads / 4 x hidden_size / hidden_size / num_heads.
    # qk_norm: Qwen3's per-head query/key RMSNorm (llama family). sliding_window (gemma3): > 0 makes
    # five of every six layers attend to that many positions only, at RoPE base 10000, as Gemma 3 does.
    c.model.builtin = ml_collections.ConfigDict(dict(
        family="gpt2", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=0, intermediate_size=0,
        head_dim=0, max_position_embeddings=64, init_seed=0, vocab_size=0, rope_theta=10000.0, norm_eps=1e-5,
        tie_word_embeddings=True, qk_norm=False, sliding_window=0))
    c.model.dtype = "float32"  # compute dtype: bfloat16 on TPU/GPU, float32 on CPU
    c.model.param_dtype = "float32"
    c.model.value_model = "shared"  # "shared": value head on the policy's backbone; "separate": its own model
    c.model.value_path = ""  # separate value model from an HF scalar folder (e.g. the reward model)
    c.model.reference_path = ""  # empty: the reference is the initial policy
    # Memory levers of the update (they change memory and time, not results):
    c.model.remat = "none"  # per block: "none", "full" (recompute it in the backward), "dots" (keep matmul outputs)
    c.model.logits_chunk = 0  # > 0: log-probs and entropy this many response positions at a time (no full logits)
    c.model.shard_activations = True  # the update keeps activations and minibatches sharded over (data, fsdp)
    # The blocks stacked and run under a scan: compile time flat in depth (an 8B update compiles in about
    # the time of a 4-layer one); checkpoints of a scanned run keep the stacked layout.
    c.model.scan_layers = False
    # The update's attention: "xla" (scores and softmax as plain XLA ops; fastest on CPU), "splash" (TPU's
    # Pallas kernel: no [batch, heads, seq, seq] scores in memory; prompt + response a multiple of 128) or
    # "cudnn" (GPU: cuDNN's fused kernel through jax.nn.dot_product_attention).
    c.model.attention = "xla"

    # path empty: model.path. pad_token: set a pad token (e.g. when the tokenizer's pad is its EOS).
    c.tokenizer = ml_collections.ConfigDict(dict(path="", pad_token=""))

    # LoRA: the base stays frozen (one copy serves policy and reference), only the adapters (and the
    # value head of a shared trunk) train. The reference is the policy as RL starts: the bare base, or
    # the base plus `adapter_path`'s adapters (a LoRA SFT) frozen as they were loaded.
    c.lora = ml_collections.ConfigDict(dict(
        enabled=False, rank=8, alpha=16.0, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        adapter_path=""))

    c.reward = ml_collections.ConfigDict(dict(
        kind="function",  # "function": a Python callable on the host; "model": a learned reward model
        function="rlhf_jax.tasks.reviews:sentiment_reward",  # "module:callable(prompts, responses) -> floats"
        model_path="",  # HF scalar (AutoModelForSequenceClassification) folder
        scale=1.0, bias=0.0,  # score = scale * raw + bias, then:
        # "none"; "reference": a fixed gain and offset so that scores of the reference policy's samples
        # have mean 0 and std 1 (measured once at the start on `normalize_batches` batches);
        # "running": whiten by the running mean and std of every score seen so far.
        normalize="none", normalize_batches=4))

    c.data = ml_collections.ConfigDict(dict(
        path="",  # JSONL file or HF datasets folder; empty: `builtin_prompts` prompts of the built-in task
        # A module providing build_tokenizer(folder) and sample_prompts(n, seed): the prompts when `path` is
        # empty, and the tokenizer when tokenizer.path and model.path are.
        builtin="rlhf_jax.tasks.reviews",
        field="prompt", max_prompt_len=8, truncation="left", builtin_prompts=512,
        chat_template=False))  # wrap each prompt as a user turn with the tokenizer's chat template

    # shard_cache: split the KV cache by rows over the batch axes (False: XLA places it); shard_prefill:
    # also the prefill's activations, so that it gathers weights instead of reducing partial sums;
    # decode_segments: the decode loop in this many loops, each reading the KV cache only as far as it
    # is filled by then (1: one loop reading every slot at every step); decode_layout: "batch" (the
    # weights where the update keeps them, the cache split by rows), "tensor" (a tensor-parallel copy
    # of the weights for the decode loop, the cache split by KV heads; needs shard_cache) or "auto"
    # ("tensor" on more than one model device where the heads split evenly), see
    # rlhf_jax.sampling.generate.generate
    # engine: "static" (every row decodes until the batch's last EOS), "continuous" (`slots` rows decode
    # at a time and a finished row's slot takes the next request, `refill` requests joining at once;
    # 0: half the rows, the prompt group; see rlhf_jax.sampling.engine) or "auto" (continuous where
    # rows can end early and max_new_tokens >= 128, static otherwise: rlhf_jax.sampling.rollout.engine_shape)
    c.sampling = ml_collections.ConfigDict(dict(max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0,
                                                shard_cache=True, shard_prefill=True, decode_segments=1,
                                                decode_layout="auto", engine="auto", slots=0, refill=0,
                                                tail_halvings=2))

    # The update's options, for every algorithm (the section was called `ppo` before GRPO and the others
    # joined: a config or override that says config.ppo.* stops with one line naming config.rl.*).
    c.rl = ml_collections.ConfigDict(dict(
        kl_coef=0.05, kl_estimator="k1", kl_in_loss=False, kl_loss_estimator="k3",
        adaptive_kl=False, kl_target=6.0, kl_horizon=10000.0,
        cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, ent_coef=0.0,
        gamma=1.0, lam=0.95, num_ppo_epochs=4, num_mini_batches=1,
        whiten_rewards=False, whiten_advantages=True, missing_eos_penalty=0.0, loss_aggregation="token",
        # PPO's old log-probs: "recompute" (the training forward, exactly the reference's program),
        # "sampler" (as sampled: saves a forward, differs by rounding below float32), "auto": recompute
        # unless model.dtype is float32.
        old_logprobs="auto",
        # Importance weights pi_trainer / pi_sampler on the policy loss (rlhf_jax.core.losses.sampler_weights):
        # "none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"; cap C > 1.
        sampler_correction="none", sampler_correction_cap=3.0,
        # The ratio is clipped to [1 - cliprange, 1 + cliprange_high] (0: cliprange); ratio_level "token" or
        # "sequence" (GSPO); without a critic loss_aggregation may also be "constant" (Dr. GRPO);
        # scale_rewards_by_std False: Dr. GRPO; mask_zero_std_groups: DAPO's dynamic sampling (no refill);
        # overlong_buffer > 0: DAPO's soft penalty, up to overlong_penalty, over the last that many tokens.
        cliprange_high=0.0, ratio_level="token", scale_rewards_by_std=True, mask_zero_std_groups=False,
        overlong_buffer=0, overlong_penalty=1.0))

    # Offline preference optimisation on pairs (rlhf_jax.core.preference; the update:
    # rlhf_jax.step.preference.make_preference_update): loss "sigmoid" (DPO; label_smoothing > 0:
    # conservative DPO), "ipo", "simpo" (target margin gamma, no reference), "orpo" (orpo_lambda, no
    # reference).
    c.dpo = ml_collections.ConfigDict(dict(loss="sigmoid", beta=0.1, label_smoothing=0.0, gamma=0.5,
                                           orpo_lambda=0.1))

    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, schedule="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
        b1=0.9, b2=0.999, eps=1e-8))

    # rollout_batch_size counts responses: rollout_batch_size / num_generations prompts per iteration.
    # share_prompts: a value-free update runs each prompt once through the backbone for its
    # num_generations samples (where it applies: `rlhf_jax.sampling.rollout.prompt_group`).
    # pack_tokens > 0: the update's forwards run each minibatch's samples packed into rows of this many
    # tokens (`rlhf_jax.core.packing`; at least max_prompt_len + max_new_tokens), not padded to the
    # longest: the real tokens' work, whatever the lengths. Each sample then runs its own prompt.
    # micro_rows > 0 (with pack_tokens): each forward runs this many packed rows per device (a token
    # budget: micro_rows x pack_tokens), a minibatch as many such micro-batches as its samples fill, their
    # gradients summed into one optimizer step; 0: a minibatch's rows in one forward, every minibatch
    # padded to the most rows any needs.
    c.train = ml_collections.ConfigDict(dict(rollout_batch_size=16, num_iterations=10, on_nonfinite="stop",
                                             num_generations=1, share_prompts=True, pack_tokens=0, micro_rows=0))

    c.checkpoint = ml_collections.ConfigDict(dict(every=0, max_to_keep=3, async_save=True))

    c.logging = ml_collections.ConfigDict(dict(
        samples_every=5, num_samples=4, tensorboard=True, wandb=False, wandb_project="rlhf_jax", progress=True))

    # distributed: one process per host, joined by jax.distributed.initialize before any other JAX call;
    # coordinator_address "" and num_processes / process_id -1: JAX's own cluster detection (TPU VM, SLURM).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, distributed=False, coordinator_address="",
                                            num_processes=-1, process_id=-1))
    return c


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _leaves(config, prefix: str = ""):
    """(dotted key, value) of every field, nested sections included."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# Keys that moved, to the key that replaced them: a config or override that uses one stops with one line.
RENAMED_SECTIONS = {"ppo": "rl"}


def load_config(path: str, overrides: Iterable[str] | dict = ()) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path`, with dotted overrides applied: ["rl.kl_coef=0.1", ...]
    or {"rl.kl_coef": 0.1}. Every entry point loads configs through here (the command lines, the
    scripts, the tests, and config files that extend another). An override's string is read as the
    type of the value it replaces (bools as true/false/1/0; tuples and lists as Python literals).
    A file that is missing or has no get_config(), an unknown key or a value of the wrong type is a
    ConfigError naming it; an exception inside the config file's own code keeps its traceback."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config={path}: no such config file")
    name = "rlhf_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"--config={path}: the file defines no get_config()")
    try:
        config = module.get_config()
    except AttributeError as e:
        moved = RENAMED_SECTIONS.get(getattr(e, "name", None) or "")
        if moved is None:
            raise  # the config file's own code: its traceback
        raise ConfigError(f"{path}: config.{e.name} is now config.{moved} (rename the section there)") from None
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    for key, value in items:
        set_key(config, key, value)
    return config


def _split_override(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq:
        raise ConfigError(f"override {text!r}: expected key=value")
    return key.removeprefix("--config.").removeprefix("config."), value


def set_key(config, key: str, value) -> None:
    """Set the dotted `key` of `config` to `value` (a string is parsed as the type of the current value)."""
    section, _, leaf = key.rpartition(".")
    node = config
    for part in section.split(".") if section else ():
        node = _child(node, part, key)
    current = _child(node, leaf, key)
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config.{key} is a section; set one of its keys ({', '.join(sorted(current.keys()))})")
    if isinstance(value, str) and not isinstance(current, str):
        value = _parse(value, current, key)
    try:
        setattr(node, leaf, value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{key} = {value!r}: {e}") from None


def _child(node, part: str, key: str):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        moved = RENAMED_SECTIONS.get(key.split(".")[0])
        if moved:
            raise ConfigError(f"config.{key}: the section is now config.{moved} (config.{moved}."
                              f"{key.partition('.')[2]})")
        raise ConfigError(f"no such config key config.{key}")
    return node[part]


def _parse(text: str, current, key: str):
    try:
        if isinstance(current, bool):
            if text.lower() in ("true", "1"):
                return True
            if text.lower() in ("false", "0"):
                return False
            raise ValueError
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        kind = type(current).__name__
        raise ConfigError(f"config.{key} = {text!r}: expected {'an' if kind[0] in 'aeiou' else 'a'} {kind} "
                          f"(like the default {current!r})") from None


# The keys that take one of several values, and their lists (`rlhf_jax.options`).
_CHOICES = {
    "dpo.loss": options.PREFERENCE_LOSSES,
    "model.value_model": options.VALUE_MODELS,
    "model.dtype": options.DTYPES,
    "model.param_dtype": options.DTYPES,
    "model.remat": options.REMAT_MODES,
    "model.attention": options.ATTENTION_KERNELS,
    "model.builtin.family": options.FAMILIES,
    "sampling.decode_layout": options.DECODE_LAYOUTS,
    "sampling.engine": options.ENGINES,
    "reward.kind": options.REWARD_KINDS,
    "reward.normalize": options.REWARD_NORMALIZATIONS,
    "data.truncation": options.TRUNCATIONS,
    "rl.kl_estimator": options.KL_ESTIMATORS,
    "rl.kl_loss_estimator": options.KL_ESTIMATORS,
    "algorithm": options.ALGORITHMS,
    "rl.ratio_level": options.RATIO_LEVELS,
    "rl.old_logprobs": options.OLD_LOGPROBS,
    "rl.sampler_correction": options.SAMPLER_CORRECTIONS,
    "optim.schedule": options.SCHEDULES,
    "train.on_nonfinite": options.ON_NONFINITE,
}


def _choice(config, key: str, choices) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    if value not in choices:
        raise ConfigError(f"config.{key} = {value!r}: must be one of {list(choices)}")


def _positive(config, key: str, allow_zero: bool = False) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config.{key} = {value!r}: must be {'>= 0' if allow_zero else '> 0'}")


def validate(config, num_devices: int = 1) -> None:
    """Check everything that can be checked from the config alone (before any model is built)."""
    missing = set(base_config().keys()) - set(config.keys())
    if missing:
        raise ConfigError(f"config is missing section(s) {sorted(missing)}: start from rlhf_jax.config.base_config()")
    for key, value in _leaves(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config.{key} = {value}: must be a finite number")
    for key, choices in _CHOICES.items():
        _choice(config, key, choices)
    _positive(config, "seed", allow_zero=True)
    _positive(config, "checkpoint.max_to_keep")
    _positive(config, "dpo.beta")
    _positive(config, "dpo.gamma", allow_zero=True)
    _positive(config, "dpo.orpo_lambda", allow_zero=True)
    if not 0 <= config.dpo.label_smoothing < 0.5:
        raise ConfigError(f"config.dpo.label_smoothing = {config.dpo.label_smoothing}: must be in [0, 0.5) "
                          "(the assumed chance that a pair's labels are flipped)")
    builtin = config.model.builtin
    if builtin.qk_norm and builtin.family != "llama":
        raise ConfigError("config.model.builtin.qk_norm = True needs config.model.builtin.family = 'llama' "
                          f"(got {builtin.family!r}; gemma3 always has it)")
    _positive(config, "model.builtin.head_dim", allow_zero=True)
    _positive(config, "model.builtin.sliding_window", allow_zero=True)
    if builtin.sliding_window and builtin.family != "gemma3":
        raise ConfigError(f"config.model.builtin.sliding_window = {builtin.sliding_window} needs "
                          f"config.model.builtin.family = 'gemma3' (got {builtin.family!r})")
    if builtin.head_dim and builtin.family == "gpt2":
        raise ConfigError(f"config.model.builtin.head_dim = {builtin.head_dim}: the gpt2 family's is "
                          "hidden_size / num_heads")
    _positive(config, "model.logits_chunk", allow_zero=True)
    _positive(config, "sampling.decode_segments")
    for key in ("slots", "refill", "tail_halvings"):
        _positive(config, f"sampling.{key}", allow_zero=True)
    if config.sampling.decode_layout == "tensor" and not config.sampling.shard_cache:
        raise ConfigError("config.sampling.decode_layout = 'tensor' needs config.sampling.shard_cache = True")
    if config.model.logits_chunk and config.sampling.max_new_tokens % config.model.logits_chunk:
        raise ConfigError(f"config.model.logits_chunk = {config.model.logits_chunk} does not divide "
                          f"config.sampling.max_new_tokens = {config.sampling.max_new_tokens}")
    # A critic's value loss has no constant-length normalisation.
    _choice(config, "rl.loss_aggregation", options.AGGREGATIONS[:2] if uses_value(config) else options.AGGREGATIONS)
    _positive(config, "train.num_generations")
    _positive(config, "rl.cliprange_high", allow_zero=True)
    _positive(config, "rl.overlong_buffer", allow_zero=True)
    if config.rl.overlong_buffer > config.sampling.max_new_tokens:
        raise ConfigError(f"config.rl.overlong_buffer = {config.rl.overlong_buffer} exceeds "
                          f"config.sampling.max_new_tokens = {config.sampling.max_new_tokens}")
    generations = config.train.num_generations
    if config.algorithm in ("grpo", "rloo") and generations < 2:
        raise ConfigError(f"config.algorithm = {config.algorithm!r} needs config.train.num_generations >= 2 "
                          "(the group baseline)")
    if config.train.rollout_batch_size % generations:
        raise ConfigError(f"config.train.rollout_batch_size = {config.train.rollout_batch_size} is not a multiple "
                          f"of config.train.num_generations = {generations}")
    if not config.rl.sampler_correction_cap > 1:
        raise ConfigError(f"config.rl.sampler_correction_cap = {config.rl.sampler_correction_cap}: must be > 1 "
                          "(the weights are kept within [1/cap, cap])")
    for key in ("train.rollout_batch_size", "train.num_iterations", "rl.num_ppo_epochs", "rl.num_mini_batches",
                "sampling.max_new_tokens", "data.max_prompt_len", "optim.learning_rate", "rl.cliprange",
                "rl.cliprange_value"):
        _positive(config, key)
    for key in ("rl.kl_coef", "sampling.temperature", "sampling.top_k", "checkpoint.every",
                "optim.max_grad_norm", "rl.missing_eos_penalty", "optim.warmup_steps"):
        _positive(config, key, allow_zero=True)
    if not 0 < config.sampling.top_p <= 1:
        raise ConfigError(f"config.sampling.top_p = {config.sampling.top_p}: must be in (0, 1]")
    if config.sampling.temperature == 0:
        raise ConfigError("config.sampling.temperature = 0 (greedy) gives no exploration and no valid PPO "
                          "logprobs: use a temperature > 0 for training")
    if config.sampling.top_k or config.sampling.top_p < 1:
        raise ConfigError("config.sampling.top_k / top_p filter the sampler's distribution, so the logprobs PPO "
                          "recomputes would not match it: leave top_k = 0 and top_p = 1.0 for training")
    batch, minibatches = config.train.rollout_batch_size, config.rl.num_mini_batches
    if batch % minibatches:
        raise ConfigError(f"config.train.rollout_batch_size = {batch} does not divide into "
                          f"config.rl.num_mini_batches = {minibatches} minibatches")
    if (batch // minibatches) % num_devices:
        raise ConfigError(f"a minibatch of {batch // minibatches} rows (config.train.rollout_batch_size / "
                          f"config.rl.num_mini_batches) does not divide over {num_devices} devices")
    pack = config.train.pack_tokens
    _positive(config, "train.pack_tokens", allow_zero=True)
    if pack and pack < config.data.max_prompt_len + config.sampling.max_new_tokens:
        raise ConfigError(f"config.train.pack_tokens = {pack} is less than a sample's longest "
                          f"(config.data.max_prompt_len + config.sampling.max_new_tokens = "
                          f"{config.data.max_prompt_len + config.sampling.max_new_tokens})")
    _positive(config, "train.micro_rows", allow_zero=True)
    if config.train.micro_rows and not pack:
        raise ConfigError(f"config.train.micro_rows = {config.train.micro_rows} needs config.train.pack_tokens > 0 "
                          "(micro-batches are of packed rows)")
    if pack and config.model.attention != "xla":
        raise ConfigError(f"config.train.pack_tokens = {pack} needs config.model.attention = 'xla' (the fused "
                          f"kernels take no segment ids here; got {config.model.attention!r})")
    if pack and config.model.logits_chunk and pack % config.model.logits_chunk:
        raise ConfigError(f"config.model.logits_chunk = {config.model.logits_chunk} does not divide "
                          f"config.train.pack_tokens = {pack} (packed, the head runs over each row's tokens)")
    if config.rl.adaptive_kl and (config.rl.kl_target <= 0 or config.rl.kl_horizon <= 0):
        raise ConfigError("config.rl.adaptive_kl needs config.rl.kl_target > 0 and config.rl.kl_horizon > 0")
    if config.lora.enabled:
        _positive(config, "lora.rank")
        unknown = sorted(set(config.lora.targets) - set(options.LORA_TARGETS))
        if unknown or not config.lora.targets:
            raise ConfigError(f"config.lora.targets = {tuple(config.lora.targets)}: choose one or more of "
                              f"{options.LORA_TARGETS}")
        if config.lora.dropout:
            raise ConfigError(f"config.lora.dropout = {config.lora.dropout}: dropout makes the PPO ratio differ "
                              "from 1 on unchanged params (the rollout and training forwards must match); use 0")
    m = config.mesh
    explicit = [bool(m.coordinator_address), m.num_processes != -1, m.process_id != -1]
    if any(explicit) and not all(explicit):
        raise ConfigError("config.mesh.coordinator_address, num_processes and process_id go together: set all "
                          "three (a local multi-process run) or none (JAX's cluster detection)")
    if all(explicit) and not 0 <= m.process_id < m.num_processes:
        raise ConfigError(f"config.mesh.process_id = {m.process_id}: must be in [0, config.mesh.num_processes = "
                          f"{m.num_processes})")
    if any(explicit) and not m.distributed:
        raise ConfigError("config.mesh.coordinator_address / num_processes / process_id need "
                          "config.mesh.distributed = True")
    if config.reward.kind == "function" and ":" not in config.reward.function:
        raise ConfigError(f"config.reward.function = {config.reward.function!r}: expected 'module:callable'")
    if config.reward.kind == "model" and not config.reward.model_path:
        raise ConfigError("config.reward.kind = 'model' needs config.reward.model_path (an HF scalar model folder)")


def validate_tokenizer(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token (tokenizer.pad_token_id is None): set one that is not "
                          "the EOS token")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token (tokenizer.eos_token_id is None)")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ConfigError(f"the tokenizer's pad token is its EOS token (id {tokenizer.eos_token_id}): a policy "
                          "trained with pad = EOS never learns to stop; give it a distinct pad token")


def validate_lengths(config, max_positions: int) -> None:
    total = config.data.max_prompt_len + config.sampling.max_new_tokens
    if total > max_positions:
        raise ConfigError(
            f"config.data.max_prompt_len + config.sampling.max_new_tokens = {config.data.max_prompt_len} + "
            f"{config.sampling.max_new_tokens} = {total} exceeds the model's {max_positions} positions "
            "(max_position_embeddings)")


def uses_value(config) -> bool:
    """Whether the run has a value model or head (PPO); the value-free algorithms build none."""
    return config.algorithm == "ppo"
