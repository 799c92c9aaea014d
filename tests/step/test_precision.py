"""bf16 that trains correctly: PPO's old log-probs and the reference's come from one program (step 0's
KL exactly 0, ratios exactly 1), the sampler correction's weights against a NumPy loop, and float32
master weights that keep a 1e-6 step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax.config import ConfigError, base_config, validate
from rlhf_jax.core.losses import sampler_weights
from rlhf_jax.models import CausalLM
from rlhf_jax.models.lora import TRAINABLE, with_lora
from rlhf_jax.run.loading import builtin_model_config
from rlhf_jax.sampling.rollout import make_rollout
from rlhf_jax.step.state import init_train_state, make_optimizer
from rlhf_jax.step.update import make_update

VOCAB = 48


def setup(dtype: str, family: str, lora: bool, old_logprobs: str = "auto", **ppo):
    """A tiny policy, its reference (the same weights, or the base with adapters off) and a config."""
    config = base_config()
    config.model.update(dtype=dtype, param_dtype=dtype)
    config.model.builtin.update(family=family, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=32)
    config.sampling.max_new_tokens = 8
    config.rl.update(**{"num_ppo_epochs": 2, "num_mini_batches": 2, "old_logprobs": old_logprobs, **ppo})
    model = CausalLM(builtin_model_config(config, VOCAB), rngs=nnx.Rngs(0), value_head=True)
    if lora:
        model = with_lora(model, 4, 8.0, ("q_proj", "v_proj"))
        graphdef, params, frozen = nnx.split(model, TRAINABLE, ...)
        # The reference as the trainer builds it: a snapshot of the fresh adapters (B = 0) over the base.
        ref_graphdef, ref_params = graphdef, jax.tree.map(jnp.copy, params)
    else:
        graphdef, params = nnx.split(model)
        frozen, ref_graphdef, ref_params = None, graphdef, jax.tree.map(jnp.copy, params)
    return config, graphdef, params, frozen, ref_graphdef, ref_params


def one_update(config, graphdef, params, frozen, ref_graphdef, ref_params, optimizer):
    rollout = make_rollout(config, policy_graphdef=graphdef, eos_ids=(1,), pad_id=0)
    update = make_update(config, policy_graphdef=graphdef, ref_graphdef=ref_graphdef, eos_ids=(1,),
                             optimizer=optimizer)
    prompts = jnp.asarray(np.random.default_rng(0).integers(2, VOCAB, (16, 4)), jnp.int32)
    policy = params if frozen is None else nnx.merge_state(params, frozen)
    batch = rollout(policy, prompts, jnp.ones_like(prompts), jax.random.PRNGKey(3))
    scores = jnp.asarray(np.random.default_rng(1).normal(size=16), jnp.float32)
    state = init_train_state(config, {"policy": jax.tree.map(jnp.copy, params)}, optimizer)
    return update(state, batch, scores, frozen, ref_params)


@pytest.mark.parametrize("dtype,family,lora", [("bfloat16", "llama", False), ("bfloat16", "llama", True),
                                               ("float32", "gpt2", False)])
def test_step0_kl_is_exactly_zero_and_every_ratio_exactly_one(dtype, family, lora):
    """With unchanged params (a zero optimizer step) every minibatch of both epochs, grouped
    differently each epoch, has ratio 1 exactly; the KL to an equal reference is exactly 0."""
    parts = setup(dtype, family, lora, old_logprobs="recompute")
    _, metrics = one_update(*parts, optax.set_to_zero())
    assert float(metrics["objective/kl"]) == 0.0
    assert float(metrics["policy/approxkl_avg"]) == 0.0  # 0.5 * mean(log ratio ^ 2): zero only if every one is
    assert float(metrics["policy/clipfrac_avg"]) == 0.0
    assert float(metrics["val/ratio"]) == 1.0
    if dtype == "bfloat16":  # the sampler rounds differently, and the metrics show it
        assert float(metrics["sampling/sampling_logp_difference/max"]) > 0


def test_first_minibatch_ratio_is_exactly_one_in_a_real_step():
    _, metrics = one_update(*setup("bfloat16", "llama", False, num_ppo_epochs=1, num_mini_batches=1),
                            make_optimizer(base_config()))
    assert float(metrics["policy/approxkl_avg"]) == 0.0 and float(metrics["objective/kl"]) == 0.0


def test_sampler_logprobs_in_bf16_are_not_the_trainers():
    """The contrast that the exact tests above rely on: as sampled, the old log-probs are off by rounding."""
    _, metrics = one_update(*setup("bfloat16", "llama", False, old_logprobs="sampler"), optax.set_to_zero())
    assert float(metrics["policy/approxkl_avg"]) > 0 and float(metrics["objective/kl"]) != 0


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_sampler_weights_against_a_numpy_loop(mode):
    rng = np.random.default_rng(0)
    trainer = rng.normal(size=(4, 6)).astype(np.float32)
    sampler = (trainer + rng.normal(scale=0.8, size=(4, 6))).astype(np.float32)
    mask = np.ones((4, 6), bool)
    mask[1, 3:] = False
    mask[3, :] = False
    cap = 2.0
    weights, metrics = sampler_weights(jnp.asarray(trainer), jnp.asarray(sampler), jnp.asarray(mask), mode, cap)
    expected = np.zeros((4, 6))
    for i in range(4):
        n = mask[i].sum()
        seq_w = np.exp(np.sum((trainer[i] - sampler[i])[mask[i]]) / n) if n else 1.0
        for j in range(6):
            if not mask[i, j]:
                continue
            w = seq_w if mode.startswith("sequence") else np.exp(trainer[i, j] - sampler[i, j])
            expected[i, j] = min(w, cap) if mode.endswith("truncate") else (w if 1 / cap <= w <= cap else 0.0)
    np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-5)
    raw = np.exp(trainer - sampler)[mask]
    np.testing.assert_allclose(float(metrics["sampling/importance_sampling_ratio/max"]), raw.max(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["sampling/importance_sampling_ratio/min"]), raw.min(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["sampling/sampling_logp_difference/max"]),
                               np.abs(trainer - sampler)[mask].max(), rtol=1e-5)
    assert sampler_weights(jnp.asarray(trainer), jnp.asarray(sampler), jnp.asarray(mask))[0] is None


def test_sampler_correction_config_is_checked():
    config = base_config()
    config.rl.sampler_correction = "token"
    with pytest.raises(ConfigError, match="rl.sampler_correction"):
        validate(config)
    config.rl.sampler_correction, config.rl.sampler_correction_cap = "token_mask", 1.0
    with pytest.raises(ConfigError, match="sampler_correction_cap"):
        validate(config)


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_params_keep_a_1e6_update_in_float32_master_weights(lora):
    """Stored in bf16, a 1e-6 AdamW step would round away on nearly every weight; the state keeps
    float32 master weights, so every entry with a gradient moves."""
    config, graphdef, params, frozen, ref_graphdef, ref_params = setup("bfloat16", "llama", lora,
                                                                       num_ppo_epochs=1, num_mini_batches=1)
    config.optim.learning_rate = 1e-6
    optimizer = make_optimizer(config)
    state, _ = one_update(config, graphdef, params, frozen, ref_graphdef, ref_params, optimizer)
    flat = lambda tree: {path: np.asarray(x[...], np.float32) for path, x in nnx.to_flat_state(nnx.State(tree))}
    before, after = flat(params), flat(state.params["policy"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params["policy"]))
    # LoRA's A matrices get no gradient while B is 0 (the first step): count the entries that can move.
    movable = [path for path in after if not (lora and "lora_a" in path)]
    total = sum(after[path].size for path in movable)
    moved = sum(int(np.sum(after[path] != before[path])) for path in movable)
    assert moved / total > 0.97, (moved, total)
    if not lora:  # (LoRA's B and the value head start at 0, where bf16 keeps a small step too)
        as_bf16 = lambda x: np.asarray(jnp.asarray(x).astype(jnp.bfloat16), np.float32)
        kept_in_bf16 = sum(int(np.sum(as_bf16(after[path]) != before[path])) for path in movable)
        assert kept_in_bf16 / total < 0.5  # what bf16 storage would have kept
