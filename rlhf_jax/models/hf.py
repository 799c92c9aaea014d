"""Hugging Face checkpoint import and export (config.json + safetensors, local folders only).

No pickle, no torch.load, no remote code: weights come in and go out as
safetensors. `load_pretrained` returns an NNX module; `save_pretrained` writes a
folder that `transformers.AutoModelForCausalLM` (or
`AutoModelForSequenceClassification` for a `ScalarModel`) loads.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.heads import CausalLM, ScalarModel
from rlhf_jax.models.lora import merged_params
from rlhf_jax.models.tree import flatten, per_layer, stack_layers, unflatten

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "smollm3", "gemma3_text")
# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


class CheckpointError(ValueError):
    """A checkpoint folder that does not match the architecture its config describes."""


def config_from_hf(hf: dict, dtype: str = "float32", param_dtype: str = "float32") -> ModelConfig:
    """Translate a transformers config.json dict into a ModelConfig, or raise naming what is unsupported
    (or missing)."""
    try:
        return _config_from_hf(hf, dtype, param_dtype)
    except KeyError as e:
        raise CheckpointError(f"config.json of model_type={hf.get('model_type')!r} has no field {e.args[0]!r}") from None


def _config_from_hf(hf: dict, dtype: str, param_dtype: str) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"unsupported architecture: model_type={model_type!r} (architectures={hf.get('architectures')}); "
            f"supported model types: {SUPPORTED_MODEL_TYPES}")
    common = dict(dtype=dtype, param_dtype=param_dtype, vocab_size=hf["vocab_size"],
                  tie_word_embeddings=hf.get("tie_word_embeddings", model_type == "gpt2"))
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"unsupported gpt2 activation_function={act!r} (only tanh-GELU 'gelu_new')")
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(key):
                raise CheckpointError(f"unsupported gpt2 option {key}=True")
        d = hf["n_embd"]
        return ModelConfig(
            family="gpt2", hidden_size=d, num_layers=hf["n_layer"], num_heads=hf["n_head"],
            num_kv_heads=hf["n_head"], head_dim=d // hf["n_head"],
            intermediate_size=hf.get("n_inner") or 4 * d, max_position_embeddings=hf["n_positions"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), qkv_bias=True, o_bias=True, mlp_bias=True, **common)
    if model_type != "gemma3_text":
        _refuse_sliding_windows(hf, model_type)
    heads = hf["num_attention_heads"]
    d = hf["hidden_size"]
    shape = dict(hidden_size=d, num_layers=hf["num_hidden_layers"], num_heads=heads,
                 num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or d // heads,
                 intermediate_size=hf["intermediate_size"], max_position_embeddings=hf["max_position_embeddings"],
                 norm_eps=hf.get("rms_norm_eps", 1e-6), **common)
    if model_type == "gemma3_text":
        return _gemma3_config(hf, shape)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"unsupported hidden_act={act!r} for {model_type} (only 'silu')")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta, scaling = _rope(rope, hf.get("rope_theta", 10000.0), ("default", "llama3"))
    nope = ()
    if model_type == "smollm3":  # no_rope_layers: 1 where a layer uses RoPE, 0 where it has none
        flags = hf.get("no_rope_layers") or [1] * shape["num_layers"]
        if len(flags) != shape["num_layers"] or set(flags) - {0, 1}:
            raise CheckpointError(f"unsupported smollm3 no_rope_layers={flags!r} (one 0 or 1 per layer)")
        nope = tuple(i for i, use in enumerate(flags) if not use)
    qkv_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
    return ModelConfig(
        family="llama", rope_theta=theta, rope_scaling=scaling, qkv_bias=qkv_bias,
        o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=model_type == "qwen3", nope_layers=nope, **shape)


def _rope(rope: dict, theta, supported: tuple[str, ...]) -> tuple[float, tuple | None]:
    """(base, scaling) from a transformers RoPE dict (rope_parameters or the older rope_scaling)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in supported:
        raise CheckpointError(f"unsupported rope_type={rope_type!r} (supported: {', '.join(map(repr, supported))})")
    keys = {"default": (), "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[rope_type]
    scaling = tuple(sorted([(k, rope[k]) for k in keys] + [("rope_type", rope_type)])) if keys else None
    return float(rope.get("rope_theta", theta)), scaling


def _gemma3_config(hf: dict, shape: dict) -> ModelConfig:
    """Gemma 3's text model (`gemma3_text`), refusing, by field, what is not implemented."""
    act = hf.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise CheckpointError(f"unsupported gemma3_text hidden_activation={act!r} (only 'gelu_pytorch_tanh')")
    if hf.get("attn_logit_softcapping"):  # Gemma 2's; Gemma 3 checkpoints leave it null
        raise CheckpointError(f"unsupported gemma3_text attn_logit_softcapping={hf['attn_logit_softcapping']!r}: "
                              "transformers' Gemma 3 does not apply it, so no result would match theirs")
    if hf.get("use_bidirectional_attention"):
        raise CheckpointError("unsupported gemma3_text option use_bidirectional_attention=True (causal LMs only)")
    layers = shape["num_layers"]
    pattern = hf.get("sliding_window_pattern", 6)
    types = hf.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                      for i in range(layers)]
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown or len(types) != layers:
        raise CheckpointError(f"unsupported gemma3_text layer_types={types!r} (one 'full_attention' or "
                              f"'sliding_attention' per layer)")
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    window = hf.get("sliding_window") or 0
    if sliding and window <= 0:
        raise CheckpointError(f"gemma3_text sliding_window={hf.get('sliding_window')!r} with sliding layers {sliding}")
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5: one dict per layer type
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:  # older config.json files
        full = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1e6)}
        local = {"rope_theta": hf.get("rope_local_base_freq", 1e4)}
    theta, scaling = _rope(full, 1e6, ("default", "linear"))
    local_theta, _ = _rope(local, 1e4, ("default",))
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family="gemma3", rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
        sliding_window=window if sliding else 0, sliding_layers=sliding, qk_norm=True, qkv_bias=bias, o_bias=bias,
        query_pre_attn_scalar=int(hf.get("query_pre_attn_scalar") or shape["head_dim"]),
        final_softcap=float(hf.get("final_logit_softcapping") or 0.0), **shape)


