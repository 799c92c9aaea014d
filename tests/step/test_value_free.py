"""Value-free algorithms through the trainer: GRPO (with Dr. GRPO / DAPO / GSPO options), RLOO and
REINFORCE++ each run an iteration with no value parameters, step 0's KL is exactly 0, and with
kl_coef = 0 the reference is never needed."""


import jax
import numpy as np
import pytest

from rlhf_jax.config import ConfigError, validate
from rlhf_jax.run.trainer import RLTrainer
from tests import common


def config_for(algorithm, **ppo):
    c = common.config()
    c.algorithm = algorithm
    c.train.num_generations = 4
    c.logging.progress = False
    c.rl.update(ppo)
    return c


def n_params(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("algorithm,ppo", [
    ("grpo", dict(kl_in_loss=True, kl_loss_estimator="k3")),  # GRPO as published
    # DAPO-style: clip-higher, token aggregation, zero-std groups masked, soft overlong penalty, no KL
    ("grpo", dict(cliprange_high=0.28, loss_aggregation="token", mask_zero_std_groups=True, overlong_buffer=4,
                  kl_coef=0.0)),
    # Dr. GRPO with GSPO's sequence ratio
    ("grpo", dict(scale_rewards_by_std=False, loss_aggregation="constant", ratio_level="sequence")),
    ("rloo", {}),
    ("reinforce_pp", {}),
])
def test_one_iteration_without_a_value_model(tmp_path, algorithm, ppo):
    config = config_for(algorithm, old_logprobs="recompute", **ppo)  # exact step-0 KL, as in bf16
    trainer = RLTrainer(config, str(tmp_path))
    assert trainer.value_graphdef is None
    state = trainer.init_state()
    assert set(state.params) == {"policy"}
    assert not any("value_head" in str(path) for path, _ in jax.tree_util.tree_flatten_with_path(state.params)[0])
    reference = trainer.update_reference if config.rl.kl_coef else None  # kl_coef 0: never read
    rollout = trainer.rollout_fn(trainer.policy_params(state), trainer.to_device_batch(
        np.repeat(trainer.prompt_ids[:4], 4, axis=0)), trainer.to_device_batch(
        np.repeat(trainer.prompt_mask[:4], 4, axis=0)), jax.random.PRNGKey(0))
    assert rollout.values is None
    scores = np.asarray(np.arange(16) % 3 == 0, np.float32)
    before = n_params(state.params)
    state, metrics = trainer.update_fn(state, rollout, trainer.to_device_batch(scores), trainer.frozen, reference)
    assert n_params(state.params) == before
    assert float(metrics["objective/kl"]) == 0.0  # the reference is the policy at step 0
    for key in ("reward/mean", "reward/std", "frac_reward_zero_std", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "completions/mean_length", "completions/clipped_ratio", "kl", "entropy"):
        assert np.isfinite(float(metrics[key])), key
    np.testing.assert_allclose(float(metrics["reward/mean"]), scores.mean(), rtol=1e-6)


def test_the_trainer_runs_grpo_on_the_tiny_arithmetic_task(tmp_path):
    config = config_for("grpo")
    config.data.update(builtin="rlhf_jax.tasks.arithmetic", max_prompt_len=3)
    config.reward.function = "rlhf_jax.tasks.arithmetic:exact_match_reward"
    trainer = RLTrainer(config, str(tmp_path))
    assert trainer.tokenizer.decode(trainer.prompt_ids[0][-3:]).split()[1] == "plus"
    state, metrics, _ = trainer.iteration(trainer.init_state())
    assert int(state.step) == 1 and np.isfinite(metrics["loss"]) and 0.0 <= metrics["reward/mean"] <= 1.0
    ppo = RLTrainer(common.config(), str(tmp_path / "ppo"))
    # The PPO policy carries a value head; the GRPO one does not.
    assert n_params(ppo.init_state().params) > n_params(state.params)


@pytest.mark.parametrize("change,message", [
    (dict(algorithm="grpo"), "needs config.train.num_generations >= 2"),
    (dict(algorithm="grpo", generations=3), "is not a multiple of config.train.num_generations = 3"),
    (dict(algorithm="ppo", generations=2, aggregation="constant"), "config.rl.loss_aggregation = 'constant'"),
])
def test_value_free_config_is_checked(change, message):
    c = common.config()
    c.algorithm = change["algorithm"]
    c.train.num_generations = change.get("generations", 1)
    c.rl.loss_aggregation = change.get("aggregation", "token")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(c)
