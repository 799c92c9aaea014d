"""Memory levers change memory, not results: chunked log-probs, rematerialisation, activation
sharding; and a small model compiled for a TPU slice keeps its batch sharded."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.core.ops import chunked_token_stats, entropy_from_logits, token_logprobs
from rlhf_jax.models import CausalLM, ModelConfig, gpt2_config
from tests import common

LLAMA = ModelConfig(family="llama", vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                    head_dim=8, intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)


def test_chunked_logprobs_and_entropy_equal_the_full_ones_with_gradients():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 8, 16)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 50, (3, 8)), jnp.int32)

    def full(w, h):
        logits = h @ w
        return token_logprobs(logits, tokens), entropy_from_logits(logits)

    def chunked(w, h):
        return chunked_token_stats(h, lambda x: x @ w, tokens, chunk=2)

    for a, b in zip(full(weight, hidden), chunked(weight, hidden)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    loss = lambda fn: lambda w, h: sum(jnp.sum(x * (i + 1.5)) for i, x in enumerate(fn(w, h)))
    grads_full = jax.grad(loss(full), argnums=(0, 1))(weight, hidden)
    grads_chunked = jax.grad(loss(chunked), argnums=(0, 1))(weight, hidden)
    for a, b in zip(grads_full, grads_chunked):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not divide"):
        chunked_token_stats(hidden, lambda x: x @ weight, tokens, chunk=3)


@pytest.mark.parametrize("cfg,lora", [
    (LLAMA, False),
    (gpt2_config(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, max_position_embeddings=64), False),
    (LLAMA, True)], ids=["llama", "gpt2", "llama-lora"])
def test_remat_gives_the_same_loss_and_gradients(cfg, lora):
    """Gradients with respect to the trainable params (with LoRA: the adapters, the base frozen
    outside the differentiated tree, as in the trainer)."""
    from rlhf_jax.models.lora import TRAINABLE, with_lora

    model = CausalLM(cfg, rngs=nnx.Rngs(0), value_head=True)
    if lora:
        model = with_lora(model, 4, 8.0, ("q_proj", "v_proj", "up_proj"))
    graphdef, params, frozen = nnx.split(model, TRAINABLE if lora else nnx.Param, ...)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 96, (2, 12)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, :4].set(0)

    def loss(params, remat):
        model = nnx.merge(graphdef, params, frozen)
        hidden, _ = model.backbone(ids, mask, output_index=slice(3, 11), remat=remat)
        return jnp.mean(model.logits(hidden) ** 2) + jnp.mean(model.values(hidden))

    reference_loss, reference_grads = jax.value_and_grad(loss)(params, "none")
    for remat in ("full", "dots"):
        value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, remat)
        np.testing.assert_allclose(float(value), float(reference_loss), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(reference_grads), jax.tree.leaves(grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_update_with_levers_equals_update_without(tmp_path):
    """One PPO iteration with remat, chunked log-probs and activation constraints on gives the
    params of one without them (same rollout)."""
    from rlhf_jax.run.trainer import RLTrainer

    def run(**model):
        config = common.config()
        config.logging.progress = False
        config.model.update(**model)
        trainer = RLTrainer(config, str(tmp_path))
        state, metrics, _ = trainer.iteration(trainer.init_state())
        return state, metrics

    plain, plain_metrics = run(remat="none", logits_chunk=0, shard_activations=False)
    levers, levers_metrics = run(remat="full", logits_chunk=4, shard_activations=True)
    # Adam divides by sqrt(v): where a gradient is ~0, float noise moves a step by up to the learning
    # rate (3e-3 here, 4 steps); the differences seen are below 1e-5.
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(levers.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)
    for key in ("loss/policy_avg", "policy/entropy_avg", "objective/kl"):
        assert levers_metrics[key] == pytest.approx(plain_metrics[key], rel=1e-4, abs=1e-6)


def _tpu_devices(topology):
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]'): no compile-only TPU")
    from rlhf_jax.plan.cli import topology_devices
    return topology_devices(topology)[0]


def test_two_layer_update_compiled_for_tpu_keeps_the_batch_sharded():
    """Per-chip temporaries of the update shrink when the chips double: the batch stays sharded."""
    from rlhf_jax.parallel.sharding import make_mesh
    from rlhf_jax.plan.aot import abstract_iteration

    config = common.config()
    config.model.update(dtype="bfloat16", param_dtype="float32", logits_chunk=16)
    config.data.max_prompt_len = 64
    config.sampling.max_new_tokens = 64
    config.train.rollout_batch_size = 32
    config.rl.update(num_ppo_epochs=1, num_mini_batches=1)
    cfg = LLAMA.replace(num_layers=2, hidden_size=256, num_heads=8, num_kv_heads=4, head_dim=32,
                        intermediate_size=1024, vocab_size=32768, max_position_embeddings=128, dtype="bfloat16")
    temps = {}
    for topology in ("v5e:2x2", "v5e:2x4"):
        mesh = make_mesh(1, -1, 1, devices=_tpu_devices(topology))
        compiled = abstract_iteration(config, cfg, mesh).lower_update().compile()
        temps[topology] = compiled.memory_analysis().temp_size_in_bytes
    assert temps["v5e:2x4"] < 0.7 * temps["v5e:2x2"], temps
