"""Command line of reward-model training.

    python -m rlhf_jax.train_reward --config=configs/reward_demo.py --workdir=runs/rm
"""

from __future__ import annotations

import json
import logging
import sys


def _main(argv):
    from absl import flags

    from rlhf_jax.config import ConfigError
    from rlhf_jax.reward_model import train_reward_model
    del argv
    try:
        metrics = train_reward_model(flags.FLAGS.config, flags.FLAGS.workdir)
    except (ConfigError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(metrics))


def run():
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a reward-model config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the exported model go.")
    flags.mark_flags_as_required(["config", "workdir"])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        app.run(_main)
    except (AttributeError, KeyError) as e:
        print(f"error: bad config override: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
