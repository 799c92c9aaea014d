"""The host loop of RL training: a trainer's iterations with checkpoints, metrics, samples, the
progress bar and preemption, resumed from the newest readable checkpoint of the workdir.

    trainer, state, history = train(config, workdir)

A workdir that already holds checkpoints is resumed from the newest readable one. SIGTERM (a TPU VM
preemption) saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Callable

import jax

from rlhf_jax.config import validate
from rlhf_jax.run.checkpoint import Checkpointer, is_finite
from rlhf_jax.run.metrics import MetricWriter
from rlhf_jax.run.runtime import initialize_distributed
from rlhf_jax.run.trainer import RLTrainer
from rlhf_jax.step.state import TrainState

log = logging.getLogger("rlhf_jax")


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between iterations."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint after this iteration, then exiting")
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)


def _save(checkpointer: Checkpointer, state: TrainState, trainer: RLTrainer, step: int) -> None:
    if not is_finite((state.params, state.opt_state)):
        raise FloatingPointError(f"iteration {step}: the parameters or optimizer state are not finite; "
                                 "not saving a checkpoint")
    checkpointer.save(step, state, {"step": step, "data": trainer.iterator.state()})


def train(config, workdir: str, extra_metrics: dict[str, Callable] | None = None, num_iterations: int | None = None,
          progress_desc: str | None = None) -> tuple[RLTrainer, TrainState, list[dict]]:
    """Run (or resume) RL (`config.algorithm`) in `workdir`. Returns the trainer, the final state and every
    iteration's metrics. `progress_desc`: the progress bar's label (default: the algorithm's name).

    `num_iterations` stops early (after that many iterations in total) without changing the schedule.
    """
    if config.mesh.distributed:
        # One process per host (TPU pods, multi-node GPU), joined before anything starts JAX's backend.
        validate(config)
        initialize_distributed(config.mesh)
    os.makedirs(workdir, exist_ok=True)
    trainer = RLTrainer(config, workdir, extra_metrics)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint.max_to_keep,
                                config.checkpoint.async_save)
    state = trainer.init_state()
    restored = checkpointer.restore_latest(state)
    if restored is not None:
        step, state, meta = restored
        log.info("resumed from checkpoint %d in %s", step, checkpointer.directory)
        if trainer.reference_score_stats is not None and float(state.score_stats[0]) == 0:
            # Saved before the reference statistics were kept in the state: the measurement is
            # deterministic, so the one just made is the one that run used.
            state = state.replace(score_stats=jax.device_put(trainer.reference_score_stats,
                                                             state.score_stats.sharding))
    start = int(state.step)
    is_main = jax.process_index() == 0
    if is_main:
        with open(os.path.join(workdir, f"config.step{start}.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    writer = MetricWriter(workdir, config.logging.tensorboard, config.logging.wandb, config.logging.wandb_project,
                          config.to_dict(), enabled=is_main, resumed_at=start)
    end = min(num_iterations or config.train.num_iterations, config.train.num_iterations)
    history = []
    bar = None
    if is_main and config.logging.progress:
        from tqdm import tqdm
        bar = tqdm(total=end, initial=start, dynamic_ncols=True,
                   desc=progress_desc or {"reinforce_pp": "REINFORCE++"}.get(config.algorithm, config.algorithm.upper()))
    try:
        with _Preemption() as preemption:
            for it in range(start, end):
                samples_every = config.logging.samples_every
                want_samples = bool(samples_every) and (it % samples_every == 0 or it == end - 1)
                state, metrics, samples = trainer.iteration(state, want_samples=want_samples)
                step = it + 1
                writer.write(step, metrics)
                if samples:
                    writer.write_samples(step, samples)
                history.append(metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
                every = config.checkpoint.every
                # SIGTERM may reach one host only: all stop after the same iteration, or the others would
                # wait in the next iteration's collectives while this one saves.
                stop = trainer.any_host(preemption.requested)
                if stop or (every and step % every == 0) or step == end:
                    _save(checkpointer, state, trainer, step)
                if stop:
                    log.warning("stopped after iteration %d for SIGTERM; checkpoint saved", step)
                    break
    finally:
        if bar is not None:
            bar.close()
        checkpointer.close()
        writer.close()
    return trainer, state, history
