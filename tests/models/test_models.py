"""Our Flax models against transformers' PyTorch models (the reference)."""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import (
    CausalLM,
    CheckpointError,
    ModelConfig,
    gpt2_config,
    init_cache,
    load_pretrained,
    read_hf_config,
    save_pretrained,
)

torch = pytest.importorskip("torch")
import transformers as tf  # noqa: E402

CAUSAL = ["gpt2", "llama", "llama3_tied", "qwen2", "qwen3", "gemma3", "smollm3"]


def hf_logits(path, ids, mask, kind="causal_lm"):
    cls = tf.AutoModelForCausalLM if kind == "causal_lm" else tf.AutoModelForSequenceClassification
    model = cls.from_pretrained(path).eval()
    # transformers' generate derives position ids from the mask the same way.
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.numpy()


@pytest.mark.parametrize("name", CAUSAL)
def test_logits_match_transformers_left_padded(name, hf_checkpoints, left_padded_batch):
    ids, mask = left_padded_batch
    ours = load_pretrained(hf_checkpoints[name])
    logits = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask))["logits"])
    ref = hf_logits(hf_checkpoints[name], ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], ref[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_left_padding_equals_unpadded(name, hf_checkpoints, left_padded_batch):
    ids, mask = left_padded_batch
    model = load_pretrained(hf_checkpoints[name])
    padded = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))["logits"])[2, 7:]
    alone = np.asarray(model(jnp.asarray(ids[2:, 7:]), jnp.ones((1, 3), jnp.int32))["logits"])[0]
    np.testing.assert_allclose(padded, alone, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2_scalar", "llama_scalar", "gemma3_scalar"])
def test_scalar_model_matches_sequence_classification(name, hf_checkpoints, left_padded_batch):
    ids, mask = left_padded_batch
    ours = load_pretrained(hf_checkpoints[name], kind="scalar")
    per_token = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    # HF pools at the last non-pad token; with left padding that is the last column.
    ref = hf_logits(hf_checkpoints[name], ids, mask, kind="scalar")[:, 0]
    np.testing.assert_allclose(per_token[:, -1], ref, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours.sequence_scores(jnp.asarray(ids), jnp.asarray(mask))), ref, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "qwen2", "qwen3", "gemma3", "smollm3", "llama_scalar"])
def test_round_trip_through_transformers(name, hf_checkpoints, left_padded_batch, tmp_path):
    ids, mask = left_padded_batch
    kind = "scalar" if name.endswith("scalar") else "causal_lm"
    ours = load_pretrained(hf_checkpoints[name], kind=kind)
    save_pretrained(ours, str(tmp_path / "out"), hf_config=read_hf_config(hf_checkpoints[name]))
    again = hf_logits(str(tmp_path / "out"), ids, mask, kind)
    first = hf_logits(hf_checkpoints[name], ids, mask, kind)
    real = mask.astype(bool)
    if kind == "scalar":
        np.testing.assert_allclose(again, first, atol=1e-6)
    else:
        np.testing.assert_allclose(again[real], first[real], atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "qwen3", "gemma3_text", "smollm3"])
