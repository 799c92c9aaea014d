"""Where metrics go: a JSONL file, TensorBoard event files, optionally Weights & Biases."""

from __future__ import annotations

import json
import logging
import math
import os

log = logging.getLogger(__name__)


def _plain(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


def drop_rows_after(path: str, step: int) -> int:
    """Keep the rows of a JSONL log whose "step" is at most `step` (a resumed run redoes the later
    ones); a torn last line from a crash goes too. Rewritten in place atomically. Returns rows dropped."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if row_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return dropped


class MetricWriter:
    """Writes one record per iteration to `workdir/metrics.jsonl` (and TensorBoard / W&B when enabled),
    and sample tables to `workdir/samples.jsonl`. Only process 0 writes. `resumed_at`: the step a
    resumed run restarts from; what the logs hold of later steps (written after that checkpoint, then
    lost with the run) is dropped, so each step appears once (TensorBoard hides them: purge_step)."""

    def __init__(self, workdir: str, tensorboard: bool = True, wandb: bool = False, wandb_project: str = "",
                 config: dict | None = None, enabled: bool = True, resumed_at: int = 0):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        paths = [os.path.join(workdir, name) for name in ("metrics.jsonl", "samples.jsonl")]
        if resumed_at:
            dropped = sum(drop_rows_after(path, resumed_at) for path in paths)
            if dropped:
                log.info("dropped %d log rows of steps after %d (the run resumes from there)", dropped, resumed_at)
        self.metrics_file = open(paths[0], "a")
        self.samples_file = open(paths[1], "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                    purge_step=resumed_at + 1 if resumed_at else None)
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                log.warning("logging.wandb is on but wandb is not installed: `pip install wandb`; skipping it")
            else:
                self.wandb = wandb_lib.init(project=wandb_project, config=config, dir=workdir)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, float(value), step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def write_samples(self, step: int, rows: list[dict]) -> None:
        if not self.enabled:
            return
        for row in rows:
            self.samples_file.write(json.dumps({"step": step, **row}) + "\n")
        self.samples_file.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics_file.close()
        self.samples_file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
