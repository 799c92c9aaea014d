"""LoRA adapters on our models: add them, split them from the frozen base, merge them, save them
in the PEFT layout (adapter_config.json + adapter_model.safetensors) and load them back."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from rlhf_jax.models.heads import CausalLM
from rlhf_jax.models.tree import flatten, per_layer, stack_layers, unflatten

# What trains in a LoRA run: the adapters and a value head on the shared trunk.
TRAINABLE = nnx.Any(nnx.LoRAParam, nnx.PathContains("value_head"))


def with_lora(model: CausalLM, rank: int, alpha: float, targets, seed: int = 0) -> CausalLM:
    """A copy of `model` with LoRA adapters on `targets`, sharing the base weights' buffers."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be > 0, got {rank}")
    cfg = model.cfg.replace(lora_rank=rank, lora_alpha=float(alpha), lora_targets=tuple(targets))
    value_head = model.value_head is not None
    adapted = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(seed), value_head=value_head))
    graphdef, lora_state, rest = nnx.split(adapted, nnx.LoRAParam, ...)
    # Fresh adapters (A random, B zero) for the abstract LoRA leaves; the rest is the base model's.
    key = jax.random.PRNGKey(seed)
    flat = dict(nnx.to_flat_state(lora_state))
    fresh = {}
    for i, (path, var) in enumerate(sorted(flat.items())):
        shape, dtype = var.shape, var.dtype
        if path[-1] == "lora_a":
            fresh[path] = jax.random.normal(jax.random.fold_in(key, i), shape, dtype) / np.sqrt(shape[-2])
        else:
            fresh[path] = jnp.zeros(shape, dtype)
    nnx.replace_by_pure_dict(lora_state, unflatten(fresh))
    base_state = nnx.state(model)
    return nnx.merge(graphdef, lora_state, base_state)


def merged_params(model: CausalLM):
    """The base params with every adapter folded in (W + A @ B * alpha / rank), adapters dropped.

    Returns a pure dict of the base model's params (what `save_pretrained` writes).
    """
    cfg = model.cfg
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def fold(node):
        if isinstance(node, dict):
            if "lora_a" in node:
                node = dict(node)
                a, b = node.pop("lora_a"), node.pop("lora_b")
                if a is not None:
                    scale = cfg.lora_alpha / cfg.lora_rank
                    node["kernel"] = (node["kernel"] + (a @ b) * scale).astype(node["kernel"].dtype)
            return {k: fold(v) for k, v in node.items()}
        return node

    return fold(pure)


_GPT2_MODULES = {"o_proj": "attn.c_proj", "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}


def _hf_module(cfg, proj: str) -> str:
    """Our projection name -> the HF module suffix PEFT targets."""
    if cfg.family != "gpt2":
        return proj
    if proj not in _GPT2_MODULES:
        raise NotImplementedError(
            f"saving adapters on GPT-2's {proj} in the PEFT layout is not supported (GPT-2 fuses q/k/v into "
            "one c_attn module); use the merged export, or target o_proj / up_proj / down_proj")
    return _GPT2_MODULES[proj]


def _peft_name(cfg, layer: int, proj: str) -> str:
    group = ("self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp")
    if cfg.family == "gpt2":
        return f"base_model.model.transformer.h.{layer}.{_hf_module(cfg, proj)}"
    return f"base_model.model.model.layers.{layer}.{group}.{proj}"


def _adapter_items(cfg):
    for layer in range(cfg.num_layers):
        for proj in cfg.lora_targets:
            yield layer, ("attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"), proj


def save_adapters(model: CausalLM, path: str, base_model_name_or_path: str = "") -> None:
    """Write the adapters alone in the PEFT layout (lora_A: [r, in], lora_B: [out, r])."""
    cfg = model.cfg
    if not cfg.lora_rank:
        raise ValueError("this model has no LoRA adapters")
    flat = per_layer(flatten(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))))
    tensors = {}
    for layer, group, proj in _adapter_items(cfg):
        prefix = _peft_name(cfg, layer, proj)
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            value = np.asarray(flat[("backbone", "layers", layer, group, proj, ours)])
            tensors[f"{prefix}.{theirs}.weight"] = np.ascontiguousarray(value.T)
    targets = sorted(_hf_module(cfg, p) for p in cfg.lora_targets)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
              "lora_dropout": 0.0, "bias": "none", "target_modules": targets,
              "fan_in_fan_out": cfg.family == "gpt2", "base_model_name_or_path": base_model_name_or_path,
              "inference_mode": True}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})


def load_adapters(model: CausalLM, path: str, seed: int = 0) -> CausalLM:
    """`model` (without adapters) plus the PEFT adapters saved in `path` (by `save_adapters` or peft)."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    targets = config["target_modules"]
    if model.cfg.family == "gpt2":
        inverse = {v: k for k, v in _GPT2_MODULES.items()}
        unknown = [t for t in targets if t not in inverse]
        if unknown:
            raise ValueError(f"adapter target(s) {unknown} in {path!r} are not supported on GPT-2 "
                             f"(supported: {sorted(inverse)})")
        targets = [inverse[t] for t in targets]
    adapted = with_lora(model, config["r"], config["lora_alpha"], targets, seed)
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    lora_state = nnx.state(adapted, nnx.LoRAParam)
    flat = per_layer(flatten(nnx.to_pure_dict(lora_state)))
    for layer, group, proj in _adapter_items(adapted.cfg):
        prefix = _peft_name(adapted.cfg, layer, proj)
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            key = ("backbone", "layers", layer, group, proj, ours)
            name = f"{prefix}.{theirs}.weight"
            if name not in tensors:
                raise KeyError(f"missing adapter tensor {name!r} in {path!r}")
            value = tensors[name].T
            if value.shape != flat[key].shape:
                raise ValueError(f"misshapen adapter tensor {name!r} in {path!r}: expected "
                                 f"{tuple(flat[key].shape[::-1])}, found {tensors[name].shape}")
            flat[key] = jnp.asarray(value, flat[key].dtype)
    if adapted.cfg.scan_layers:
        flat = stack_layers(flat)
    nnx.replace_by_pure_dict(lora_state, unflatten(flat))
    nnx.update(adapted, lora_state)
    return adapted