def test_builtin_model_exports_to_transformers(tmp_path, left_padded_batch, family):
    ids, mask = left_padded_batch
    if family == "gpt2":
        cfg = gpt2_config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=32)
    else:
        options = {"qwen3": dict(qk_norm=True), "smollm3": dict(nope_layers=(1,)),
                   "gemma3_text": dict(family="gemma3", qk_norm=True, sliding_window=3, sliding_layers=(0,),
                                       rope_local_theta=100.0, rope_scaling=(("factor", 2.0), ("rope_type", "linear")),
                                       query_pre_attn_scalar=6, final_softcap=3.0)}[family]
        cfg = ModelConfig(**{**dict(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                    num_kv_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=32,
                                    tie_word_embeddings=False), **options})
    model = CausalLM(cfg, rngs=nnx.Rngs(3))
    if cfg.qk_norm:  # norms start at one (or zero): make them differ, so that the export must carry them
        for layer in model.backbone.layers:
            layer.attn.q_norm.scale[...] = 1.0 + 0.1 * jnp.arange(8.0)
            layer.attn.k_norm.scale[...] = 1.0 - 0.05 * jnp.arange(8.0)
            if cfg.family == "gemma3":
                layer.attn_post_norm.scale[...] = 0.01 * jnp.arange(32.0)
    save_pretrained(model, str(tmp_path / "m"))
    assert read_hf_config(str(tmp_path / "m"))["model_type"] == family
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))["logits"])
    ref = hf_logits(str(tmp_path / "m"), ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_output_index_matches_full_forward(name, hf_checkpoints, left_padded_batch):
    # output_index prunes the last block to the selected positions.
    ids, mask = jnp.asarray(left_padded_batch[0]), jnp.asarray(left_padded_batch[1])
    model = load_pretrained(hf_checkpoints[name])
    full = np.asarray(model.backbone(ids, mask)[0])
    np.testing.assert_allclose(np.asarray(model.backbone(ids, mask, output_index=slice(2, 5))[0]),
                               full[:, 2:5], atol=1e-5)
    index = jnp.asarray(np.stack([np.arange(ids.shape[0]) % ids.shape[1], np.full(ids.shape[0], ids.shape[1] - 1)],
                                 axis=1))
    picked = np.asarray(model.backbone(ids, mask, output_index=index)[0])
    np.testing.assert_allclose(picked, np.take_along_axis(full, np.asarray(index)[..., None], axis=1), atol=1e-5)

@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen3", "gemma3", "smollm3"])
def test_kv_cache_decoding_matches_full_forward(name, hf_checkpoints, left_padded_batch):
    ids, mask = left_padded_batch
    model = load_pretrained(hf_checkpoints[name])
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))["logits"])
    prefix = 4
    cache = init_cache(model.cfg, ids.shape[0], ids.shape[1])
    out = model(jnp.asarray(ids[:, :prefix]), jnp.asarray(mask[:, :prefix]), cache)
    steps = [np.asarray(out["logits"])]
    cache = out["cache"]
    for t in range(prefix, ids.shape[1]):
        out = model(jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache)
        cache = out["cache"]
        steps.append(np.asarray(out["logits"]))
    decoded = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(decoded[real], full[real], atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3", "smollm3"])
def test_greedy_generate_equals_transformers_generate(name, hf_checkpoints, left_padded_batch):
    import jax
    from flax import nnx as _nnx

    from rlhf_jax.sampling.generate import generate
    ids, mask = left_padded_batch
    graphdef, params = _nnx.split(load_pretrained(hf_checkpoints[name]))
    # Both stop a row at the config's EOS and pad after it (transformers' min_new_tokens would instead
    # forbid the EOS, a different distribution).
    eos = read_hf_config(hf_checkpoints[name]).get("eos_token_id")
    ours = generate(graphdef, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0), max_new_tokens=16,
                    temperature=0.0, eos_ids=() if eos is None else (eos,), pad_id=0)
    model = tf.AutoModelForCausalLM.from_pretrained(hf_checkpoints[name]).eval()
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                             max_new_tokens=16, do_sample=False, pad_token_id=0)[:, ids.shape[1]:].numpy()
    ref = np.pad(ref, ((0, 0), (0, 16 - ref.shape[1])))  # every row ended before 16 tokens: pads
    np.testing.assert_array_equal(np.asarray(ours["response_ids"]), ref)


def test_sliding_window_configs_are_refused(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints["qwen3"], tmp_path / "m")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(use_sliding_window=True, sliding_window=4)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match="use_sliding_window"):
        load_pretrained(path)


@pytest.mark.parametrize("name,change,message", [
    ("gemma3", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0"),
    ("gemma3", dict(layer_types=["sliding_attention", "chunked_attention"]), "layer_types"),
    ("gemma3", dict(hidden_activation="silu"), "hidden_activation='silu'"),
    ("gemma3", dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 2.0}}), "rope_type='yarn'"),
    ("smollm3", dict(no_rope_layers=[1]), "no_rope_layers"),
])
def test_unimplemented_options_are_refused_by_name(hf_checkpoints, tmp_path, name, change, message):
    path = _copy(hf_checkpoints[name], tmp_path / "m")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(change)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_pretrained(path)


def test_value_head_starts_at_zero(hf_checkpoints, left_padded_batch):
    ids, mask = left_padded_batch
    model = load_pretrained(hf_checkpoints["gpt2"], value_head=True)
    out = model(jnp.asarray(ids), jnp.asarray(mask))
    assert out["values"].shape == ids.shape
    assert np.all(np.asarray(out["values"]) == 0)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_tensors(path, edit):
    from safetensors.numpy import load_file, save_file
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints["llama"], tmp_path / "m")
    _edit_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_pretrained(path)


