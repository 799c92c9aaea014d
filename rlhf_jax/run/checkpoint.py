"""Orbax checkpoints of the train state: save every N iterations, keep the newest few, and
restore the newest one that reads back.

A checkpoint that does not match the run (another model size, LoRA on or off, another optimizer:
its tree, shapes or dtypes differ from the run's state) stops the run with one line naming the
first difference, and nothing is renamed: running the config that wrote it resumes it. A damaged
checkpoint (unreadable, holding non-finite values, or not matching the checksums saved with it)
is set aside as `<step>.corrupt-<time>`,
never overwritten or deleted, and the previous one is tried.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from rlhf_jax.config import ConfigError
from rlhf_jax.parallel.sharding import path_keys

log = logging.getLogger(__name__)


class CheckpointMismatch(ConfigError):
    """A checkpoint written by a run whose state has another layout than this run's."""


def describe(tree) -> dict[tuple, tuple]:
    """{path of names: (shape, dtype)} of a state, an abstract state or Orbax's metadata of one."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[tuple(str(k) for k in path_keys(path))] = (tuple(leaf.shape), str(jnp.dtype(leaf.dtype)))
    return out


def first_difference(saved: dict, expected: dict) -> str | None:
    """The first path whose presence, shape or dtype differs, said in words; None when they match."""
    # Parameters first: "params/policy/backbone/embed" says more to a user than its Adam moment's path.
    for path in sorted(set(saved) | set(expected), key=lambda p: (p[:1] != ("params",), p)):
        name = "/".join(path)
        if path not in saved:
            return f"{name} is not in the checkpoint"
        if path not in expected:
            return f"the checkpoint has {name}, which this run does not"
        if saved[path] != expected[path]:
            (s_shape, s_dtype), (e_shape, e_dtype) = saved[path], expected[path]
            return f"{name} is {s_dtype}{list(s_shape)} there and {e_dtype}{list(e_shape)} here"
    return None


@jax.jit
def _fingerprints(leaves):
    def one(x):
        if jnp.dtype(x.dtype).itemsize == 4:
            words = jax.lax.bitcast_convert_type(x, jnp.uint32)
        elif jnp.dtype(x.dtype).itemsize == 2:
            words = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
        else:
            words = x.astype(jnp.uint32)
        words = words.reshape(-1)
        # An odd weight per position (wrapping mod 2^32): a change to any one word always shows, and
        # integer sums are exact in any order, so a sharded state gives the same number on any mesh.
        weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
        return jnp.sum(words * (weights | jnp.uint32(1)), dtype=jnp.uint32)
    return [one(x) for x in leaves]


def fingerprint(tree) -> list[int]:
    """One uint32 checksum per leaf of a state, computed on the devices: saved beside a checkpoint and
    compared after restoring it, so that a flipped byte that still reads as a number is caught."""
    return [int(v) for v in jax.device_get(_fingerprints(jax.tree.leaves(tree)))]


def is_finite(tree) -> bool:
    """Whether every floating-point value of a tree is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Save `state` (a pytree of arrays) and `meta` (JSON) as checkpoint `step` (async by default);
        the meta also carries the state's checksums (`fingerprint`)."""
        meta = {**meta, "checksums": fingerprint(state)}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state):
        """Restore the newest usable checkpoint onto `abstract_state`'s structure and shardings.

        Returns (step, state, meta), or None when there is no checkpoint. Raises CheckpointMismatch
        (renaming nothing) when the newest checkpoint was written for another state layout; sets a
        damaged one aside and tries the previous one.
        """
        expected = describe(abstract_state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            path = os.path.join(self.directory, str(step))
            try:
                saved = describe(self.manager.metadata(step).item_metadata["state"])
            except Exception as e:  # noqa: BLE001 - unreadable metadata means a damaged checkpoint
                self._set_aside(step, f"its metadata does not read ({type(e).__name__}: {e})")
                continue
            difference = first_difference(saved, expected)
            if difference:
                if "/layers/" in difference:  # the likely cause: one run stacked its blocks, the other did not
                    difference += "; model.scan_layers must be what it was when the checkpoint was written"
                raise CheckpointMismatch(
                    f"checkpoint {path} was written by a run with another model or state layout ({difference}); "
                    "it is left untouched: run the config that wrote it to resume, or use another --workdir")
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - matching metadata but unreadable data: damaged
                self._set_aside(step, f"it does not read ({type(e).__name__}: {e})")
                continue
            if not is_finite(restored["state"]):
                self._set_aside(step, "it holds non-finite values")
                continue
            saved_sums = restored["meta"].get("checksums")  # absent in checkpoints from before they were kept
            if saved_sums is not None and saved_sums != fingerprint(restored["state"]):
                self._set_aside(step, "its data does not match the checksums saved with it")
                continue
            return step, restored["state"], restored["meta"]
        return None

    def _set_aside(self, step: int, why: str) -> None:
        path = os.path.join(self.directory, str(step))
        aside = f"{path}.corrupt-{int(time.time())}"
        log.warning("checkpoint %s is damaged: %s; moving it to %s and trying the previous one", path, why, aside)
        if jax.process_index() == 0 and os.path.exists(path):
            os.rename(path, aside)
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
