"""`scan_layers` (the blocks stacked and run under a scan) changes compile time, not results: logits,
gradients, decoding, HF import/export, LoRA adapters and a trainer iteration equal the unrolled model's."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlhf_jax.models import CausalLM, ModelConfig, gpt2_config, load_pretrained
from rlhf_jax.models.hf import export_tensors
from rlhf_jax.models.lora import TRAINABLE, load_adapters, merged_params, save_adapters, with_lora
from rlhf_jax.models.tree import flatten, per_layer
from rlhf_jax.sampling.generate import generate
from tests import common

# Every per-layer difference the scan must carry: a layer without RoPE, windowed layers at their own
# RoPE base, query/key norms, soft-capped logits.
CONFIGS = {
    "gpt2": gpt2_config(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, max_position_embeddings=64),
    "llama": ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                         head_dim=8, intermediate_size=64, max_position_embeddings=64, qk_norm=True,
                         nope_layers=(1,), tie_word_embeddings=False),
    "gemma3": ModelConfig(family="gemma3", vocab_size=64, hidden_size=32, num_layers=3, num_heads=4,
                          num_kv_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64,
                          qk_norm=True, sliding_window=3, sliding_layers=(0, 2), rope_local_theta=100.0,
                          final_softcap=5.0, query_pre_attn_scalar=6),
}


def _pair(cfg, lora=False):
    """The same model (same initial values) unrolled and scanned."""
    models = []
    for scan in (False, True):
        model = CausalLM(cfg.replace(scan_layers=scan), rngs=nnx.Rngs(0), value_head=True)
        models.append(with_lora(model, 4, 8.0, ("q_proj", "v_proj", "up_proj")) if lora else model)
    if lora:  # fresh adapters are drawn per leaf: give the scanned model the unrolled one's
        _copy_params(models[0], models[1], nnx.LoRAParam)
    return models


def _layered(state) -> dict:
    """A params state as flat per-layer numpy arrays (the unrolled model's keys)."""
    return {k: np.asarray(v) for k, v in per_layer(flatten(nnx.to_pure_dict(state))).items()}


def _copy_params(source, target, kind):
    from rlhf_jax.models.tree import stack_layers, unflatten
    flat = per_layer(flatten(nnx.to_pure_dict(nnx.state(source, kind))))
    state = nnx.state(target, kind)
    nnx.replace_by_pure_dict(state, unflatten(stack_layers(flat)))
    nnx.update(target, state)


def _assert_same(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], err_msg=str(key), **tol)


def _batch():
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 64, (2, 12)), jnp.int32)
    return ids, jnp.ones_like(ids).at[1, :4].set(0)


