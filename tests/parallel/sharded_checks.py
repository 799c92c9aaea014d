"""Checks on a simulated 8-device mesh. Run by tests/parallel/test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set before jax starts)."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax.core.advantages import masked_whiten
from rlhf_jax.core.losses import clipped_surrogate, value_loss
from rlhf_jax.core.minibatch import ppo_update
from rlhf_jax.core.ops import token_logprobs
from rlhf_jax.models import CausalLM, ModelConfig, gpt2_config
from rlhf_jax.models.transformer import Pins
from rlhf_jax.parallel.sharding import (
    batch_sharding,
    bytes_per_device,
    decode_mesh,
    make_mesh,
    param_shardings,
    shard_like,
)
from rlhf_jax.run.trainer import RLTrainer
from rlhf_jax.sampling.engine import continuous_generate
from rlhf_jax.sampling.generate import generate
from tests import common

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs the 8-device simulated mesh")


def mesh_config(data, fsdp=1, tensor=1):
    c = common.config()
    c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    c.logging.progress = False
    c.logging.tensorboard = False
    c.checkpoint.every = 0
    c.checkpoint.async_save = False
    return c


def one_iteration(config, workdir):
    trainer = RLTrainer(config, str(workdir))
    state, metrics, _ = trainer.iteration(trainer.init_state())
    return trainer, state, metrics


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    return one_iteration(mesh_config(1, 1, 1), tmp_path_factory.mktemp("single"))


def assert_params_close(reference, state, lr, steps=4):
    """Adam divides by sqrt(v): where a gradient is ~0, reduction-order noise can move a step by up to
    the learning rate. So: almost every element within 1e-5, none beyond a few Adam steps."""
    for a, b in zip(jax.tree.leaves(reference.params), jax.tree.leaves(state.params)):
        diff = np.abs(np.asarray(a) - np.asarray(b))
        assert np.sum(diff > 1e-5) <= max(2, 0.005 * diff.size), np.sum(diff > 1e-5)
        assert diff.max() < lr * steps, diff.max()


def test_packed_ppo_iteration_on_a_2x4_mesh_matches_single_device(single_device, tmp_path):
    """`train.pack_tokens` on a (2, 4, 1) mesh, in micro-batches of one packed row per device: the rows
    split over the 8 batch devices, and the iteration's update gives the unpacked single-device one's
    params and metrics."""
    _, reference, ref_metrics = single_device
    config = mesh_config(2, 4, 1)
    config.train.update(pack_tokens=16, micro_rows=1)
    trainer, state, metrics = one_iteration(config, tmp_path)
    assert metrics["packing/rows"] == 8 and 0 < metrics["packing/real_fraction"] <= 1
    assert_params_close(reference, state, trainer.config.optim.learning_rate)
    for key in ("objective/scores", "objective/kl", "policy/approxkl_avg", "loss/value_avg"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-6), key


# Pure data parallelism against one device: test_grpo_groups_on_a_data8_mesh_match_one_device.
@pytest.mark.parametrize("shape,decode_layout", [((2, 4, 1), "auto"), ((2, 1, 4), "tensor")])
def test_ppo_iteration_matches_single_device(single_device, tmp_path, shape, decode_layout):
    _, reference, ref_metrics = single_device
    config = mesh_config(*shape)
    config.sampling.decode_layout = decode_layout
    trainer, state, metrics = one_iteration(config, tmp_path)
    assert trainer.mesh.devices.size == 8
    assert_params_close(reference, state, trainer.config.optim.learning_rate)
    assert metrics["objective/scores"] == pytest.approx(ref_metrics["objective/scores"], abs=1e-6)
    # The params really are spread over the mesh (not gathered onto one device).
    kernel = state.params["policy"]["backbone"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert len({s.device for s in kernel.addressable_shards}) == 8
    if shape[1] > 1 or shape[2] > 1:
        assert kernel.addressable_shards[0].data.size < kernel.size


def test_fsdp8_holds_an_eighth_per_device(tmp_path):
    config = mesh_config(1, 8, 1)
    config.model.builtin.update(hidden_size=64, num_heads=4)
    trainer = RLTrainer(config, str(tmp_path))
    state = trainer.init_state()
    tree = (state.params, state.opt_state)
    total = sum(x.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))
    per_device = bytes_per_device(tree)
    assert len(per_device) == 8
    assert max(per_device.values()) <= 1.15 * total / 8, (max(per_device.values()), total / 8)


@pytest.mark.parametrize("family,layout,mesh_shape,scan", [
    ("gpt2", {}, (2, 2, 2), False), ("llama", {}, (1, 8, 1), False),
    ("gpt2", {"shard_prefill": True}, (1, 8, 1), False), ("llama", {"shard_prefill": True}, (2, 2, 2), False),
    ("llama", {"shard_prefill": False}, (1, 8, 1), False), ("llama", {"shard_prefill": True}, (2, 2, 2), True),
])
def test_generate_on_a_sharded_batch_equals_unsharded(family, layout, mesh_shape, scan):
    """Whatever the rollout's layout (left to XLA; the KV cache split by rows; the prefill's
    activations pinned to the batch axes too; the blocks and the cache stacked), the samples are
    those of one device."""
    if family == "gpt2":
        cfg = gpt2_config(vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=32)
    else:
        cfg = ModelConfig(family="llama", vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=8, intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=False)
    graphdef, params = nnx.split(CausalLM(cfg.replace(scan_layers=scan), rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(0)
    ids = rng.randint(2, 48, (16, 5)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::3, :2] = 0
    kw = dict(max_new_tokens=6, temperature=1.0, eos_ids=(1,), pad_id=0)
    plain = generate(graphdef, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(3), **kw)
    mesh = make_mesh(*mesh_shape)
    sharded_params = shard_like(params, param_shardings(params, mesh))
    put = lambda x: jax.device_put(x, batch_sharding(mesh))
    if layout:
        kw.update(batch_mesh=mesh, **layout)
    sharded = generate(graphdef, sharded_params, put(ids), put(mask), jax.random.PRNGKey(3), **kw)
    np.testing.assert_array_equal(np.asarray(plain["response_ids"]), np.asarray(sharded["response_ids"]))
    np.testing.assert_allclose(np.asarray(plain["logprobs"]), np.asarray(sharded["logprobs"]), atol=1e-5)


@pytest.mark.parametrize("family,mesh_shape,scan", [("llama", (2, 2, 2), True), ("gemma3", (1, 8, 1), False)])
def test_tensor_parallel_decoding_samples_what_one_device_does(family, mesh_shape, scan):
    """The decode loop on a tensor-parallel copy of the weights, the KV cache split by heads and rows
    (2 KV heads: a (data, 4, 2) or (2, 1, 2) decode mesh): the samples, log-probs and values of one
    device. Llama with LoRA adapters, a NoPE layer and untied head; Gemma 3 with sliding layers, a
    soft-capped tied head."""
    if family == "llama":
        cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=3, num_heads=8, num_kv_heads=2,
                          head_dim=8, intermediate_size=64, max_position_embeddings=64, qk_norm=True,
                          nope_layers=(1,), tie_word_embeddings=False, lora_rank=4,
                          lora_targets=("q_proj", "v_proj", "up_proj", "down_proj"))
    else:
        cfg = ModelConfig(family="gemma3", vocab_size=64, hidden_size=32, num_layers=3, num_heads=8, num_kv_heads=2,
                          head_dim=8, intermediate_size=64, max_position_embeddings=64, qk_norm=True,
                          sliding_window=3, sliding_layers=(0, 2), rope_local_theta=100.0, final_softcap=5.0)
    graphdef, params = nnx.split(CausalLM(cfg.replace(scan_layers=scan), rngs=nnx.Rngs(0), value_head=True))
    # The value head and the adapters' B start at zero: perturbed, so that they count.
    noise = iter(jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(noise), x.shape, x.dtype), params)
    rng = np.random.RandomState(0)
    ids = rng.randint(2, 64, (16, 5)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::3, :2] = 0
    kw = dict(max_new_tokens=6, temperature=1.0, eos_ids=(1,), pad_id=0, with_values=True)
    plain = generate(graphdef, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(3), **kw)
    mesh = make_mesh(*mesh_shape)
    assert dict(decode_mesh(mesh, 2).shape) == {"data": mesh_shape[0], "fsdp": 8 // mesh_shape[0] // 2, "tensor": 2}
    put = lambda x: jax.device_put(x, batch_sharding(mesh))
    sharded = generate(graphdef, shard_like(params, param_shardings(params, mesh)), put(ids), put(mask),
                       jax.random.PRNGKey(3), batch_mesh=mesh, shard_prefill=True, decode_layout="tensor", **kw)
    np.testing.assert_array_equal(np.asarray(plain["response_ids"]), np.asarray(sharded["response_ids"]))
    for name in ("logprobs", "values"):
        np.testing.assert_allclose(np.asarray(plain[name]), np.asarray(sharded[name]), atol=1e-5)


@pytest.mark.parametrize("family,layout,scan", [("gpt2", "batch", False), ("llama", "tensor", True)])
def test_continuous_engine_on_a_mesh_samples_what_one_device_does(family, layout, scan):
    """The continuous-batching engine with its slots split over the batch axes (and, in the tensor
    layout, its cache over KV heads), halving its slots in the tail: the static sampler's samples on
    one device."""
    if family == "gpt2":
        cfg = gpt2_config(vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=32)
    else:
        cfg = ModelConfig(family="llama", vocab_size=48, hidden_size=32, num_layers=2, num_heads=8, num_kv_heads=2,
                          head_dim=8, intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=False)
    graphdef, params = nnx.split(CausalLM(cfg.replace(scan_layers=scan), rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda x: x * 3.0, params)  # sharper distributions: rows end at different steps
    rng = np.random.RandomState(0)
    ids = rng.randint(2, 48, (24, 5)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::3, :2] = 0
    kw = dict(max_new_tokens=8, temperature=1.0, eos_ids=(1, 2, 3), pad_id=0)
    plain = jax.device_get(generate(graphdef, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(3),
                                    **kw))
    assert len(set(plain["lengths"].tolist())) > 2, plain["lengths"]
    mesh = make_mesh(2, 2, 2)
    put = lambda x: jax.device_put(x, batch_sharding(mesh))
    sharded = jax.device_get(continuous_generate(
        graphdef, shard_like(params, param_shardings(params, mesh)), put(ids), put(mask), jax.random.PRNGKey(3),
        slots=8, refill=2, batch_mesh=mesh, shard_prefill=True, decode_layout=layout, **kw))
    for name in ("response_ids", "response_mask", "lengths"):
        np.testing.assert_array_equal(plain[name], sharded[name])
    np.testing.assert_allclose(plain["logprobs"], sharded["logprobs"], atol=1e-5)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    from rlhf_jax.run.loop import train
    config = mesh_config(8, 1, 1)
    config.train.num_iterations = 1
    train(config, str(tmp_path))
    config = mesh_config(2, 4, 1)
    config.train.num_iterations = 2
    trainer, state, history = train(config, str(tmp_path))
    assert int(state.step) == 2 and len(history) == 1  # resumed from the data=8 checkpoint
    kernel = state.params["policy"]["backbone"]["layers"][0]["attn"]["q_proj"]["kernel"]
    assert kernel.sharding.mesh.shape == trainer.mesh.shape and trainer.mesh.shape["fsdp"] == 4


def toy_update_inputs():
    """A tiny model, a rollout batch with full masks (equal token counts per device), an optimizer."""
    cfg = gpt2_config(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16)
    graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(1), value_head=True))
    rng = np.random.RandomState(4)
    b, p, r = 16, 3, 4
    batch = {
        "prompt_ids": rng.randint(2, 32, (b, p)).astype(np.int32), "prompt_mask": np.ones((b, p), np.int32),
        "response_ids": rng.randint(2, 32, (b, r)).astype(np.int32), "response_mask": np.ones((b, r), np.int32),
        "logprobs": (rng.randn(b, r) * 0.1 - 3.4).astype(np.float32), "values": rng.randn(b, r).astype(np.float32),
        "advantages": rng.randn(b, r).astype(np.float32), "returns": rng.randn(b, r).astype(np.float32),
    }

    def forward(params, mb):
        ids = jnp.concatenate([mb["prompt_ids"], mb["response_ids"]], 1)
        mask = jnp.concatenate([mb["prompt_mask"], mb["response_mask"]], 1)
        out = nnx.merge(graphdef, params)(ids, mask)
        return out["logits"][:, p - 1:-1], out["values"][:, p - 1:-1]

    def loss_fn(params, mb):
        logits, values = forward(params, mb)
        mask = mb["response_mask"]
        pg, stats = clipped_surrogate(token_logprobs(logits, mb["response_ids"]), mb["logprobs"], mb["advantages"],
                                      mask, clip_low=0.2)
        vf, _ = value_loss(values, mb["values"], mb["returns"], mask, 0.2)
        return pg + 0.5 * vf, stats

    return params, batch, loss_fn, optax.adam(1e-2)


def test_pmap_update_equals_jit_sharded_data8():
    params, batch, loss_fn, optimizer = toy_update_inputs()
    opt_state = optimizer.init(params)
    kw = dict(loss_fn=loss_fn, optimizer=optimizer, num_epochs=1, num_minibatches=1)
    mesh = make_mesh(8, 1, 1)
    sharded = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
    jit_params, _, jit_stats = jax.jit(lambda p, o, b: ppo_update(p, o, b, jax.random.PRNGKey(0), **kw))(
        params, opt_state, sharded)

    def per_device(p, o, b):
        return ppo_update(p, o, b, jax.random.PRNGKey(0), axis_name="data", **kw)

    split = {k: v.reshape(8, -1, *v.shape[1:]) for k, v in batch.items()}
    replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * 8), tree)
    pmap_params, _, pmap_stats = jax.pmap(per_device, axis_name="data")(replicate(params), replicate(opt_state), split)
    for a, b in zip(jax.tree.leaves(jit_params), jax.tree.leaves(pmap_params)):
        for device in range(8):
            np.testing.assert_allclose(np.asarray(b)[device], np.asarray(a), atol=2e-5)
    np.testing.assert_allclose(np.asarray(pmap_stats["loss"])[0], float(jit_stats["loss"]), atol=1e-6)


def test_masked_whiten_with_axis_name_uses_global_statistics():
    rng = np.random.RandomState(5)
    x = rng.randn(16, 6).astype(np.float32)
    mask = rng.rand(16, 6) > 0.4
    expected = np.asarray(masked_whiten(jnp.asarray(x), jnp.asarray(mask)))
    got = jax.pmap(lambda a, m: masked_whiten(a, m, axis_name="d"), axis_name="d")(
        x.reshape(8, 2, 6), mask.reshape(8, 2, 6))
    np.testing.assert_allclose(np.asarray(got).reshape(16, 6), expected, atol=1e-5)


def test_iteration_compiles_from_shapes_on_a_2x4_mesh():
    from rlhf_jax.plan.aot import abstract_iteration
    config = mesh_config(2, 4, 1)
    cfg = gpt2_config(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=32)
    mesh = make_mesh(2, 4, 1)
    step = abstract_iteration(config, cfg, mesh)
    state = step.update_args[0]
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.params, state.opt_state)))
    update = step.lower_update().compile()
    # Params and Adam moments are FSDP-sharded 4 ways: each device's arguments are far below the total.
    assert update.memory_analysis().argument_size_in_bytes < 0.5 * total
    step.lower_rollout().compile()


def test_bf16_step0_kl_and_ratios_are_exact_on_a_2x4_mesh(tmp_path):
    """The scoring pass and the loss are one program on a mesh too: with a zero optimizer step every
    ratio of both epochs is exactly 1 and the KL to the (equal) reference exactly 0."""
    from rlhf_jax.step.update import make_update
    config = mesh_config(2, 4)
    config.model.update(dtype="bfloat16", param_dtype="bfloat16")
    config.model.builtin.family = "llama"
    # The batch decode layout's bf16 log-probs differ from the scoring pass's (the tensor layout's
    # happened to agree here), which is what shows that the ratios come from the scoring pass.
    config.sampling.decode_layout = "batch"
    trainer = RLTrainer(config, str(tmp_path))
    trainer.optimizer = optax.set_to_zero()
    trainer.update_fn = make_update(config, policy_graphdef=trainer.policy_graphdef,
                                        ref_graphdef=trainer.ref_graphdef, eos_ids=trainer.eos_ids,
                                        optimizer=trainer.optimizer, mesh=trainer.mesh)
    _, metrics, _ = trainer.iteration(trainer.init_state())
    assert metrics["objective/kl"] == 0.0 and metrics["policy/approxkl_avg"] == 0.0
    assert metrics["sampling/sampling_logp_difference/max"] > 0  # while the sampler's differ


def test_grpo_groups_on_a_data8_mesh_match_one_device(tmp_path):
    """4 samples of each prompt are one group whatever the mesh: a GRPO iteration on data=8 (a group
    spans two devices; its prompt is run per row) and on (2, 1, 4) (each prompt once for its group,
    two prompts per batch shard) gives one device's metrics (prompts shared)."""
    from rlhf_jax.sampling.rollout import prompt_group

    def grpo(*shape):
        c = mesh_config(*shape)
        c.algorithm, c.train.num_generations = "grpo", 4
        # One minibatch step: its loss does not depend on the order of the rows (by groups where shared).
        c.rl.update(kl_in_loss=True, kl_loss_estimator="k3", num_mini_batches=1, num_ppo_epochs=1)
        return c
    _, _, one = one_iteration(grpo(1), tmp_path / "one")
    for shape, shared in (((8,), 1), ((2, 1, 4), 4)):
        trainer, _, metrics = one_iteration(grpo(*shape), tmp_path / "x".join(map(str, shape)))
        assert prompt_group(trainer.config, trainer.mesh) == shared
        for key in ("objective/scores", "reward/std", "frac_reward_zero_std", "loss", "completions/mean_length"):
            assert metrics[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), (shape, key)


