"""The update on packed rows (`train.pack_tokens`): the scoring pass's log-probs and values, the loss's
statistics and the new params equal the padded update's on a ragged rollout, whatever the algorithm;
the packed row counts come from a few buckets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import ConfigError, validate
from rlhf_jax.core.packing import bucket_rows, minibatch_layouts
from rlhf_jax.step.forward import TrainingForward, sequence_batch
from rlhf_jax.step.update import packed_minibatches
from tests import common

BUDGET = 24  # prompt 4 + response 8 per sample at most: two or three samples a row


def _trainer(tmp_path, **overrides):
    from rlhf_jax.run.trainer import RLTrainer

    c = common.config(train__pack_tokens=BUDGET, **overrides)
    c.logging.progress = False
    return c, RLTrainer(c, str(tmp_path))


def _ragged_rollout(trainer, state, seed=0):
    """The trainer's rollout with responses cut at 1-8 tokens (and one prompt shortened)."""
    rows = [trainer.prompt_ids[:16], trainer.prompt_mask[:16]]
    rows[1] = rows[1].copy()
    rows[1][3, :2] = 0
    rows[0] = rows[0] * rows[1]
    rollout = trainer.rollout_fn(trainer.policy_params(state), *map(trainer.to_device_batch, rows),
                                 jax.random.PRNGKey(0))
    lengths = np.random.default_rng(seed).integers(1, 9, 16)
    keep = np.arange(8) < lengths[:, None]
    return rollout.replace(response_ids=jnp.where(keep, rollout.response_ids, trainer.pad_id),
                           response_mask=jnp.asarray(keep, jnp.int32),
                           logprobs=jnp.where(keep, rollout.logprobs, 0.0),
                           values=None if rollout.values is None else jnp.where(keep, rollout.values, 0.0),
                           lengths=jnp.asarray(lengths, jnp.int32))


