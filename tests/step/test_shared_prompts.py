"""Each prompt run once for its group's samples (`train.share_prompts`): the grouped forward gives the
full-sequence forward's hidden states and gradients, the shared prefill the same samples, and a GRPO
update the unshared one's result; minibatches keep groups whole."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.core.minibatch import minibatch_orders
from rlhf_jax.models import CausalLM
from rlhf_jax.sampling.generate import generate
from rlhf_jax.sampling.rollout import join, prompt_group, response_positions
from tests import common
from tests.models.test_scan_layers import CONFIGS

PROMPTS, GROUP, PROMPT_LEN, RESPONSE_LEN = 3, 4, 7, 6


def ragged_batch():
    """Left-padded prompts of 4, 7 and 6 tokens; responses that end early (zero mask after)."""
    rng = np.random.default_rng(0)
    prompt_mask = np.ones((PROMPTS, PROMPT_LEN), np.int32)
    prompt_mask[0, :3] = 0
    prompt_mask[2, :1] = 0
    response_mask = np.ones((PROMPTS * GROUP, RESPONSE_LEN), np.int32)
    response_mask[1, 4:] = 0
    response_mask[5, 2:] = 0
    response_mask[11, 1:] = 0
    return (rng.integers(1, 64, (PROMPTS, PROMPT_LEN)) * prompt_mask, prompt_mask,
            rng.integers(1, 64, (PROMPTS * GROUP, RESPONSE_LEN)) * response_mask, response_mask)


# GPT-2 (learned positions) runs grouped in the update test below (configs/tiny.py).
@pytest.mark.parametrize("family,scan,remat", [("llama", False, "full"), ("gemma3", True, "dots")])
def test_grouped_forward_equals_the_full_sequence_forward(family, scan, remat):
    """Every per-layer difference (no-RoPE layer, sliding windows at their own base, qk norms), left
    padding and early-ended responses: hidden states at the real response positions, and the gradient
    of a loss read there, equal the full forward's over the prompts repeated."""
    prompt_ids, prompt_mask, response_ids, response_mask = ragged_batch()
    graphdef, params = nnx.split(CausalLM(CONFIGS[family].replace(scan_layers=scan), rngs=nnx.Rngs(0)))

    def full(params):
        ids, mask = join(np.repeat(prompt_ids, GROUP, 0), np.repeat(prompt_mask, GROUP, 0), response_ids,
                         response_mask)
        return nnx.merge(graphdef, params).backbone(ids, mask, output_index=response_positions(PROMPT_LEN, RESPONSE_LEN),
                                                    remat=remat)[0]

    def grouped(params):
        return nnx.merge(graphdef, params).backbone.grouped(prompt_ids, prompt_mask, response_ids, response_mask,
                                                            GROUP, remat=remat)

    real = response_mask[..., None].astype(bool)

    def loss(forward):
        def value(p):
            hidden = forward(p)
            return jnp.sum(jnp.where(real, jnp.sin(hidden), 0.0)), hidden
        return jax.jit(jax.value_and_grad(value, has_aux=True))

    ((_, a), grads_a), ((_, b), grads_b) = (loss(f)(params) for f in (full, grouped))
    assert a.shape == b.shape == (PROMPTS * GROUP, RESPONSE_LEN, 32)
    np.testing.assert_allclose(np.where(real, b, 0), np.where(real, a, 0), atol=5e-6)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(grads_a), jax.tree.leaves(grads_b)):
        # k_proj's bias has a zero gradient (it shifts every score of a query alike): rounding only.
        np.testing.assert_allclose(y, x, atol=2e-5 * max(1.0, float(np.max(np.abs(x)))), err_msg=jax.tree_util.keystr(path))


def test_grouped_forward_checks_the_group():
    prompt_ids, prompt_mask, response_ids, response_mask = ragged_batch()
    model = CausalLM(CONFIGS["llama"], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="12 responses are not 3 per prompt for 3 prompts"):
        model.backbone.grouped(prompt_ids, prompt_mask, response_ids, response_mask, 3)


def test_the_shared_prefill_samples_what_the_full_one_does():
    """Scanned (the cache's rows are its second axis); unrolled, in the GRPO tests on a mesh."""
    prompt_ids, prompt_mask, _, _ = ragged_batch()
    graphdef, params = nnx.split(CausalLM(CONFIGS["gemma3"].replace(scan_layers=True), rngs=nnx.Rngs(0)))
    kwargs = dict(max_new_tokens=5, temperature=1.0)
    rows = (np.repeat(prompt_ids, GROUP, 0), np.repeat(prompt_mask, GROUP, 0))
    full = generate(graphdef, params, *rows, jax.random.PRNGKey(1), **kwargs)
    shared = generate(graphdef, params, *rows, jax.random.PRNGKey(1), prompt_group=GROUP, **kwargs)
    np.testing.assert_array_equal(shared["response_ids"], full["response_ids"])
    np.testing.assert_allclose(shared["logprobs"], full["logprobs"], atol=1e-5)
    # The group's rows are sampled independently, not copies of one another.
    assert len({tuple(r) for r in np.asarray(full["response_ids"])[:GROUP]}) > 1
    with pytest.raises(ValueError, match="prompt_group=5 does not divide the batch of 12 rows"):
        generate(graphdef, params, *rows, jax.random.PRNGKey(1), prompt_group=5, **kwargs)


