"""Pairwise (Bradley-Terry) reward-model training on (prompt, chosen, rejected) preference pairs.

    python -m rlhf_jax.train_reward --config=configs/reward_demo.py --workdir=runs/rm

The reward is the scalar head read at the last real token of prompt + response
+ EOS (exactly what PPO scores); the loss is -log sigmoid(r_chosen - r_rejected - margin).
The trained model is exported as a transformers `AutoModelForSequenceClassification` folder,
which `config.reward.model_path` (and `config.model.value_path`) of the RL trainer take.
"""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from rlhf_jax.config import ConfigError
from rlhf_jax.models import CausalLM, ScalarModel, load_pretrained, read_hf_config, save_pretrained
from rlhf_jax.run.loading import builtin_task, check_path

log = logging.getLogger(__name__)


def base_reward_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        path="",  # an HF folder: a causal LM (the SFT model; its backbone is reused) or a scalar model
        dtype="float32"))
    c.tokenizer = ml_collections.ConfigDict(dict(path=""))  # empty: model.path
    c.data = ml_collections.ConfigDict(dict(
        path="",  # JSONL (or HF datasets folder) with prompt / chosen / rejected; empty: the built-in task's pairs
        builtin="rlhf_jax.tasks.reviews",  # a module with preference_pairs(n, seed): the pairs when `path` is empty
        prompt_field="prompt", chosen_field="chosen", rejected_field="rejected",
        max_prompt_len=4, max_response_len=24, eval_fraction=0.1, builtin_pairs=4000))
    c.loss = ml_collections.ConfigDict(dict(margin=0.0))
    c.optim = ml_collections.ConfigDict(dict(learning_rate=1e-3, weight_decay=0.0, max_grad_norm=1.0,
                                             warmup_steps=0))
    c.train = ml_collections.ConfigDict(dict(batch_size=32, num_steps=300, eval_every=100))
    c.checkpoint = ml_collections.ConfigDict(dict(every=100, max_to_keep=2))
    c.logging = ml_collections.ConfigDict(dict(progress=True))
    return c


def pairwise_loss(chosen_scores, rejected_scores, margin=0.0):
    """Bradley-Terry loss and accuracy: chosen_scores, rejected_scores: f32[batch]."""
    diff = chosen_scores - rejected_scores - margin
    return -jnp.mean(jax.nn.log_sigmoid(diff)), jnp.mean((chosen_scores > rejected_scores).astype(jnp.float32))


def scalar_model_from(path: str, dtype: str = "float32", seed: int = 0) -> ScalarModel:
    """A reward model from an HF folder: a scalar model as it is, or a causal LM's backbone with a new head."""
    architectures = read_hf_config(path).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return load_pretrained(path, kind="scalar", dtype=dtype)
    lm: CausalLM = load_pretrained(path, dtype=dtype)
    model = ScalarModel(lm.cfg, rngs=nnx.Rngs(seed))
    nnx.update(model.backbone, nnx.state(lm.backbone))
    return model


def encode_pairs(records: list[dict], tokenizer, max_prompt_len: int, max_response_len: int):
    """Token ids for prompt + response + EOS, left-padded: (chosen_ids, chosen_mask, rejected_ids, rejected_mask).

    Prompts are cut from the left, responses from the right (then EOS).
    """
    width = max_prompt_len + max_response_len + 1
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out = {name: np.full((len(records), width), pad, np.int32) for name in ("chosen", "rejected")}
    masks = {name: np.zeros((len(records), width), np.int32) for name in ("chosen", "rejected")}
    for i, r in enumerate(records):
        prompt = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"][-max_prompt_len:]
        for name in ("chosen", "rejected"):
            response = tokenizer(r[name], add_special_tokens=False)["input_ids"][:max_response_len]
            ids = prompt + response + [eos]
            out[name][i, width - len(ids):] = ids
            masks[name][i, width - len(ids):] = 1
    return out["chosen"], masks["chosen"], out["rejected"], masks["rejected"]


def read_pairs(config) -> list[dict]:
    d = config.data
    if not d.path:
        return builtin_task(config).preference_pairs(d.builtin_pairs, seed=config.seed)
    from rlhf_jax.run.data import read_prompts
    fields = {"prompt": d.prompt_field, "chosen": d.chosen_field, "rejected": d.rejected_field}
    columns = {name: read_prompts(d.path, field) for name, field in fields.items()}
    for name, values in columns.items():
        if not all(isinstance(v, str) for v in values):
            raise ConfigError(f"data.path {d.path}: field {fields[name]!r} holds a conversation; preference "
                              "pairs are plain text")
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "margin"), donate_argnums=(1, 2))
def reward_train_step(graphdef, params, opt_state, batch, optimizer, margin: float = 0.0):
    def loss_fn(p):
        model = nnx.merge(graphdef, p)
        chosen = model.sequence_scores(batch["chosen_ids"], batch["chosen_mask"])
        rejected = model.sequence_scores(batch["rejected_ids"], batch["rejected_mask"])
        return pairwise_loss(chosen, rejected, margin)

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, accuracy