# GPT-2 (no RoPE) scanned is covered by the trainer iteration below (configs/tiny.py) and the HF test.
@pytest.mark.parametrize("name,lora", [("gemma3", False), ("llama", True)])
def test_scanned_logits_and_gradients_equal_the_unrolled_ones(name, lora):
    """Gradients with respect to the trainable params, remat off and on, at a few output positions."""
    ids, mask = _batch()
    unrolled, scanned = _pair(CONFIGS[name], lora)
    assert scanned.backbone.layers.mlp.up_proj.kernel.shape[0] == 3
    grads = {}
    for key, model in (("unrolled", unrolled), ("scanned", scanned)):
        graphdef, params, frozen = nnx.split(model, TRAINABLE if lora else nnx.Param, ...)

        def loss(params, remat):
            model = nnx.merge(graphdef, params, frozen)
            hidden, _ = model.backbone(ids, mask, output_index=slice(3, 11), remat=remat)
            return jnp.mean(model.logits(hidden) ** 2) + jnp.mean(model.values(hidden))

        for remat in ("none",) if key == "unrolled" else ("none", "full"):
            value, g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, remat)
            grads[key, remat] = (float(value), _layered(g))
    for remat in ("none", "full"):
        assert grads["scanned", remat][0] == pytest.approx(grads["unrolled", "none"][0], rel=1e-6)
        _assert_same(grads["unrolled", "none"][1], grads["scanned", remat][1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(unrolled(ids, mask)["logits"]), np.asarray(scanned(ids, mask)["logits"]),
                               rtol=1e-5, atol=1e-6)


def test_scanned_decoding_samples_what_the_unrolled_model_samples():
    """The KV cache stacked in the scan's carry: sampled tokens and their log-probs agree, in one
    decode loop or several."""
    ids, mask = _batch()
    outs = []
    for model in _pair(CONFIGS["gemma3"]):
        graphdef, params = nnx.split(model)
        for segments in (1, 3):  # the stacked cache read only as far as it is filled, too
            outs.append(generate(graphdef, params, ids, mask, jax.random.PRNGKey(3), max_new_tokens=6,
                                 temperature=1.0, top_k=20, with_values=True, decode_segments=segments))
    assert all(np.array_equal(outs[0]["response_ids"], out["response_ids"]) for out in outs[1:])
    for out in outs[2:]:
        np.testing.assert_allclose(np.asarray(out["logprobs"]), np.asarray(outs[0]["logprobs"]), rtol=1e-5, atol=1e-6)
    for key in ("logprobs", "values"):
        np.testing.assert_allclose(np.asarray(outs[0][key]), np.asarray(outs[1][key]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2"])
def test_hf_import_and_export_of_a_scanned_model(hf_checkpoints, left_padded_batch, name):
    ids, mask = left_padded_batch
    unrolled = load_pretrained(hf_checkpoints[name])
    scanned = load_pretrained(hf_checkpoints[name], scan_layers=True)
    assert scanned.cfg.scan_layers and scanned.backbone.layers.attn.q_proj.kernel.ndim == 3
    np.testing.assert_allclose(np.asarray(unrolled(ids, mask)["logits"]), np.asarray(scanned(ids, mask)["logits"]),
                               rtol=1e-5, atol=1e-6)
    exported = [export_tensors(nnx.state(m, nnx.Param), m.cfg) for m in (unrolled, scanned)]
    _assert_same(*exported, rtol=0, atol=0)


def test_lora_adapters_move_between_scanned_and_unrolled_models(tmp_path):
    """PEFT files written from a scanned model load into an unrolled one and back, the same adapters."""
    ids, mask = _batch()
    unrolled, scanned = _pair(CONFIGS["llama"], lora=True)
    state = nnx.state(scanned, nnx.LoRAParam)  # non-zero B, so that the adapters change the logits
    nnx.update(scanned, jax.tree.map(lambda x: x + 0.05, state))
    save_adapters(scanned, str(tmp_path / "from_scanned"))
    bases = _pair(CONFIGS["llama"])
    loaded_unrolled = load_adapters(bases[0], str(tmp_path / "from_scanned"))
    _assert_same(_layered(nnx.state(scanned, nnx.LoRAParam)), _layered(nnx.state(loaded_unrolled, nnx.LoRAParam)),
                 rtol=0, atol=0)
    save_adapters(loaded_unrolled, str(tmp_path / "from_unrolled"))
    loaded_scanned = load_adapters(bases[1], str(tmp_path / "from_unrolled"))
    _assert_same(_layered(nnx.state(scanned, nnx.LoRAParam)), _layered(nnx.state(loaded_scanned, nnx.LoRAParam)),
                 rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(loaded_unrolled(ids, mask)["logits"]),
                               np.asarray(scanned(ids, mask)["logits"]), rtol=1e-5, atol=1e-6)
    # The merged export (adapters folded into the base, as the trainer writes the final model).
    merged = [export_tensors(merged_params(m), m.cfg) for m in (loaded_unrolled, scanned)]
    _assert_same(*merged, rtol=1e-6, atol=1e-7)


def test_stacked_params_keep_the_layer_axis_whole():
    from rlhf_jax.parallel.sharding import make_mesh, spec_for
    mesh = make_mesh(1, 1, 1)
    shape = (3, 32, 64)
    assert spec_for(("backbone", "layers", "mlp", "up_proj", "kernel"), shape, mesh) == P(None, "fsdp", "tensor")
    assert spec_for(("backbone", "layers", 0, "mlp", "up_proj", "kernel"), shape[1:], mesh) == P("fsdp", "tensor")


def test_trainer_iteration_with_scanned_layers_equals_the_unrolled_one(tmp_path):
    """One PPO iteration of the tiny config (a value head, 4 minibatch steps; remat on) lands on the
    same params and metrics with the blocks scanned."""
    from rlhf_jax.run.trainer import RLTrainer

    def run(scan):
        config = common.config()
        config.logging.progress = False
        config.model.update(scan_layers=scan, remat="full")
        trainer = RLTrainer(config, str(tmp_path / str(scan)))
        state, metrics, _ = trainer.iteration(trainer.init_state())
        return _layered(state.params["policy"]), metrics

    plain, plain_metrics = run(False)
    scanned, scanned_metrics = run(True)
    # Adam divides by sqrt(v): where a gradient is ~0, float noise moves a step by up to the learning rate.
    _assert_same(plain, scanned, rtol=1e-4, atol=5e-5)
    for key in ("loss/policy_avg", "policy/entropy_avg", "objective/kl", "objective/scores"):
        assert scanned_metrics[key] == pytest.approx(plain_metrics[key], rel=1e-4, abs=1e-6)
