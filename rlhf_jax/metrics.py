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


class MetricWriter:
    """Writes one record per iteration to `workdir/metrics.jsonl` (and TensorBoard / W&B when enabled),
    and sample tables to `workdir/samples.jsonl`. Only process 0 writes."""

    def __init__(self, workdir: str, tensorboard: bool = True, wandb: bool = False, wandb_project: str = "",
                 config: dict | None = None, enabled: bool = True):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.samples_file = open(os.path.join(workdir, "samples.jsonl"), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
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
