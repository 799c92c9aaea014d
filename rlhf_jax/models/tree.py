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