@functools.partial(jax.jit, static_argnames=("graphdef",))
def pair_scores(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    return (model.sequence_scores(batch["chosen_ids"], batch["chosen_mask"]),
            model.sequence_scores(batch["rejected_ids"], batch["rejected_mask"]))


def evaluate_pairs(graphdef, params, arrays: dict, batch_size: int) -> dict:
    """Held-out pairwise accuracy and loss (a trailing partial batch is included)."""
    n = len(arrays["chosen_ids"])
    chosen, rejected = [], []
    for start in range(0, n, batch_size):
        batch = {k: jnp.asarray(v[start:start + batch_size]) for k, v in arrays.items()}
        c, r = pair_scores(graphdef, params, batch)
        chosen.append(np.asarray(c))
        rejected.append(np.asarray(r))
    chosen, rejected = np.concatenate(chosen), np.concatenate(rejected)
    loss = float(-np.mean(jax.nn.log_sigmoid(chosen - rejected)))
    return {"eval/accuracy": float(np.mean(chosen > rejected)), "eval/loss": loss}


def train_reward_model(config, workdir: str) -> dict:
    """Train (or resume) a reward model in `workdir`; export it to `workdir/reward_model`. Returns final metrics."""
    from transformers import AutoTokenizer

    from rlhf_jax.config import validate_tokenizer
    from rlhf_jax.run.checkpoint import Checkpointer
    from rlhf_jax.run.metrics import MetricWriter

    if not config.model.path:
        raise ConfigError("config.model.path: the reward model starts from an HF folder (e.g. the SFT model)")
    check_path("config.model.path", config.model.path, "model")
    if config.tokenizer.path:
        check_path("config.tokenizer.path", config.tokenizer.path, "tokenizer")
    else:
        check_path("config.model.path", config.model.path, "tokenizer")  # the tokenizer comes from there too
    if not 0 < config.data.eval_fraction < 1:
        raise ConfigError(f"config.data.eval_fraction = {config.data.eval_fraction}: must be in (0, 1)")
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer.path or config.model.path)
    validate_tokenizer(tokenizer)
    records = read_pairs(config)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(records))
    n_eval = max(1, int(len(records) * config.data.eval_fraction))
    encoded = encode_pairs([records[i] for i in order], tokenizer, config.data.max_prompt_len,
                           config.data.max_response_len)
    names = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")
    eval_set = {k: v[:n_eval] for k, v in zip(names, encoded)}
    train_set = {k: v[n_eval:] for k, v in zip(names, encoded)}
    n_train = len(train_set["chosen_ids"])
    if n_train < config.train.batch_size:
        raise ConfigError(f"{n_train} training pairs are fewer than config.train.batch_size = "
                          f"{config.train.batch_size}")

    model = scalar_model_from(config.model.path, config.model.dtype, config.seed)
    graphdef, params = nnx.split(model)
    o = config.optim
    schedule = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1),
                                                  max(config.train.num_steps, 2))
    optimizer = optax.chain(optax.clip_by_global_norm(o.max_grad_norm),
                            optax.adamw(schedule, weight_decay=o.weight_decay))
    state = {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params)}
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint.max_to_keep,
                                async_save=False)
    restored = checkpointer.restore_latest(state)
    if restored is not None:
        state = restored[1]
    writer = MetricWriter(workdir, tensorboard=True)
    start = int(state["step"])
    params, opt_state = state["params"], state["opt_state"]
    metrics: dict = {}
    try:
        for step in range(start, config.train.num_steps):
            # The batch order is a pure function of (seed, step), so a resumed run sees the same batches.
            pick = np.random.default_rng([config.seed, step]).choice(n_train, config.train.batch_size, replace=False)
            batch = {k: jnp.asarray(v[pick]) for k, v in train_set.items()}
            params, opt_state, loss, accuracy = reward_train_step(graphdef, params, opt_state, batch,
                                                                  optimizer=optimizer, margin=config.loss.margin)
            done = step + 1
            metrics = {"train/loss": float(loss), "train/accuracy": float(accuracy)}
            if not np.isfinite(metrics["train/loss"]):
                raise FloatingPointError(f"reward-model step {step}: non-finite loss")
            if done % config.train.eval_every == 0 or done == config.train.num_steps:
                metrics.update(evaluate_pairs(graphdef, params, eval_set, config.train.batch_size))
                if config.logging.progress:
                    print(f"[reward model] step {done}: train loss {metrics['train/loss']:.3f}, "
                          f"held-out accuracy {metrics['eval/accuracy']:.1%}")
            writer.write(done, metrics)
            if (config.checkpoint.every and done % config.checkpoint.every == 0) or done == config.train.num_steps:
                checkpointer.save(done, {"step": jnp.int32(done), "params": params, "opt_state": opt_state},
                                  {"step": done})
    finally:
        checkpointer.close()
        writer.close()
    if "eval/accuracy" not in metrics:
        metrics.update(evaluate_pairs(graphdef, params, eval_set, config.train.batch_size))
    export = os.path.join(workdir, "reward_model")
    save_pretrained(nnx.merge(graphdef, params), export,
                    hf_config={"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id})
    tokenizer.save_pretrained(export)
    with open(os.path.join(workdir, "reward_model_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    metrics["export_dir"] = export
    return metrics
