"""Orbax checkpoints of the train state: save every N iterations, keep the newest few, and
restore the newest one that reads back (a corrupt newest one is reported and set aside, never
overwritten or deleted)."""

from __future__ import annotations

import logging
import os
import time

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Save `state` (a pytree of arrays) and `meta` (JSON) as checkpoint `step` (async by default)."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state):
        """Restore the newest readable checkpoint onto `abstract_state`'s structure and shardings.

        Returns (step, state, meta), or None when there is no checkpoint. A checkpoint
        that fails to read is logged and renamed to `<step>.corrupt-<time>`, and the
        previous one is tried.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                return step, restored["state"], restored["meta"]
            except Exception as e:  # noqa: BLE001 - any failure to read means "not usable"
                path = os.path.join(self.directory, str(step))
                aside = f"{path}.corrupt-{int(time.time())}"
                log.warning("checkpoint %s could not be restored (%s: %s); moving it to %s and trying the "
                            "previous one", path, type(e).__name__, e, aside)
                if jax.process_index() == 0 and os.path.exists(path):
                    os.rename(path, aside)
                self.manager.reload()
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