def test_unexpected_tensor_is_named(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints["llama"], tmp_path / "m")
    _edit_tensors(path, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*model.layers.0.extra.weight"):
        load_pretrained(path)


def test_misshapen_tensor_is_named(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints["gpt2"], tmp_path / "m")
    _edit_tensors(path, lambda t: t.update({"transformer.wpe.weight": np.zeros((10, 32), np.float32)}))
    with pytest.raises(CheckpointError, match=r"misshapen tensor 'transformer.wpe.weight'.*\(64, 32\).*\(10, 32\)"):
        load_pretrained(path)


def test_unsupported_architecture_is_named(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints["llama"], tmp_path / "m")
    config_file = os.path.join(path, "config.json")
    config = json.load(open(config_file))
    config.update(model_type="falcon", architectures=["FalconForCausalLM"])
    json.dump(config, open(config_file, "w"))
    with pytest.raises(CheckpointError, match=r"unsupported architecture: model_type='falcon'"):
        load_pretrained(path)


def test_folder_without_weights_is_named(tmp_path):
    os.makedirs(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(str(tmp_path / "m"))


def test_bf16_compute_runs_and_stays_close(hf_checkpoints, left_padded_batch):
    ids, mask = left_padded_batch
    f32 = load_pretrained(hf_checkpoints["llama"])
    bf16 = load_pretrained(hf_checkpoints["llama"], dtype="bfloat16")
    a = np.asarray(f32(jnp.asarray(ids), jnp.asarray(mask))["logits"])
    b = np.asarray(bf16(jnp.asarray(ids), jnp.asarray(mask))["logits"])
    real = mask.astype(bool)
    assert np.abs(a[real] - b[real]).max() < 0.05


@pytest.mark.parametrize("name", ["gemma3", "smollm3"])
def test_lora_merged_export_and_adapter_names_fit_transformers(name, hf_checkpoints, left_padded_batch, tmp_path):
    import jax
    from safetensors.numpy import load_file

    from rlhf_jax.models.lora import save_adapters, with_lora
    ids, mask = left_padded_batch
    adapted = with_lora(load_pretrained(hf_checkpoints[name]), 2, 4.0, ("q_proj", "o_proj", "gate_proj", "down_proj"))
    nnx.update(adapted, jax.tree.map(lambda x: x + 0.05, nnx.state(adapted, nnx.LoRAParam)))
    save_pretrained(adapted, str(tmp_path / "merged"), hf_config=read_hf_config(hf_checkpoints[name]))
    ours = np.asarray(adapted(jnp.asarray(ids), jnp.asarray(mask))["logits"])
    real = mask.astype(bool)
    np.testing.assert_allclose(hf_logits(str(tmp_path / "merged"), ids, mask)[real], ours[real], atol=1e-4)
    # PEFT addresses adapters by the transformers module they wrap: each must exist in the HF model.
    save_adapters(adapted, str(tmp_path / "adapters"))
    modules = dict(tf.AutoModelForCausalLM.from_pretrained(hf_checkpoints[name]).named_modules())
    names = load_file(str(tmp_path / "adapters" / "adapter_model.safetensors"))
    wrapped = {n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for n in names}
    assert len(wrapped) == 2 * 4 and all(isinstance(modules[m], torch.nn.Linear) for m in wrapped)


def test_builtin_gemma3_windows_five_layers_in_six():
    from rlhf_jax.config import base_config
    from rlhf_jax.run.loading import builtin_model_config
    config = base_config()
    config.model.builtin.update(family="gemma3", num_layers=7, head_dim=32, sliding_window=4)
    cfg = builtin_model_config(config, vocab_size=50)
    assert (cfg.sliding_layers, cfg.sliding_window, cfg.head_dim, cfg.qk_norm) == ((0, 1, 2, 3, 4, 6), 4, 32, True)
    ids = jnp.ones((1, 6), jnp.int32)
    assert CausalLM(cfg, rngs=nnx.Rngs(0))(ids, ids)["logits"].shape == (1, 6, 50)


def test_missing_config_field_is_named(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints["gemma3"], tmp_path / "m")
    config = json.load(open(os.path.join(path, "config.json")))
    del config["intermediate_size"]
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="config.json of model_type='gemma3_text' has no field 'intermediate_size'"):
        load_pretrained(path)