# PPO with the value head on the policy's trunk (the default): the packed iteration on a 2x4 mesh in
# tests/parallel/sharded_checks.py.
@pytest.mark.parametrize("overrides", [
    dict(model__value_model="separate", model__scan_layers=True, train__micro_rows=2),
    dict(algorithm="grpo", train__num_generations=4, lora__enabled=True, lora__rank=4, rl__kl_in_loss=True,
         rl__kl_loss_estimator="k3"),
    dict(algorithm="grpo", train__num_generations=4, lora__enabled=True, lora__rank=4, train__micro_rows=1,
         rl__loss_aggregation="sequence"),
], ids=["ppo_separate_scanned_micro", "grpo_lora", "grpo_micro"])
def test_the_packed_update_equals_the_padded_one(tmp_path, overrides):
    c, trainer = _trainer(tmp_path, **overrides)
    state = trainer.init_state()
    rollout = _ragged_rollout(trainer, state)
    scores = trainer.to_device_batch(np.arange(16, dtype=np.float32) % 3)
    packing = packed_minibatches(c, state.key, rollout, trainer.pad_id)
    # Every sample packed once per epoch, in fewer rows than the padded minibatch's 8 (in micro-batches
    # of one row, several).
    assert packing["orders"].shape == (2, 2, 8)
    if c.train.micro_rows:
        micros = bucket_rows(packing["micro_steps"].max(), -(-8 // c.train.micro_rows))
        assert packing["packed_ids"].shape[2:4] == (micros, c.train.micro_rows)
        assert packing["micro_steps"].max() > 1 and packing["micro_steps"].min() >= 1
    else:
        assert packing["packed_ids"].shape[2] < 8
    real = int(np.asarray(rollout.prompt_mask).sum() + np.asarray(rollout.response_mask).sum())
    assert (packing["segment_ids"] > 0).sum() == 2 * real

    # The scoring pass, token by token.
    value = c.algorithm == "ppo"
    forward = TrainingForward(c, trainer.policy_graphdef, trainer.ref_graphdef,
                              trainer.value_graphdef if value else None, None, value_head=value)
    batch = sequence_batch(rollout)
    first = {k: v[0] for k, v in packing.items() if k != "orders"}
    score = jax.jit(lambda params, packed: forward.score(params, trainer.frozen, trainer.update_reference, batch,
                                                         packing["orders"][0], policy=True, values=value,
                                                         packed=packed))
    padded, packed = score(state.params, None), score(state.params, first)
    mask = np.asarray(rollout.response_mask, bool)
    assert padded.keys() == packed.keys() == ({"ref_logprobs", "logprobs", "values"} if value
                                              else {"ref_logprobs", "logprobs"})
    for key in padded:
        np.testing.assert_allclose(np.asarray(packed[key])[mask], np.asarray(padded[key])[mask], rtol=1e-5, atol=2e-6,
                                   err_msg=key)
        assert np.all(np.asarray(packed[key])[~mask] == 0)

    copy = lambda: jax.tree.map(jnp.copy, state)  # the update donates its state
    plain_state, plain = trainer.update_fn(copy(), rollout, scores, trainer.frozen, trainer.update_reference)
    packed_state, metrics = trainer.update_fn(copy(), rollout, scores, trainer.frozen, trainer.update_reference,
                                              packing)
    assert plain.keys() == metrics.keys()
    # In micro-batches val/ratio_var is the token-weighted mean of theirs (a variance does not add up).
    for key in set(plain) - ({"val/ratio_var"} if c.train.micro_rows else set()):
        assert float(metrics[key]) == pytest.approx(float(plain[key]), rel=1e-4, abs=1e-5), key
    for a, b in zip(jax.tree.leaves(packed_state.params), jax.tree.leaves(plain_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_packed_row_counts_come_from_a_few_buckets():
    assert [bucket_rows(n, 64) for n in (1, 8, 9, 40, 64)] == [8, 8, 16, 40, 64]
    assert [bucket_rows(n, 64, unit=16) for n in (1, 17, 33)] == [16, 32, 48]
    assert len({bucket_rows(n, 64, unit=2) for n in range(1, 65)}) == 8
    with pytest.raises(ValueError, match="9 packed rows for 8 samples"):
        bucket_rows(9, 8)
    # Three epochs of two minibatches: one packed row count for all (a bucket, even), and at each
    # response token's gather position the packed targets hold that very token.
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (16, 12))
    prompt_mask = np.ones((16, 4), np.int32)
    response_mask = (np.arange(8) < rng.integers(1, 9, (16, 1))).astype(np.int32)
    orders = np.stack([rng.permutation(16).reshape(2, 8) for _ in range(3)])
    layouts = minibatch_layouts(ids[:, :4], prompt_mask, ids[:, 4:], response_mask, orders, BUDGET, unit=2)
    rows = layouts["packed_ids"].shape[2]
    assert layouts["packed_ids"].shape == (3, 2, rows, BUDGET) and rows % 2 == 0 and rows < 8
    for e in range(3):
        for m in range(2):
            gather, order = layouts["gather"][e, m], orders[e, m]
            real = response_mask[order] > 0
            np.testing.assert_array_equal(layouts["targets"][e, m].reshape(-1)[gather[real]], ids[order, 4:][real])
            assert np.all(gather[~real] == -1)
            used = (layouts["segment_ids"][e, m] > 0).any(1)
            assert np.all(np.diff(used.astype(int)) <= 0)  # the rows a minibatch does not need stay empty, last


def test_ragged_rollouts_share_a_few_compiled_updates(tmp_path):
    # Whatever the lengths, the layouts' shapes come from at most 8 micro-batch counts...
    rng = np.random.default_rng(1)
    orders = np.stack([rng.permutation(16).reshape(2, 8) for _ in range(2)])
    shapes = set()
    for _ in range(100):
        response_mask = (np.arange(8) < rng.integers(1, 9, (16, 1))).astype(np.int32)
        layouts = minibatch_layouts(np.ones((16, 4)), np.ones((16, 4)), np.ones((16, 8)), response_mask, orders,
                                    BUDGET, micro_rows=1)
        shapes.add(tuple((k, v.shape) for k, v in sorted(layouts.items())))
    assert 1 < len(shapes) <= 8
    # ...and rollouts of other lengths in the same bucket run the program already compiled.
    c, trainer = _trainer(tmp_path, algorithm="grpo", train__num_generations=4, lora__enabled=True, lora__rank=4,
                          train__micro_rows=1)
    state = trainer.init_state()
    scores = trainer.to_device_batch(np.arange(16, dtype=np.float32) % 3)
    seen = {}
    for seed in range(4):
        rollout = _ragged_rollout(trainer, state, seed)
        packing = packed_minibatches(c, state.key, rollout, trainer.pad_id)
        shape = packing["packed_ids"].shape
        state, _ = trainer.update_fn(state, rollout, scores, trainer.frozen, trainer.update_reference, packing)
        seen.setdefault(shape, set()).add(tuple(np.asarray(rollout.lengths)))
    assert max(len(lengths) for lengths in seen.values()) > 1  # two rollouts of other lengths shared a shape
    assert trainer.update_fn._cache_size() == len(seen)


@pytest.mark.parametrize("key,value,message", [
    ("train.pack_tokens", 10, "config.train.pack_tokens = 10 is less than a sample's longest"),
    ("model.attention", "splash", "config.train.pack_tokens = 24 needs config.model.attention = 'xla'"),
    ("model.logits_chunk", 5, "config.model.logits_chunk = 5 does not divide"),
    ("train.micro_rows", -1, "config.train.micro_rows"),
])
def test_packing_config_errors_name_the_key(key, value, message):
    c = common.config(**{"train__pack_tokens": BUDGET, key.replace(".", "__"): value})
    with pytest.raises(ConfigError, match=message):
        validate(c)


def test_micro_batches_need_packing():
    with pytest.raises(ConfigError, match=r"config.train.micro_rows = 2 needs config.train.pack_tokens > 0"):
        validate(common.config(train__micro_rows=2))
