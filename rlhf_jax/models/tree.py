"""Pytree helpers shared by HF import/export, LoRA and the train state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def unflatten(flat: dict[tuple, Any]) -> dict:
    """{(a, b, c): x} -> {a: {b: {c: x}}}."""
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return nested


def cast_floats(tree, dtype):
    """`tree` with its floating-point leaves as `dtype` (no-op casts where they already are): what a
    forward pass sees of float32 master weights kept for a lower-precision model."""
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x

    return jax.tree.map(cast, tree)


def as_master(tree):
    """Floating-point leaves in float32: the weights an optimizer updates (a bf16 weight drops any
    update below half its ulp, as most RLHF-sized steps are)."""
    return cast_floats(tree, jnp.float32)


def flatten(tree: dict) -> dict[tuple, Any]:
    """{a: {b: {c: x}}} -> {(a, b, c): x} (the inverse of `unflatten`; None leaves are dropped)."""
    return {tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _in_layers(path: tuple) -> bool:
    return path[:2] == ("backbone", "layers") and len(path) > 2


def _stacked(path: tuple) -> bool:
    """A path into `scan_layers`' stacked blocks: ("backbone", "layers", <not a layer number>, ...)."""
    return _in_layers(path) and not str(path[2]).isdigit()


def per_layer(flat: dict[tuple, Any]) -> dict[tuple, Any]:
    """Flat params with `scan_layers`' stacked entries split into one per layer, keyed as the unstacked
    model keys them (("backbone", "layers", i, ...)); other entries pass through. Leaves are arrays
    or `jax.ShapeDtypeStruct`s."""
    out = {}
    for path, value in flat.items():
        if not _stacked(path):
            out[path] = value
            continue
        for i in range(value.shape[0]):
            one = (jax.ShapeDtypeStruct(value.shape[1:], value.dtype) if isinstance(value, jax.ShapeDtypeStruct)
                   else value[i])
            out[path[:2] + (i,) + path[2:]] = one
    return out


def stack_layers(flat: dict[tuple, Any], stack=None) -> dict[tuple, Any]:
    """The inverse of `per_layer`: per-layer entries ("backbone", "layers", i, ...) stacked on a new
    leading axis under ("backbone", "layers", ...), in layer order (`stack`: np.stack or jnp.stack)."""
    stack = stack or jnp.stack
    out, layers = {}, {}
    for path, value in flat.items():
        if _in_layers(path) and not _stacked(path):
            layers.setdefault(path[:2] + path[3:], {})[int(path[2])] = value
        else:
            out[path] = value
    for path, by_layer in layers.items():
        out[path] = stack([by_layer[i] for i in range(len(by_layer))])
    return out