def test_splash_attention_under_shard_map_equals_the_plain_attention(mesh_shape=(2, 2, 2)):
    """The fused kernel (Pallas interpret mode) on each device's rows (and, over "tensor", its KV
    heads), with the blocks scanned: the gradients of one device's plain attention."""
    from rlhf_jax.parallel.attention import splash_attention
    from rlhf_jax.parallel.sharding import batch_constraint

    seq = 128
    cfg = ModelConfig(family="llama", vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=64, max_position_embeddings=seq, qk_norm=True, scan_layers=True)
    graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 48, (8, seq)), jnp.int32)
    mask = jnp.ones_like(ids).at[::3, :30].set(0).at[1::3, 90:].set(0)
    readout = jnp.asarray(rng.normal(size=(32,)), jnp.float32)
    mesh = make_mesh(*mesh_shape)

    def loss(params, attend):
        hidden, _ = nnx.merge(graphdef, params).backbone(ids, mask, remat="full", attend=attend,
                                                         pins=Pins(residual=batch_constraint(mesh)))
        return jnp.sum(jnp.where(mask > 0, jnp.tanh(hidden) @ readout, 0.0))

    plain = jax.jit(jax.grad(loss), static_argnums=1)(params, None)
    fused = jax.jit(jax.grad(loss), static_argnums=1)(params, splash_attention(cfg, seq, mesh=mesh, interpret=True))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(fused)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * np.abs(np.asarray(a)).max())