def _refuse_sliding_windows(hf: dict, model_type: str) -> None:
    """Every layer here attends to all earlier positions: a config that windows some layers is refused."""
    if hf.get("use_sliding_window"):
        raise CheckpointError(f"unsupported {model_type} option use_sliding_window=True (sliding-window attention)")
    windowed = [i for i, t in enumerate(hf.get("layer_types") or ()) if t != "full_attention"]
    if windowed:
        raise CheckpointError(f"unsupported {model_type} layer_types: layers {windowed} are not 'full_attention'")


def hf_config_from(cfg: ModelConfig, architecture: str = "causal_lm", extra: dict | None = None) -> dict:
    """A transformers config.json dict for a ModelConfig (for models we created ourselves)."""
    if cfg.family == "gpt2":
        hf: dict[str, Any] = dict(
            model_type="gpt2", n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
            n_inner=cfg.intermediate_size, n_positions=cfg.max_position_embeddings,
            layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
            attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, summary_first_dropout=0.0)
        arch = {"causal_lm": "GPT2LMHeadModel", "scalar": "GPT2ForSequenceClassification"}[architecture]
    elif cfg.family == "gemma3":
        hf = _gemma3_hf_config(cfg)
        arch = {"causal_lm": "Gemma3ForCausalLM", "scalar": "Gemma3TextForSequenceClassification"}[architecture]
    else:
        model_type = ("smollm3" if cfg.nope_layers else "qwen3" if cfg.qk_norm
                      else "qwen2" if cfg.qkv_bias and not cfg.o_bias else "llama")
        hf = dict(
            model_type=model_type, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
            rms_norm_eps=cfg.norm_eps, hidden_act="silu", mlp_bias=cfg.mlp_bias,
            rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"})
        if model_type != "qwen2":
            hf["attention_bias"] = cfg.qkv_bias
        if model_type in ("qwen3", "smollm3"):
            hf.update(use_sliding_window=False, layer_types=["full_attention"] * cfg.num_layers)
        if model_type == "smollm3":
            hf["no_rope_layers"] = [int(i not in cfg.nope_layers) for i in range(cfg.num_layers)]
        if cfg.rope_scaling:
            hf["rope_parameters"].update(dict(cfg.rope_scaling))
        prefix = {"qwen2": "Qwen2", "qwen3": "Qwen3", "smollm3": "SmolLM3"}.get(model_type, "Llama")
        arch = prefix + {"causal_lm": "ForCausalLM", "scalar": "ForSequenceClassification"}[architecture]
    hf.update(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_word_embeddings,
              architectures=[arch], dtype=cfg.param_dtype)
    if architecture == "scalar":
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    hf.update(extra or {})
    return hf


def _gemma3_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    full = {"rope_type": "default", "rope_theta": cfg.rope_theta, **dict(cfg.rope_scaling or ())}
    return dict(
        model_type="gemma3_text", hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps, hidden_activation="gelu_pytorch_tanh", attention_bias=cfg.qkv_bias,
        query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
        attn_logit_softcapping=None, final_logit_softcapping=cfg.final_softcap or None,
        sliding_window=cfg.sliding_window or cfg.max_position_embeddings, use_bidirectional_attention=False,
        layer_types=["sliding_attention" if i in cfg.sliding_layers else "full_attention"
                     for i in range(cfg.num_layers)],
        rope_parameters={"full_attention": full, "sliding_attention": {
            "rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}})


def _key_map(cfg: ModelConfig, kind: str) -> dict[tuple, tuple[str, str]]:
    """Our flat param path -> (HF tensor name, transform). Transforms: "" (as is), "T" (transpose),
    "qkv0|1|2" (a third of GPT-2's fused c_attn, split on the output axis)."""
    gpt2 = cfg.family == "gpt2"
    base = "transformer." if gpt2 else "model."
    m: dict[tuple, tuple[str, str]] = {
        ("backbone", "embed"): (base + ("wte.weight" if gpt2 else "embed_tokens.weight"), ""),
    }
    if gpt2:
        m[("backbone", "pos_embed")] = (base + "wpe.weight", "")
    norms = {"attn_norm": "ln_1", "mlp_norm": "ln_2"} if gpt2 else {
        "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    if cfg.family == "gemma3":  # its post_attention_layernorm normalises the attention's output
        norms = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                 "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}
    for i in range(cfg.num_layers):
        ours = ("backbone", "layers", i)
        theirs = f"{base}{'h' if gpt2 else 'layers'}.{i}."
        for norm, hf_norm in norms.items():
            m[ours + (norm, "scale")] = (theirs + hf_norm + ".weight", "")
            if gpt2:
                m[ours + (norm, "bias")] = (theirs + hf_norm + ".bias", "")
        if gpt2:
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                m[ours + ("attn", proj, "kernel")] = (theirs + "attn.c_attn.weight", f"qkv{j}")
                m[ours + ("attn", proj, "bias")] = (theirs + "attn.c_attn.bias", f"qkv{j}")
            linears = {("attn", "o_proj"): "attn.c_proj", ("mlp", "up_proj"): "mlp.c_fc",
                       ("mlp", "down_proj"): "mlp.c_proj"}
            for path, name in linears.items():
                m[ours + path + ("kernel",)] = (theirs + name + ".weight", "")
                m[ours + path + ("bias",)] = (theirs + name + ".bias", "")
        else:
            linears = {("attn", p): f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
            linears.update({("mlp", p): f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")})
            if cfg.qk_norm:
                for norm in ("q_norm", "k_norm"):
                    m[ours + ("attn", norm, "scale")] = (theirs + f"self_attn.{norm}.weight", "")
            for path, name in linears.items():
                m[ours + path + ("kernel",)] = (theirs + name + ".weight", "T")
                has_bias = {"q_proj": cfg.qkv_bias, "k_proj": cfg.qkv_bias, "v_proj": cfg.qkv_bias,
                            "o_proj": cfg.o_bias}.get(path[1], cfg.mlp_bias)
                if has_bias:
                    m[ours + path + ("bias",)] = (theirs + name + ".bias", "")
    m[("backbone", "final_norm", "scale")] = (base + ("ln_f.weight" if gpt2 else "norm.weight"), "")
    if gpt2:
        m[("backbone", "final_norm", "bias")] = (base + "ln_f.bias", "")
    if kind == "scalar":
        m[("score", "kernel")] = ("score.weight", "T")
    elif not cfg.tie_word_embeddings:
        m[("lm_head", "kernel")] = ("lm_head.weight", "T")
    return m


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(single):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"no model.safetensors or model.safetensors.index.json in {path!r} "
            "(only safetensors checkpoints are read; convert .bin files first)")
    tensors = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: listed in model.safetensors.index.json but missing")
        try:
            # "flax" keeps bf16 tensors as bf16 (numpy has no bf16).
            with safe_open(file, framework="flax") as f:
                for key in f.keys():
                    tensors[key] = np.asarray(f.get_tensor(key))
        except Exception as e:  # the safetensors reader's errors name neither the file nor the tensor
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    return tensors


def _transform_in(tensor: np.ndarray, how: str) -> np.ndarray:
    if how == "T":
        return tensor.T
    if how.startswith("qkv"):
        return np.split(tensor, 3, axis=-1)[int(how[3])]
    return tensor


def _flat_params(state) -> dict[tuple, Any]:
    return flatten(state if isinstance(state, dict) else nnx.to_pure_dict(state))


def read_hf_config(path: str) -> dict:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in {path!r}: not a Hugging Face model folder")
    with open(config_file) as f:
        try:
            config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    return config


def load_pretrained(path: str, *, kind: str = "causal_lm", value_head: bool = False,
                    dtype: str = "float32", param_dtype: str = "float32", scan_layers: bool = False, placement=None):
    """Load a local HF folder into a `CausalLM` (kind="causal_lm") or a `ScalarModel` (kind="scalar").

    Reads config.json and model.safetensors (or a sharded index). Every tensor
    is checked: a missing, unexpected or misshapen tensor raises CheckpointError naming it.
    Pass `read_hf_config(path)` to `save_pretrained` to carry the original config.json fields over.
    `placement(param path, shape) -> jax.sharding.Sharding`: each tensor goes from host memory straight
    to its shards, never whole onto one device (`rlhf_jax.parallel.sharding.param_placement(mesh)`:
    the partition rules). `scan_layers`: the blocks' weights stacked (`ModelConfig.scan_layers`).
    """
    hf = read_hf_config(path)
    cfg = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype).replace(scan_layers=scan_layers)
    tensors = _read_safetensors(path)
    build = (lambda: CausalLM(cfg, rngs=nnx.Rngs(0), value_head=value_head)) if kind == "causal_lm" else (
        lambda: ScalarModel(cfg, rngs=nnx.Rngs(0)))
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    expected = per_layer(_flat_params(state))
    key_map = _key_map(cfg, kind)
    used = set()
    loaded = {}
    for ours, shape in expected.items():
        if ours[0] == "value_head":  # not in HF checkpoints: starts at zero
            loaded[ours] = np.zeros(shape.shape, shape.dtype)
            continue
        hf_name, how = key_map[ours]
        if hf_name not in tensors:
            raise CheckpointError(f"missing tensor {hf_name!r} in {path!r} (needed for {'/'.join(map(str, ours))})")
        value = _transform_in(tensors[hf_name], how)
        if value.shape != shape.shape:
            raise CheckpointError(
                f"misshapen tensor {hf_name!r} in {path!r}: expected {tuple(shape.shape)} "
                f"(after transform {how or 'none'}), found {tuple(value.shape)}")
        used.add(hf_name)
        loaded[ours] = np.asarray(value).astype(shape.dtype)
    unexpected = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES)
                        and not (k == "lm_head.weight" and cfg.tie_word_embeddings))
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in {path!r}: {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}")
    loaded = stack_layers(loaded, np.stack) if cfg.scan_layers else loaded
    nnx.replace_by_pure_dict(state, unflatten({path: _place(value, path, placement) for path, value in loaded.items()}))
    return nnx.merge(graphdef, state)


def _place(value: np.ndarray, path: tuple, placement):
    if placement is None:
        return jnp.asarray(value)
    return jax.device_put(value, placement(path, value.shape))


def export_tensors(params, cfg: ModelConfig, kind: str = "causal_lm") -> dict[str, np.ndarray]:
    """Our params (an nnx.State or its pure dict) -> HF-named numpy tensors."""
    flat = per_layer(_flat_params(params))
    key_map = _key_map(cfg, kind)
    out: dict[str, np.ndarray] = {}
    qkv: dict[str, dict[int, np.ndarray]] = {}
    for ours, (hf_name, how) in key_map.items():
        value = np.asarray(jax.device_get(flat[ours]))
        if how == "T":
            out[hf_name] = np.ascontiguousarray(value.T)
        elif how.startswith("qkv"):
            qkv.setdefault(hf_name, {})[int(how[3])] = value
        else:
            out[hf_name] = value
    for hf_name, parts in qkv.items():
        out[hf_name] = np.concatenate([parts[0], parts[1], parts[2]], axis=-1)
    return out


def save_pretrained(model, path: str, *, hf_config: dict | None = None, params=None) -> None:
    """Write `model` (a CausalLM or ScalarModel; `params` overrides its weights) as an HF folder.

    The folder holds config.json and model.safetensors; transformers loads it with
    AutoModelForCausalLM (or AutoModelForSequenceClassification for a ScalarModel).
    A value head is not part of the HF format and is not written.
    """
    kind = "scalar" if isinstance(model, ScalarModel) else "causal_lm"
    cfg = model.cfg
    if params is None:
        if cfg.lora_rank:
            params = merged_params(model)  # adapters folded into the base weights
        else:
            params = nnx.state(model, nnx.Param)
    tensors = export_tensors(params, cfg, kind)
    # Keep the source's other fields (token ids, chat settings); ours win on the architecture. Without
    # a source, no token ids: transformers' defaults (SmolLM3's 128004, ...) may lie outside our vocabulary.
    no_tokens = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))
    config = {**no_tokens, **(hf_config or {}), **hf_config_from(cfg, kind)}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
