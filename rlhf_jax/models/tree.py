"""Nested-dict helpers shared by HF import/export and LoRA."""

from __future__ import annotations

from typing import Any


def unflatten(flat: dict[tuple, Any]) -> dict:
    """{(a, b, c): x} -> {a: {b: {c: x}}}."""
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return nested
