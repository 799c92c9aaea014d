"""The continuous-batching engine samples what the static sampler samples, whatever its slots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.sampling.engine import continuous_generate, engine_problem, schedule
from rlhf_jax.sampling.generate import generate

# GQA, RoPE (one layer without), qk-norm and a sliding window: every per-row cache path.
CFG = ModelConfig(family="gemma3", vocab_size=48, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64, max_position_embeddings=64, qk_norm=True, sliding_window=6,
                  sliding_layers=(0, 2), rope_local_theta=100.0, final_softcap=5.0)
PAD, REQUESTS, NEW = 0, 12, 10
EOS = (5, 7)  # sampled often enough that the rows end at different steps


def _model(scan: bool):
    graphdef, params = nnx.split(CausalLM(CFG.replace(scan_layers=scan), rngs=nnx.Rngs(0), value_head=True))
    noise = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(noise), x.shape, x.dtype), params)
    return graphdef, params


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(1)
    ids = rng.randint(8, CFG.vocab_size, (REQUESTS // 2, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[3, :5] = 0
    ids[mask == 0] = PAD
    # Pairs of equal prompts, as GRPO samples them (groups of 2).
    return jnp.asarray(np.repeat(ids, 2, 0)), jnp.asarray(np.repeat(mask, 2, 0))


KW = dict(max_new_tokens=NEW, temperature=1.0, eos_ids=EOS, pad_id=PAD, with_values=True)


def _assert_same_samples(out, ref):
    """Tokens, masks and lengths equal; log-probs and values equal up to the last bits: XLA:CPU's
    matmul and reduction kernels sum in an order that depends on the row count (a one-row product is
    a matrix-vector kernel), and the engine runs other row counts than the static sampler."""
    for name in ("response_ids", "response_mask", "lengths"):
        np.testing.assert_array_equal(out[name], ref[name], err_msg=name)
    for name in ("logprobs", "values"):
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=2e-6, err_msg=name)
        assert np.all(out[name][ref["response_mask"] == 0] == 0)


@pytest.mark.parametrize("scan,shapes", [(False, ((1, 1), (3, 1), (8, 2))), (True, ((4, 4),))])
def test_engine_samples_what_the_static_sampler_samples_with_any_slots(prompts, scan, shapes):
    """(slots, refill) pairs; the scanned blocks (a stacked cache written per row) in one of them."""
    graphdef, params = _model(scan)
    key = jax.random.key(3)
    ref = jax.device_get(generate(graphdef, params, *prompts, key, **KW))
    lengths = ref["lengths"]
    assert 1 < len(set(lengths.tolist())) and lengths.min() < NEW // 2, lengths  # ragged, so slots refill
    for slots, refill in shapes:
        out = jax.device_get(continuous_generate(graphdef, params, *prompts, key, slots=slots, refill=refill, **KW))
        _assert_same_samples(out, ref)
        # The engine's own count of decode row-steps is what a host-side replay of its schedule counts
        # (the planner's estimate uses the replay).
        loops = schedule(lengths, slots, refill, tail_halvings=2)
        assert out["decode_row_steps"] == sum(size * steps for size, steps in loops)
        assert out["decode_row_steps"] >= int(lengths.sum()) - REQUESTS
        if slots == 8:  # here fewer row-steps than the static batch, which runs every row to the longest
            assert out["decode_row_steps"] < REQUESTS * (int(lengths.max()) - 1)


def test_prompt_groups_share_their_prefill_and_keep_their_order(prompts):
    graphdef, params = _model(False)
    key = jax.random.key(5)
    ref = jax.device_get(generate(graphdef, params, *prompts, key, **KW))
    out = jax.device_get(continuous_generate(graphdef, params, *prompts, key, slots=4, prompt_group=2, **KW))
    _assert_same_samples(out, ref)
    assert not np.array_equal(out["response_ids"][0], out["response_ids"][1])  # a group's two samples differ


def test_greedy_and_no_eos(prompts):
    graphdef, params = _model(False)
    kw = dict(KW, temperature=0.0, eos_ids=())
    ref = jax.device_get(generate(graphdef, params, *prompts, jax.random.key(0), **kw))
    out = jax.device_get(continuous_generate(graphdef, params, *prompts, jax.random.key(9), slots=5, refill=1, **kw))
    _assert_same_samples(out, ref)
    assert np.all(out["lengths"] == NEW)


def test_engine_shapes_that_do_not_work_are_named():
    assert engine_problem(12, 4, 2, 2) is None
    assert "multiple of the prompt group" in engine_problem(12, 4, 3, 2)
    assert "not a multiple of refill" in engine_problem(12, 6, 4, 1)
    assert "do not split into refills" in engine_problem(10, 4, 4, 1)
    with pytest.raises(ValueError, match="multiple of the prompt group"):
        graphdef, params = _model(False)
        ids = jnp.zeros((4, 3), jnp.int32)
        continuous_generate(graphdef, params, ids, jnp.ones_like(ids), jax.random.key(0), slots=2, refill=1,
                            prompt_group=2, max_new_tokens=2)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_the_run_rollout_takes_the_engine_with_the_same_samples(algorithm):
    """`make_rollout` with sampling.engine = "continuous" (PPO with its value head as sampled; GRPO's
    groups sharing their prompt's prefill) returns the static sampler's Rollout."""
    from rlhf_jax.models import gpt2_config
    from rlhf_jax.sampling.rollout import make_rollout
    from tests import common

    config = common.config(algorithm=algorithm, model__value_model="shared", train__num_generations=2 if
                           algorithm == "grpo" else 1, sampling__max_new_tokens=NEW, sampling__slots=4)
    cfg = gpt2_config(vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=32)
    graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0), value_head=algorithm == "ppo"))
    params = jax.tree.map(lambda x: x * 4.0, params)
    rows = config.train.rollout_batch_size
    prompts = jnp.asarray(np.repeat(np.random.default_rng(0).integers(8, 48, (rows // 2, 4)), 2, 0), jnp.int32)
    rollouts = {}
    for engine in ("static", "continuous"):
        config.sampling.engine = engine
        rollout = make_rollout(config, policy_graphdef=graphdef, eos_ids=EOS, pad_id=PAD)
        rollouts[engine] = jax.device_get(rollout(params, prompts, jnp.ones_like(prompts), jax.random.key(2)))
    static, continuous = rollouts["static"], rollouts["continuous"]
    assert len(set(static.lengths.tolist())) > 1
    np.testing.assert_array_equal(static.response_ids, continuous.response_ids)
    np.testing.assert_array_equal(static.lengths, continuous.lengths)
    np.testing.assert_allclose(static.logprobs, continuous.logprobs, rtol=1e-5, atol=2e-6)
    if algorithm == "ppo":
        np.testing.assert_allclose(static.values, continuous.values, rtol=1e-5, atol=2e-6)


def test_engine_shape_follows_the_config_and_names_what_does_not_fit():
    from rlhf_jax.config import ConfigError
    from rlhf_jax.parallel.sharding import make_mesh
    from rlhf_jax.sampling.rollout import AUTO_ENGINE_TOKENS, engine_shape
    from tests import common

    config = common.config(train__rollout_batch_size=16)
    assert engine_shape(config) is None  # auto: a short budget stays static
    config.sampling.max_new_tokens = AUTO_ENGINE_TOKENS
    assert engine_shape(config) == {"slots": 8, "refill": 1, "tail_halvings": 2}
    assert engine_shape(config, has_eos=False) is None  # every row runs to the budget
    config.algorithm, config.train.num_generations = "grpo", 4
    assert engine_shape(config)["refill"] == 4  # whole groups join at once, sharing their prefill
    config.sampling.update(engine="continuous", slots=6)
    with pytest.raises(ConfigError, match=r"config.sampling.slots = 6.*not a multiple of refill \(4\)"):
        engine_shape(config)
    config.sampling.update(slots=4, refill=0)
    assert engine_shape(config, make_mesh(1, 1, 1))["slots"] == 4


def test_truncation_gap_is_the_filtered_minus_the_full_log_prob(prompts):
    """With top-k / top-p both samplers return, per token, the sampled log-prob (under the filtered
    distribution) minus its log-prob under the full one: -log of the mass the filters kept."""
    from rlhf_jax.core.ops import token_logprobs

    graphdef, params = _model(False)
    kw = dict(KW, temperature=0.8, top_k=6, top_p=0.9)
    ref = jax.device_get(generate(graphdef, params, *prompts, jax.random.key(4), **kw))
    out = jax.device_get(continuous_generate(graphdef, params, *prompts, jax.random.key(4), slots=4, **kw))
    _assert_same_samples(out, ref)
    np.testing.assert_allclose(out["truncation_gap"], ref["truncation_gap"], rtol=1e-5, atol=2e-6)
    mask = ref["response_mask"] > 0
    # The teacher-forced forward's full-distribution log-probs: the gap closes the difference.
    ids = np.concatenate([np.asarray(prompts[0]), ref["response_ids"]], 1)
    full_mask = np.concatenate([np.asarray(prompts[1]), ref["response_mask"]], 1)
    logits = nnx.merge(graphdef, params)(jnp.asarray(ids), jnp.asarray(full_mask))["logits"][:, 5:-1] / 0.8
    full = np.asarray(token_logprobs(logits, jnp.asarray(ref["response_ids"])))
    np.testing.assert_allclose((ref["logprobs"] - ref["truncation_gap"])[mask], full[mask], atol=1e-4)
    assert np.all(ref["truncation_gap"][mask] >= 0) and ref["truncation_gap"][mask].max() > 0.01
    assert np.all(ref["truncation_gap"][~mask] == 0)
    assert "truncation_gap" not in jax.device_get(generate(graphdef, params, *prompts, jax.random.key(4), **KW))


def test_the_update_reports_the_truncation_gap():
    from rlhf_jax.models import gpt2_config
    from rlhf_jax.sampling.rollout import make_rollout
    from rlhf_jax.step.state import init_train_state, make_optimizer
    from rlhf_jax.step.update import make_update
    from tests import common

    config = common.config(sampling__top_k=5, rl__num_ppo_epochs=1, rl__num_mini_batches=1)
    cfg = gpt2_config(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=32)
    graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0), value_head=True))
    rollout = make_rollout(config, policy_graphdef=graphdef, eos_ids=(1,), pad_id=0)
    update = make_update(config, policy_graphdef=graphdef, eos_ids=(1,))
    prompts = jnp.asarray(np.random.default_rng(0).integers(2, 32, (16, 4)), jnp.int32)
    batch = rollout(params, prompts, jnp.ones_like(prompts), jax.random.key(0))
    state = init_train_state(config, {"policy": jax.tree.map(jnp.copy, params)}, make_optimizer(config))
    _, metrics = update(state, batch, jnp.zeros((16,), jnp.float32), reference=params)
    gap = np.asarray(batch.truncation_gap)[np.asarray(batch.response_mask) > 0]
    np.testing.assert_allclose(float(metrics["sampling/truncation_logp_gap/mean"]), gap.mean(), rtol=1e-5)
    # A random model's distributions are wide: the top 5 of 32 tokens keep well under all the mass.
    assert float(metrics["sampling/truncation_logp_gap/mean"]) > 0.3


def test_the_tensor_layout_is_checked_against_the_engine_slots():
    import types

    from rlhf_jax.config import ConfigError
    from rlhf_jax.sampling.generate import validate_decode_layout
    from tests import common

    config = common.config(sampling__decode_layout="tensor", train__rollout_batch_size=16)
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 2, "tensor": 2})  # 4 model devices, 2 KV heads
    validate_decode_layout(config, CFG, mesh)  # 16 rows split over the 2 devices beyond one per KV head
    validate_decode_layout(config, CFG, mesh, slots=4)
    with pytest.raises(ConfigError, match=r"'tensor' with config.sampling.slots = 3: 3 rows do not split over 2"):
        validate_decode_layout(config, CFG, mesh, slots=3)