def test_minibatches_of_whole_groups():
    orders = np.asarray(minibatch_orders(jax.random.PRNGKey(0), 24, 2, 3, group=4))
    assert orders.shape == (2, 3, 8)
    for epoch in orders:
        np.testing.assert_array_equal(np.sort(epoch.reshape(-1)), np.arange(24))
        groups = epoch.reshape(-1, 4)
        np.testing.assert_array_equal(groups - groups[:, :1], np.tile(np.arange(4), (6, 1)))  # whole, in order
        assert np.all(groups[:, 0] % 4 == 0)
    assert not np.array_equal(orders[0], orders[1])  # a fresh permutation each epoch


def grpo_config(**train):
    c = common.config()
    c.algorithm = "grpo"
    c.train.update(num_generations=4, rollout_batch_size=16, **train)
    c.logging.progress = False
    return c


class Mesh8:
    shape = {"data": 8, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("change,expected", [
    ({}, 4),
    (dict(share_prompts=False), 1),
    (dict(algorithm="ppo"), 1),
    (dict(attention="splash"), 1),  # the fused kernels take no KV cache
    (dict(num_mini_batches=2), 4),  # 8 rows: two whole groups
    (dict(num_mini_batches=8), 1),  # 2 rows: half a group
    (dict(mesh=Mesh8), 1),  # 4 prompts over 8 devices
    (dict(mesh=Mesh8, shard_activations=False), 4),
])
def test_where_prompts_are_shared(change, expected):
    c = grpo_config(share_prompts=change.get("share_prompts", True))
    c.algorithm = change.get("algorithm", c.algorithm)
    c.model.update(attention=change.get("attention", "xla"), shard_activations=change.get("shard_activations", True))
    c.rl.num_mini_batches = change.get("num_mini_batches", 1)
    assert prompt_group(c, change.get("mesh")) == expected
    # The prefill needs neither the plain attention nor whole-group minibatches.
    if "attention" in change or "num_mini_batches" in change:
        assert prompt_group(c, change.get("mesh"), update=False) == 4


def test_a_grpo_update_with_shared_prompts_equals_one_without(tmp_path):
    """The trainer's update (prompts shared) and one built with `share_prompts=False`, on the same
    rollout (sampled with the shared prefill) and rewards. One epoch of one minibatch: the orders
    differ (by groups, by rows), the loss over all rows does not."""
    from rlhf_jax.run.trainer import RLTrainer
    from rlhf_jax.step.update import make_update

    c = grpo_config()
    c.rl.update(kl_in_loss=True, kl_loss_estimator="k3", num_ppo_epochs=1, num_mini_batches=1)
    trainer = RLTrainer(c, str(tmp_path))
    state = trainer.init_state()
    rows = [np.repeat(a[:4], GROUP, axis=0) for a in (trainer.prompt_ids, trainer.prompt_mask)]
    rollout = trainer.rollout_fn(trainer.policy_params(state), *map(trainer.to_device_batch, rows),
                                 jax.random.PRNGKey(0))
    scores = trainer.to_device_batch(np.arange(16, dtype=np.float32) % 3)
    plain = c.copy_and_resolve_references()
    plain.train.share_prompts = False
    assert prompt_group(c) == GROUP and prompt_group(plain) == 1
    unshared = make_update(plain, policy_graphdef=trainer.policy_graphdef, ref_graphdef=trainer.ref_graphdef,
                           eos_ids=trainer.eos_ids, optimizer=trainer.optimizer)
    copy = lambda: jax.tree.map(jnp.copy, state)  # the updates donate their state
    results = [update(copy(), rollout, scores, trainer.frozen, trainer.update_reference)
               for update in (trainer.update_fn, unshared)]
    (shared, m_shared), (plain_state, m_plain) = results
    for key in ("loss", "kl", "entropy", "loss/kl_avg"):
        assert float(m_shared[key]) == pytest.approx(float(m_plain[key]), rel=1e-4, abs=1e-6), key
    for a, b in zip(jax.tree.leaves(shared.params), jax.tree.leaves(plain_state.params)):
        np.testing.assert_allclose(a, b, atol=4 * c.optim.learning_rate)
    assert not np.allclose(jax.tree.leaves(shared.params)[0], jax.tree.leaves(state.params)[0])  # it moved
